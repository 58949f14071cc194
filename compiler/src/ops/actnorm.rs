//! ActNorm: per-channel affine with a closed-form inverse and a constant log-det.

use super::p;
use crate::tensor::Params;

/// Elements per channel of a per-sample shape (`H*W` for images, 1 for vectors).
pub fn spatial(shape: &[usize]) -> usize {
    shape.iter().skip(1).product::<usize>().max(1)
}

pub fn forward(name: &str, params: &Params, x: &[f64], shape: &[usize]) -> Vec<f64> {
    let (ls, b) = (p(params, name, "log_scale"), p(params, name, "bias"));
    let hw = spatial(shape);
    x.iter()
        .enumerate()
        .map(|(i, &v)| v * ls[i / hw].exp() + b[i / hw])
        .collect()
}

pub fn inverse(name: &str, params: &Params, y: &[f64], shape: &[usize]) -> Vec<f64> {
    let (ls, b) = (p(params, name, "log_scale"), p(params, name, "bias"));
    let hw = spatial(shape);
    y.iter()
        .enumerate()
        .map(|(i, &v)| (v - b[i / hw]) * (-ls[i / hw]).exp())
        .collect()
}

/// `H*W*sum(log_scale)`.
pub fn logdet(name: &str, params: &Params, shape: &[usize]) -> f64 {
    spatial(shape) as f64 * p(params, name, "log_scale").iter().sum::<f64>()
}
