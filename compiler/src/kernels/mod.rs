//! f64 CPU kernels for one sample (NCHW without the batch axis): 2-D convolution,
//! its adjoint (transposed convolution), and dense layers.
//!
//! These run inside power iteration (hundreds of applications per layer) and in the
//! f64 reference executor, so the convolutions are cast as `matrixmultiply::dgemm`
//! calls instead of loops over taps and pixels.
//!
//! # How the convolution becomes GEMMs
//!
//! The input is copied once into a zero-padded buffer split into `stride x stride`
//! *phases* (polyphase decomposition): phase `(py, px)` holds the padded pixels
//! `(a*stride + py, b*stride + px)`. Tap `(ky, kx)` of a strided convolution then reads
//! phase `(ky % stride, kx % stride)` at offset `(ky / stride, kx / stride)` with unit
//! step, so every tap becomes a stride-1 shift of one phase image.
//!
//! Outputs are computed on a "wide" grid whose row pitch is the phase width `wq`
//! rather than `out_w`: output `(oy, ox)` is column `j = oy * wq + ox`. A shift by
//! `(dy, dx)` is then a constant offset `dy * wq + dx` in `j`, so the shifted phase
//! image is an ordinary strided matrix that dgemm can read in place, with no im2col
//! copy. Columns with `ox >= out_w` are junk (they read neighbouring rows) and are
//! dropped when the wide result is cropped; they cost `wq / out_w - 1` extra work
//! (12.5 % for a 3x3 "same" conv at 16x16).
//!
//! Three formulations use this layout ([`ConvAlgo`]; the fastest is picked from the
//! channel counts, see `preferred`):
//! * **per tap**: `y_wide += W[:, :, ky, kx] * shift(phase)` for each of the `k*k`
//!   taps, i.e. `k*k` GEMMs with inner dimension `cin`, reading the input in place.
//!   No copies, but `k*k` smaller GEMMs that re-read the output: best when both
//!   channel counts are large.
//! * **im2col**: stack the `k*k` shifted views into a `[cin*k*k, n]` matrix (one
//!   `memcpy` per row) and do a single GEMM with inner dimension `cin*k*k`. The copy
//!   is `cin*k*k*n` values, cheap when `cin` is small.
//! * **output expansion**: one GEMM of the stacked `[k*k*cout, cin]` weights with the
//!   unshifted phase image gives all `k*k` partial outputs, which are then added at
//!   their shifts. The expansion is `k*k*cout*n` values, cheap when `cout` is small
//!   (the 512->12 convolution of the CIFAR model).
//!
//! The adjoint mirrors each: per tap, `phase_grad[shift] += W_tap^T * dy_wide` (the
//! destination is again a strided view, and the junk columns of `dy_wide` are zero,
//! so they add nothing); col2im, `cols = W^T * dy_wide` followed by scatter-adds; or
//! a gather of `k*k` shifted copies of `dy_wide` followed by one GEMM.

use matrixmultiply::dgemm;

/// Geometry of a 2-D convolution on one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    /// `(h + 2*pad - k) / stride + 1`, or 0 when the geometry is degenerate
    /// (kernel larger than the padded input, `k == 0` or `stride == 0`).
    pub fn out_h(&self) -> usize {
        out_extent(self.h, self.k, self.stride, self.pad)
    }

    /// `(w + 2*pad - k) / stride + 1`, or 0 when the geometry is degenerate.
    pub fn out_w(&self) -> usize {
        out_extent(self.w, self.k, self.stride, self.pad)
    }

    /// `cin * h * w`.
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// `cout * out_h * out_w`.
    pub fn out_len(&self) -> usize {
        self.cout * self.out_h() * self.out_w()
    }

    /// `cout * cin * k * k`, the length of the weight tensor `[cout, cin, k, k]`.
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }

    /// True when the kernel fits the padded input and `k, stride >= 1`, i.e. the
    /// output has at least one pixel per channel.
    pub fn is_valid(&self) -> bool {
        self.out_h() > 0 && self.out_w() > 0
    }

    /// Multiply-adds of one application (same for the adjoint).
    pub fn macs(&self) -> usize {
        self.out_len() * self.cin * self.k * self.k
    }
}

fn out_extent(n: usize, k: usize, stride: usize, pad: usize) -> usize {
    let padded = n + 2 * pad;
    if k == 0 || stride == 0 || padded < k {
        0
    } else {
        (padded - k) / stride + 1
    }
}

/// Which GEMM formulation a convolution uses; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConvAlgo {
    /// Pick per call from the shapes (the choice measured fastest here).
    #[default]
    Auto,
    /// `k*k` GEMMs reading shifted views of the input in place.
    PerTap,
    /// One GEMM on an explicit im2col matrix (col2im for the adjoint).
    Im2col,
    /// One GEMM of the stacked `[k*k*cout, cin]` weights with the unshifted input,
    /// then `k*k` shifted adds of the partial outputs (for the adjoint: a gather of
    /// `k*k` shifted copies of `dy`, then one GEMM). The expansion is on the output
    /// side, so it suits a small `cout` as im2col suits a small `cin`.
    OutputExpand,
}

/// Which formulation is fastest depends on which side has few channels: expand that
/// side (im2col for a small `cin`, output expansion for a very small `cout`) and do
/// one large GEMM; with many channels on both sides the per-tap GEMMs are large
/// enough and need no copies. Measured by the `bench_conv_cifar_shapes` test (ms,
/// fastest of 31, on a shared 2-core machine, so +-20 %):
///
/// | conv (16x16 unless noted) | fwd per-tap | im2col | out-expand | adj per-tap | col2im | out-expand |
/// |---|---|---|---|---|---|---|
/// | 512->12 3x3        | 1.43 | 2.87 | **0.95** | 0.93 | 2.04 | **0.90** |
/// | 12->512 3x3        | 0.85 | **0.65** | 2.93 | 1.46 | **0.72** | 3.90 |
/// | 48->512 3x3 (8x8)  | 0.91 | **0.65** | 2.17 | 1.06 | **0.68** | 2.82 |
/// | 512->48 3x3 (8x8)  | **1.16** | 1.16 | 1.39 | 1.04 | **0.95** | 1.71 |
/// | 32->32 3x3 (32x32) | **0.43** | 0.83 | 0.67 | **0.45** | 0.58 | 1.00 |
/// | 64->64 3x3         | **0.40** | 0.53 | 0.90 | **0.40** | 0.65 | 0.99 |
fn preferred(g: &ConvGeom) -> ConvAlgo {
    if g.k == 1 {
        // A single tap: one GEMM on the input as it is, nothing to expand.
        ConvAlgo::PerTap
    } else if g.cin >= 16 * g.cout {
        ConvAlgo::OutputExpand
    } else if g.cin < g.cout {
        ConvAlgo::Im2col
    } else {
        ConvAlgo::PerTap
    }
}

/// Derived sizes of the phase buffer and the wide output grid.
#[derive(Clone, Copy, Debug)]
struct Layout {
    s: usize,
    /// Phase image width: `ceil((w + 2 pad) / s)`; also the row pitch of the wide grid.
    wq: usize,
    /// Columns of the wide grid: `out_h * wq`.
    n: usize,
    /// Distance between channels inside one phase. Large enough that a shifted view
    /// of `n` columns never leaves its channel, so views of different channels never
    /// overlap (which matters when they are GEMM destinations).
    cs: usize,
    oh: usize,
    ow: usize,
}

impl Layout {
    fn new(g: &ConvGeom) -> Layout {
        let s = g.stride.max(1);
        let hq = (g.h + 2 * g.pad).div_ceil(s);
        let wq = (g.w + 2 * g.pad).div_ceil(s);
        let oh = g.out_h();
        let ow = g.out_w();
        let n = oh * wq;
        // Largest tap offset in phase coordinates, in both directions.
        let q = g.k.saturating_sub(1) / s;
        let cs = (hq * wq).max((oh + q) * wq + q);
        Layout {
            s,
            wq,
            n,
            cs,
            oh,
            ow,
        }
    }

    fn phase_len(&self, cin: usize) -> usize {
        cin * self.cs
    }

    fn buf_len(&self, cin: usize) -> usize {
        self.s * self.s * self.phase_len(cin)
    }

    /// Offset of the view read (forward) or written (adjoint) by tap `(ky, kx)`
    /// in the phase buffer, relative to its start.
    fn tap_offset(&self, cin: usize, ky: usize, kx: usize) -> usize {
        let phase = (ky % self.s) * self.s + kx % self.s;
        phase * self.phase_len(cin) + (ky / self.s) * self.wq + kx / self.s
    }

    /// Index in the phase buffer of unpadded input pixel `(ci, y, x)`.
    fn pixel_index(&self, cin: usize, pad: usize, ci: usize, y: usize, x: usize) -> usize {
        let (py, px) = (y + pad, x + pad);
        let phase = (py % self.s) * self.s + px % self.s;
        phase * self.phase_len(cin) + ci * self.cs + (py / self.s) * self.wq + px / self.s
    }
}

/// The taps `(ky, kx)` that read phase `phase`, in row-major tap order.
fn phase_taps(k: usize, s: usize, phase: usize) -> Vec<(usize, usize)> {
    (0..k)
        .flat_map(|ky| (0..k).map(move |kx| (ky, kx)))
        .filter(|&(ky, kx)| (ky % s) * s + kx % s == phase)
        .collect()
}

fn resolve(algo: ConvAlgo, g: &ConvGeom) -> ConvAlgo {
    match algo {
        ConvAlgo::Auto => preferred(g),
        other => other,
    }
}

/// `y[co,oy,ox] = bias[co] + sum_{ci,ky,kx} weight[co,ci,ky,kx] * x[ci, oy*stride+ky-pad, ox*stride+kx-pad]`
/// (zero outside the input). `weight` is `[cout, cin, k, k]` row-major.
///
/// On a length mismatch (`x`, `weight` or `bias` not matching `g`) the result is
/// all NaN rather than a panic: callers validate shapes, and a NaN surfaces in every
/// downstream number instead of aborting the compiler.
pub fn conv2d(g: &ConvGeom, x: &[f64], weight: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    conv2d_with(g, x, weight, bias, ConvAlgo::Auto)
}

/// [`conv2d`] with an explicit GEMM formulation (for tests and benchmarks).
pub fn conv2d_with(
    g: &ConvGeom,
    x: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    algo: ConvAlgo,
) -> Vec<f64> {
    let out_len = g.out_len();
    let lengths_ok = x.len() == g.in_len()
        && weight.len() == g.weight_len()
        && bias.is_none_or(|b| b.len() == g.cout);
    debug_assert!(lengths_ok, "conv2d: slice lengths do not match {g:?}");
    if !lengths_ok {
        return vec![f64::NAN; out_len];
    }
    if out_len == 0 {
        return Vec::new();
    }
    let lay = Layout::new(g);
    let (cin, cout, k) = (g.cin, g.cout, g.k);

    // Scatter the input into the zero-padded phase buffer.
    let mut buf = vec![0.0; lay.buf_len(cin)];
    for ci in 0..cin {
        for y in 0..g.h {
            let row = &x[(ci * g.h + y) * g.w..][..g.w];
            if lay.s == 1 {
                let start = lay.pixel_index(cin, g.pad, ci, y, 0);
                buf[start..start + g.w].copy_from_slice(row);
            } else {
                for (xx, &val) in row.iter().enumerate() {
                    buf[lay.pixel_index(cin, g.pad, ci, y, xx)] = val;
                }
            }
        }
    }

    // Wide output, pre-filled with the bias so that every GEMM accumulates (beta = 1).
    let n = lay.n;
    let mut wide = vec![0.0; cout * n];
    if let Some(b) = bias {
        for (row, &bv) in wide.chunks_exact_mut(n).zip(b) {
            row.fill(bv);
        }
    }

    match resolve(algo, g) {
        ConvAlgo::OutputExpand => {
            // Every phase channel is `cs` long and tap (ky, kx) needs its columns
            // off..off+n, which lie inside it (Layout::cs).
            let span = lay.cs;
            for phase in 0..lay.s * lay.s {
                let taps = phase_taps(k, lay.s, phase);
                if taps.is_empty() {
                    continue;
                }
                let m = taps.len() * cout;
                let mut stacked = vec![0.0; m * cin];
                for (t, &(ky, kx)) in taps.iter().enumerate() {
                    for co in 0..cout {
                        for ci in 0..cin {
                            stacked[(t * cout + co) * cin + ci] =
                                weight[((co * cin + ci) * k + ky) * k + kx];
                        }
                    }
                }
                let mut partial = vec![0.0; m * span];
                // SAFETY: A = stacked (m x cin), B = this phase of buf (cin x span with
                // strides (cs, 1), span == cs, so it ends at the phase's end), C = partial
                // (m x span); all contiguous and in bounds.
                unsafe {
                    dgemm(
                        m,
                        cin,
                        span,
                        1.0,
                        stacked.as_ptr(),
                        cin as isize,
                        1,
                        buf.as_ptr().add(phase * lay.phase_len(cin)),
                        lay.cs as isize,
                        1,
                        0.0,
                        partial.as_mut_ptr(),
                        span as isize,
                        1,
                    );
                }
                for (t, &(ky, kx)) in taps.iter().enumerate() {
                    let off = (ky / lay.s) * lay.wq + kx / lay.s;
                    for co in 0..cout {
                        let src = &partial[(t * cout + co) * span + off..][..n];
                        for (d, &p) in wide[co * n..(co + 1) * n].iter_mut().zip(src) {
                            *d += p;
                        }
                    }
                }
            }
        }
        ConvAlgo::PerTap | ConvAlgo::Auto => {
            for ky in 0..k {
                for kx in 0..k {
                    let off = lay.tap_offset(cin, ky, kx);
                    // SAFETY: A = weight[.., .., ky, kx] as a cout x cin matrix with strides
                    // (cin*k*k, k*k): largest index (cout-1)*cin*k*k + (cin-1)*k*k + ky*k + kx
                    // < weight.len(). B = the shifted phase view, cin x n with strides (cs, 1):
                    // largest index off + (cin-1)*cs + n-1 < buf.len() because the view stays
                    // inside its channel (Layout::cs). C = wide, cout x n contiguous.
                    unsafe {
                        dgemm(
                            cout,
                            cin,
                            n,
                            1.0,
                            weight.as_ptr().add(ky * k + kx),
                            (cin * k * k) as isize,
                            (k * k) as isize,
                            buf.as_ptr().add(off),
                            lay.cs as isize,
                            1,
                            1.0,
                            wide.as_mut_ptr(),
                            n as isize,
                            1,
                        );
                    }
                }
            }
        }
        ConvAlgo::Im2col => {
            let rows = cin * k * k;
            let mut cols = vec![0.0; rows * n];
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let src = lay.tap_offset(cin, ky, kx) + ci * lay.cs;
                        let r = (ci * k + ky) * k + kx;
                        cols[r * n..(r + 1) * n].copy_from_slice(&buf[src..src + n]);
                    }
                }
            }
            // SAFETY: A = weight as a contiguous cout x (cin*k*k) matrix, B = cols as a
            // contiguous (cin*k*k) x n matrix, C = wide as a contiguous cout x n matrix;
            // all three slices have exactly those lengths.
            unsafe {
                dgemm(
                    cout,
                    rows,
                    n,
                    1.0,
                    weight.as_ptr(),
                    rows as isize,
                    1,
                    cols.as_ptr(),
                    n as isize,
                    1,
                    1.0,
                    wide.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        }
    }

    // Crop the junk columns.
    let mut y = Vec::with_capacity(out_len);
    for row in wide.chunks_exact(n) {
        for oy in 0..lay.oh {
            y.extend_from_slice(&row[oy * lay.wq..oy * lay.wq + lay.ow]);
        }
    }
    y
}

/// The adjoint of [`conv2d`] without bias (the transposed convolution): maps
/// `cout*out_h*out_w -> cin*h*w` with `<conv2d(g,x,w,None), dy> == <x, conv2d_adjoint(g,dy,w)>`.
///
/// Length mismatches give an all-NaN result, as in [`conv2d`].
pub fn conv2d_adjoint(g: &ConvGeom, dy: &[f64], weight: &[f64]) -> Vec<f64> {
    conv2d_adjoint_with(g, dy, weight, ConvAlgo::Auto)
}

/// [`conv2d_adjoint`] with an explicit GEMM formulation (for tests and benchmarks).
pub fn conv2d_adjoint_with(g: &ConvGeom, dy: &[f64], weight: &[f64], algo: ConvAlgo) -> Vec<f64> {
    let in_len = g.in_len();
    let lengths_ok = dy.len() == g.out_len() && weight.len() == g.weight_len();
    debug_assert!(
        lengths_ok,
        "conv2d_adjoint: slice lengths do not match {g:?}"
    );
    if !lengths_ok {
        return vec![f64::NAN; in_len];
    }
    if g.out_len() == 0 {
        // No output pixels: the operator is zero.
        return vec![0.0; in_len];
    }
    let lay = Layout::new(g);
    let (cin, cout, k, n) = (g.cin, g.cout, g.k, lay.n);

    // dy on the wide grid; the junk columns stay zero so they contribute nothing.
    let mut dy_wide = vec![0.0; cout * n];
    let plane = lay.oh * lay.ow;
    for co in 0..cout {
        for oy in 0..lay.oh {
            let src = &dy[co * plane + oy * lay.ow..][..lay.ow];
            dy_wide[co * n + oy * lay.wq..][..lay.ow].copy_from_slice(src);
        }
    }

    let mut buf = vec![0.0; lay.buf_len(cin)];
    match resolve(algo, g) {
        ConvAlgo::OutputExpand => {
            let span = lay.cs;
            for phase in 0..lay.s * lay.s {
                let taps = phase_taps(k, lay.s, phase);
                if taps.is_empty() {
                    continue;
                }
                let m = taps.len() * cout;
                // A[ci, (t, co)] = W[co, ci, tap t]; G[(t, co), off_t + j] = dy_wide[co, j].
                let mut a = vec![0.0; cin * m];
                let mut shifted = vec![0.0; m * span];
                for (t, &(ky, kx)) in taps.iter().enumerate() {
                    let off = (ky / lay.s) * lay.wq + kx / lay.s;
                    for co in 0..cout {
                        for ci in 0..cin {
                            a[ci * m + t * cout + co] = weight[((co * cin + ci) * k + ky) * k + kx];
                        }
                        shifted[(t * cout + co) * span + off..][..n]
                            .copy_from_slice(&dy_wide[co * n..(co + 1) * n]);
                    }
                }
                // SAFETY: A = a (cin x m), B = shifted (m x span), C = this phase of buf
                // (cin x span with strides (cs, 1), span == cs: disjoint rows ending at the
                // phase's end); all in bounds.
                unsafe {
                    dgemm(
                        cin,
                        m,
                        span,
                        1.0,
                        a.as_ptr(),
                        m as isize,
                        1,
                        shifted.as_ptr(),
                        span as isize,
                        1,
                        0.0,
                        buf.as_mut_ptr().add(phase * lay.phase_len(cin)),
                        lay.cs as isize,
                        1,
                    );
                }
            }
        }
        ConvAlgo::PerTap | ConvAlgo::Auto => {
            for ky in 0..k {
                for kx in 0..k {
                    let off = lay.tap_offset(cin, ky, kx);
                    // SAFETY: A = weight[.., .., ky, kx]^T as a cin x cout matrix with strides
                    // (k*k, cin*k*k), in bounds as in conv2d. B = dy_wide, cout x n contiguous.
                    // C = the shifted phase view, cin x n with strides (cs, 1): in bounds
                    // (largest index off + (cin-1)*cs + n-1 < buf.len()) and free of aliasing,
                    // because each channel's view of n columns ends before the next channel
                    // starts (Layout::cs).
                    unsafe {
                        dgemm(
                            cin,
                            cout,
                            n,
                            1.0,
                            weight.as_ptr().add(ky * k + kx),
                            (k * k) as isize,
                            (cin * k * k) as isize,
                            dy_wide.as_ptr(),
                            n as isize,
                            1,
                            1.0,
                            buf.as_mut_ptr().add(off),
                            lay.cs as isize,
                            1,
                        );
                    }
                }
            }
        }
        ConvAlgo::Im2col => {
            let rows = cin * k * k;
            let mut cols = vec![0.0; rows * n];
            // SAFETY: A = weight^T as a (cin*k*k) x cout matrix with strides (1, cin*k*k),
            // B = dy_wide (cout x n), C = cols ((cin*k*k) x n), all contiguous and in bounds.
            unsafe {
                dgemm(
                    rows,
                    cout,
                    n,
                    1.0,
                    weight.as_ptr(),
                    1,
                    rows as isize,
                    dy_wide.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    cols.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let dst = lay.tap_offset(cin, ky, kx) + ci * lay.cs;
                        let r = (ci * k + ky) * k + kx;
                        for (d, &c) in buf[dst..dst + n].iter_mut().zip(&cols[r * n..(r + 1) * n]) {
                            *d += c;
                        }
                    }
                }
            }
        }
    }

    // Gather the unpadded pixels back out of the phase buffer.
    let mut dx = Vec::with_capacity(in_len);
    for ci in 0..cin {
        for y in 0..g.h {
            if lay.s == 1 {
                let start = lay.pixel_index(cin, g.pad, ci, y, 0);
                dx.extend_from_slice(&buf[start..start + g.w]);
            } else {
                dx.extend((0..g.w).map(|xx| buf[lay.pixel_index(cin, g.pad, ci, y, xx)]));
            }
        }
    }
    dx
}

/// Dot product with independent partial sums, so the compiler can vectorize it
/// (a single running sum is a serial dependency chain it may not reassociate).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    const L: usize = 8;
    let mut acc = [0.0; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `y = W x + b`, `W` is `[fout, fin]` row-major. Length mismatches give all NaN.
pub fn dense(fin: usize, fout: usize, x: &[f64], weight: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let lengths_ok =
        x.len() == fin && weight.len() == fin * fout && bias.is_none_or(|b| b.len() == fout);
    debug_assert!(
        lengths_ok,
        "dense: slice lengths do not match {fin} -> {fout}"
    );
    if !lengths_ok {
        return vec![f64::NAN; fout];
    }
    if fin == 0 {
        return bias.map_or_else(|| vec![0.0; fout], <[f64]>::to_vec);
    }
    weight
        .chunks_exact(fin)
        .enumerate()
        .map(|(o, row)| dot(row, x) + bias.map_or(0.0, |b| b[o]))
        .collect()
}

/// `W^T dy`, `W` is `[fout, fin]` row-major. Length mismatches give all NaN.
pub fn dense_adjoint(fin: usize, fout: usize, dy: &[f64], weight: &[f64]) -> Vec<f64> {
    let lengths_ok = dy.len() == fout && weight.len() == fin * fout;
    debug_assert!(
        lengths_ok,
        "dense_adjoint: slice lengths do not match {fin} -> {fout}"
    );
    if !lengths_ok {
        return vec![f64::NAN; fin];
    }
    let mut dx = vec![0.0; fin];
    if fin == 0 {
        return dx;
    }
    // Row-wise axpy: streams W once in memory order.
    for (row, &d) in weight.chunks_exact(fin).zip(dy) {
        for (acc, &wv) in dx.iter_mut().zip(row) {
            *acc += d * wv;
        }
    }
    dx
}

#[cfg(test)]
mod tests;
