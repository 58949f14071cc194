//! Convolutions and dense layers as matrix products on the `gemm` crate.
//!
//! Activations live channel-major over the whole batch, `[C][B][H*W]` (a dense layer's vector
//! is `[D][B]`, i.e. H = W = 1), so a layer is *one* GEMM with `N = B*H*W` columns whatever the
//! batch: a 1x1 convolution or dense layer multiplies the weight by the activation directly.
//! A `k x k` convolution (stride 1, zero padding `p`) takes one of two equivalent forms, chosen
//! per layer by which needs the smaller scratch buffer:
//! - **im2col**: gather the `C_src*k*k` shifted copies of the input, then one GEMM with
//!   `K = C_src*k*k` (cheap when the source has few channels);
//! - **shifted accumulation** ("col2im"): one GEMM producing the `k*k*C_dst` per-offset partial
//!   products, then add each, shifted, into the output (cheap when the destination has few).
//!
//! The adjoint (transposed convolution, for the log-det's vector-Jacobian products) is the same
//! operator with the kernel offsets negated and the weight transposed, so it reuses both forms.
//! Weights are rearranged once at load into the matrix each form multiplies.

use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use super::simd::simd_kernel;

/// `dst[m x n] = (accumulate ? dst : 0) + beta * a[m x kk] * b[kk x n]`, all row-major.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    kk: usize,
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    accumulate: bool,
    beta: f32,
    threads: usize,
) {
    matmul_lhs(m, n, kk, dst, a, false, b, accumulate, beta, threads)
}

/// [`matmul`] where `a` may be stored transposed (`a_transposed`: `a` is `[kk x m]` row-major
/// and the product uses its transpose), so a 1x1 layer's adjoint multiplies by the forward
/// weight itself instead of keeping a transposed copy.
#[allow(clippy::too_many_arguments)]
pub fn matmul_lhs(
    m: usize,
    n: usize,
    kk: usize,
    dst: &mut [f32],
    a: &[f32],
    a_transposed: bool,
    b: &[f32],
    accumulate: bool,
    beta: f32,
    threads: usize,
) {
    assert!(dst.len() >= m * n && a.len() >= m * kk && b.len() >= kk * n);
    if m == 0 || n == 0 {
        return;
    }
    if kk == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // Column and row strides of the m x kk left factor.
    let (a_cs, a_rs) = if a_transposed {
        (m as isize, 1)
    } else {
        (1, kk as isize)
    };
    // SAFETY: the asserts above keep every access of an m x n / m x kk (or its transpose, kk x m)
    // / kk x n row-major matrix inside the three slices, and `dst` is a unique borrow that
    // aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// 1x1: the weight times the activation.
    Plain,
    Im2col,
    Shifted,
}

/// One linear operator `dst += alpha * (K ⊛ src)` with its weight packed for its form.
#[derive(Clone, Debug)]
pub struct ConvOp {
    pub src_c: usize,
    pub dst_c: usize,
    pub k: usize,
    /// +1 for the convolution, -1 for its adjoint: source pixel = output pixel + sign*(ky - pad).
    sign: isize,
    form: Form,
    /// Plain/Im2col: `[dst_c, src_c*k*k]`; Shifted: `[k*k*dst_c, src_c]`; with `transposed`
    /// (a 1x1 adjoint), the forward's `[src_c, dst_c]`, shared with it.
    a: Arc<Vec<f32>>,
    transposed: bool,
}

impl ConvOp {
    /// The operator of a `[cout, cin, k, k]` weight (row-major): the convolution
    /// (`adjoint == false`, source `cin` -> destination `cout`) or its adjoint (`cout` -> `cin`).
    /// Packing is a large share of loading a model, so each form is a direct loop over
    /// contiguous destination rows, one parallel task per row.
    pub fn new(cin: usize, cout: usize, k: usize, weight: &[f32], adjoint: bool) -> Self {
        let kk = k * k;
        let (src_c, dst_c, sign) = if adjoint {
            (cout, cin, -1)
        } else {
            (cin, cout, 1)
        };
        let form = if k == 1 {
            Form::Plain
        } else if src_c <= dst_c {
            Form::Im2col
        } else {
            Form::Shifted
        };
        // w(d, s, tap): the coefficient from source channel s to destination channel d.
        let at = |d: usize, s: usize, tap: usize| {
            if adjoint {
                (s * cin + d) * kk + tap
            } else {
                (d * cin + s) * kk + tap
            }
        };
        let mut a = vec![0f32; dst_c * src_c * kk];
        match form {
            // The forward weight is already `[cout][cin*k*k]`.
            Form::Plain | Form::Im2col if !adjoint => {
                let len = a.len();
                a.copy_from_slice(&weight[..len])
            }
            Form::Plain | Form::Im2col => {
                a.par_chunks_mut(src_c * kk)
                    .enumerate()
                    .for_each(|(d, row)| {
                        for s in 0..src_c {
                            let from = at(d, s, 0);
                            row[s * kk..(s + 1) * kk].copy_from_slice(&weight[from..from + kk]);
                        }
                    })
            }
            Form::Shifted => a.par_chunks_mut(src_c).enumerate().for_each(|(r, row)| {
                let (tap, d) = (r / dst_c, r % dst_c);
                for (s, v) in row.iter_mut().enumerate() {
                    *v = weight[at(d, s, tap)];
                }
            }),
        }
        Self {
            src_c,
            dst_c,
            k,
            sign,
            form,
            a: Arc::new(a),
            transposed: false,
        }
    }

    /// The adjoint of a 1x1 operator, multiplying by the same packed weight transposed.
    fn adjoint_of_plain(&self) -> Self {
        debug_assert_eq!(self.form, Form::Plain);
        Self {
            src_c: self.dst_c,
            dst_c: self.src_c,
            k: 1,
            sign: -self.sign,
            form: Form::Plain,
            a: Arc::clone(&self.a),
            transposed: !self.transposed,
        }
    }

    /// Scratch floats needed for `n` columns.
    pub fn scratch_len(&self, n: usize) -> usize {
        match self.form {
            Form::Plain => 0,
            Form::Im2col => self.src_c * self.k * self.k * n,
            Form::Shifted => self.dst_c * self.k * self.k * n,
        }
    }

    /// `dst[dst_c][imgs][h*w] = (accumulate ? dst : 0) + alpha * (K ⊛ src)`; `scratch` grows
    /// when needed.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        src: &[f32],
        dst: &mut [f32],
        imgs: usize,
        h: usize,
        w: usize,
        alpha: f32,
        accumulate: bool,
        scratch: &mut Vec<f32>,
        threads: usize,
    ) {
        let n = imgs * h * w;
        let kk = self.k * self.k;
        let (src, dst) = (&src[..self.src_c * n], &mut dst[..self.dst_c * n]);
        match self.form {
            Form::Plain => matmul_lhs(
                self.dst_c,
                n,
                self.src_c,
                dst,
                &self.a,
                self.transposed,
                src,
                accumulate,
                alpha,
                threads,
            ),
            Form::Im2col => {
                grow(scratch, self.scratch_len(n));
                let cols = &mut scratch[..self.scratch_len(n)];
                im2col(src, cols, self.src_c, imgs, h, w, self.k, self.sign);
                matmul(
                    self.dst_c,
                    n,
                    self.src_c * kk,
                    dst,
                    &self.a,
                    cols,
                    accumulate,
                    alpha,
                    threads,
                );
            }
            Form::Shifted => {
                grow(scratch, self.scratch_len(n));
                let t = &mut scratch[..self.scratch_len(n)];
                matmul(
                    kk * self.dst_c,
                    n,
                    self.src_c,
                    t,
                    &self.a,
                    src,
                    false,
                    1.0,
                    threads,
                );
                if !accumulate {
                    dst.fill(0.0);
                }
                shift_add(t, dst, self.dst_c, imgs, h, w, self.k, self.sign, alpha);
            }
        }
    }
}

/// Grows a scratch buffer (never shrinks it: steady state allocates nothing).
pub fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// The range of output coordinates `o` in `0..len` whose source `o + d` is in `0..len`.
fn valid_range(len: usize, d: isize) -> (usize, usize) {
    let lo = (-d).max(0) as usize;
    let hi = (len as isize - d).clamp(0, len as isize) as usize;
    (lo.min(hi), hi)
}

/// `cols[(c*k + ky)*k + kx][img][y][x] = src[c][img][y + dy][x + dx]` (0 outside), with
/// `(dy, dx) = sign * (ky - k/2, kx - k/2)`.
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    src: &[f32],
    cols: &mut [f32],
    c: usize,
    imgs: usize,
    h: usize,
    w: usize,
    k: usize,
    sign: isize,
) {
    let hw = h * w;
    let n = imgs * hw;
    let pad = (k / 2) as isize;
    cols.par_chunks_mut(n)
        .take(c * k * k)
        .enumerate()
        .for_each(|(row, out)| {
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let dy = sign * (ky as isize - pad);
            let dx = sign * (kx as isize - pad);
            let (ylo, yhi) = valid_range(h, dy);
            let (xlo, xhi) = valid_range(w, dx);
            for img in 0..imgs {
                let s = &src[(ci * imgs + img) * hw..][..hw];
                let o = &mut out[img * hw..][..hw];
                for y in 0..h {
                    let orow = &mut o[y * w..][..w];
                    if y < ylo || y >= yhi {
                        orow.fill(0.0);
                        continue;
                    }
                    let sy = (y as isize + dy) as usize;
                    orow[..xlo].fill(0.0);
                    orow[xhi..].fill(0.0);
                    let sx = (xlo as isize + dx) as usize;
                    orow[xlo..xhi].copy_from_slice(&s[sy * w + sx..sy * w + sx + (xhi - xlo)]);
                }
            }
        });
}

/// `dst[c][img][y][x] += alpha * sum_{ky,kx} t[(ky*k + kx)*c_total + c][img][y + dy][x + dx]`.
///
/// Each offset is applied to a whole image plane at once: `dst[i] += alpha * t[i + dy*w + dx]`
/// over the plane's flat index, where a per-offset validity mask (the source pixel lies inside
/// the image) selects which sums to keep. Rows of 4 to 16 pixels would leave a row-by-row loop
/// scalar; the flat loop vectorizes, and a select keeps exactly the terms (and the order of
/// additions) of the row-by-row form.
#[allow(clippy::too_many_arguments)]
fn shift_add(
    t: &[f32],
    dst: &mut [f32],
    c_total: usize,
    imgs: usize,
    h: usize,
    w: usize,
    k: usize,
    sign: isize,
    alpha: f32,
) {
    let hw = h * w;
    let n = imgs * hw;
    let pad = (k / 2) as isize;
    // valid[tap][y*w + x]: the offset's source pixel is inside the image.
    let mut valid = vec![false; k * k * hw];
    for ky in 0..k {
        let dy = sign * (ky as isize - pad);
        let (ylo, yhi) = valid_range(h, dy);
        for kx in 0..k {
            let dx = sign * (kx as isize - pad);
            let (xlo, xhi) = valid_range(w, dx);
            let m = &mut valid[(ky * k + kx) * hw..][..hw];
            for y in ylo..yhi {
                m[y * w + xlo..y * w + xhi].fill(true);
            }
        }
    }
    dst.par_chunks_mut(n)
        .take(c_total)
        .enumerate()
        .for_each(|(c, out)| {
            for ky in 0..k {
                let dy = sign * (ky as isize - pad);
                for kx in 0..k {
                    let dx = sign * (kx as isize - pad);
                    let off = dy * w as isize + dx;
                    let tap = ky * k + kx;
                    let plane = &t[(tap * c_total + c) * n..][..n];
                    let m = &valid[tap * hw..][..hw];
                    for img in 0..imgs {
                        // The plane-local range whose source index stays inside `plane`; every
                        // valid pixel is in it (its source is in the same image).
                        let base = (img * hw) as isize + off;
                        let lo = (-base).clamp(0, hw as isize) as usize;
                        let hi = (n as isize - base).clamp(lo as isize, hw as isize) as usize;
                        if lo == hi {
                            continue;
                        }
                        let src_at = (base + lo as isize) as usize;
                        shift_add_plane(
                            &mut out[img * hw + lo..img * hw + hi],
                            &plane[src_at..src_at + (hi - lo)],
                            &m[lo..hi],
                            alpha,
                        );
                    }
                }
            }
        });
}

simd_kernel! {
    fn shift_add_plane(out: &mut [f32], src: &[f32], valid: &[bool], alpha: f32) {
        for ((o, s), &v) in out.iter_mut().zip(src).zip(valid) {
            let sum = *o + alpha * s;
            *o = if v { sum } else { *o };
        }
    }
}

/// A convolution or dense layer: bias, the forward operator and its adjoint.
#[derive(Clone, Debug)]
pub struct Linear {
    pub cin: usize,
    pub cout: usize,
    pub bias: Vec<f32>,
    pub fwd: ConvOp,
    pub adj: ConvOp,
}

impl Linear {
    /// From a `[cout, cin, k, k]` weight (row-major) and its bias.
    pub fn new(cin: usize, cout: usize, k: usize, weight: &[f32], bias: &[f32]) -> Self {
        let fwd = ConvOp::new(cin, cout, k, weight, false);
        let adj = if k == 1 {
            fwd.adjoint_of_plain()
        } else {
            ConvOp::new(cin, cout, k, weight, true)
        };
        Self {
            cin,
            cout,
            bias: bias.to_vec(),
            fwd,
            adj,
        }
    }

    pub fn scratch_len(&self, n: usize) -> usize {
        self.fwd.scratch_len(n).max(self.adj.scratch_len(n))
    }
}

/// `dst[c][..] = value[c]` over `n` columns per channel.
pub fn fill_rows(dst: &mut [f32], values: &[f32], n: usize) {
    dst.par_chunks_mut(n)
        .zip(values.par_iter())
        .for_each(|(row, &v)| row.fill(v));
}

/// `dst[c][..] += value[c]` over `n` columns per channel.
pub fn add_rows(dst: &mut [f32], values: &[f32], n: usize) {
    dst.par_chunks_mut(n)
        .zip(values.par_iter())
        .for_each(|(row, &v)| row.iter_mut().for_each(|x| *x += v));
}

/// `dst[c][..] = src[c][..] * scale[c] + shift[c]` over `n` columns per channel.
pub fn affine_rows(dst: &mut [f32], scale: &[f32], shift: &[f32], n: usize) {
    dst.par_chunks_mut(n)
        .zip(scale.par_iter().zip(shift.par_iter()))
        .for_each(|(row, (&s, &b))| row.iter_mut().for_each(|x| *x = *x * s + b));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution (stride 1, zero padding k/2) on `[C][imgs][H][W]`, written from the
    /// definition: `out[d][i][y][x] = sum_{s,ky,kx} w[d][s][ky][kx] * in[s][i][y+ky-p][x+kx-p]`.
    fn direct(
        w: &[f32],
        cin: usize,
        cout: usize,
        k: usize,
        x: &[f32],
        imgs: usize,
        h: usize,
        wd: usize,
    ) -> Vec<f64> {
        let p = (k / 2) as isize;
        let mut out = vec![0f64; cout * imgs * h * wd];
        for d in 0..cout {
            for i in 0..imgs {
                for y in 0..h {
                    for xx in 0..wd {
                        let mut acc = 0f64;
                        for s in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (sy, sx) = (
                                        y as isize + ky as isize - p,
                                        xx as isize + kx as isize - p,
                                    );
                                    if sy < 0 || sx < 0 || sy >= h as isize || sx >= wd as isize {
                                        continue;
                                    }
                                    let v =
                                        x[((s * imgs + i) * h + sy as usize) * wd + sx as usize];
                                    acc += w[((d * cin + s) * k + ky) * k + kx] as f64 * v as f64;
                                }
                            }
                        }
                        out[((d * imgs + i) * h + y) * wd + xx] = acc;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: deterministic, independent of the engine's RNG.
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Every form (1x1, im2col, shifted) of the forward and of the adjoint, against the direct
    /// convolution and `<K x, y> = <x, K^T y>`, on odd image sides where rows are short.
    #[test]
    fn every_form_matches_the_direct_convolution_and_its_adjoint() {
        let (imgs, h, wd) = (3, 5, 3);
        let n = imgs * h * wd;
        for (cin, cout, k) in [(3, 7, 3), (7, 3, 3), (4, 6, 1), (6, 2, 1), (2, 5, 5)] {
            let w = values(cout * cin * k * k, (cin * 31 + cout * 7 + k) as u32);
            let lin = Linear::new(cin, cout, k, &w, &vec![0.0; cout]);
            let x = values(cin * n, 7);
            let yv = values(cout * n, 9);
            let want = direct(&w, cin, cout, k, &x, imgs, h, wd);
            for threads in [1, 2] {
                let mut scratch = vec![];
                let mut out = vec![1.0f32; cout * n];
                // accumulate onto 1.0 with alpha 2: out = 1 + 2 K x.
                lin.fwd
                    .apply(&x, &mut out, imgs, h, wd, 2.0, true, &mut scratch, threads);
                for (o, e) in out.iter().zip(&want) {
                    assert!(
                        (*o as f64 - (1.0 + 2.0 * e)).abs() < 1e-5,
                        "fwd {cin}->{cout} k{k}: {o} vs {}",
                        1.0 + 2.0 * e
                    );
                }
                let mut back = vec![0f32; cin * n];
                lin.adj.apply(
                    &yv,
                    &mut back,
                    imgs,
                    h,
                    wd,
                    1.0,
                    false,
                    &mut scratch,
                    threads,
                );
                let lhs: f64 = want.iter().zip(&yv).map(|(a, b)| a * *b as f64).sum();
                let rhs: f64 = x
                    .iter()
                    .zip(&back)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!(
                    (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
                    "adjoint {cin}->{cout} k{k}: {lhs} vs {rhs}"
                );
            }
        }
    }
}
