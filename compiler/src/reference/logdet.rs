//! Log-determinant estimators of a block's `ln det(I + J_g)`.

use nalgebra::DMatrix;

use super::Reference;

pub use iresnetc_runtime::logdet::{draw, survival, LogDetMethod};

/// The reference's evaluation of a [`LogDetMethod`] on one block.
pub trait BlockLogDet {
    /// `ln det(I + J_g)` of block `b` at its input `x`, for the `sample`-th sample of the array.
    fn block_logdet(&self, r: &Reference<'_>, b: usize, sample: usize, x: &[f64]) -> f64;
}

impl BlockLogDet for LogDetMethod {
    fn block_logdet(&self, r: &Reference<'_>, b: usize, sample: usize, x: &[f64]) -> f64 {
        match *self {
            Self::None => 0.0,
            Self::Exact => exact_block_logdet(r, b, x),
            Self::Series { probes, .. } | Self::Roulette { probes, .. } => {
                let weights = self.term_weights(b, sample);
                hutchinson(r, b, sample, x, &weights, probes, self)
            }
        }
    }
}

/// Hutchinson estimate of `sum_k weights[k-1] (-1)^(k+1) tr(J^k) / k`, averaged over probes.
fn hutchinson(
    r: &Reference<'_>,
    b: usize,
    sample: usize,
    x: &[f64],
    weights: &[f64],
    probes: usize,
    method: &LogDetMethod,
) -> f64 {
    let (_, inputs) = r.branch(b, x);
    let mut total = 0.0;
    for p in 0..probes {
        let v = method.probe(b, sample, p, x.len());
        let mut w = v.clone();
        for (k0, wt) in weights.iter().enumerate() {
            let k = k0 + 1;
            w = r.branch_vjp(b, &inputs, &w);
            let t: f64 = w.iter().zip(&v).map(|(a, b)| a * b).sum();
            let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
            total += sign * wt * t / k as f64;
        }
    }
    total / probes as f64
}

/// Largest dimension the exact estimator accepts (a d x d Jacobian, d vjps and an LU).
pub const EXACT_MAX_DIM: usize = 4096;

/// The full Jacobian `J_g` at x, row i = `e_i^T J`.
pub fn block_jacobian(r: &Reference<'_>, b: usize, x: &[f64]) -> DMatrix<f64> {
    let d = x.len();
    let (_, inputs) = r.branch(b, x);
    let mut j = DMatrix::zeros(d, d);
    let mut e = vec![0.0; d];
    for i in 0..d {
        e[i] = 1.0;
        let row = r.branch_vjp(b, &inputs, &e);
        e[i] = 0.0;
        for (c, v) in row.iter().enumerate() {
            j[(i, c)] = *v;
        }
    }
    j
}

/// `ln|det(I + J_g(x))|`.
pub fn exact_block_logdet(r: &Reference<'_>, b: usize, x: &[f64]) -> f64 {
    let j = block_jacobian(r, b, x);
    let d = j.nrows();
    let lu = (DMatrix::identity(d, d) + j).lu();
    // Sum of log|u_ii| rather than ln|det|: the determinant itself can overflow.
    lu.u().diagonal().iter().map(|v| v.abs().ln()).sum()
}

/// The series with exact traces: `sum_{k<=terms} (-1)^(k+1) tr(J^k) / k`.
pub fn series_exact_traces(r: &Reference<'_>, b: usize, x: &[f64], terms: usize) -> f64 {
    let j = block_jacobian(r, b, x);
    let mut p = j.clone();
    let mut s = 0.0;
    for k in 1..=terms {
        let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
        s += sign * p.trace() / k as f64;
        p = &p * &j;
    }
    s
}
