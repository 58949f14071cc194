//! Unit tests of the f64 convolution and dense kernels: every algorithm, stride, padding and
//! kernel size, forward and adjoint.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

const ALGOS: [ConvAlgo; 4] = [
    ConvAlgo::Auto,
    ConvAlgo::PerTap,
    ConvAlgo::Im2col,
    ConvAlgo::OutputExpand,
];

fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.sample(StandardNormal)).collect()
}

fn inner(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The definition, literally: seven nested loops, bounds checked per tap.
fn conv2d_naive(g: &ConvGeom, x: &[f64], wt: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let (oh, ow, k) = (g.out_h(), g.out_w(), g.k);
    let mut y = vec![0.0; g.cout * oh * ow];
    for co in 0..g.cout {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = bias.map_or(0.0, |b| b[co]);
                for ci in 0..g.cin {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            let (iy, ix) = (iy as usize, ix as usize);
                            acc += wt[((co * g.cin + ci) * k + ky) * k + kx]
                                * x[(ci * g.h + iy) * g.w + ix];
                        }
                    }
                }
                y[(co * oh + oy) * ow + ox] = acc;
            }
        }
    }
    y
}

/// Random geometries covering stride 1/2/3, pad 0/1/2, k 1/2/3/5 and h != w.
fn random_geoms(rng: &mut StdRng, count: usize) -> Vec<ConvGeom> {
    let mut out = Vec::new();
    while out.len() < count {
        let g = ConvGeom {
            cin: rng.random_range(1..=6),
            cout: rng.random_range(1..=6),
            h: rng.random_range(1..=9),
            w: rng.random_range(1..=9),
            k: [1, 2, 3, 3, 5][rng.random_range(0..5)],
            stride: [1, 1, 2, 3][rng.random_range(0..4)],
            pad: rng.random_range(0..=2),
        };
        if g.is_valid() {
            out.push(g);
        }
    }
    out
}

fn fixed_geoms() -> Vec<ConvGeom> {
    let mut v = Vec::new();
    for &(k, pad) in &[(1, 0), (1, 1), (3, 0), (3, 1)] {
        for &stride in &[1, 2] {
            v.push(ConvGeom {
                cin: 3,
                cout: 4,
                h: 7,
                w: 5,
                k,
                stride,
                pad,
            });
            v.push(ConvGeom {
                cin: 5,
                cout: 2,
                h: 4,
                w: 9,
                k,
                stride,
                pad,
            });
        }
    }
    v
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn conv2d_matches_naive_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut geoms = fixed_geoms();
    geoms.extend(random_geoms(&mut rng, 200));
    for g in geoms {
        let x = gaussian(&mut rng, g.in_len());
        let wt = gaussian(&mut rng, g.weight_len());
        let b = gaussian(&mut rng, g.cout);
        let want = conv2d_naive(&g, &x, &wt, Some(&b));
        for algo in ALGOS {
            let got = conv2d_with(&g, &x, &wt, Some(&b), algo);
            let err = max_abs_diff(&got, &want);
            assert!(err <= 1e-12, "{g:?} {algo:?}: max abs err {err}");
        }
        let got = conv2d(&g, &x, &wt, None);
        let want = conv2d_naive(&g, &x, &wt, None);
        assert!(max_abs_diff(&got, &want) <= 1e-12, "{g:?} without bias");
    }
}

#[test]
fn conv2d_adjoint_identity() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut geoms = fixed_geoms();
    geoms.extend(random_geoms(&mut rng, 200));
    for g in geoms {
        let x = gaussian(&mut rng, g.in_len());
        let dy = gaussian(&mut rng, g.out_len());
        let wt = gaussian(&mut rng, g.weight_len());
        let lhs = inner(&conv2d(&g, &x, &wt, None), &dy);
        for algo in ALGOS {
            let rhs = inner(&x, &conv2d_adjoint_with(&g, &dy, &wt, algo));
            // Relative to the scale of the terms summed, not to the (possibly
            // cancelling) result.
            let scale = lhs.abs().max(rhs.abs()).max(1.0);
            assert!(
                (lhs - rhs).abs() <= 1e-10 * scale,
                "{g:?} {algo:?}: <Ax,y> = {lhs}, <x,A^T y> = {rhs}"
            );
        }
    }
}

#[test]
fn conv2d_adjoint_matches_naive_transpose() {
    // Entry-wise check of the adjoint against the transpose of the naive operator,
    // which the inner-product identity alone would only check in aggregate.
    let mut rng = StdRng::seed_from_u64(3);
    for g in fixed_geoms().into_iter().chain(random_geoms(&mut rng, 40)) {
        let wt = gaussian(&mut rng, g.weight_len());
        // Column i of the naive operator is A e_i.
        let cols: Vec<Vec<f64>> = (0..g.in_len())
            .map(|i| {
                let mut xi = vec![0.0; g.in_len()];
                xi[i] = 1.0;
                conv2d_naive(&g, &xi, &wt, None)
            })
            .collect();
        for o in 0..g.out_len() {
            let mut e = vec![0.0; g.out_len()];
            e[o] = 1.0;
            let row = conv2d_adjoint(&g, &e, &wt);
            for (i, col) in cols.iter().enumerate() {
                assert!((row[i] - col[o]).abs() <= 1e-12, "{g:?} entry ({o},{i})");
            }
        }
    }
}

#[test]
fn dense_matches_reference_and_adjoint_identity() {
    let mut rng = StdRng::seed_from_u64(4);
    for &(fin, fout) in &[
        (1, 1),
        (2, 3),
        (7, 5),
        (17, 9),
        (64, 33),
        (128, 128),
        (3, 0),
    ] {
        let x = gaussian(&mut rng, fin);
        let dy = gaussian(&mut rng, fout);
        let wt = gaussian(&mut rng, fin * fout);
        let b = gaussian(&mut rng, fout);
        let y = dense(fin, fout, &x, &wt, Some(&b));
        for o in 0..fout {
            let want: f64 = b[o] + (0..fin).map(|i| wt[o * fin + i] * x[i]).sum::<f64>();
            assert!((y[o] - want).abs() <= 1e-12, "dense {fin}->{fout} row {o}");
        }
        let dx = dense_adjoint(fin, fout, &dy, &wt);
        for i in 0..fin {
            let want: f64 = (0..fout).map(|o| wt[o * fin + i] * dy[o]).sum();
            assert!(
                (dx[i] - want).abs() <= 1e-12,
                "dense_adjoint {fin}->{fout} col {i}"
            );
        }
        let lhs = inner(&dense(fin, fout, &x, &wt, None), &dy);
        let rhs = inner(&x, &dx);
        assert!((lhs - rhs).abs() <= 1e-10 * lhs.abs().max(rhs.abs()).max(1.0));
    }
}

#[test]
fn degenerate_geometries_do_not_panic() {
    // Kernel larger than the padded input: no output pixels.
    let g = ConvGeom {
        cin: 2,
        cout: 3,
        h: 2,
        w: 2,
        k: 5,
        stride: 1,
        pad: 0,
    };
    assert!(!g.is_valid());
    assert_eq!(g.out_len(), 0);
    assert!(conv2d(&g, &[0.0; 8], &vec![1.0; g.weight_len()], None).is_empty());
    assert_eq!(
        conv2d_adjoint(&g, &[], &vec![1.0; g.weight_len()]),
        vec![0.0; 8]
    );
    // stride 0 is degenerate, not a division by zero.
    let g0 = ConvGeom { stride: 0, ..g };
    assert_eq!(g0.out_h(), 0);
}

#[test]
fn nan_weights_propagate() {
    let g = ConvGeom {
        cin: 2,
        cout: 2,
        h: 3,
        w: 3,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let mut wt = vec![0.5; g.weight_len()];
    wt[4] = f64::NAN;
    let y = conv2d(&g, &[1.0; 18], &wt, None);
    assert!(y.iter().any(|v| v.is_nan()));
}

/// Fastest wall time of `f` in milliseconds (the minimum, because the machine is
/// shared and other processes only ever add time).
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[0]
}

/// `cargo test --release -p iresnetc --lib bench_conv -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_conv_cifar_shapes() {
    let mut rng = StdRng::seed_from_u64(5);
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
        ConvGeom {
            cin: 48,
            cout: 512,
            h: 8,
            w: 8,
            k: 3,
            stride: 1,
            pad: 1,
        },
        ConvGeom {
            cin: 512,
            cout: 48,
            h: 8,
            w: 8,
            k: 3,
            stride: 1,
            pad: 1,
        },
        ConvGeom {
            cin: 32,
            cout: 32,
            h: 32,
            w: 32,
            k: 3,
            stride: 1,
            pad: 1,
        },
        ConvGeom {
            cin: 64,
            cout: 64,
            h: 16,
            w: 16,
            k: 3,
            stride: 1,
            pad: 1,
        },
        ConvGeom {
            cin: 16,
            cout: 16,
            h: 32,
            w: 32,
            k: 3,
            stride: 2,
            pad: 1,
        },
    ];
    for g in shapes {
        let x = gaussian(&mut rng, g.in_len());
        let dy = gaussian(&mut rng, g.out_len());
        let wt = gaussian(&mut rng, g.weight_len());
        let reps = 21;
        let gflop = 2.0 * g.macs() as f64 * 1e-9;
        for algo in ALGOS {
            let f = time_ms(reps, || {
                std::hint::black_box(conv2d_with(&g, &x, &wt, None, algo));
            });
            let a = time_ms(reps, || {
                std::hint::black_box(conv2d_adjoint_with(&g, &dy, &wt, algo));
            });
            println!(
                "{:>3}->{:<3} k{} s{} {:>2}x{:<2} {:<7} fwd {:7.3} ms ({:5.1} GFLOP/s)  adj {:7.3} ms ({:5.1} GFLOP/s)",
                g.cin,
                g.cout,
                g.k,
                g.stride,
                g.h,
                g.w,
                format!("{algo:?}"),
                f,
                gflop / f * 1e3,
                a,
                gflop / a * 1e3
            );
        }
    }
}
