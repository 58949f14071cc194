//! The native CPU backend: the f32 engine of [`crate::cpu`] behind the [`Backend`] trait.
//! Unlike the GPU, it stops each block's inverse once the model's tolerance holds (the
//! certified count is the cap) and reports the iterations and residual per block.

use std::path::Path;

use crate::cpu::engine::{InverseReport, LogDetRequest};
use crate::cpu::CpuEngine;
use crate::engine::{
    require_kind, Backend, BackendInfo, Batch, BlockInversion, Decoded, Encoded, ModelInfo,
    Precision, Prior,
};
use crate::error::{Result, RuntimeError};
use crate::logdet::LogDetMethod;
use crate::plan::ModelKind;

pub struct CpuBackend {
    engine: CpuEngine,
    info: ModelInfo,
}

impl CpuBackend {
    /// An engine and the model description it runs (from a bundle's plan, or the compiler).
    pub fn new(engine: CpuEngine, info: ModelInfo) -> Result<CpuBackend> {
        if engine.input_dim() != info.input_dim() {
            return Err(RuntimeError::corrupt(
                crate::cpu::net::NET_FILE,
                format!(
                    "input of {} values contradicts plan.json's {:?}",
                    engine.input_dim(),
                    info.input_shape
                ),
            ));
        }
        Ok(CpuBackend { engine, info })
    }

    /// A compiled bundle: `net.json`, the weights and `plan.json`'s model description, every
    /// file checked against the plan's hashes.
    pub fn open_bundle(dir: &Path) -> Result<CpuBackend> {
        let plan = crate::bundle::load_plan(dir)?;
        let info = plan.info.clone().ok_or_else(|| {
            RuntimeError::corrupt(
                dir.join(crate::plan::PLAN_FILE),
                "no `info` section: recompile the bundle with `iresnetc compile`",
            )
        })?;
        CpuBackend::new(CpuEngine::open_bundle(dir)?, info)
    }

    pub fn engine(&mut self) -> &mut CpuEngine {
        &mut self.engine
    }
}

fn decoded(x: Vec<f32>, batch: usize, rep: InverseReport) -> Decoded {
    let converged = Some(rep.converged());
    Decoded {
        x: Batch::from_f32(&x, batch),
        blocks: rep
            .blocks
            .into_iter()
            .map(|b| BlockInversion {
                block: b.name,
                iters: b.iters,
                residual: b.residual,
            })
            .collect(),
        converged,
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "cpu",
            device: format!("CPU, {} threads", self.engine.threads()),
            precision: Precision::F32,
        }
    }

    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn prior(&self) -> Result<Prior> {
        let (mean, log_std) = self
            .engine
            .prior
            .clone()
            .ok_or_else(|| RuntimeError::Unsupported("a classifier has no prior".into()))?;
        Ok(Prior { mean, log_std })
    }

    fn encode(&mut self, x: &Batch, logdet: &LogDetMethod, first_sample: usize) -> Result<Encoded> {
        require_kind(&self.info, ModelKind::Flow, "encode")?;
        let xs = x.to_f32("input")?;
        let req = LogDetRequest::from_method(logdet, first_sample);
        let (z, ld) = self.engine.encode(&xs, x.batch, req.as_ref())?;
        Ok(Encoded {
            z: Batch::from_f32(&z, x.batch),
            logdet: req.is_some().then_some(ld),
        })
    }

    fn decode(&mut self, z: &Batch) -> Result<Decoded> {
        require_kind(&self.info, ModelKind::Flow, "decode")?;
        let zs = z.to_f32("z")?;
        let (x, rep) = self.engine.decode(&zs, z.batch)?;
        Ok(decoded(x, z.batch, rep))
    }

    fn classify(&mut self, x: &Batch) -> Result<Batch> {
        require_kind(&self.info, ModelKind::Classifier, "classify")?;
        let xs = x.to_f32("input")?;
        let l = self.engine.classify(&xs, x.batch)?;
        Ok(Batch::from_f32(&l, x.batch))
    }
}
