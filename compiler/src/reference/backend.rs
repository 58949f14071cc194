//! The f64 reference executor as a [`Backend`]: the oracle, run the same way as every other
//! backend (`--backend reference`).

use iresnetc_runtime::engine::require_kind;
use iresnetc_runtime::{
    Backend, BackendInfo, Batch, BlockInversion, Decoded, Encoded, ModelInfo, ModelKind, Precision,
    Prior, RuntimeError,
};

use super::{LogDetMethod, Reference};
use crate::pipeline::Model;

pub struct ReferenceBackend {
    model: Model,
    info: ModelInfo,
}

impl ReferenceBackend {
    pub fn new(model: Model) -> ReferenceBackend {
        let info = model.info();
        ReferenceBackend { model, info }
    }

    pub fn graph_model(&self) -> &Model {
        &self.model
    }
}

fn rows(b: &Batch) -> Vec<Vec<f64>> {
    b.rows().map(|r| r.to_vec()).collect()
}

fn lift(e: crate::Error) -> RuntimeError {
    RuntimeError::Backend(e.to_string())
}

impl Backend for ReferenceBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "reference",
            device: format!("CPU, {} threads", cpu_threads()),
            precision: Precision::F64,
        }
    }

    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn prior(&self) -> iresnetc_runtime::Result<Prior> {
        require_kind(&self.info, ModelKind::Flow, "a prior")?;
        let p = &self.model.graph.params;
        let get = |n: &str| {
            p.get(n)
                .map(|t| t.data.clone())
                .ok_or_else(|| RuntimeError::Backend(format!("weights have no tensor {n:?}")))
        };
        Ok(Prior {
            mean: get("prior.mean")?,
            log_std: get("prior.log_std")?,
        })
    }

    fn encode(
        &mut self,
        x: &Batch,
        logdet: &LogDetMethod,
        first_sample: usize,
    ) -> iresnetc_runtime::Result<Encoded> {
        require_kind(&self.info, ModelKind::Flow, "encode")?;
        let r = Reference::new(&self.model.graph);
        let out = r
            .forward_from(&rows(x), logdet, first_sample)
            .map_err(lift)?;
        Ok(Encoded {
            z: Batch::from_rows(&out.outputs),
            logdet: (!matches!(logdet, LogDetMethod::None)).then_some(out.logdet),
        })
    }

    fn decode(&mut self, z: &Batch) -> iresnetc_runtime::Result<Decoded> {
        require_kind(&self.info, ModelKind::Flow, "decode")?;
        let r = Reference::new(&self.model.graph);
        let (x, stats) = r.inverse(&rows(z)).map_err(lift)?;
        Ok(Decoded {
            x: Batch::from_rows(&x),
            blocks: self
                .info
                .blocks
                .iter()
                .zip(stats.block_iters.iter().zip(&stats.block_residuals))
                .map(|(name, (&iters, &residual))| BlockInversion {
                    block: name.clone(),
                    iters,
                    residual,
                })
                .collect(),
            converged: Some(stats.converged),
        })
    }

    fn classify(&mut self, x: &Batch) -> iresnetc_runtime::Result<Batch> {
        require_kind(&self.info, ModelKind::Classifier, "classify")?;
        let r = Reference::new(&self.model.graph);
        let out = r.forward(&rows(x), &LogDetMethod::None).map_err(lift)?;
        Ok(Batch::from_rows(&out.outputs))
    }
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
