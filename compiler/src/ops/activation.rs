//! Elementwise activations with Lipschitz constant <= 1, their derivatives and vjps.

use super::p;
use crate::spec::Activation;
use crate::tensor::Params;

/// LipSwish divides by this so that its Lipschitz constant is <= 1 for any beta
/// (the maximal slope of `x * sigmoid(beta x)` is about 1.0998).
pub const LIPSWISH_DIV: f64 = 1.1;

pub fn softplus(x: f64) -> f64 {
    if x > 30.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The effective LipSwish slope `softplus(b)` of a node.
pub fn lipswish_beta(name: &str, params: &Params) -> f64 {
    softplus(p(params, name, "beta").first().copied().unwrap_or(0.0))
}

pub fn apply(act: Activation, beta: f64, x: f64) -> f64 {
    match act {
        Activation::Elu => {
            if x > 0.0 {
                x
            } else {
                x.exp_m1()
            }
        }
        Activation::Relu => x.max(0.0),
        Activation::LipSwish => x * sigmoid(beta * x) / LIPSWISH_DIV,
    }
}

pub fn derivative(act: Activation, beta: f64, x: f64) -> f64 {
    match act {
        Activation::Elu => {
            if x > 0.0 {
                1.0
            } else {
                x.exp()
            }
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::LipSwish => {
            let s = sigmoid(beta * x);
            (s + beta * x * s * (1.0 - s)) / LIPSWISH_DIV
        }
    }
}

fn beta_of(act: Activation, name: &str, params: &Params) -> f64 {
    if act == Activation::LipSwish {
        lipswish_beta(name, params)
    } else {
        0.0
    }
}

pub fn forward(act: Activation, name: &str, params: &Params, x: &[f64]) -> Vec<f64> {
    let beta = beta_of(act, name, params);
    x.iter().map(|&v| apply(act, beta, v)).collect()
}

/// `dy * f'(x)`, x the pre-activation.
pub fn vjp(act: Activation, name: &str, params: &Params, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let beta = beta_of(act, name, params);
    x.iter()
        .zip(dy)
        .map(|(&v, &d)| d * derivative(act, beta, v))
        .collect()
}

/// `d softplus(b) / d b`.
pub fn softplus_derivative(b: f64) -> f64 {
    sigmoid(b)
}

/// `[f, f', f'', df/dbeta, df'/dbeta]` at x from one exponential, beta the
/// effective slope `softplus(b)` (chain with [`softplus_derivative`] for `b`).
/// Training differentiates `w^T J v` (the Neumann log-det gradient) and `J`
/// holds `f'(pre-activation)`, so it needs `f''` and `df'/dbeta` as well.
pub fn all_derivatives(act: Activation, beta: f64, x: f64) -> [f64; 5] {
    match act {
        Activation::LipSwish => {
            let s = sigmoid(beta * x);
            let ds = s * (1.0 - s);
            let d = LIPSWISH_DIV;
            [
                x * s / d,
                (s + beta * x * ds) / d,
                (2.0 * beta * ds + beta * beta * x * ds * (1.0 - 2.0 * s)) / d,
                x * x * ds / d,
                (2.0 * x * ds + beta * x * x * ds * (1.0 - 2.0 * s)) / d,
            ]
        }
        Activation::Elu => {
            if x > 0.0 {
                [x, 1.0, 0.0, 0.0, 0.0]
            } else {
                let e = x.exp();
                [e - 1.0, e, e, 0.0, 0.0]
            }
        }
        Activation::Relu => {
            if x > 0.0 {
                [x, 1.0, 0.0, 0.0, 0.0]
            } else {
                [0.0, 0.0, 0.0, 0.0, 0.0]
            }
        }
    }
}
