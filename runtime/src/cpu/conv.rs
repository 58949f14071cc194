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

use gemm::Parallelism;
use rayon::prelude::*;

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
    // SAFETY: the asserts above keep every access of an m x n / m x kk / kk x n row-major
    // matrix (column stride 1, row strides n, kk, n) inside the three slices, and `dst` is a
    // unique borrow that aliases neither input.
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
            1,
            kk as isize,
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
    /// Plain/Im2col: `[dst_c, src_c*k*k]`; Shifted: `[k*k*dst_c, src_c]`.
    a: Vec<f32>,
}

impl ConvOp {
    /// `w(d, s, ky, kx)`: the coefficient from source channel `s` to destination channel `d`
    /// at kernel offset `(ky, kx)`.
    pub fn new(
        src_c: usize,
        dst_c: usize,
        k: usize,
        sign: isize,
        w: impl Fn(usize, usize, usize, usize) -> f32,
    ) -> Self {
        let kk = k * k;
        let form = if k == 1 {
            Form::Plain
        } else if src_c <= dst_c {
            Form::Im2col
        } else {
            Form::Shifted
        };
        let mut a = vec![0f32; dst_c * src_c * kk];
        for d in 0..dst_c {
            for s in 0..src_c {
                for ky in 0..k {
                    for kx in 0..k {
                        let v = w(d, s, ky, kx);
                        let at = match form {
                            Form::Plain | Form::Im2col => d * src_c * kk + (s * k + ky) * k + kx,
                            Form::Shifted => ((ky * k + kx) * dst_c + d) * src_c + s,
                        };
                        a[at] = v;
                    }
                }
            }
        }
        Self {
            src_c,
            dst_c,
            k,
            sign,
            form,
            a,
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
            Form::Plain => matmul(
                self.dst_c, n, self.src_c, dst, &self.a, src, accumulate, alpha, threads,
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
fn valid(len: usize, d: isize) -> (usize, usize) {
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
            let (ylo, yhi) = valid(h, dy);
            let (xlo, xhi) = valid(w, dx);
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
    dst.par_chunks_mut(n)
        .take(c_total)
        .enumerate()
        .for_each(|(c, out)| {
            for ky in 0..k {
                let dy = sign * (ky as isize - pad);
                let (ylo, yhi) = valid(h, dy);
                for kx in 0..k {
                    let dx = sign * (kx as isize - pad);
                    let (xlo, xhi) = valid(w, dx);
                    let plane = &t[((ky * k + kx) * c_total + c) * n..][..n];
                    for img in 0..imgs {
                        let s = &plane[img * hw..][..hw];
                        let o = &mut out[img * hw..][..hw];
                        for y in ylo..yhi {
                            let sy = (y as isize + dy) as usize;
                            let sx = (xlo as isize + dx) as usize;
                            let src = &s[sy * w + sx..sy * w + sx + (xhi - xlo)];
                            for (d, v) in o[y * w + xlo..y * w + xhi].iter_mut().zip(src) {
                                *d += alpha * v;
                            }
                        }
                    }
                }
            }
        });
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
        let at = |co: usize, ci: usize, ky: usize, kx: usize| ((co * cin + ci) * k + ky) * k + kx;
        Self {
            cin,
            cout,
            bias: bias.to_vec(),
            fwd: ConvOp::new(cin, cout, k, 1, |d, s, ky, kx| weight[at(d, s, ky, kx)]),
            adj: ConvOp::new(cout, cin, k, -1, |d, s, ky, kx| weight[at(s, d, ky, kx)]),
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
