//! Batched evaluation helpers for a trained flow: per-sample log-densities
//! (for the heat map) and samples by the batched fixed-point inverse (the
//! reference executor's inverse, with each block's branch run on the whole
//! batch at once).

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

use super::branch;
use super::grad::{loss_grad, Options};
use super::kernels::{Backend, ReferenceKernels};
use super::logdet::Noise;
use super::mat::Mat;
use super::trainer::train_logdet;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::{actnorm, layout, Op};
use iresnetc_runtime::rng::{streams, Rng};

/// `log p(x)` per point (the evaluation log-det of [`super::trainer::evaluate`]).
pub fn log_density(g: &Graph, xs: &[Vec<f64>]) -> Result<Vec<f64>> {
    let dim = g
        .blocks
        .iter()
        .map(|b| g.node(b.actnorm).shape.iter().product::<usize>())
        .max()
        .unwrap_or(0);
    let logdet = train_logdet(&g.spec, dim, Some(g.spec.logdet.estimator));
    let mut out = Vec::with_capacity(xs.len());
    for rows in xs.chunks(1000) {
        let o = loss_grad(
            g,
            &Mat::from_rows(rows, g.input_dim()),
            None,
            &Options {
                logdet: logdet.clone(),
                noise: Noise { seed: 0, step: 0 },
                grads: false,
                bn_train: false,
                total: rows.len(),
                first: 0,
                // The picture's oracle precision; the 2-D branches are dense GEMMs either way.
                backend: Backend::Reference,
            },
        )?;
        out.extend(o.loss.iter().map(|l| -l));
    }
    Ok(out)
}

/// Inverse of a batch of latents `z` (rows) through the whole flow.
pub fn inverse(g: &Graph, z: &Mat) -> Result<Mat> {
    let bs = z.rows;
    let mut vals: HashMap<NodeIndex, Mat> = HashMap::new();
    let mut off = 0;
    for &l in &g.latents {
        let n: usize = g.node(l).shape.iter().product();
        vals.insert(l, z.map_rows(n, |r| r[off..off + n].to_vec()));
        off += n;
    }
    let residual_of = g.block_of_residual();
    let (tol, max_iters) = (g.spec.inverse.tol, g.spec.inverse.max_iters);
    for ix in g.inverse_order()? {
        let n = g.node(ix);
        let y = vals.get(&ix).cloned().ok_or_else(|| Error::Graph {
            node: n.name.clone(),
            reason: "inverse reached a node whose output is unknown".into(),
        })?;
        let ins = g.inputs(ix);
        let in_shape = g.input_shape(ix);
        let x = match &n.op {
            Op::Residual => {
                let b = residual_of[&ix];
                let mut x = y.clone();
                for _ in 0..max_iters {
                    // f64: the fixed point is iterated to the model's tolerance (1e-10 for 2-D).
                    let gx = branch::forward(&ReferenceKernels, g, b, &x).out;
                    let mut step = 0.0f64;
                    for ((xv, yv), gv) in x.data.iter_mut().zip(&y.data).zip(&gx.data) {
                        let next = yv - gv;
                        step = step.max((next - *xv).abs());
                        *xv = next;
                    }
                    if step <= tol {
                        break;
                    }
                }
                x
            }
            Op::ActNorm => y.map_rows(y.cols, |r| {
                actnorm::inverse(&n.name, &g.params, r, &in_shape)
            }),
            Op::Squeeze { order } => {
                y.map_rows(y.cols, |r| layout::unsqueeze(r, &in_shape, *order))
            }
            Op::PadChannels { .. } => {
                let len: usize = in_shape.iter().product();
                y.map_rows(len, |r| r[..len].to_vec())
            }
            Op::SliceChannels { start, .. } => {
                let per = actnorm::spatial(&in_shape);
                let total: usize = in_shape.iter().product();
                let full = vals.entry(ins[0]).or_insert_with(|| Mat::zeros(bs, total));
                for r in 0..bs {
                    full.row_mut(r)[start * per..start * per + y.cols].copy_from_slice(y.row(r));
                }
                continue;
            }
            other => {
                return Err(Error::Unsupported {
                    what: n.name.clone(),
                    reason: format!("op {} has no inverse", other.kind()),
                })
            }
        };
        vals.insert(ins[0], x);
    }
    vals.remove(&g.input).ok_or_else(|| Error::Graph {
        node: "input".into(),
        reason: "inverse did not reach the input".into(),
    })
}

/// `num` samples: prior draws (the reference's streams) mapped through the inverse.
pub fn sample(g: &Graph, num: usize, seed: u64) -> Result<Vec<Vec<f64>>> {
    let p = |n: &str| g.params.get(n).map(|t| t.data.clone()).unwrap_or_default();
    let (mu, ls) = (p("prior.mean"), p("prior.log_std"));
    let d = g.latent_dim();
    let mut z = Mat::zeros(num, d);
    for i in 0..num {
        let mut r = Rng::for_stream(seed, &[streams::PRIOR_SAMPLE, i as u64]);
        for (j, v) in z.row_mut(i).iter_mut().enumerate() {
            *v = mu[j] + ls[j].exp() * r.normal();
        }
    }
    let mut out = Vec::with_capacity(num);
    for c in 0..num.div_ceil(1000) {
        let lo = c * 1000;
        let hi = (lo + 1000).min(num);
        let part = Mat {
            rows: hi - lo,
            cols: d,
            data: z.data[lo * d..hi * d].to_vec(),
        };
        out.extend(inverse(g, &part)?.to_rows());
    }
    Ok(out)
}
