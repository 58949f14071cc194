//! The log-det of one block and its gradient seed: per sample the value of
//! `ln det(I + J_g)` (exact, or the series estimate) and the rows `w` such that
//! the gradient is that of `w^T J_g v` with `w` held constant.
//!
//! * Exact (small dimensions): the tangent pass with `v = e_j` gives the columns
//!   of `J`; `tr((I+J)^-1 dJ) = sum_j e_j^T M dJ e_j`, so probe `j` gets
//!   `w_j = M^T e_j`, `M = (I + J)^-1`.
//! * Neumann (Chen et al. 2019): `u_k = v^T J^k` by the vjp chain; the value is
//!   `sum_{k=1}^n (-1)^(k+1) c_k <u_k, v> / k` and its gradient is that of
//!   `w^T J v` with `w = sum_{k=0}^{n-1} (-1)^k c_{k+1} u_k`, where `c_k` are the
//!   Russian-roulette weights `1 / P(N >= k - n_exact)` (1 for a fixed truncation).

use nalgebra::DMatrix;

use super::branch::{self, Cache};
use super::kernels::LinearKernels;
use super::mat::Mat;
use crate::ir::Graph;
use crate::reference::{draw, survival};
use crate::spec::{ProbeKind, RouletteDist};
use iresnetc_runtime::rng::Rng;

/// How training estimates each block's log-det and its gradient.
#[derive(Clone, Debug, PartialEq)]
pub enum LogDetGrad {
    /// `ln|det(I + J)|` and `tr((I+J)^-1 dJ)` from the full Jacobian.
    Exact,
    /// Neumann series: `terms` terms, plus a random number more (reweighted)
    /// when `roulette` is set.
    Neumann {
        terms: usize,
        probes: usize,
        kind: ProbeKind,
        roulette: Option<(RouletteDist, f64)>,
    },
}

/// Where the random numbers of one step come from: every draw is its own
/// stream of `(seed, step, ...)`, so a resumed run draws the same numbers and
/// splitting the batch over threads changes nothing.
#[derive(Clone, Copy, Debug)]
pub struct Noise {
    pub seed: u64,
    pub step: u64,
}

pub const STREAM_PROBE: u64 = 101;
pub const STREAM_ROULETTE: u64 = 102;

/// Per block: the log-det value per sample, the tangent inputs, and the `w` rows.
pub struct BlockLogDet {
    pub value: Vec<f64>,
    pub tins: Vec<Mat>,
    pub w: Mat,
}

/// Number of terms and their weights `c_1..c_n` for block `b` at this step.
pub fn term_weights(est: &LogDetGrad, noise: Noise, b: usize) -> Vec<f64> {
    match est {
        LogDetGrad::Exact => vec![],
        LogDetGrad::Neumann {
            terms, roulette, ..
        } => match roulette {
            None => vec![1.0; *terms],
            Some((dist, param)) => {
                let mut rng = Rng::for_stream(noise.seed, &[STREAM_ROULETTE, noise.step, b as u64]);
                let extra = draw(*dist, *param, &mut rng);
                (1..=terms + extra)
                    .map(|k| {
                        if k <= *terms {
                            1.0
                        } else {
                            1.0 / survival(*dist, *param, k - terms)
                        }
                    })
                    .collect()
            }
        },
    }
}

/// `first`: index of the chunk's first sample within the whole batch.
pub fn block_logdet(
    kern: &dyn LinearKernels,
    g: &Graph,
    b: usize,
    cache: &Cache,
    est: &LogDetGrad,
    noise: Noise,
    first: usize,
) -> Result<BlockLogDet, String> {
    let a = &cache.inputs[0];
    let (bs, d) = (a.rows, a.cols);
    match est {
        LogDetGrad::Exact => {
            let mut v = Mat::zeros(d * bs, d);
            for j in 0..d {
                for i in 0..bs {
                    v.data[(j * bs + i) * d + j] = 1.0;
                }
            }
            let (tins, jv) = branch::tangents(kern, g, b, cache, &v);
            let mut value = vec![0.0; bs];
            let mut w = Mat::zeros(d * bs, d);
            for i in 0..bs {
                // Column j of J is J e_j, the tangent row of probe j.
                let mut m = DMatrix::<f64>::identity(d, d);
                for j in 0..d {
                    for r in 0..d {
                        m[(r, j)] += jv.data[(j * bs + i) * d + r];
                    }
                }
                let lu = m.clone().lu();
                value[i] = lu.u().diagonal().iter().map(|x| x.abs().ln()).sum();
                let inv = lu
                    .try_inverse()
                    .ok_or_else(|| format!("block `{}`: I + J is singular", g.blocks[b].name))?;
                for j in 0..d {
                    for c in 0..d {
                        w.data[(j * bs + i) * d + c] = inv[(j, c)];
                    }
                }
            }
            Ok(BlockLogDet { value, tins, w })
        }
        LogDetGrad::Neumann { probes, kind, .. } => {
            let p = *probes;
            let weights = term_weights(est, noise, b);
            let mut v = Mat::zeros(p * bs, d);
            for pi in 0..p {
                for i in 0..bs {
                    let mut r = Rng::for_stream(
                        noise.seed,
                        &[
                            STREAM_PROBE,
                            noise.step,
                            b as u64,
                            (first + i) as u64,
                            pi as u64,
                        ],
                    );
                    for x in v.row_mut(pi * bs + i) {
                        *x = if *kind == ProbeKind::Rademacher {
                            r.rademacher()
                        } else {
                            r.normal()
                        };
                    }
                }
            }
            let (tins, _) = branch::tangents(kern, g, b, cache, &v);
            let mut value = vec![0.0; bs];
            let mut w = Mat::zeros(p * bs, d);
            let mut u = v.clone();
            for (k0, &c) in weights.iter().enumerate() {
                let k = k0 + 1;
                // w collects u_{k-1} before u advances to u_k.
                let sw = if k0 % 2 == 0 { c } else { -c };
                for (wv, uv) in w.data.iter_mut().zip(&u.data) {
                    *wv += sw * uv;
                }
                u = branch::vjp(kern, g, b, cache, &u);
                let sv = if k % 2 == 1 { c } else { -c } / k as f64;
                for r in 0..p * bs {
                    let t: f64 = u.row(r).iter().zip(v.row(r)).map(|(a, b)| a * b).sum();
                    value[r % bs] += sv * t;
                }
            }
            let inv_p = 1.0 / p as f64;
            value.iter_mut().for_each(|x| *x *= inv_p);
            w.scale(inv_p);
            Ok(BlockLogDet { value, tins, w })
        }
    }
}
