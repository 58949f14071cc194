//! Classifier head pieces: eval-form batch norm and global average pooling.

use super::p;
use crate::ops::actnorm::spatial;
use crate::tensor::Params;

/// The affine `(scale, shift)` per channel that an eval-form batch norm is.
pub fn batchnorm_affine(name: &str, params: &Params, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let (w, b) = (p(params, name, "weight"), p(params, name, "bias"));
    let (m, v) = (
        p(params, name, "running_mean"),
        p(params, name, "running_var"),
    );
    let scale: Vec<f64> = w.iter().zip(v).map(|(w, v)| w / (v + eps).sqrt()).collect();
    let shift = b
        .iter()
        .zip(m)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

pub fn batchnorm(name: &str, params: &Params, eps: f64, x: &[f64], shape: &[usize]) -> Vec<f64> {
    let (scale, shift) = batchnorm_affine(name, params, eps);
    let hw = spatial(shape);
    x.iter()
        .enumerate()
        .map(|(i, &v)| v * scale[i / hw] + shift[i / hw])
        .collect()
}

pub fn pool_shape(s: &[usize]) -> Result<Vec<usize>, String> {
    if s.len() != 3 {
        return Err(format!("global average pool needs [C, H, W], got {s:?}"));
    }
    Ok(vec![s[0]])
}

pub fn global_avg_pool(x: &[f64], s: &[usize]) -> Vec<f64> {
    let hw = s[1] * s[2];
    x.chunks(hw)
        .map(|c| c.iter().sum::<f64>() / hw as f64)
        .collect()
}
