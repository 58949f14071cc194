//! Reverse mode through one residual branch `g` on a batch, and the
//! forward-over-reverse pass that differentiates `w^T J_g v`.
//!
//! The branch is a chain of linear maps and activations (the verifier admits
//! nothing else), walked node by node like the reference executor does. Three
//! kinds of rows travel through it:
//! * primal rows `h` (one per sample) with their adjoints `mu`;
//! * tangent rows `t = J v` (one per probe and sample, row `r` belongs to
//!   sample `r % B`) with their adjoints `lambda`, seeded with `w`;
//! * plain vjp rows `u -> u^T J` for the Neumann series (no parameter gradient).
//!
//! Differentiating `s = w^T J v` (w held constant): through a linear node
//! `t' = W t` gives `dW += lambda' t^T`, `lambda = W^T lambda'`; through an
//! activation `t' = f'(h) t` gives `lambda = f'(h) lambda'` and feeds the primal
//! adjoint `mu += f''(h) t lambda'`. The primal adjoint then carries the
//! input gradient of `s` (and of the data term) back through `h' = f(h)`,
//! `h' = W h + b`.

use std::collections::BTreeMap;

use super::kernels::LinearKernels;
use super::linear;
use super::mat::{add_col_sums, Mat};
use crate::ir::Graph;
use crate::ops::activation::{all_derivatives, lipswish_beta, softplus_derivative};
use crate::ops::{param_name, Op};
use crate::spec::Activation;

/// Gradients by full parameter name.
pub type Grads = BTreeMap<String, Vec<f64>>;

/// The accumulator of a parameter's gradient, created zeroed on first use.
pub fn grad_slot(grads: &mut Grads, name: String, len: usize) -> &mut [f64] {
    grads.entry(name).or_insert_with(|| vec![0.0; len])
}

fn weight<'g>(g: &'g Graph, node: &str) -> &'g [f64] {
    g.params
        .get(&param_name(node, "weight"))
        .map(|t| t.data.as_slice())
        .unwrap_or(&[])
}

fn beta(g: &Graph, node: &str, act: Activation) -> f64 {
    if act == Activation::LipSwish {
        lipswish_beta(node, &g.params)
    } else {
        0.0
    }
}

/// The input of every node of the branch (the primal values), and `g(a)`.
pub struct Cache {
    pub inputs: Vec<Mat>,
    pub out: Mat,
    /// Per activation node (None for linear ones): `f'`, `f''`, `df/dbeta`,
    /// `df'/dbeta` at every pre-activation, computed once in the forward pass.
    pub derivs: Vec<Option<[Vec<f64>; 4]>>,
}

pub fn forward(kern: &dyn LinearKernels, g: &Graph, b: usize, a: &Mat) -> Cache {
    let body = &g.blocks[b].body;
    let mut inputs = Vec::with_capacity(body.len());
    let mut derivs = Vec::with_capacity(body.len());
    let mut h = a.clone();
    for &ix in body {
        let n = g.node(ix);
        let out = match &n.op {
            Op::Dense { .. } | Op::Conv2d { .. } => {
                let mut y = kern.apply(&n.op, weight(g, &n.name), &h);
                let bias = g
                    .params
                    .get(&param_name(&n.name, "bias"))
                    .map(|t| t.data.as_slice())
                    .unwrap_or(&[]);
                let per = (y.cols / bias.len().max(1)).max(1);
                for r in 0..y.rows {
                    for (j, v) in y.row_mut(r).iter_mut().enumerate() {
                        *v += bias.get(j / per).copied().unwrap_or(0.0);
                    }
                }
                y
            }
            Op::Act { act } => {
                let bt = beta(g, &n.name, *act);
                let mut y = h.clone();
                let len = h.data.len();
                let mut d: [Vec<f64>; 4] = std::array::from_fn(|_| Vec::with_capacity(len));
                for v in y.data.iter_mut() {
                    let all = all_derivatives(*act, bt, *v);
                    *v = all[0];
                    for k in 0..4 {
                        d[k].push(all[k + 1]);
                    }
                }
                derivs.push(Some(d));
                y
            }
            other => unreachable!("op {} inside a branch", other.kind()),
        };
        if n.op.is_linear() {
            derivs.push(None);
        }
        inputs.push(std::mem::replace(&mut h, out));
    }
    Cache {
        inputs,
        out: h,
        derivs,
    }
}

/// `J t` for every tangent row, keeping the tangent input of every node.
pub fn tangents(
    kern: &dyn LinearKernels,
    g: &Graph,
    b: usize,
    cache: &Cache,
    t: &Mat,
) -> (Vec<Mat>, Mat) {
    let body = &g.blocks[b].body;
    let batch = cache.inputs[0].rows;
    let mut tins = Vec::with_capacity(body.len());
    let mut cur = t.clone();
    for (k, &ix) in body.iter().enumerate() {
        let n = g.node(ix);
        let next = match &n.op {
            Op::Act { .. } => {
                let mut o = cur.clone();
                scale_rows(&mut o, d1(cache, k), batch);
                o
            }
            _ => kern.apply(&n.op, weight(g, &n.name), &cur),
        };
        tins.push(std::mem::replace(&mut cur, next));
    }
    (tins, cur)
}

/// `u^T J` for every row of `u` (rows map to samples as `r % B`).
pub fn vjp(kern: &dyn LinearKernels, g: &Graph, b: usize, cache: &Cache, u: &Mat) -> Mat {
    let body = &g.blocks[b].body;
    let batch = cache.inputs[0].rows;
    let mut cur = u.clone();
    for (k, &ix) in body.iter().enumerate().rev() {
        let n = g.node(ix);
        cur = match &n.op {
            Op::Act { .. } => {
                scale_rows(&mut cur, d1(cache, k), batch);
                cur
            }
            _ => kern.adjoint(&n.op, weight(g, &n.name), &cur),
        };
    }
    cur
}

/// `f'` at the pre-activations of body node `k` (an activation).
fn d1(cache: &Cache, k: usize) -> &[f64] {
    cache.derivs[k]
        .as_ref()
        .map(|d| d[0].as_slice())
        .expect("the forward pass caches every activation's derivatives")
}

/// Multiplies every row `r` elementwise by row `r % batch` of `d`.
fn scale_rows(m: &mut Mat, d: &[f64], batch: usize) {
    let cols = m.cols;
    for r in 0..m.rows {
        let base = (r % batch) * cols;
        for (v, f) in m.row_mut(r).iter_mut().zip(&d[base..base + cols]) {
            *v *= f;
        }
    }
}

/// What flows back into a branch from above.
pub struct Seed<'a> {
    /// Adjoint of `g(a)` (one row per sample), from the data term.
    pub mu: Option<Mat>,
    /// Tangent inputs of every node (from [`tangents`]) and `lambda` at the
    /// output, i.e. the (scaled) `w` rows of the log-det gradient.
    pub tangent: Option<(&'a [Mat], Mat)>,
}

/// The combined reverse pass: accumulates every parameter gradient of the
/// branch into `grads` and returns the adjoint of the branch input `a`.
pub fn reverse(
    kern: &dyn LinearKernels,
    g: &Graph,
    b: usize,
    cache: &Cache,
    seed: Seed<'_>,
    grads: &mut Grads,
) -> Mat {
    let body = &g.blocks[b].body;
    let batch = cache.inputs[0].rows;
    let mut mu = seed.mu.unwrap_or_else(|| Mat::zeros(batch, cache.out.cols));
    let (tins, mut lam) = match seed.tangent {
        Some((t, l)) => (Some(t), Some(l)),
        None => (None, None),
    };
    for (k, &ix) in body.iter().enumerate().rev() {
        let n = g.node(ix);
        let h = &cache.inputs[k];
        match &n.op {
            Op::Act { act } => {
                let [fd1, fd2, fdb, fd1b] = cache.derivs[k]
                    .as_ref()
                    .expect("the forward pass caches every activation's derivatives");
                let cols = h.cols;
                let mut dbeta = 0.0;
                // Primal: mu_in = f'(h) mu_out (+ f''(h) t lambda_out below).
                let mut mu_in = mu;
                for (j, v) in mu_in.data.iter_mut().enumerate() {
                    dbeta += *v * fdb[j];
                    *v *= fd1[j];
                }
                if let (Some(tins), Some(l)) = (tins, lam.as_mut()) {
                    let t = &tins[k];
                    for r in 0..l.rows {
                        let base = (r % batch) * cols;
                        let mrow = &mut mu_in.data[base..base + cols];
                        let lrow = &mut l.data[r * cols..(r + 1) * cols];
                        let trow = &t.data[r * cols..(r + 1) * cols];
                        for j in 0..cols {
                            let tl = trow[j] * lrow[j];
                            mrow[j] += fd2[base + j] * tl;
                            dbeta += fd1b[base + j] * tl;
                            lrow[j] *= fd1[base + j];
                        }
                    }
                }
                if *act == Activation::LipSwish {
                    let raw = g
                        .params
                        .get(&param_name(&n.name, "beta"))
                        .and_then(|t| t.data.first().copied())
                        .unwrap_or(0.0);
                    grad_slot(grads, param_name(&n.name, "beta"), 1)[0] +=
                        dbeta * softplus_derivative(raw);
                }
                mu = mu_in;
            }
            _ => {
                let w = weight(g, &n.name);
                let (_, out_len) = linear::dims(&n.op);
                let dw = grad_slot(grads, param_name(&n.name, "weight"), w.len());
                kern.add_weight_grad(&n.op, dw, &mu, h);
                if let (Some(tins), Some(l)) = (tins, lam.as_ref()) {
                    kern.add_weight_grad(&n.op, dw, l, &tins[k]);
                }
                let nb = g
                    .params
                    .get(&param_name(&n.name, "bias"))
                    .map(|t| t.data.len())
                    .unwrap_or(0);
                let db = grad_slot(grads, param_name(&n.name, "bias"), nb);
                let mut cs = vec![0.0; out_len];
                add_col_sums(&mut cs, &mu);
                let per = (out_len / nb.max(1)).max(1);
                for (j, v) in cs.iter().enumerate() {
                    if let Some(d) = db.get_mut(j / per) {
                        *d += v;
                    }
                }
                mu = kern.adjoint(&n.op, w, &mu);
                if let Some(l) = lam.as_mut() {
                    *l = kern.adjoint(&n.op, w, l);
                }
            }
        }
    }
    mu
}
