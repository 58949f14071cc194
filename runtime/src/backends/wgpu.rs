//! The wgpu backend: a bundle's WGSL kernels on one adapter, each direction one submission.
//! The inverse runs the certified iteration count with no read-back inside, so it reports no
//! per-block convergence.

use crate::bundle::Bundle;
use crate::device::GpuDevice;
use crate::engine::{
    require_kind, Backend, BackendInfo, Batch, Decoded, Encoded, ModelInfo, Precision, Prior,
};
use crate::error::{Result, RuntimeError};
use crate::executor::{GpuExecutor, Outputs};
use crate::logdet::{LogDetLayout, LogDetMethod};
use crate::plan::entries::{CLASSIFY, ENCODE, INVERSE};
use crate::plan::ModelKind;

pub struct WgpuBackend {
    ex: GpuExecutor,
    info: ModelInfo,
    layout: Option<LogDetLayout>,
    prior: Option<Prior>,
    adapter: String,
}

fn take(out: &mut Outputs, name: &str) -> Result<Vec<f32>> {
    out.remove(name)
        .ok_or_else(|| RuntimeError::corrupt(crate::plan::PLAN_FILE, format!("no output {name:?}")))
}

impl WgpuBackend {
    /// Builds every pipeline of `bundle` on `gpu` and uploads its weights.
    pub fn new(gpu: &GpuDevice, bundle: &Bundle) -> Result<WgpuBackend> {
        let info = super::bundle_info(bundle)?;
        let prior = if info.is_flow() {
            Some(super::bundle_prior(bundle, &info)?)
        } else {
            None
        };
        Ok(WgpuBackend {
            ex: GpuExecutor::new(gpu, bundle)?,
            layout: bundle.plan.logdet.clone(),
            info,
            prior,
            adapter: gpu.adapter().to_string(),
        })
    }

    pub fn executor(&mut self) -> &mut GpuExecutor {
        &mut self.ex
    }
}

impl Backend for WgpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "wgpu",
            device: self.adapter.clone(),
            precision: Precision::F32,
        }
    }

    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn prior(&self) -> Result<Prior> {
        self.prior
            .clone()
            .ok_or_else(|| RuntimeError::Unsupported("a classifier has no prior".into()))
    }

    fn encode(&mut self, x: &Batch, logdet: &LogDetMethod, first_sample: usize) -> Result<Encoded> {
        require_kind(&self.info, ModelKind::Flow, "encode")?;
        let xs = x.to_f32("input")?;
        let b = x.batch;
        if matches!(logdet, LogDetMethod::None) {
            let mut out = self.ex.run(ENCODE, b, &[("x", &xs)])?;
            return Ok(Encoded {
                z: Batch::from_f32(&take(&mut out, "z")?, b),
                logdet: None,
            });
        }
        let layout = self.layout.as_ref().ok_or_else(|| {
            RuntimeError::corrupt(
                crate::plan::PLAN_FILE,
                "a flow plan without a log-det layout",
            )
        })?;
        let Some((entry, coef)) = layout.coefs_for(logdet, first_sample, b)? else {
            return Err(RuntimeError::Unsupported(
                "the exact log-det does not run on the wgpu backend; use --estimator series or roulette (or --backend reference)".into(),
            ));
        };
        let probes = layout.probes_for(logdet, first_sample, b);
        let mut out = self.ex.run(
            entry,
            b,
            &[("x", &xs), ("probes", &probes), ("coef", &coef)],
        )?;
        let ld = take(&mut out, "logdet")?;
        Ok(Encoded {
            z: Batch::from_f32(&take(&mut out, "z")?, b),
            logdet: Some(ld.iter().map(|&v| f64::from(v)).collect()),
        })
    }

    fn decode(&mut self, z: &Batch) -> Result<Decoded> {
        require_kind(&self.info, ModelKind::Flow, "decode")?;
        let zs = z.to_f32("z")?;
        let mut out = self.ex.run(INVERSE, z.batch, &[("z", &zs)])?;
        Ok(Decoded {
            x: Batch::from_f32(&take(&mut out, "x")?, z.batch),
            blocks: vec![],
            converged: None,
        })
    }

    fn classify(&mut self, x: &Batch) -> Result<Batch> {
        require_kind(&self.info, ModelKind::Classifier, "classify")?;
        let xs = x.to_f32("input")?;
        let mut out = self.ex.run(CLASSIFY, x.batch, &[("x", &xs)])?;
        Ok(Batch::from_f32(&take(&mut out, "logits")?, x.batch))
    }
}
