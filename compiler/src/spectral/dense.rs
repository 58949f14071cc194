//! The certified bound of a dense matrix (exact SVD plus the rounding margin).

use super::*;

/// `Some(NaN)` if any entry is NaN, else `Some(inf)` if any is infinite, else `None`:
/// the value a norm of these numbers must report, checked up front because iterative
/// eigensolvers may never converge on non-finite input.
pub(super) fn non_finite_norm(data: &[f64]) -> Option<f64> {
    if data.iter().any(|x| x.is_nan()) {
        Some(f64::NAN)
    } else if data.iter().any(|x| x.is_infinite()) {
        Some(f64::INFINITY)
    } else {
        None
    }
}

/// Generous iteration cap for the dense solvers: they need a few QR sweeps per
/// eigenvalue; the cap only exists so that nothing can loop forever.
pub(super) fn solver_iteration_cap(n: usize) -> usize {
    1000 + 100 * n
}

/// Largest singular value of a dense row-major `rows x cols` matrix, by nalgebra's SVD
/// (singular values only), times `1 + 1e-10` plus `1e-300`: a certified, tight upper
/// bound. NaN if any entry is NaN, infinite if any is infinite (or a length
/// mismatch: NaN). Should the SVD fail to converge, the Frobenius norm (also an upper
/// bound) is returned instead.
pub fn matrix_sigma_max(rows: usize, cols: usize, data: &[f64]) -> f64 {
    if data.len() != rows * cols {
        return f64::NAN;
    }
    if rows == 0 || cols == 0 {
        return certify(0.0);
    }
    if let Some(bad) = non_finite_norm(data) {
        return bad;
    }
    let m = DMatrix::from_row_slice(rows, cols, data);
    let cap = solver_iteration_cap(rows.min(cols));
    match m.try_svd_unordered(false, false, f64::EPSILON, cap) {
        Some(svd) => certify(svd.singular_values.max()),
        None => certify(norm(data)),
    }
}
