//! Linear maps: convolutions and dense layers (bias included in the forward,
//! not in the vjp, which is the adjoint of the linear part).

use super::p;
use crate::kernels::{self, ConvGeom};
use crate::tensor::Params;

pub fn conv_shape(g: &ConvGeom, s: &[usize]) -> Result<Vec<usize>, String> {
    if s != [g.cin, g.h, g.w] {
        return Err(format!(
            "convolution expects input [{}, {}, {}], got {s:?}",
            g.cin, g.h, g.w
        ));
    }
    if g.h + 2 * g.pad < g.k || g.w + 2 * g.pad < g.k {
        return Err(format!("kernel {} larger than the padded input", g.k));
    }
    Ok(vec![g.cout, g.out_h(), g.out_w()])
}

pub fn dense_shape(fin: usize, fout: usize, s: &[usize]) -> Result<Vec<usize>, String> {
    if s != [fin] {
        return Err(format!("dense layer expects input [{fin}], got {s:?}"));
    }
    Ok(vec![fout])
}

pub fn conv_forward(name: &str, params: &Params, g: &ConvGeom, x: &[f64]) -> Vec<f64> {
    kernels::conv2d(
        g,
        x,
        p(params, name, "weight"),
        Some(p(params, name, "bias")),
    )
}

pub fn conv_vjp(name: &str, params: &Params, g: &ConvGeom, dy: &[f64]) -> Vec<f64> {
    kernels::conv2d_adjoint(g, dy, p(params, name, "weight"))
}

pub fn dense_forward(name: &str, params: &Params, fin: usize, fout: usize, x: &[f64]) -> Vec<f64> {
    kernels::dense(
        fin,
        fout,
        x,
        p(params, name, "weight"),
        Some(p(params, name, "bias")),
    )
}

pub fn dense_vjp(name: &str, params: &Params, fin: usize, fout: usize, dy: &[f64]) -> Vec<f64> {
    kernels::dense_adjoint(fin, fout, dy, p(params, name, "weight"))
}
