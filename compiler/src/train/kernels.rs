//! The linear algebra of a training step behind one trait, so the trainer is
//! generic over where its matrix products run: the f64 reference kernels (the
//! oracle of the tests) or the native CPU engine's f32 GEMMs (the default).
//!
//! Everything else the trainer does per step (activations and their
//! derivatives, ActNorm, the log-det seeds, the optimizer) is elementwise and
//! stays in f64; the products of the residual branches, which are nearly all of
//! a step's arithmetic, go through [`LinearKernels`] on whole batches.

use super::linear;
use super::mat::Mat;
use crate::ops::Op;
use iresnetc_runtime::cpu::grad;

/// A branch's linear maps (dense layers and convolutions, no bias) on a batch
/// of rows, row `r` one sample (or probe) laid out as `[C, H, W]`.
pub trait LinearKernels: Sync {
    /// `W x` for every row.
    fn apply(&self, op: &Op, w: &[f64], x: &Mat) -> Mat;
    /// `W^T y` for every row.
    fn adjoint(&self, op: &Op, w: &[f64], y: &Mat) -> Mat;
    /// `acc += sum_rows dy (x) x`, the weight gradient of `W x` with output gradient `dy`.
    fn add_weight_grad(&self, op: &Op, acc: &mut [f64], dy: &Mat, x: &Mat);
}

/// Where a training step's matrix products run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The native CPU engine's f32 GEMMs (im2col / shifted accumulation over the batch).
    #[default]
    Cpu,
    /// The reference executor's f64 kernels: the oracle.
    Reference,
}

impl Backend {
    pub fn kernels(self) -> &'static dyn LinearKernels {
        match self {
            Backend::Cpu => &CpuKernels,
            Backend::Reference => &ReferenceKernels,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Reference => "reference",
        }
    }
}

/// The f64 reference: dense layers as `dgemm`, convolutions by the reference
/// executor's direct kernels sample by sample.
pub struct ReferenceKernels;

impl LinearKernels for ReferenceKernels {
    fn apply(&self, op: &Op, w: &[f64], x: &Mat) -> Mat {
        linear::apply(op, w, x)
    }
    fn adjoint(&self, op: &Op, w: &[f64], y: &Mat) -> Mat {
        linear::adjoint(op, w, y)
    }
    fn add_weight_grad(&self, op: &Op, acc: &mut [f64], dy: &Mat, x: &Mat) {
        linear::add_weight_grad(op, acc, dy, x)
    }
}

/// The CPU engine's f32 kernels, one GEMM per product over the whole batch.
/// Operators the engine does not have (strided or unevenly padded
/// convolutions: never inside an i-ResNet branch) fall back to the reference.
pub struct CpuKernels;

/// The engine's shape of a convolution it runs (stride 1, same padding).
fn conv_shape(op: &Op) -> Option<grad::Shape> {
    match op {
        Op::Conv2d { geom } if geom.stride == 1 && geom.k % 2 == 1 && geom.pad == geom.k / 2 => {
            Some((geom.cin, geom.cout, geom.k, geom.h, geom.w))
        }
        _ => None,
    }
}

thread_local! {
    /// im2col / shifted-accumulation scratch, reused across calls on a thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn mat(rows: usize, cols: usize, v: &[f32]) -> Mat {
    Mat {
        rows,
        cols,
        data: v.iter().map(|&x| x as f64).collect(),
    }
}

/// Batch-major f64 rows `[B][C][HW]` to the engine's channel-major f32 `[C][B][HW]`.
fn to_engine(x: &Mat, c: usize) -> Vec<f32> {
    let b = x.rows;
    let hw = x.cols / c.max(1);
    let mut out = vec![0f32; x.data.len()];
    for r in 0..b {
        let row = x.row(r);
        for ch in 0..c {
            let dst = &mut out[(ch * b + r) * hw..][..hw];
            for (d, s) in dst.iter_mut().zip(&row[ch * hw..(ch + 1) * hw]) {
                *d = *s as f32;
            }
        }
    }
    out
}

/// The inverse of [`to_engine`], `c` channels of `hw` pixels per row.
fn from_engine(y: &[f32], b: usize, c: usize, hw: usize) -> Mat {
    let mut out = Mat::zeros(b, c * hw);
    for r in 0..b {
        let row = out.row_mut(r);
        for ch in 0..c {
            let src = &y[(ch * b + r) * hw..][..hw];
            for (d, s) in row[ch * hw..(ch + 1) * hw].iter_mut().zip(src) {
                *d = *s as f64;
            }
        }
    }
    out
}

// Dense layers multiply the batch-major rows directly (strided GEMMs, no
// transposes); convolutions go channel-major, where a layer is one GEMM over
// every pixel of every sample.
impl LinearKernels for CpuKernels {
    fn apply(&self, op: &Op, w: &[f64], x: &Mat) -> Mat {
        if let Op::Dense { fin, fout } = op {
            let y = grad::dense_rows(&f32s(w), *fin, *fout, &f32s(&x.data), x.rows, false, 1);
            return mat(x.rows, *fout, &y);
        }
        let Some(s) = conv_shape(op) else {
            return linear::apply(op, w, x);
        };
        let y = SCRATCH
            .with_borrow_mut(|sc| grad::forward(s, &f32s(w), &to_engine(x, s.0), x.rows, sc, 1));
        from_engine(&y, x.rows, s.1, s.3 * s.4)
    }

    fn adjoint(&self, op: &Op, w: &[f64], y: &Mat) -> Mat {
        if let Op::Dense { fin, fout } = op {
            let x = grad::dense_rows(&f32s(w), *fin, *fout, &f32s(&y.data), y.rows, true, 1);
            return mat(y.rows, *fin, &x);
        }
        let Some(s) = conv_shape(op) else {
            return linear::adjoint(op, w, y);
        };
        let x = SCRATCH
            .with_borrow_mut(|sc| grad::adjoint(s, &f32s(w), &to_engine(y, s.1), y.rows, sc, 1));
        from_engine(&x, y.rows, s.0, s.3 * s.4)
    }

    fn add_weight_grad(&self, op: &Op, acc: &mut [f64], dy: &Mat, x: &Mat) {
        let mut g = vec![0f32; acc.len()];
        if let Op::Dense { fin, fout } = op {
            let (d, xs) = (f32s(&dy.data), f32s(&x.data));
            grad::dense_weight_grad(&mut g, &d, &xs, x.rows, *fin, *fout, 1);
        } else if let Some(s) = conv_shape(op) {
            let (d, xs) = (to_engine(dy, s.1), to_engine(x, s.0));
            SCRATCH.with_borrow_mut(|sc| grad::add_weight_grad(s, &mut g, &d, &xs, x.rows, sc, 1));
        } else {
            return linear::add_weight_grad(op, acc, dy, x);
        }
        acc.iter_mut().zip(&g).for_each(|(a, v)| *a += *v as f64);
    }
}
