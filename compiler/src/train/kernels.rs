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
use iresnetc_runtime::cpu::grad::{self, TrainLinear};

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

/// `(cin, cout, k, h, w)` of an operator the engine runs.
fn engine_shape(op: &Op) -> Option<(usize, usize, usize, usize, usize)> {
    match op {
        Op::Dense { fin, fout } => Some((*fin, *fout, 1, 1, 1)),
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

fn packed(op: &Op, w: &[f64]) -> Option<TrainLinear> {
    let (cin, cout, k, h, wd) = engine_shape(op)?;
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    Some(TrainLinear::new(cin, cout, k, h, wd, &w32))
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

impl LinearKernels for CpuKernels {
    fn apply(&self, op: &Op, w: &[f64], x: &Mat) -> Mat {
        let Some(l) = packed(op, w) else {
            return linear::apply(op, w, x);
        };
        let y = SCRATCH.with_borrow_mut(|s| l.forward(&to_engine(x, l.cin), x.rows, s, 1));
        from_engine(&y, x.rows, l.cout, l.h * l.w)
    }

    fn adjoint(&self, op: &Op, w: &[f64], y: &Mat) -> Mat {
        let Some(l) = packed(op, w) else {
            return linear::adjoint(op, w, y);
        };
        let x = SCRATCH.with_borrow_mut(|s| l.adjoint(&to_engine(y, l.cout), y.rows, s, 1));
        from_engine(&x, y.rows, l.cin, l.h * l.w)
    }

    fn add_weight_grad(&self, op: &Op, acc: &mut [f64], dy: &Mat, x: &Mat) {
        let Some((cin, cout, k, h, wd)) = engine_shape(op) else {
            return linear::add_weight_grad(op, acc, dy, x);
        };
        let mut g = vec![0f32; acc.len()];
        let (dy, x32) = (to_engine(dy, cout), to_engine(x, cin));
        SCRATCH.with_borrow_mut(|s| {
            grad::add_weight_grad((cin, cout, k, h, wd), &mut g, &dy, &x32, x.rows, s, 1)
        });
        acc.iter_mut().zip(&g).for_each(|(a, v)| *a += *v as f64);
    }
}
