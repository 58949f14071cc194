//! Loss and gradient of a whole model on a batch: the graph walked node by node
//! in topological order (like the reference executor), every block's branch
//! through [`super::branch`], then the adjoints walked back in reverse order.
//!
//! Flows: loss = mean over the batch of `-log p(x)` in nats, with each block's
//! log-det from [`super::logdet`]. Classifiers: mean cross-entropy, the head's
//! batch norm on batch statistics (its running averages are returned so the
//! caller can update them).

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

use super::branch::{self, grad_slot, Cache, Grads, Seed};
use super::kernels::Backend;
use super::logdet::{block_logdet, LogDetGrad, Noise};
use super::mat::Mat;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::activation::derivative;
use crate::ops::actnorm::spatial;
use crate::ops::{layout, p, param_name, Op};
use crate::spec::ModelKind;

/// Batch statistics of a training-mode batch norm: `(node, mean, biased var, count)`.
pub type BnStats = Vec<(String, Vec<f64>, Vec<f64>, usize)>;

#[derive(Debug, Default)]
pub struct Out {
    /// Per sample: `-log p(x)` (flows, nats) or the cross-entropy (classifiers).
    pub loss: Vec<f64>,
    /// Classifiers: per sample whether the arg-max logit is the label.
    pub correct: Vec<bool>,
    pub grads: Grads,
    pub bn: BnStats,
}

/// What to compute besides the loss.
#[derive(Clone, Debug)]
pub struct Options {
    pub logdet: LogDetGrad,
    pub noise: Noise,
    /// Whether to differentiate (false: loss only, e.g. for evaluation).
    pub grads: bool,
    /// Batch norm on batch statistics (training) or on the running ones.
    pub bn_train: bool,
    /// Size of the whole batch the loss is averaged over (chunks of it are
    /// differentiated separately and summed).
    pub total: usize,
    /// Index of this chunk's first sample within the batch.
    pub first: usize,
    /// Where the branches' matrix products run.
    pub backend: Backend,
}

fn param<'g>(g: &'g Graph, node: &str, suffix: &str) -> &'g [f64] {
    p(&g.params, node, suffix)
}

/// Training-mode batch norm forward: output, normalized input, inverse std, stats.
fn bn_forward(
    g: &Graph,
    name: &str,
    eps: f64,
    x: &Mat,
    shape: &[usize],
) -> (Mat, Mat, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (c, hw) = (shape[0], spatial(shape));
    let n = (x.rows * hw) as f64;
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    for r in 0..x.rows {
        for (j, v) in x.row(r).iter().enumerate() {
            mean[j / hw] += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    for r in 0..x.rows {
        for (j, v) in x.row(r).iter().enumerate() {
            var[j / hw] += (v - mean[j / hw]).powi(2);
        }
    }
    var.iter_mut().for_each(|v| *v /= n);
    let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let (w, b) = (param(g, name, "weight"), param(g, name, "bias"));
    let mut xhat = x.clone();
    let mut y = x.clone();
    for r in 0..x.rows {
        for j in 0..x.cols {
            let ch = j / hw;
            let xh = (x.data[r * x.cols + j] - mean[ch]) * inv[ch];
            xhat.data[r * x.cols + j] = xh;
            y.data[r * x.cols + j] = xh * w[ch] + b[ch];
        }
    }
    (y, xhat, inv, mean, var)
}

/// Per-sample log-density of z under the diagonal Gaussian prior.
fn prior_logp(g: &Graph, z: &[f64]) -> f64 {
    let (mu, ls) = (
        p(&g.params, "prior", "mean"),
        p(&g.params, "prior", "log_std"),
    );
    iresnetc_runtime::modes::prior_logp(z, mu, ls)
}

/// Loss (and gradients) of one chunk of a batch. `labels` for classifiers.
pub fn loss_grad(g: &Graph, x: &Mat, labels: Option<&[usize]>, opt: &Options) -> Result<Out> {
    let bs = x.rows;
    let flow = g.spec.kind == ModelKind::Flow;
    let scale = 1.0 / opt.total as f64;
    let order = g.topo_order()?;
    let kern = opt.backend.kernels();
    let residual_of = g.block_of_residual();
    let mut vals: HashMap<NodeIndex, Mat> = HashMap::new();
    vals.insert(g.input, x.clone());
    let mut caches: HashMap<usize, (Cache, Option<super::logdet::BlockLogDet>)> = HashMap::new();
    let mut bn_cache: HashMap<NodeIndex, (Mat, Vec<f64>)> = HashMap::new();
    let mut logdet = vec![0.0; bs];
    let mut out = Out::default();

    for &ix in &order {
        let n = g.node(ix);
        if n.op == Op::Input || n.block.is_some() {
            continue;
        }
        let ins = g.inputs(ix);
        let in_shape = g.input_shape(ix);
        let cols: usize = n.shape.iter().product();
        let y = if let Some(&b) = residual_of.get(&ix) {
            let a = &vals[&ins[0]];
            let cache = branch::forward(kern, g, b, a);
            let ld = if flow {
                let ld = block_logdet(kern, g, b, &cache, &opt.logdet, opt.noise, opt.first)
                    .map_err(|reason| Error::Graph {
                        node: g.blocks[b].name.clone(),
                        reason,
                    })?;
                logdet.iter_mut().zip(&ld.value).for_each(|(l, v)| *l += v);
                Some(ld)
            } else {
                None
            };
            let mut y = a.clone();
            y.add_assign(&cache.out);
            caches.insert(b, (cache, ld));
            y
        } else if let (Op::BatchNorm { eps }, true) = (&n.op, opt.bn_train) {
            let (y, xhat, inv, mean, var) = bn_forward(g, &n.name, *eps, &vals[&ins[0]], &in_shape);
            out.bn
                .push((n.name.clone(), mean, var, bs * spatial(&in_shape)));
            bn_cache.insert(ix, (xhat, inv));
            y
        } else {
            if n.op == Op::ActNorm {
                let ld = crate::ops::actnorm::logdet(&n.name, &g.params, &in_shape);
                logdet.iter_mut().for_each(|l| *l += ld);
            }
            let args: Vec<&Mat> = ins.iter().map(|i| &vals[i]).collect();
            let mut y = Mat::zeros(bs, cols);
            for r in 0..bs {
                let rows: Vec<&[f64]> = args.iter().map(|m| m.row(r)).collect();
                let o = n.op.eval(&n.name, &g.params, &rows, &in_shape);
                y.row_mut(r).copy_from_slice(&o);
            }
            y
        };
        vals.insert(ix, y);
    }

    // Loss and the adjoint of the outputs.
    let mut adj: HashMap<NodeIndex, Mat> = HashMap::new();
    if flow {
        let dim = g.latent_dim();
        let mut z = Mat::zeros(bs, dim);
        let mut off = 0;
        for &l in &g.latents {
            let v = &vals[&l];
            for r in 0..bs {
                z.row_mut(r)[off..off + v.cols].copy_from_slice(v.row(r));
            }
            off += v.cols;
        }
        let (mu, ls) = (param(g, "prior", "mean"), param(g, "prior", "log_std"));
        let mut dz = Mat::zeros(bs, dim);
        let mut dmu = vec![0.0; dim];
        let mut dls = vec![0.0; dim];
        for r in 0..bs {
            out.loss.push(-(prior_logp(g, z.row(r)) + logdet[r]));
            for j in 0..dim {
                let inv_var = (-2.0 * ls[j]).exp();
                let d = z.data[r * dim + j] - mu[j];
                // loss = -log p: d/dz = (z - mu)/sigma^2, d/dmu = -that, d/dls = 1 - t^2.
                dz.data[r * dim + j] = scale * d * inv_var;
                dmu[j] -= scale * d * inv_var;
                dls[j] += scale * (1.0 - d * d * inv_var);
            }
        }
        if opt.grads {
            out.grads.insert("prior.mean".into(), dmu);
            out.grads.insert("prior.log_std".into(), dls);
            let mut off = 0;
            for &l in &g.latents {
                let c = vals[&l].cols;
                adj.insert(l, dz.map_rows(c, |row| row[off..off + c].to_vec()));
                off += c;
            }
        }
    } else {
        let lx = g.logits.ok_or_else(|| Error::Graph {
            node: "head".into(),
            reason: "classifier without logits".into(),
        })?;
        let logits = &vals[&lx];
        let labels = labels.ok_or_else(|| Error::Unsupported {
            what: format!("model `{}`", g.spec.name),
            reason: "a classifier trains on labelled data".into(),
        })?;
        let mut d = logits.clone();
        for r in 0..bs {
            let row = logits.row(r);
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let y = labels[r];
            out.loss.push(lse - row[y]);
            let arg = row
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |a, (i, &v)| if v > a.1 { (i, v) } else { a },
                )
                .0;
            out.correct.push(arg == y);
            for (j, v) in d.row_mut(r).iter_mut().enumerate() {
                *v = scale * ((row[j] - lse).exp() - if j == y { 1.0 } else { 0.0 });
            }
        }
        adj.insert(lx, d);
    }
    if !opt.grads {
        return Ok(out);
    }

    let add = |adj: &mut HashMap<NodeIndex, Mat>, ix: NodeIndex, m: Mat| match adj.get_mut(&ix) {
        Some(a) => a.add_assign(&m),
        None => {
            adj.insert(ix, m);
        }
    };
    let grads = &mut out.grads;
    for &ix in order.iter().rev() {
        let n = g.node(ix);
        if n.op == Op::Input || n.block.is_some() {
            continue;
        }
        let in_shape = g.input_shape(ix);
        if n.op == Op::ActNorm && flow {
            // The log-det H*W*sum(log_scale) is in every sample's log p.
            let hw = spatial(&in_shape) as f64;
            let bs_scale = scale * bs as f64;
            for v in grad_slot(grads, param_name(&n.name, "log_scale"), in_shape[0]) {
                *v -= bs_scale * hw;
            }
        }
        let Some(dy) = adj.remove(&ix) else { continue };
        let ins = g.inputs(ix);
        let xin = &vals[&ins[0]];
        match &n.op {
            Op::Residual => {
                let b = residual_of[&ix];
                let (cache, ld) = &caches[&b];
                let tangent = ld.as_ref().map(|ld| {
                    let mut w = ld.w.clone();
                    w.scale(-scale);
                    (ld.tins.as_slice(), w)
                });
                let mu = branch::reverse(
                    kern,
                    g,
                    b,
                    cache,
                    Seed {
                        mu: Some(dy.clone()),
                        tangent,
                    },
                    grads,
                );
                let mut da = dy;
                da.add_assign(&mu);
                add(&mut adj, ins[0], da);
            }
            Op::ActNorm => {
                let hw = spatial(&in_shape);
                let ls = param(g, &n.name, "log_scale");
                let mut dx = dy.clone();
                let mut dls = vec![0.0; ls.len()];
                let mut db = vec![0.0; ls.len()];
                for r in 0..bs {
                    for j in 0..dy.cols {
                        let c = j / hw;
                        let e = ls[c].exp();
                        let d = dy.data[r * dy.cols + j];
                        dx.data[r * dy.cols + j] = d * e;
                        dls[c] += d * xin.data[r * xin.cols + j] * e;
                        db[c] += d;
                    }
                }
                for (a, v) in grad_slot(grads, param_name(&n.name, "log_scale"), ls.len())
                    .iter_mut()
                    .zip(&dls)
                {
                    *a += v;
                }
                for (a, v) in grad_slot(grads, param_name(&n.name, "bias"), ls.len())
                    .iter_mut()
                    .zip(&db)
                {
                    *a += v;
                }
                add(&mut adj, ins[0], dx);
            }
            Op::Squeeze { order } => {
                let dx = dy.map_rows(xin.cols, |r| layout::unsqueeze(r, &in_shape, *order));
                add(&mut adj, ins[0], dx);
            }
            Op::PadChannels { .. } => {
                let c = xin.cols;
                add(&mut adj, ins[0], dy.map_rows(c, |r| r[..c].to_vec()));
            }
            Op::SliceChannels { start, .. } => {
                let per = spatial(&in_shape);
                let off = start * per;
                let mut dx = Mat::zeros(bs, xin.cols);
                for r in 0..bs {
                    dx.row_mut(r)[off..off + dy.cols].copy_from_slice(dy.row(r));
                }
                add(&mut adj, ins[0], dx);
            }
            Op::BatchNorm { .. } => {
                let hw = spatial(&in_shape);
                let c = in_shape[0];
                let w = param(g, &n.name, "weight");
                let (xhat, inv) = bn_cache.get(&ix).ok_or_else(|| Error::Unsupported {
                    what: n.name.clone(),
                    reason: "batch norm gradients need batch statistics".into(),
                })?;
                let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
                let (mut s1, mut s2) = (vec![0.0; c], vec![0.0; c]);
                for r in 0..bs {
                    for j in 0..dy.cols {
                        let ch = j / hw;
                        let d = dy.data[r * dy.cols + j];
                        let xh = xhat.data[r * dy.cols + j];
                        dw[ch] += d * xh;
                        db[ch] += d;
                        s1[ch] += d * w[ch];
                        s2[ch] += d * w[ch] * xh;
                    }
                }
                let cnt = (bs * hw) as f64;
                let mut dx = dy.clone();
                for r in 0..bs {
                    for j in 0..dy.cols {
                        let ch = j / hw;
                        let dxh = dy.data[r * dy.cols + j] * w[ch];
                        let xh = xhat.data[r * dy.cols + j];
                        dx.data[r * dy.cols + j] =
                            inv[ch] * (dxh - s1[ch] / cnt - xh * s2[ch] / cnt);
                    }
                }
                grads.insert(param_name(&n.name, "weight"), dw);
                grads.insert(param_name(&n.name, "bias"), db);
                add(&mut adj, ins[0], dx);
            }
            Op::GlobalAvgPool => {
                let hw = spatial(&in_shape);
                let dx = dy.map_rows(xin.cols, |r| {
                    (0..xin.cols).map(|j| r[j / hw] / hw as f64).collect()
                });
                add(&mut adj, ins[0], dx);
            }
            Op::Act { act } => {
                let mut dx = dy;
                for (d, &x) in dx.data.iter_mut().zip(&xin.data) {
                    *d *= derivative(*act, 0.0, x);
                }
                add(&mut adj, ins[0], dx);
            }
            Op::Dense { fin, .. } => {
                let w = param(g, &n.name, "weight");
                let dw = grad_slot(grads, param_name(&n.name, "weight"), w.len());
                super::mat::add_dt_x(dw, &dy, xin);
                let db = grad_slot(grads, param_name(&n.name, "bias"), dy.cols);
                super::mat::add_col_sums(db, &dy);
                add(&mut adj, ins[0], super::mat::mul_w(&dy, w, *fin));
            }
            other => {
                return Err(Error::Unsupported {
                    what: n.name.clone(),
                    reason: format!("no gradient for op {} outside a branch", other.kind()),
                })
            }
        }
    }
    Ok(out)
}

/// [`loss_grad`] over a batch split into `threads` contiguous chunks run in
/// parallel; the gradients are summed in chunk order, so the result depends on
/// the thread count only through floating-point summation order.
pub fn loss_grad_parallel(
    g: &Graph,
    x: &Mat,
    labels: Option<&[usize]>,
    opt: &Options,
    threads: usize,
) -> Result<Out> {
    // Batch statistics need the whole batch in one place.
    let threads = if opt.bn_train && g.spec.kind == ModelKind::Classifier {
        1
    } else {
        threads.clamp(1, x.rows.max(1))
    };
    if threads == 1 {
        return loss_grad(g, x, labels, opt);
    }
    let per = x.rows.div_ceil(threads);
    let chunks: Vec<(usize, Mat)> = (0..x.rows)
        .step_by(per)
        .map(|s| {
            let e = (s + per).min(x.rows);
            (
                s,
                Mat {
                    rows: e - s,
                    cols: x.cols,
                    data: x.data[s * x.cols..e * x.cols].to_vec(),
                },
            )
        })
        .collect();
    let results: Vec<Result<Out>> = std::thread::scope(|sc| {
        let hs: Vec<_> = chunks
            .iter()
            .map(|(s, m)| {
                let o = Options {
                    first: opt.first + s,
                    ..opt.clone()
                };
                let lab = labels.map(|l| &l[*s..*s + m.rows]);
                sc.spawn(move || loss_grad(g, m, lab, &o))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Unsupported {
                        what: "training".into(),
                        reason: "a worker thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut total = Out::default();
    for r in results {
        let o = r?;
        total.loss.extend(o.loss);
        total.correct.extend(o.correct);
        total.bn.extend(o.bn);
        for (k, v) in o.grads {
            match total.grads.get_mut(&k) {
                Some(a) => a.iter_mut().zip(&v).for_each(|(a, b)| *a += b),
                None => {
                    total.grads.insert(k, v);
                }
            }
        }
    }
    Ok(total)
}
