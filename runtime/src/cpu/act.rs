//! Elementwise activations in f32, applied in place; when the log-det needs it, the same pass
//! stores the derivative at the pre-activation (the mask the vector-Jacobian product multiplies by).

use rayon::prelude::*;

use super::net::ActKind;

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

impl Act {
    #[inline]
    fn value_and_slope(&self, x: f32) -> (f32, f32) {
        match self.kind {
            ActKind::Elu => {
                if x > 0.0 {
                    (x, 1.0)
                } else {
                    let e = x.exp();
                    (x.exp_m1(), e)
                }
            }
            ActKind::Relu => {
                if x > 0.0 {
                    (x, 1.0)
                } else {
                    (0.0, 0.0)
                }
            }
            ActKind::LipSwish => {
                let s = 1.0 / (1.0 + (-self.beta * x).exp());
                (
                    x * s / LIPSWISH_DIV,
                    (s + self.beta * x * s * (1.0 - s)) / LIPSWISH_DIV,
                )
            }
        }
    }

    /// `x <- f(x)`, and `mask <- f'(x)` (pre-activation) when given.
    pub fn apply(&self, x: &mut [f32], mask: Option<&mut [f32]>) {
        let len = x.len();
        match mask {
            Some(m) => x
                .par_chunks_mut(CHUNK)
                .zip(m[..len].par_chunks_mut(CHUNK))
                .for_each(|(xs, ms)| {
                    for (v, d) in xs.iter_mut().zip(ms) {
                        let (f, s) = self.value_and_slope(*v);
                        *v = f;
                        *d = s;
                    }
                }),
            None => x.par_chunks_mut(CHUNK).for_each(|xs| {
                for v in xs {
                    *v = self.value_and_slope(*v).0;
                }
            }),
        }
    }

    /// `dst <- f(src)`.
    pub fn apply_to(&self, src: &[f32], dst: &mut [f32], mask: Option<&mut [f32]>) {
        dst[..src.len()].copy_from_slice(src);
        self.apply(&mut dst[..src.len()], mask);
    }
}

/// `w <- w * mask`, elementwise.
pub fn mul_mask(w: &mut [f32], mask: &[f32]) {
    let len = w.len();
    w.par_chunks_mut(CHUNK)
        .zip(mask[..len].par_chunks(CHUNK))
        .for_each(|(ws, ms)| {
            for (v, m) in ws.iter_mut().zip(ms) {
                *v *= m;
            }
        });
}
