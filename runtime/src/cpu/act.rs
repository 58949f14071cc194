//! Elementwise activations in f32, applied in place; when the log-det needs it, the same pass
//! stores the derivative at the pre-activation (the mask the vector-Jacobian product multiplies by).

use rayon::prelude::*;

use super::net::ActKind;
use super::simd::simd_kernel;

/// LipSwish divides by this so that its Lipschitz constant stays <= 1 for any beta.
const LIPSWISH_DIV: f32 = 1.1;

/// Elements per parallel task: big enough that rayon's overhead is noise.
const CHUNK: usize = 1 << 14;

/// An activation with its resolved slope (`softplus(b)` for LipSwish).
#[derive(Clone, Copy, Debug)]
pub struct Act {
    pub kind: ActKind,
    pub beta: f32,
}

/// `softplus` in f64, as the reference computes the LipSwish slope.
pub fn softplus(x: f64) -> f64 {
    if x > 30.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `e^x` in f32 without a libm call, branch-free so that loops over slices vectorize:
/// `x = n ln2 + r` with `|r| <= ln2/2`, `e^r` by its degree-7 Taylor polynomial (truncation below 5e-9
/// relative, under f32's rounding), `2^n` by building the exponent bits. Inputs are clamped to
/// [-87, 88] (the results there are below f32's smallest normal or near its largest, which only
/// ELU's negative side reaches and where it is -1 to f32 precision anyway).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in plain SSE2.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `t`'s low mantissa bits hold n itself (t = 1.5 * 2^23 + n): reading them instead of
    // converting `n` keeps the loop free of saturating float -> int conversions, which
    // would stop it from vectorizing.
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let bits = ((n_int + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

impl Act {
    /// `x <- f(x)`, and `mask <- f'(x)` (pre-activation) when given.
    pub fn apply(&self, x: &mut [f32], mask: Option<&mut [f32]>) {
        let len = x.len();
        let act = *self;
        match mask {
            Some(m) => x
                .par_chunks_mut(CHUNK)
                .zip(m[..len].par_chunks_mut(CHUNK))
                .for_each(|(xs, ms)| values_and_slopes(act, xs, ms)),
            None => x.par_chunks_mut(CHUNK).for_each(|xs| values(act, xs)),
        }
    }

    /// `dst <- f(src)`.
    pub fn apply_to(&self, src: &[f32], dst: &mut [f32], mask: Option<&mut [f32]>) {
        dst[..src.len()].copy_from_slice(src);
        self.apply(&mut dst[..src.len()], mask);
    }
}

simd_kernel! {
    fn values(act: Act, xs: &mut [f32]) {
        // One loop per kind, so that each vectorizes without a per-element match.
        match act.kind {
            ActKind::Elu => xs.iter_mut().for_each(|v| *v = elu(*v).0),
            ActKind::Relu => xs.iter_mut().for_each(|v| *v = relu(*v).0),
            ActKind::LipSwish => xs.iter_mut().for_each(|v| *v = lipswish(act.beta, *v).0),
        }
    }
}

simd_kernel! {
    fn values_and_slopes(act: Act, xs: &mut [f32], ms: &mut [f32]) {
        match act.kind {
            ActKind::Elu => each_value_and_slope(xs, ms, elu),
            ActKind::Relu => each_value_and_slope(xs, ms, relu),
            ActKind::LipSwish => each_value_and_slope(xs, ms, |x| lipswish(act.beta, x)),
        }
    }
}

#[inline(always)]
fn each_value_and_slope(xs: &mut [f32], ms: &mut [f32], f: impl Fn(f32) -> (f32, f32)) {
    for (v, d) in xs.iter_mut().zip(ms) {
        let (y, s) = f(*v);
        *v = y;
        *d = s;
    }
}

#[inline(always)]
fn elu(x: f32) -> (f32, f32) {
    // exp of min(x, 0) for both branches: no overflow, and a select, not a branch.
    let e = fast_exp(x.min(0.0));
    if x > 0.0 {
        (x, 1.0)
    } else {
        (e - 1.0, e)
    }
}

#[inline(always)]
fn relu(x: f32) -> (f32, f32) {
    if x > 0.0 {
        (x, 1.0)
    } else {
        (0.0, 0.0)
    }
}

#[inline(always)]
fn lipswish(beta: f32, x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + fast_exp(-beta * x));
    (
        x * s / LIPSWISH_DIV,
        (s + beta * x * s * (1.0 - s)) / LIPSWISH_DIV,
    )
}

/// `w <- w * mask`, elementwise.
pub fn mul_mask(w: &mut [f32], mask: &[f32]) {
    let len = w.len();
    w.par_chunks_mut(CHUNK)
        .zip(mask[..len].par_chunks(CHUNK))
        .for_each(|(ws, ms)| mul_chunk(ws, ms));
}

simd_kernel! {
    fn mul_chunk(ws: &mut [f32], ms: &[f32]) {
        for (v, m) in ws.iter_mut().zip(ms) {
            *v *= m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against std's f64 exp over the range the activations use.
    #[test]
    fn fast_exp_is_accurate_to_f32_rounding() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let want = (x as f32 as f64).exp();
            let got = fast_exp(x as f32) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-7, "max relative error {worst:e}");
    }
}
