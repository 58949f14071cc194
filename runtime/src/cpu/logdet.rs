//! Per-block `ln det(I + J_g)`: the Hutchinson series (truncated or Russian roulette) through
//! the chain of vector-Jacobian products, and the exact value for small dimensions.
//!
//! The vjp of g runs its layers backwards: a linear layer applies its adjoint (transposed
//! convolution), an activation multiplies by the derivative mask the forward pass stored. Probes
//! and roulette draws come from [`crate::rng`] keyed by (block, sample index, probe), exactly as
//! the reference executor and the tract backend draw them, so one seed gives one estimate.

use rayon::prelude::*;

use super::act::mul_mask;
use super::conv::grow;
use super::engine::{BLayer, Block, CpuEngine, LogDetRequest};
use super::net::{EstimatorKind, ProbeKind};
use super::pool::Workspace;
use crate::error::Result;
use crate::rng::probe_values;

/// Largest block dimension the exact estimator accepts: it keeps a d x d f64 Jacobian per
/// sample and runs d vjps.
pub const EXACT_MAX_DIM: usize = 1024;

/// `w^T J_g` for the vector in `w[0]` (`[C][B][HW]`); returns which of `w` holds the result.
pub(crate) fn vjp(
    blk: &Block,
    w: &mut [Vec<f32>; 2],
    masks: &[Vec<f32>],
    col: &mut Vec<f32>,
    imgs: usize,
    threads: usize,
) -> usize {
    let n = imgs * blk.h * blk.w;
    let mut at = 0;
    adjoint(&blk.last, w, &mut at, col, imgs, blk.h, blk.w, threads);
    let mut mi = blk.acts;
    let mut ch = blk.last.cin;
    for layer in blk.hidden.iter().rev() {
        match layer {
            BLayer::Act(_) => {
                mi -= 1;
                mul_mask(&mut w[at][..ch * n], &masks[mi]);
            }
            BLayer::Linear(l) => {
                adjoint(l, w, &mut at, col, imgs, blk.h, blk.w, threads);
                ch = l.cin;
            }
        }
    }
    at
}

/// `w[1-at] = W^T w[at]` (the layer's transposed operator); flips `at`.
#[allow(clippy::too_many_arguments)]
fn adjoint(
    l: &super::conv::Linear,
    w: &mut [Vec<f32>; 2],
    at: &mut usize,
    col: &mut Vec<f32>,
    imgs: usize,
    h: usize,
    wd: usize,
    threads: usize,
) {
    let n = imgs * h * wd;
    let d = 1 - *at;
    grow(&mut w[d], l.cin * n);
    let (w0, w1) = w.split_at_mut(1);
    let (src, dst) = if *at == 0 {
        (&w0[0], &mut w1[0])
    } else {
        (&w1[0], &mut w0[0])
    };
    l.adj.apply(
        &src[..l.cout * n],
        &mut dst[..l.cin * n],
        imgs,
        h,
        wd,
        1.0,
        false,
        col,
        threads,
    );
    *at = d;
}

/// Per-sample `<a, b>` of two `[C][B][HW]` tensors, accumulated in f64 in a fixed order.
fn dots(a: &[f32], b: &[f32], c: usize, imgs: usize, hw: usize) -> Vec<f64> {
    (0..imgs)
        .into_par_iter()
        .map(|img| {
            let mut s = 0f64;
            for ci in 0..c {
                let at = (ci * imgs + img) * hw;
                let part: f32 = a[at..at + hw]
                    .iter()
                    .zip(&b[at..at + hw])
                    .map(|(x, y)| x * y)
                    .sum();
                s += part as f64;
            }
            s
        })
        .collect()
}

impl CpuEngine {
    /// Adds block `b`'s log-det (at the point whose masks the forward pass just stored) to `lds`.
    pub(crate) fn block_logdet(
        &self,
        b: &Block,
        ws: &mut Workspace,
        batch: usize,
        req: &LogDetRequest,
        lds: &mut [f64],
    ) -> Result<()> {
        match req.estimator {
            EstimatorKind::Exact => {
                self.exact(b, ws, batch, lds);
                Ok(())
            }
            EstimatorKind::Series | EstimatorKind::Roulette => {
                self.hutchinson(b, ws, batch, req, lds);
                Ok(())
            }
        }
    }

    fn hutchinson(
        &self,
        b: &Block,
        ws: &mut Workspace,
        batch: usize,
        req: &LogDetRequest,
        lds: &mut [f64],
    ) {
        let hw = b.h * b.w;
        let d = b.c * hw;
        let len = d * batch;
        // Term k (1-based) of sample i is weighted by weights[i][k-1]; roulette draws N_i extra
        // terms and divides term k > terms by P(N >= k - terms).
        let method = req.method();
        let weights: Vec<Vec<f64>> = (0..batch)
            .map(|i| method.term_weights(b.index, req.first_sample + i))
            .collect();
        let kmax = weights.iter().map(|w| w.len()).max().unwrap_or(0);
        let mut total = vec![0f64; batch];
        for p in 0..req.probes {
            grow(&mut ws.probe, len);
            for i in 0..batch {
                // Sample i's probe is [C][HW]; its channel ci goes to row ci of [C][B][HW].
                let mut v = probe_values(
                    req.seed,
                    b.index,
                    req.first_sample + i,
                    p,
                    req.probe == ProbeKind::Rademacher,
                );
                for ci in 0..b.c {
                    let dst = &mut ws.probe[(ci * batch + i) * hw..][..hw];
                    for (o, s) in dst.iter_mut().zip(&mut v) {
                        *o = s as f32;
                    }
                }
            }
            grow(&mut ws.w[0], len);
            ws.w[0][..len].copy_from_slice(&ws.probe[..len]);
            for k in 1..=kmax {
                let at = vjp(b, &mut ws.w, &ws.masks, &mut ws.col, batch, self.threads);
                if at != 0 {
                    ws.w.swap(0, 1);
                }
                let t = dots(&ws.w[0], &ws.probe, b.c, batch, hw);
                let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
                for i in 0..batch {
                    if let Some(wt) = weights[i].get(k - 1) {
                        total[i] += sign * wt * t[i] / k as f64;
                    }
                }
            }
        }
        for (l, t) in lds.iter_mut().zip(total) {
            *l += t / req.probes as f64;
        }
    }

    /// `ln|det(I + J)|` from the full Jacobian, one vjp per coordinate (for the whole batch).
    fn exact(&self, b: &Block, ws: &mut Workspace, batch: usize, lds: &mut [f64]) {
        let hw = b.h * b.w;
        let d = b.c * hw;
        let len = d * batch;
        let mut jac = vec![0f64; batch * d * d];
        for row in 0..d {
            let (ci, q) = (row / hw, row % hw);
            grow(&mut ws.w[0], len);
            ws.w[0][..len].fill(0.0);
            for i in 0..batch {
                ws.w[0][(ci * batch + i) * hw + q] = 1.0;
            }
            let at = vjp(b, &mut ws.w, &ws.masks, &mut ws.col, batch, self.threads);
            let r = &ws.w[at];
            for i in 0..batch {
                let j = &mut jac[(i * d + row) * d..][..d];
                for (col, v) in j.iter_mut().enumerate() {
                    *v = r[((col / hw) * batch + i) * hw + col % hw] as f64;
                }
            }
        }
        for (i, l) in lds.iter_mut().enumerate() {
            let m = &mut jac[i * d * d..(i + 1) * d * d];
            for k in 0..d {
                m[k * d + k] += 1.0;
            }
            *l += log_abs_det(m, d);
        }
    }
}

/// `ln|det(m)|` of a row-major d x d matrix by LU with partial pivoting (destroys `m`). Sums the
/// logs of the pivots, as the determinant itself can overflow.
pub fn log_abs_det(m: &mut [f64], d: usize) -> f64 {
    let mut s = 0.0;
    for k in 0..d {
        let p = (k..d)
            .max_by(|&a, &b| m[a * d + k].abs().total_cmp(&m[b * d + k].abs()))
            .unwrap_or(k);
        if p != k {
            for j in 0..d {
                m.swap(k * d + j, p * d + j);
            }
        }
        let piv = m[k * d + k];
        s += piv.abs().ln();
        if piv == 0.0 {
            return f64::NEG_INFINITY;
        }
        for i in k + 1..d {
            let f = m[i * d + k] / piv;
            if f != 0.0 {
                for j in k..d {
                    m[i * d + j] -= f * m[k * d + j];
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_abs_det_matches_closed_forms() {
        // 2x2: ad - bc.
        let mut m = vec![2.0, 1.0, 3.0, 4.0];
        assert!((log_abs_det(&mut m, 2) - 5f64.ln()).abs() < 1e-14);
        // A permutation times a diagonal: |det| = 2 * 3 * 5, pivoting required.
        let mut m = vec![0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 5.0, 0.0, 0.0];
        assert!((log_abs_det(&mut m, 3) - 30f64.ln()).abs() < 1e-14);
    }
}
