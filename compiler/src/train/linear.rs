//! The linear maps of a residual branch (dense layers and convolutions) on a
//! batch: the map without bias, its adjoint, and the weight gradient. Dense
//! layers are one GEMM per batch; convolutions go sample by sample through the
//! reference kernels, with the weight gradient as an im2col GEMM.

use super::mat::{add_dt_x, mul_w, mul_wt, Mat};
use crate::kernels::{conv2d, conv2d_adjoint, ConvGeom};
use crate::ops::Op;
use matrixmultiply::dgemm;

/// `W x` (no bias) for every row.
pub fn apply(op: &Op, w: &[f64], x: &Mat) -> Mat {
    match op {
        Op::Dense { fout, .. } => mul_wt(x, w, *fout),
        Op::Conv2d { geom } => x.map_rows(geom.out_len(), |r| conv2d(geom, r, w, None)),
        _ => unreachable!("only linear ops reach train::linear"),
    }
}

/// `W^T y` for every row.
pub fn adjoint(op: &Op, w: &[f64], y: &Mat) -> Mat {
    match op {
        Op::Dense { fin, .. } => mul_w(y, w, *fin),
        Op::Conv2d { geom } => y.map_rows(geom.in_len(), |r| conv2d_adjoint(geom, r, w)),
        _ => unreachable!("only linear ops reach train::linear"),
    }
}

/// `acc += sum_rows d(W x)/dW` contracted with `dy`: the weight gradient.
pub fn add_weight_grad(op: &Op, acc: &mut [f64], dy: &Mat, x: &Mat) {
    match op {
        Op::Dense { .. } => add_dt_x(acc, dy, x),
        Op::Conv2d { geom } => {
            for i in 0..dy.rows {
                conv_weight_grad(geom, acc, dy.row(i), x.row(i));
            }
        }
        _ => unreachable!("only linear ops reach train::linear"),
    }
}

/// `[cin*k*k, out_h*out_w]` patches of one sample (zero outside the image).
fn im2col(g: &ConvGeom, x: &[f64]) -> Vec<f64> {
    let (ho, wo) = (g.out_h(), g.out_w());
    let n = ho * wo;
    let mut cols = vec![0.0; g.cin * g.k * g.k * n];
    for ci in 0..g.cin {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = (ci * g.k + ky) * g.k + kx;
                let dst = &mut cols[row * n..(row + 1) * n];
                for oy in 0..ho {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    for ox in 0..wo {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix >= 0 && ix < g.w as isize {
                            dst[oy * wo + ox] = x[(ci * g.h + iy as usize) * g.w + ix as usize];
                        }
                    }
                }
            }
        }
    }
    cols
}

/// `acc[co, ci, ky, kx] += sum_pixels dy[co, p] * patch[ci, ky, kx, p]` for one sample.
pub fn conv_weight_grad(g: &ConvGeom, acc: &mut [f64], dy: &[f64], x: &[f64]) {
    let cols = im2col(g, x);
    let n = g.out_h() * g.out_w();
    let kk = g.cin * g.k * g.k;
    assert!(acc.len() >= g.cout * kk && dy.len() >= g.cout * n && cols.len() >= kk * n);
    if n == 0 || kk == 0 || g.cout == 0 {
        return;
    }
    // SAFETY: dy is [cout, n], cols is [kk, n] read transposed, acc is [cout, kk];
    // the assert above bounds every access.
    unsafe {
        dgemm(
            g.cout,
            n,
            kk,
            1.0,
            dy.as_ptr(),
            n as isize,
            1,
            cols.as_ptr(),
            1,
            n as isize,
            1.0,
            acc.as_mut_ptr(),
            kk as isize,
            1,
        );
    }
}

/// Input and output lengths of a linear op (per sample).
pub fn dims(op: &Op) -> (usize, usize) {
    match op {
        Op::Dense { fin, fout } => (*fin, *fout),
        Op::Conv2d { geom } => (geom.in_len(), geom.out_len()),
        _ => (0, 0),
    }
}
