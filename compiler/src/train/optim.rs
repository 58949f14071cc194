//! Optimizers (Adam, Adamax, SGD with momentum, with PyTorch's update rules so
//! that the PyTorch comparison trains the same way), linear learning-rate
//! warm-up, L2 weight decay, gradient-norm clipping and an exponential moving
//! average of the parameters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::branch::Grads;
use crate::tensor::Params;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    #[default]
    Adam,
    Adamax,
    Sgd,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 penalty added to the gradient (PyTorch's `weight_decay`).
    pub weight_decay: f64,
    /// Steps of linear warm-up of the learning rate (0: none).
    pub warmup: u64,
    /// Largest global gradient norm (0: no clipping).
    pub clip: f64,
    /// EMA decay of the parameters (0: no EMA).
    pub ema: f64,
}

/// Per-parameter optimizer state, by parameter name.
pub type State = BTreeMap<String, Vec<f64>>;

#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub cfg: OptimConfig,
    /// Steps taken.
    pub t: u64,
    /// First moment (Adam, Adamax) or momentum buffer (SGD).
    pub m: State,
    /// Second moment (Adam) or infinity norm (Adamax).
    pub v: State,
    /// EMA of the parameters (when on).
    pub ema: State,
}

#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl Optimizer {
    pub fn new(cfg: OptimConfig) -> Self {
        Self {
            cfg,
            t: 0,
            m: State::new(),
            v: State::new(),
            ema: State::new(),
        }
    }

    /// Learning rate of the next step (after warm-up scaling).
    pub fn lr(&self) -> f64 {
        if self.cfg.warmup == 0 {
            self.cfg.lr
        } else {
            self.cfg.lr * ((self.t + 1) as f64 / self.cfg.warmup as f64).min(1.0)
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, params: &mut Params, grads: &Grads) -> StepInfo {
        let c = self.cfg.clone();
        let norm = grads.values().flatten().map(|g| g * g).sum::<f64>().sqrt();
        let clip = if c.clip > 0.0 && norm > c.clip {
            c.clip / (norm + 1e-6)
        } else {
            1.0
        };
        let lr = self.lr();
        self.t += 1;
        let t = self.t as i32;
        for (name, g) in grads {
            let Some(p) = params.get_mut(name) else {
                continue;
            };
            let n = p.data.len();
            let m = self.m.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            let v = self.v.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            for i in 0..n {
                let gi = g[i] * clip + c.weight_decay * p.data[i];
                match c.kind {
                    OptimKind::Adam => {
                        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
                        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
                        let mh = m[i] / (1.0 - c.beta1.powi(t));
                        let vh = v[i] / (1.0 - c.beta2.powi(t));
                        p.data[i] -= lr * mh / (vh.sqrt() + c.eps);
                    }
                    OptimKind::Adamax => {
                        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
                        v[i] = (c.beta2 * v[i]).max(gi.abs() + c.eps);
                        p.data[i] -= lr / (1.0 - c.beta1.powi(t)) * m[i] / v[i];
                    }
                    OptimKind::Sgd => {
                        m[i] = c.momentum * m[i] + gi;
                        p.data[i] -= lr * m[i];
                    }
                }
            }
        }
        if c.ema > 0.0 {
            for (name, p) in params.iter() {
                match self.ema.get_mut(name) {
                    Some(e) => e
                        .iter_mut()
                        .zip(&p.data)
                        .for_each(|(e, x)| *e = c.ema * *e + (1.0 - c.ema) * x),
                    None => {
                        self.ema.insert(name.clone(), p.data.clone());
                    }
                }
            }
        }
        StepInfo {
            lr,
            grad_norm: norm,
        }
    }

    /// The parameters to evaluate and export: the EMA when on, else the parameters.
    pub fn averaged(&self, params: &Params) -> Params {
        let mut out = params.clone();
        for (name, e) in &self.ema {
            if let Some(t) = out.get_mut(name) {
                t.data.clone_from(e);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn cfg(kind: OptimKind) -> OptimConfig {
        OptimConfig {
            kind,
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            momentum: 0.9,
            weight_decay: 0.0,
            warmup: 0,
            clip: 0.0,
            ema: 0.0,
        }
    }

    /// Each optimizer minimizes a quadratic `sum (p - 3)^2`.
    #[test]
    fn optimizers_minimize_a_quadratic() {
        for kind in [OptimKind::Adam, OptimKind::Adamax, OptimKind::Sgd] {
            let mut o = Optimizer::new(OptimConfig {
                lr: if kind == OptimKind::Sgd { 0.05 } else { 0.1 },
                ..cfg(kind)
            });
            let mut p = Params::new();
            p.insert("x".into(), Tensor::new(vec![2], vec![0.0, 10.0]));
            for _ in 0..500 {
                let g: Grads = [(
                    "x".to_string(),
                    p["x"].data.iter().map(|v| 2.0 * (v - 3.0)).collect(),
                )]
                .into_iter()
                .collect();
                o.step(&mut p, &g);
            }
            for v in &p["x"].data {
                assert!((v - 3.0).abs() < 1e-2, "{kind:?}: {v}");
            }
        }
    }

    /// Adam's first step moves every coordinate by lr (sign of the gradient),
    /// warm-up scales it, clipping does not change Adam's first step direction.
    #[test]
    fn adam_first_step_and_warmup() {
        let mut o = Optimizer::new(OptimConfig {
            warmup: 4,
            ..cfg(OptimKind::Adam)
        });
        let mut p = Params::new();
        p.insert("x".into(), Tensor::new(vec![2], vec![1.0, 1.0]));
        let g: Grads = [("x".to_string(), vec![5.0, -0.5])].into_iter().collect();
        let info = o.step(&mut p, &g);
        assert!((info.lr - 0.025).abs() < 1e-15);
        assert!((p["x"].data[0] - (1.0 - 0.025)).abs() < 1e-9);
        assert!((p["x"].data[1] - (1.0 + 0.025)).abs() < 1e-9);
        assert!((info.grad_norm - (25.25f64).sqrt()).abs() < 1e-12);
    }
}
