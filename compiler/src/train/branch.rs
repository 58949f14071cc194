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

use super::linear;
use super::mat::{add_col_sums, Mat};
use crate::ir::Graph;
use crate::ops::activation::{
    beta_derivatives, derivative, lipswish_beta, second_derivative, softplus_derivative,
};
use crate::ops::{param_name, Op};
use crate::spec::Activation;

/// Gradients by full parameter name.
pub type Grads = BTreeMap<String, Vec<f64>>;

/// The accumulator of a parameter's gradient, created zeroed on first use.
pub fn grad_slot<'a>(grads: &'a mut Grads, name: String, len: usize) -> &'a mut [f64] {
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
}

pub fn forward(g: &Graph, b: usize, a: &Mat) -> Cache {
    let body = &g.blocks[b].body;
    let mut inputs = Vec::with_capacity(body.len());
    let mut h = a.clone();
    for &ix in body {
        let n = g.node(ix);
        let out = match &n.op {
            Op::Dense { .. } | Op::Conv2d { .. } => {
                let mut y = linear::apply(&n.op, weight(g, &n.name), &h);
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
                y.data
                    .iter_mut()
                    .for_each(|v| *v = crate::ops::activation::apply(*act, bt, *v));
                y
            }
            other => unreachable!("op {} inside a branch", other.kind()),
        };
        inputs.push(std::mem::replace(&mut h, out));
    }
    Cache { inputs, out: h }
}

/// `J t` for every tangent row, keeping the tangent input of every node.
pub fn tangents(g: &Graph, b: usize, cache: &Cache, t: &Mat) -> (Vec<Mat>, Mat) {
    let body = &g.blocks[b].body;
    let batch = cache.inputs[0].rows;
    let mut tins = Vec::with_capacity(body.len());
    let mut cur = t.clone();
    for (k, &ix) in body.iter().enumerate() {
        let n = g.node(ix);
        let next = match &n.op {
            Op::Act { act } => {
                let bt = beta(g, &n.name, *act);
                let h = &cache.inputs[k];
                let mut o = cur.clone();
                for r in 0..o.rows {
                    let hr = h.row(r % batch);
                    for (v, &x) in o.row_mut(r).iter_mut().zip(hr) {
                        *v *= derivative(*act, bt, x);
                    }
                }
                o
            }
            _ => linear::apply(&n.op, weight(g, &n.name), &cur),
        };
        tins.push(std::mem::replace(&mut cur, next));
    }
    (tins, cur)
}

/// `u^T J` for every row of `u` (rows map to samples as `r % B`).
pub fn vjp(g: &Graph, b: usize, cache: &Cache, u: &Mat) -> Mat {
    let body = &g.blocks[b].body;
    let batch = cache.inputs[0].rows;
    let mut cur = u.clone();
    for (k, &ix) in body.iter().enumerate().rev() {
        let n = g.node(ix);
        cur = match &n.op {
            Op::Act { act } => {
                let bt = beta(g, &n.name, *act);
                let h = &cache.inputs[k];
                for r in 0..cur.rows {
                    let hr = h.row(r % batch);
                    for (v, &x) in cur.row_mut(r).iter_mut().zip(hr) {
                        *v *= derivative(*act, bt, x);
                    }
                }
                cur
            }
            _ => linear::adjoint(&n.op, weight(g, &n.name), &cur),
        };
    }
    cur
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
pub fn reverse(g: &Graph, b: usize, cache: &Cache, seed: Seed<'_>, grads: &mut Grads) -> Mat {
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
                let bt = beta(g, &n.name, *act);
                let mut dbeta = 0.0;
                // Primal: mu_in = f'(h) mu_out (+ f''(h) t lambda_out below).
                let mut mu_in = mu.clone();
                for r in 0..batch {
                    for ((v, &x), &m) in mu_in.row_mut(r).iter_mut().zip(h.row(r)).zip(mu.row(r)) {
                        *v = m * derivative(*act, bt, x);
                        dbeta += m * beta_derivatives(*act, bt, x).0;
                    }
                }
                if let (Some(tins), Some(l)) = (tins, lam.as_mut()) {
                    let t = &tins[k];
                    for r in 0..l.rows {
                        let s = r % batch;
                        let hr = h.row(s);
                        let tr = t.row(r);
                        let mrow = mu_in.row_mut(s);
                        for j in 0..hr.len() {
                            let x = hr[j];
                            let lo = l.data[r * l.cols + j];
                            mrow[j] += second_derivative(*act, bt, x) * tr[j] * lo;
                            dbeta += beta_derivatives(*act, bt, x).1 * tr[j] * lo;
                            l.data[r * l.cols + j] = lo * derivative(*act, bt, x);
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
                linear::add_weight_grad(&n.op, dw, &mu, h);
                if let (Some(tins), Some(l)) = (tins, lam.as_ref()) {
                    linear::add_weight_grad(&n.op, dw, l, &tins[k]);
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
                mu = linear::adjoint(&n.op, w, &mu);
                if let Some(l) = lam.as_mut() {
                    *l = linear::adjoint(&n.op, w, l);
                }
            }
        }
    }
    mu
}
