//! Tests of the estimators and bounds against dense SVDs (and the ignored
//! `report_cifar_spectral`).

use super::*;
use crate::kernels::conv2d;

fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.sample(StandardNormal)).collect()
}

/// Exact largest singular value of a row-major matrix, nalgebra SVD, no margin.
fn exact_sigma(rows: usize, cols: usize, data: &[f64]) -> f64 {
    DMatrix::from_row_slice(rows, cols, data)
        .singular_values()
        .max()
}

/// Random orthogonal n x n matrix: Q of the QR of a Gaussian matrix.
fn random_orthogonal(rng: &mut StdRng, n: usize) -> DMatrix<f64> {
    DMatrix::from_vec(n, n, gaussian(rng, n * n)).qr().q()
}

/// Small conv geometries over the grid the brief asks for: cin 2-4, cout 2-5,
/// h, w 3-6 (independently), k 1 and 3, pad 0 and 1, stride 1 and 2.
fn small_geoms(rng: &mut StdRng) -> Vec<ConvGeom> {
    let mut v = Vec::new();
    for k in [1, 3] {
        for pad in [0, 1] {
            for stride in [1, 2] {
                for _ in 0..4 {
                    v.push(ConvGeom {
                        cin: rng.random_range(2..=4),
                        cout: rng.random_range(2..=5),
                        h: rng.random_range(3..=6),
                        w: rng.random_range(3..=6),
                        k,
                        stride,
                        pad,
                    });
                }
            }
        }
    }
    v
}

#[test]
fn operator_matrix_matches_conv2d() {
    // The dense operator (built from the definition) times x equals conv2d.
    let mut rng = StdRng::seed_from_u64(10);
    for g in small_geoms(&mut rng) {
        let wt = gaussian(&mut rng, g.weight_len());
        let x = gaussian(&mut rng, g.in_len());
        let m = conv_operator_matrix(&g, &wt);
        let y = conv2d(&g, &x, &wt, None);
        for (r, yr) in y.iter().enumerate() {
            let row = &m[r * g.in_len()..(r + 1) * g.in_len()];
            let want: f64 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
            assert!((yr - want).abs() <= 1e-12, "{g:?} row {r}");
        }
    }
}

#[test]
fn conv_bound_is_certified_and_estimate_is_exact() {
    let mut rng = StdRng::seed_from_u64(11);
    for g in small_geoms(&mut rng) {
        let wt = gaussian(&mut rng, g.weight_len());
        let exact = exact_sigma(g.out_len(), g.in_len(), &conv_operator_matrix(&g, &wt));

        // Certified: never below the exact norm (1e-12 absolute for the oracle's
        // own rounding), on the minimal grid and on the n + k - 1 grid.
        let bound = conv_sigma_upper_bound(&g, &wt);
        assert!(
            bound >= exact - 1e-12,
            "{g:?}: bound {bound} < exact {exact}"
        );
        let full = (g.h + g.k - 1, g.w + g.k - 1);
        let bound_full = circular_bound_on_grid(&g, &wt, full).sigma;
        assert!(
            bound_full >= exact - 1e-12,
            "{g:?}: n+k-1 grid {bound_full} < {exact}"
        );

        // The estimate (cold, plane-wave warm start, Lanczos) converges to the
        // exact value without hitting the iteration cap.
        let cold = conv_sigma_estimate(&g, &wt, 1e-13, 1_000_000, 1);
        let v0 = plane_wave(&g, &conv_sigma_bound(&g, &wt));
        let warm = conv_sigma_estimate_with(&g, &wt, Some(&v0), 1e-13, 1_000_000, 1);
        let lanczos = conv_sigma_lanczos(&g, &wt, 1e-13, 10_000, 1);
        for (name, est) in [("cold", &cold), ("warm", &warm), ("lanczos", &lanczos)] {
            assert!(
                est.converged,
                "{g:?} {name}: not converged in {}",
                est.iterations
            );
            let rel = (est.sigma - exact).abs() / exact;
            assert!(rel <= 1e-6, "{g:?} {name}: est {} exact {exact}", est.sigma);
            assert!((norm(&est.v) - 1.0).abs() <= 1e-12);
        }
    }
}

#[test]
fn k1_bound_is_the_matrix_norm() {
    let mut rng = StdRng::seed_from_u64(12);
    for (cin, cout, pad) in [(3, 5, 0), (4, 2, 1), (7, 7, 0), (1, 6, 0)] {
        let g = ConvGeom {
            cin,
            cout,
            h: 4,
            w: 3,
            k: 1,
            stride: 1,
            pad,
        };
        let wt = gaussian(&mut rng, g.weight_len());
        let m = matrix_sigma_max(cout, cin, &wt);
        let c = conv_sigma_upper_bound(&g, &wt);
        assert!((c - m).abs() <= 1e-12 * m, "{g:?}: conv {c} matrix {m}");
        // With no padding the 1x1 conv is K at every pixel: the bound is exact.
        if pad == 0 {
            let exact = exact_sigma(g.out_len(), g.in_len(), &conv_operator_matrix(&g, &wt));
            assert!(
                c >= exact && c <= exact * (1.0 + 2e-10),
                "{g:?}: {c} vs {exact}"
            );
        }
    }
}

#[test]
fn grid_smaller_than_n_plus_pad_is_not_a_bound() {
    // 1x1 input, pad 1, 3x3 kernel summing to zero with centre 1: the padded conv
    // only sees the centre tap (norm 1), the 1x1 circular conv sums all taps (0).
    let g = ConvGeom {
        cin: 1,
        cout: 1,
        h: 1,
        w: 1,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let mut wt = vec![0.0; 9];
    wt[4] = 1.0;
    wt[0] = -1.0;
    let exact = exact_sigma(1, 1, &conv_operator_matrix(&g, &wt));
    assert!((exact - 1.0).abs() < 1e-15);
    assert_eq!(conv_min_grid(&g), (2, 2));
    assert!(circular_bound_on_grid(&g, &wt, (1, 1)).sigma < 0.5);
    assert!(conv_sigma_upper_bound(&g, &wt) >= 1.0);
}

#[test]
fn matrix_sigma_max_on_known_singular_values() {
    let mut rng = StdRng::seed_from_u64(13);
    for &(rows, cols) in &[
        (1, 1),
        (1, 5),
        (5, 1),
        (3, 3),
        (6, 4),
        (4, 9),
        (40, 25),
        (64, 64),
    ] {
        let r = rows.min(cols);
        let s: Vec<f64> = (0..r).map(|_| rng.random_range(0.01..3.0)).collect();
        let smax = s.iter().copied().fold(0.0, f64::max);
        let u = random_orthogonal(&mut rng, rows);
        let v = random_orthogonal(&mut rng, cols);
        let mut d = DMatrix::zeros(rows, cols);
        for (i, &si) in s.iter().enumerate() {
            d[(i, i)] = si;
        }
        let a = &u * d * v.transpose();
        let data: Vec<f64> = a.transpose().iter().copied().collect(); // row-major
        let got = matrix_sigma_max(rows, cols, &data);
        // Certified (above) and tight: within the 1e-10 margin plus rounding.
        assert!(got >= smax, "{rows}x{cols}: {got} < {smax}");
        assert!(
            got <= smax * (1.0 + 1e-10 + 1e-12),
            "{rows}x{cols}: {got} vs {smax}"
        );
    }
    assert_eq!(matrix_sigma_max(0, 3, &[]), CERT_ABS_MARGIN);
}

#[test]
fn power_iteration_on_zero_operator() {
    let n = 7;
    let zero = |_: &[f64]| vec![0.0; 4];
    let zero_t = |_: &[f64]| vec![0.0; n];
    for v0 in [None, Some(vec![1.0; n]), Some(vec![0.0; n])] {
        let r = power_iteration(n, zero, zero_t, v0.as_deref(), 1e-12, 100, 3);
        assert_eq!(r.sigma, 0.0);
        assert!(r.converged);
        assert_eq!(r.rel_change, 0.0);
        assert_eq!(r.v.len(), n);
        assert!(r.v.iter().all(|x| x.is_finite()));
    }
    // A zero-weight conv and dense layer go through the same path.
    let g = ConvGeom {
        cin: 2,
        cout: 3,
        h: 4,
        w: 4,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let r = conv_sigma_estimate(&g, &vec![0.0; g.weight_len()], 1e-12, 100, 3);
    assert_eq!(r.sigma, 0.0);
    assert!(r.v.iter().all(|x| x.is_finite()));
    assert_eq!(
        dense_sigma_estimate(3, 2, &[0.0; 6], 1e-12, 100, 3).sigma,
        0.0
    );
    assert_eq!(
        conv_sigma_upper_bound(&g, &vec![0.0; g.weight_len()]),
        CERT_ABS_MARGIN
    );
}

#[test]
fn power_iteration_restarts_when_v0_is_in_the_null_space() {
    // A = [[1, 0]]: v0 = e_2 is in the null space, yet sigma = 1.
    let a = [1.0, 0.0];
    let r = power_iteration(
        2,
        |x| dense(2, 1, x, &a, None),
        |y| dense_adjoint(2, 1, y, &a),
        Some(&[0.0, 1.0]),
        1e-14,
        100,
        5,
    );
    assert!((r.sigma - 1.0).abs() < 1e-12 && r.converged);
}

#[test]
fn dense_estimate_matches_svd_and_is_deterministic() {
    let mut rng = StdRng::seed_from_u64(14);
    for &(fin, fout) in &[(2, 2), (5, 3), (3, 8), (32, 32), (128, 17)] {
        let wt = gaussian(&mut rng, fin * fout);
        let exact = exact_sigma(fout, fin, &wt);
        let r = dense_sigma_estimate(fin, fout, &wt, 1e-13, 1_000_000, 9);
        assert!(r.converged);
        assert!((r.sigma - exact).abs() <= 1e-6 * exact, "{fin}->{fout}");
        assert!(r.sigma <= exact * (1.0 + 1e-12), "estimate above the norm");
        let again = dense_sigma_estimate(fin, fout, &wt, 1e-13, 1_000_000, 9);
        assert_eq!(r, again);
        let bound = matrix_sigma_max(fout, fin, &wt);
        assert!(bound >= r.sigma);
    }
}

#[test]
fn non_finite_weights_give_non_finite_sigma() {
    let g = ConvGeom {
        cin: 2,
        cout: 2,
        h: 4,
        w: 4,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let mut wt = vec![0.3; g.weight_len()];
    wt[5] = f64::NAN;
    assert!(conv_sigma_upper_bound(&g, &wt).is_nan());
    let est = conv_sigma_estimate(&g, &wt, 1e-10, 50, 1);
    assert!(!est.sigma.is_finite() && !est.converged);
    assert!(matrix_sigma_max(2, 9, &wt[..18]).is_nan());
    wt[5] = f64::INFINITY;
    assert_eq!(conv_sigma_upper_bound(&g, &wt), f64::INFINITY);
    assert_eq!(matrix_sigma_max(2, 9, &wt[..18]), f64::INFINITY);
    let d = dense_sigma_estimate(9, 2, &wt[..18], 1e-10, 50, 1);
    assert!(!d.sigma.is_finite());
    // k = 1 goes through matrix_sigma_max.
    let g1 = ConvGeom { k: 1, ..g };
    assert!(conv_sigma_upper_bound(&g1, &[1.0, f64::NAN, 0.0, 1.0]).is_nan());
}

#[test]
fn plane_wave_is_exact_for_unpadded_1x1() {
    // A 1x1 conv without padding is K at every pixel: its top right singular
    // vector is the constant image a, so the plane wave at frequency 0 is exact
    // and power iteration stops after the minimum of two iterations.
    let mut rng = StdRng::seed_from_u64(15);
    let g = ConvGeom {
        cin: 6,
        cout: 4,
        h: 5,
        w: 3,
        k: 1,
        stride: 1,
        pad: 0,
    };
    let wt = gaussian(&mut rng, g.weight_len());
    let bound = conv_sigma_bound(&g, &wt);
    assert_eq!(bound.freq, (0, 0));
    let v0 = plane_wave(&g, &bound);
    let r = conv_sigma_estimate_with(&g, &wt, Some(&v0), 1e-12, 100, 1);
    assert!(r.converged && r.iterations <= 2, "{r:?}");
    let exact = exact_sigma(g.cout, g.cin, &wt);
    assert!((r.sigma - exact).abs() <= 1e-12 * exact);
    assert!(bound.sigma >= exact && bound.sigma <= exact * (1.0 + 2e-10));

    // conv_sigma_estimate starts k = 1 there on its own, also with padding and
    // stride (the operator is K on a subset of pixels).
    for (pad, stride) in [(0, 1), (1, 1), (0, 2), (1, 2)] {
        let g = ConvGeom { pad, stride, ..g };
        let r = conv_sigma_estimate(&g, &wt, 1e-12, 100, 1);
        assert!(r.converged && r.iterations <= 2, "{g:?}: {r:?}");
        assert!((r.sigma - exact).abs() <= 1e-12 * exact);
        let l = conv_sigma_lanczos(&g, &wt, 1e-12, 100, 1);
        assert!(l.converged && l.iterations <= 2, "{g:?}: {l:?}");
        assert!((l.sigma - exact).abs() <= 1e-12 * exact);
    }
}

#[test]
fn lanczos_on_zero_dense_and_both_sides() {
    let mut rng = StdRng::seed_from_u64(17);
    // Zero operator: sigma 0, converged, finite v.
    let r = lanczos_sigma(5, 3, |_| vec![0.0; 3], |_| vec![0.0; 5], None, 1e-12, 50, 1);
    assert_eq!(r.sigma, 0.0);
    assert!(r.converged && r.v.iter().all(|x| x.is_finite()) && r.v.len() == 5);
    // Wide and tall dense matrices exercise both Gram sides; a rank-1 matrix
    // makes the Krylov space invariant after one step.
    for &(fin, fout) in &[(40, 7), (7, 40), (30, 30)] {
        let wt = gaussian(&mut rng, fin * fout);
        let exact = exact_sigma(fout, fin, &wt);
        let r = lanczos_sigma(
            fin,
            fout,
            |x| dense(fin, fout, x, &wt, None),
            |y| dense_adjoint(fin, fout, y, &wt),
            None,
            1e-14,
            200,
            2,
        );
        assert!(r.converged, "{fin}->{fout}: {r:?}");
        assert!((r.sigma - exact).abs() <= 1e-10 * exact, "{fin}->{fout}");
        let av = dense(fin, fout, &r.v, &wt, None);
        assert!(
            (norm(&av) - exact).abs() <= 1e-8 * exact,
            "Ritz vector of {fin}->{fout}"
        );
    }
    let (a, b) = (gaussian(&mut rng, 6), gaussian(&mut rng, 4));
    let rank1: Vec<f64> = b
        .iter()
        .flat_map(|bi| a.iter().map(move |aj| bi * aj))
        .collect();
    let r = lanczos_sigma(
        6,
        4,
        |x| dense(6, 4, x, &rank1, None),
        |y| dense_adjoint(6, 4, y, &rank1),
        None,
        1e-14,
        50,
        3,
    );
    assert!(r.converged && r.iterations <= 2);
    assert!((r.sigma - norm(&a) * norm(&b)).abs() <= 1e-12 * r.sigma);
}

#[test]
fn tridiagonal_bisection_matches_dense_solver() {
    let mut rng = StdRng::seed_from_u64(18);
    for n in [1, 2, 3, 10, 40] {
        let a = gaussian(&mut rng, n);
        let b = gaussian(&mut rng, n - 1);
        let t = DMatrix::from_fn(n, n, |r, c| {
            if r == c {
                a[r]
            } else if r.abs_diff(c) == 1 {
                b[r.min(c)]
            } else {
                0.0
            }
        });
        let want = t.symmetric_eigenvalues().max();
        let got = tridiagonal_max_eigenvalue(&a, &b);
        assert!(
            (got - want).abs() <= 1e-13 * want.abs().max(1.0),
            "n {n}: {got} {want}"
        );
    }
}

/// `cargo test --release -p iresnetc --lib report_cifar_spectral -- --ignored --nocapture`
#[test]
#[ignore]
fn report_cifar_spectral() {
    let mut rng = StdRng::seed_from_u64(16);
    let shapes = [
        ConvGeom {
            cin: 512,
            cout: 12,
            h: 16,
            w: 16,
            k: 3,
            stride: 1,
            pad: 1,
        },
        ConvGeom {
            cin: 12,
            cout: 512,
            h: 16,
            w: 16,
            k: 3,
            stride: 1,
            pad: 1,
        },
        ConvGeom {
            cin: 512,
            cout: 512,
            h: 16,
            w: 16,
            k: 1,
            stride: 1,
            pad: 0,
        },
    ];
    for g in shapes {
        let std = (2.0 / (g.cin * g.k * g.k) as f64).sqrt();
        let wt: Vec<f64> = gaussian(&mut rng, g.weight_len())
            .iter()
            .map(|x| x * std)
            .collect();
        let t = std::time::Instant::now();
        let bound = conv_sigma_bound(&g, &wt);
        let t_bound = t.elapsed().as_secs_f64() * 1e3;
        let full = (g.h + g.k - 1, g.w + g.k - 1);
        let bound_full = circular_bound_on_grid(&g, &wt, full).sigma;
        println!(
            "{}->{} k{} {}x{}: bound {:.9} (grid {:?}, freq {:?}, {:.1} ms); n+k-1 grid {:.9}",
            g.cin, g.cout, g.k, g.h, g.w, bound.sigma, bound.grid, bound.freq, t_bound, bound_full
        );
        // Reference: Lanczos to tol 1e-14, cross-checked by 3000 power iterations
        // (both are lower bounds on sigma).
        let reference = conv_sigma_lanczos(&g, &wt, 1e-14, 3_000, 7);
        let long_power = conv_sigma_estimate(&g, &wt, 0.0, 3_000, 8);
        println!(
                "  reference: lanczos sigma {:.12} ({} iters, converged {}), 3000 power iters {:.12}; bound/sigma - 1 = {:.2e}",
                reference.sigma,
                reference.iterations,
                reference.converged,
                long_power.sigma,
                bound.sigma / reference.sigma - 1.0
            );
        let v0 = plane_wave(&g, &bound);
        for tol in [1e-3, 1e-4, 1e-6, 1e-8] {
            for (name, start) in [("warm", Some(&v0[..])), ("cold", None)] {
                let t = std::time::Instant::now();
                let r = conv_sigma_estimate_with(&g, &wt, start, tol, 20_000, 1);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                println!(
                    "  tol {tol:.0e} {name}: {:>5} iters, {:8.1} ms, sigma rel err {:.2e}",
                    r.iterations,
                    ms,
                    1.0 - r.sigma / reference.sigma
                );
            }
        }
        for tol in [1e-4, 1e-6, 1e-8, 1e-10] {
            let t = std::time::Instant::now();
            let r = conv_sigma_lanczos(&g, &wt, tol, 2_000, 1);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            println!(
                    "  tol {tol:.0e} lanczos: {:>4} iters, {:8.1} ms, sigma rel err {:.2e}, converged {}",
                    r.iterations,
                    ms,
                    1.0 - r.sigma / reference.sigma,
                    r.converged
                );
        }
        for iters in [1, 2, 5, 10, 20, 50] {
            let w = conv_sigma_estimate_with(&g, &wt, Some(&v0), 0.0, iters, 1);
            let c = conv_sigma_estimate_with(&g, &wt, None, 0.0, iters, 1);
            println!(
                "  {iters:>2} iterations: warm rel err {:.2e}, cold rel err {:.2e}",
                1.0 - w.sigma / reference.sigma,
                1.0 - c.sigma / reference.sigma
            );
        }
    }
}
