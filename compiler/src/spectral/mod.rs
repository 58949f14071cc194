//! Spectral norms of the linear layers: *estimates* by power iteration or Lanczos
//! (both approach `sigma` from below) and *certified upper bounds* (exact
//! eigensolvers on small matrices plus a rounding margin). See
//! docs/design.md#spectral-normalization-and-certified-bounds.
//!
//! Which to use: [`conv_sigma_upper_bound`] / [`matrix_sigma_max`] certify; for an
//! estimate of a 3x3 convolution [`conv_sigma_lanczos`] needs about a tenth of the
//! operator applications of [`conv_sigma_estimate`] (power iteration) for the same
//! accuracy; a 1x1 convolution or dense layer is exactly [`matrix_sigma_max`] of its
//! matrix (up to the margin). Numbers: the ignored test `report_cifar_spectral`.
//!
//! # Rounding margin of the certified bounds
//!
//! The bounds come out of backward-stable dense solvers (Householder bidiagonalization
//! followed by implicit QR for the SVD, tridiagonalization followed by implicit QR for
//! Hermitian eigenproblems). Their error on the largest singular value is at most a small
//! multiple of `n * eps * sigma_max`; forming a Gram matrix adds at most about
//! `D * d * eps` relative error on `sigma^2` (inner dimension `D`, order `d`), and a
//! kernel DFT about `k^2 * eps` relative. For every layer of the reference models this
//! is below `1e-12`, so [`CERT_REL_MARGIN`] = `1e-10` (plus [`CERT_ABS_MARGIN`] for an
//! all-zero operator) keeps the reported value above the true one with room to spare.

//!
//! Layout: `krylov` holds the estimators (power iteration, Lanczos with its
//! Ritz-residual stopping rule), `dense` the certified matrix bound, `conv` the
//! convolution estimates and bounds (circular embedding, exact small operators).

use crate::kernels::{conv2d, conv2d_adjoint, dense, dense_adjoint, ConvGeom};
use matrixmultiply::dgemm;
use nalgebra::{Complex, DMatrix, SymmetricEigen};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::f64::consts::PI;

/// Relative margin added to every certified bound (see the module docs).
pub const CERT_REL_MARGIN: f64 = 1e-10;
/// Absolute margin added to every certified bound, so that it is positive even for a
/// zero operator whose computed norm might come out as a tiny negative eigenvalue.
pub const CERT_ABS_MARGIN: f64 = 1e-300;

fn certify(sigma: f64) -> f64 {
    sigma * (1.0 + CERT_REL_MARGIN) + CERT_ABS_MARGIN
}

mod conv;
mod dense;
mod krylov;
#[cfg(test)]
mod tests;

pub use conv::*;
pub use dense::*;
pub use krylov::*;
