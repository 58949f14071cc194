//! Spectral normalization inside the training loop (Miyato et al. 2018, as the
//! i-ResNet and Residual Flows code train it): every linear map of a branch
//! keeps persistent power-iteration vectors `u` (output space) and `v` (input
//! space; for a convolution, feature maps at the operator's real shape),
//! advanced a few iterations per step and then held constant. The weight used
//! is `W / max(1, sigma / c)` with `sigma = u^T W v`, and the gradient flows
//! through sigma: `d sigma / dW = u v^T` (for a convolution, the weight
//! gradient of the map with output gradient `u` at input `v`).

use super::branch::Grads;
use super::linear;
use super::mat::Mat;
use crate::ir::Graph;
use crate::ops::{param_name, Op};
use crate::tensor::Params;
use iresnetc_runtime::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    /// Node name (`stage0.block3.dense1`); the weight is `{name}.weight`.
    pub name: String,
    pub op: Op,
    pub u: Vec<f64>,
    pub v: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SpecNorm {
    pub coeff: f64,
    pub layers: Vec<Layer>,
}

fn unit(v: &mut [f64]) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 && n.is_finite() {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

fn row(v: &[f64]) -> Mat {
    Mat {
        rows: 1,
        cols: v.len(),
        data: v.to_vec(),
    }
}

impl SpecNorm {
    /// Random unit `u, v` per linear layer of every branch, seeded by layer name.
    pub fn new(g: &Graph, seed: u64) -> Self {
        let layers = g
            .blocks
            .iter()
            .flat_map(|b| b.body.iter())
            .filter(|&&ix| g.node(ix).op.is_linear())
            .map(|&ix| {
                let n = g.node(ix);
                let (din, dout) = linear::dims(&n.op);
                let mut r = Rng::for_name(seed ^ 0x5EC7, &n.name);
                let mut u: Vec<f64> = (0..dout).map(|_| r.normal()).collect();
                let mut v: Vec<f64> = (0..din).map(|_| r.normal()).collect();
                unit(&mut u);
                unit(&mut v);
                Layer {
                    name: n.name.clone(),
                    op: n.op.clone(),
                    u,
                    v,
                }
            })
            .collect();
        Self {
            coeff: g.spec.lipschitz.coeff,
            layers,
        }
    }

    fn weight<'p>(raw: &'p Params, name: &str) -> &'p [f64] {
        raw.get(&param_name(name, "weight"))
            .map(|t| t.data.as_slice())
            .unwrap_or(&[])
    }

    /// `iters` power iterations on the raw weights: `v <- W^T u / |.|`, `u <- W v / |.|`.
    pub fn power_iterate(&mut self, raw: &Params, iters: usize) {
        for l in &mut self.layers {
            let w = Self::weight(raw, &l.name);
            for _ in 0..iters {
                let mut v = linear::adjoint(&l.op, w, &row(&l.u)).data;
                unit(&mut v);
                let mut u = linear::apply(&l.op, w, &row(&v)).data;
                unit(&mut u);
                l.u = u;
                l.v = v;
            }
        }
    }

    /// `sigma = u^T W v` of every layer.
    pub fn sigmas(&self, raw: &Params) -> Vec<f64> {
        self.layers
            .iter()
            .map(|l| {
                let wv = linear::apply(&l.op, Self::weight(raw, &l.name), &row(&l.v)).data;
                wv.iter().zip(&l.u).map(|(a, b)| a * b).sum()
            })
            .collect()
    }

    /// The parameters the model runs with: every branch weight divided by
    /// `max(1, sigma / c)`. Returns them with the scale of each layer.
    pub fn normalize(&self, raw: &Params) -> (Params, Vec<f64>) {
        let mut eff = raw.clone();
        let mut scales = Vec::with_capacity(self.layers.len());
        for (l, sigma) in self.layers.iter().zip(self.sigmas(raw)) {
            let s = (sigma / self.coeff).max(1.0);
            if let Some(t) = eff.get_mut(&param_name(&l.name, "weight")) {
                t.data.iter_mut().for_each(|x| *x /= s);
            }
            scales.push(s);
        }
        (eff, scales)
    }

    /// Turns gradients with respect to the normalized weights into gradients
    /// with respect to the raw ones:
    /// `dL/dW = G / s - [sigma > c] <G, W> / (s^2 c) u v^T`, `s = max(1, sigma/c)`.
    pub fn backprop(&self, raw: &Params, grads: &mut Grads) {
        for (l, sigma) in self.layers.iter().zip(self.sigmas(raw)) {
            let name = param_name(&l.name, "weight");
            let Some(gw) = grads.get_mut(&name) else {
                continue;
            };
            let w = Self::weight(raw, &l.name);
            let s = (sigma / self.coeff).max(1.0);
            let inner: f64 = gw.iter().zip(w).map(|(a, b)| a * b).sum();
            gw.iter_mut().for_each(|x| *x /= s);
            if sigma / self.coeff > 1.0 {
                let mut uv = vec![0.0; w.len()];
                linear::add_weight_grad(&l.op, &mut uv, &row(&l.u), &row(&l.v));
                let k = inner / (s * s * self.coeff);
                gw.iter_mut().zip(&uv).for_each(|(x, d)| *x -= k * d);
            }
        }
    }
}
