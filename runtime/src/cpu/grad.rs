//! Training kernels: a convolution or dense layer, its adjoint and its weight gradient over a
//! whole batch, on the same packed GEMMs as the engine's forward passes.
//!
//! Activations are channel-major `[C][B][H*W]` as everywhere in the engine (a dense layer is the
//! case `k = H = W = 1`), so each of the three products is one GEMM whose columns run over every
//! pixel of every sample: the forward and adjoint reuse [`ConvOp`] (im2col or shifted
//! accumulation), and the weight gradient `dW[co, ci, ky, kx] = sum_p dy[co][p] x[ci][p + off]`
//! is the output gradient times the transposed im2col patches of the input. The compiler's
//! trainer calls these through its backend-generic kernel trait; nothing here holds state
//! between calls, so results depend only on the inputs and the thread count.

use super::conv::{grow, im2col, ConvOp};
use gemm::Parallelism;

/// A stride-1, zero-padded (`k / 2`) convolution `[cout, cin, k, k]` on `h x w` images, or a
/// dense layer `[cout, cin]` (`k = h = w = 1`), with its weight packed for both directions.
pub struct TrainLinear {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
    fwd: ConvOp,
    adj: ConvOp,
}

impl TrainLinear {
    /// `weight` is `[cout, cin, k, k]` row-major; `k` must be odd (same padding).
    pub fn new(cin: usize, cout: usize, k: usize, h: usize, w: usize, weight: &[f32]) -> Self {
        assert!(k % 2 == 1, "training kernels take odd, same-padded kernels");
        assert_eq!(weight.len(), cout * cin * k * k, "weight [cout, cin, k, k]");
        let at = |co: usize, ci: usize, ky: usize, kx: usize| ((co * cin + ci) * k + ky) * k + kx;
        Self {
            cin,
            cout,
            k,
            h,
            w,
            fwd: ConvOp::new(cin, cout, k, 1, |d, s, ky, kx| weight[at(d, s, ky, kx)]),
            adj: ConvOp::new(cout, cin, k, -1, |d, s, ky, kx| weight[at(s, d, ky, kx)]),
        }
    }

    /// `y[cout][imgs][h*w] = W x` (no bias).
    pub fn forward(
        &self,
        x: &[f32],
        imgs: usize,
        scratch: &mut Vec<f32>,
        threads: usize,
    ) -> Vec<f32> {
        let mut y = vec![0f32; self.cout * imgs * self.h * self.w];
        self.fwd.apply(
            x, &mut y, imgs, self.h, self.w, 1.0, false, scratch, threads,
        );
        y
    }

    /// `x[cin][imgs][h*w] = W^T y`.
    pub fn adjoint(
        &self,
        y: &[f32],
        imgs: usize,
        scratch: &mut Vec<f32>,
        threads: usize,
    ) -> Vec<f32> {
        let mut x = vec![0f32; self.cin * imgs * self.h * self.w];
        self.adj.apply(
            y, &mut x, imgs, self.h, self.w, 1.0, false, scratch, threads,
        );
        x
    }

    /// `acc[cout, cin, k, k] += sum over samples and pixels of dy (x) patches(x)`.
    pub fn add_weight_grad(
        &self,
        acc: &mut [f32],
        dy: &[f32],
        x: &[f32],
        imgs: usize,
        scratch: &mut Vec<f32>,
        threads: usize,
    ) {
        let shape = (self.cin, self.cout, self.k, self.h, self.w);
        add_weight_grad(shape, acc, dy, x, imgs, scratch, threads);
    }
}

/// The weight gradient of a `(cin, cout, k, h, w)` operator (see [`TrainLinear`]) without
/// packing a weight: `acc[cout, cin, k, k] += dy[cout][n] * patches(x)[cin*k*k][n]^T`.
pub fn add_weight_grad(
    (cin, cout, k, h, w): (usize, usize, usize, usize, usize),
    acc: &mut [f32],
    dy: &[f32],
    x: &[f32],
    imgs: usize,
    scratch: &mut Vec<f32>,
    threads: usize,
) {
    let n = imgs * h * w;
    let kk = cin * k * k;
    assert!(k % 2 == 1, "training kernels take odd, same-padded kernels");
    assert!(acc.len() >= cout * kk && dy.len() >= cout * n && x.len() >= cin * n);
    let patches: &[f32] = if k == 1 {
        x
    } else {
        grow(scratch, kk * n);
        im2col(x, &mut scratch[..kk * n], cin, imgs, h, w, k, 1);
        &scratch[..kk * n]
    };
    matmul_nt(cout, kk, n, acc, dy, patches, threads);
}

/// `acc[m x p] += a[m x n] * b[p x n]^T`, all row-major.
fn matmul_nt(m: usize, p: usize, n: usize, acc: &mut [f32], a: &[f32], b: &[f32], threads: usize) {
    assert!(acc.len() >= m * p && a.len() >= m * n && b.len() >= p * n);
    if m == 0 || p == 0 || n == 0 {
        return;
    }
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: dst is m x p row-major (row stride p), lhs m x n row-major (row stride n), and rhs
    // the n x p transpose of b (element (i, j) at b[j * n + i]: column stride n, row stride 1);
    // the assert above bounds every one of those accesses, and `acc` aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            p,
            n,
            acc.as_mut_ptr(),
            1,
            p as isize,
            true,
            a.as_ptr(),
            1,
            n as isize,
            b.as_ptr(),
            n as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three products against loops written from the definitions (3x3, padding 1).
    #[test]
    fn conv_products_match_loops() {
        let (cin, cout, k, h, w, imgs) = (2, 3, 3, 4, 5, 2);
        let wt: Vec<f32> = (0..cout * cin * k * k)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0)
            .collect();
        let x: Vec<f32> = (0..cin * imgs * h * w)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0)
            .collect();
        let dy: Vec<f32> = (0..cout * imgs * h * w)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let l = TrainLinear::new(cin, cout, k, h, w, &wt);
        let mut s = Vec::new();
        let y = l.forward(&x, imgs, &mut s, 1);
        let xa = l.adjoint(&dy, imgs, &mut s, 1);
        let mut gw = vec![0f32; wt.len()];
        l.add_weight_grad(&mut gw, &dy, &x, imgs, &mut s, 1);
        let px = |c: usize, i: usize, yy: isize, xx: isize| -> f32 {
            if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                0.0
            } else {
                x[((c * imgs + i) * h + yy as usize) * w + xx as usize]
            }
        };
        let mut want_y = vec![0f32; y.len()];
        let mut want_x = vec![0f32; x.len()];
        let mut want_g = vec![0f32; wt.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let wi = ((co * cin + ci) * k + ky) * k + kx;
                        for i in 0..imgs {
                            for yy in 0..h {
                                for xx in 0..w {
                                    let (sy, sx) = (
                                        yy as isize + ky as isize - 1,
                                        xx as isize + kx as isize - 1,
                                    );
                                    let o = ((co * imgs + i) * h + yy) * w + xx;
                                    let v = px(ci, i, sy, sx);
                                    want_y[o] += wt[wi] * v;
                                    want_g[wi] += dy[o] * v;
                                    if sy >= 0 && sx >= 0 && sy < h as isize && sx < w as isize {
                                        let xi =
                                            ((ci * imgs + i) * h + sy as usize) * w + sx as usize;
                                        want_x[xi] += wt[wi] * dy[o];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        for (got, want) in [(&y, &want_y), (&xa, &want_x), (&gw, &want_g)] {
            for (a, b) in got.iter().zip(want.iter()) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }
}
