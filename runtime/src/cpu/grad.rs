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

use super::conv::{gemm_strided, grow, im2col, ConvOp};

/// `(cin, cout, k, h, w)`: a stride-1, zero-padded (`k / 2`, `k` odd) convolution with weight
/// `[cout, cin, k, k]` (row-major) on `h x w` images, or a dense layer `[cout, cin]` as the case
/// `k = h = w = 1`.
pub type Shape = (usize, usize, usize, usize, usize);

/// `y[cout][imgs][h*w] = W x` (no bias) for channel-major `x[cin][imgs][h*w]`.
pub fn forward(
    shape: Shape,
    weight: &[f32],
    x: &[f32],
    imgs: usize,
    scratch: &mut Vec<f32>,
    threads: usize,
) -> Vec<f32> {
    apply(shape, weight, x, imgs, scratch, threads, false)
}

/// `x[cin][imgs][h*w] = W^T y` for channel-major `y[cout][imgs][h*w]`.
pub fn adjoint(
    shape: Shape,
    weight: &[f32],
    y: &[f32],
    imgs: usize,
    scratch: &mut Vec<f32>,
    threads: usize,
) -> Vec<f32> {
    apply(shape, weight, y, imgs, scratch, threads, true)
}

/// The operator (or its adjoint) of a `[cout, cin, k, k]` weight applied to a whole batch.
fn apply(
    (cin, cout, k, h, w): Shape,
    weight: &[f32],
    src: &[f32],
    imgs: usize,
    scratch: &mut Vec<f32>,
    threads: usize,
    adjoint: bool,
) -> Vec<f32> {
    assert!(k % 2 == 1, "training kernels take odd, same-padded kernels");
    assert_eq!(weight.len(), cout * cin * k * k, "weight [cout, cin, k, k]");
    let op = ConvOp::new(cin, cout, k, weight, adjoint);
    let mut dst = vec![0f32; op.dst_c * imgs * h * w];
    op.apply(src, &mut dst, imgs, h, w, 1.0, false, scratch, threads);
    dst
}

/// Dense layers on batch-major rows, no transposes: `X W^T` (`x` is `[rows, fin]`, the result
/// `[rows, fout]`) or, with `adjoint`, `Y W` (`x` is `[rows, fout]`, the result `[rows, fin]`).
pub fn dense_rows(
    w: &[f32],
    fin: usize,
    fout: usize,
    x: &[f32],
    rows: usize,
    adjoint: bool,
    threads: usize,
) -> Vec<f32> {
    assert_eq!(w.len(), fin * fout, "weight [fout, fin]");
    let (kdim, n) = if adjoint { (fout, fin) } else { (fin, fout) };
    assert_eq!(x.len(), rows * kdim);
    let mut y = vec![0f32; rows * n];
    // B is W^T (element (i, j) = w[j * fin + i]) for the forward, W itself for the adjoint.
    let b = if adjoint { (fin, 1) } else { (1, fin) };
    gemm_strided(
        rows,
        n,
        kdim,
        &mut y,
        false,
        x,
        (kdim, 1),
        w,
        b,
        1.0,
        threads,
    );
    y
}

/// The dense weight gradient on batch-major rows: `acc[fout, fin] += dY^T X`.
pub fn dense_weight_grad(
    acc: &mut [f32],
    dy: &[f32],
    x: &[f32],
    rows: usize,
    fin: usize,
    fout: usize,
    threads: usize,
) {
    assert!(acc.len() >= fout * fin && dy.len() >= rows * fout && x.len() >= rows * fin);
    gemm_strided(
        fout,
        fin,
        rows,
        acc,
        true,
        dy,
        (1, fout),
        x,
        (fin, 1),
        1.0,
        threads,
    );
}

/// The weight gradient of a [`Shape`] for channel-major `dy`, `x`:
/// `acc[cout, cin, k, k] += dy[cout][n] * patches(x)[cin*k*k][n]^T`, `n = imgs*h*w`.
pub fn add_weight_grad(
    (cin, cout, k, h, w): Shape,
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
    // B is the transpose of the [kk, n] patches: element (i, j) at patches[j * n + i].
    gemm_strided(
        cout,
        kk,
        n,
        acc,
        true,
        dy,
        (n, 1),
        patches,
        (1, n),
        1.0,
        threads,
    );
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
        let shape = (cin, cout, k, h, w);
        let mut s = Vec::new();
        let y = forward(shape, &wt, &x, imgs, &mut s, 1);
        let xa = adjoint(shape, &wt, &dy, imgs, &mut s, 1);
        let mut gw = vec![0f32; wt.len()];
        add_weight_grad(shape, &mut gw, &dy, &x, imgs, &mut s, 1);
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

    /// Dense layers on batch-major rows against loops.
    #[test]
    fn dense_rows_match_loops() {
        let (fin, fout, rows) = (3, 4, 5);
        let w: Vec<f32> = (0..fin * fout).map(|i| (i as f32 - 5.0) / 3.0).collect();
        let x: Vec<f32> = (0..rows * fin)
            .map(|i| ((i * 7 % 5) as f32) - 2.0)
            .collect();
        let dy: Vec<f32> = (0..rows * fout)
            .map(|i| ((i * 3 % 4) as f32) - 1.5)
            .collect();
        let y = dense_rows(&w, fin, fout, &x, rows, false, 1);
        let xa = dense_rows(&w, fin, fout, &dy, rows, true, 1);
        let mut gw = vec![1f32; w.len()];
        dense_weight_grad(&mut gw, &dy, &x, rows, fin, fout, 1);
        for r in 0..rows {
            for o in 0..fout {
                let want: f32 = (0..fin).map(|i| w[o * fin + i] * x[r * fin + i]).sum();
                assert!((y[r * fout + o] - want).abs() < 1e-5);
            }
            for i in 0..fin {
                let want: f32 = (0..fout).map(|o| w[o * fin + i] * dy[r * fout + o]).sum();
                assert!((xa[r * fin + i] - want).abs() < 1e-5);
            }
        }
        for o in 0..fout {
            for i in 0..fin {
                let want: f32 = 1.0
                    + (0..rows)
                        .map(|r| dy[r * fout + o] * x[r * fin + i])
                        .sum::<f32>();
                assert!((gw[o * fin + i] - want).abs() < 1e-4);
            }
        }
    }
}
