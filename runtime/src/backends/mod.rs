//! The [`crate::Backend`] implementations that live in the runtime crate: each runs a compiled
//! bundle without the compiler.
//!
//! - [`wgpu::WgpuBackend`]: the bundle's WGSL kernels on a wgpu adapter.
//! - [`cpu::CpuBackend`]: the native f32 engine (`net.json`) on the CPU's cores.
//! - [`tract::TractBackend`]: the bundle's ONNX graphs on tract (CPU).

pub mod cpu;
pub mod tract;
pub mod wgpu;

use crate::bundle::Bundle;
use crate::engine::{ModelInfo, Prior};
use crate::error::{Result, RuntimeError};

/// The model description a bundle carries (`plan.json`'s `info`).
pub fn bundle_info(bundle: &Bundle) -> Result<ModelInfo> {
    bundle.plan.info.clone().ok_or_else(|| {
        RuntimeError::corrupt(
            crate::plan::PLAN_FILE,
            "no `info` section (a bundle from an older iresnetc): recompile it with `iresnetc compile`",
        )
    })
}

/// The prior of a flow bundle, from its weights; checked against the latent dimension.
pub fn bundle_prior(bundle: &Bundle, info: &ModelInfo) -> Result<Prior> {
    let get = |name: &str| -> Result<Vec<f64>> {
        let t = bundle.weights.get(name).ok_or_else(|| {
            RuntimeError::corrupt(crate::plan::WEIGHTS_FILE, format!("no tensor {name:?}"))
        })?;
        if t.data.len() != info.output_dim {
            return Err(RuntimeError::corrupt(
                crate::plan::WEIGHTS_FILE,
                format!(
                    "tensor {name:?} has {} values, the latent dimension is {}",
                    t.data.len(),
                    info.output_dim
                ),
            ));
        }
        Ok(t.data.iter().map(|&v| f64::from(v)).collect())
    };
    Ok(Prior {
        mean: get("prior.mean")?,
        log_std: get("prior.log_std")?,
    })
}
