//! The f64 reference executor against independent oracles: exact Jacobians,
//! hand-worked densities, and the Banach bound of the certificate.

mod common;

use common::*;
use iresnetc::passes::lipschitz::banach_iters;
use iresnetc::reference::{
    exact_block_logdet, series_exact_traces, BlockLogDet, LogDetMethod, Reference,
};
use iresnetc::spec::{ProbeKind, RouletteDist};

/// inverse(forward(x)) == x within 1e-6 at c = 0.9 (toy2d and cifar-tiny).
#[test]
fn inverse_of_forward_toy2d_and_cifar_tiny() {
    for file in ["toy2d.toml", "cifar-tiny.toml"] {
        let m = model_file(file);
        assert_eq!(m.graph.spec.lipschitz.coeff, 0.9);
        let r = Reference::new(&m.graph);
        let xs = inputs(4, m.graph.input_dim(), 11);
        let z = r.forward(&xs, &LogDetMethod::None).unwrap().outputs;
        let (back, stats) = r.inverse(&z).unwrap();
        assert!(stats.converged, "{file}: fixed point did not converge");
        let err = max_abs_diff(&xs, &back);
        assert!(err < 1e-6, "{file}: inverse(forward(x)) error {err:e}");
    }
}

/// The series with exact traces and many terms equals ln det(I + J) from the
/// full Jacobian; the tail bound of the certificate covers the difference.
#[test]
fn series_with_exact_traces_matches_exact_logdet() {
    let m = model_from_toml(SMALL_CONV);
    let r = Reference::new(&m.graph);
    for (b, x) in inputs(2, 32, 5).iter().enumerate() {
        let exact = exact_block_logdet(&r, b, x);
        let series = series_exact_traces(&r, b, x, 40);
        assert!(
            (exact - series).abs() < 1e-6,
            "block {b}: exact {exact} series {series}"
        );
        // The bound for 5 terms must cover the actual truncation error.
        let five = series_exact_traces(&r, b, x, 5);
        let bound = m.lipschitz.blocks[b].logdet_truncation_bound;
        assert!(
            (exact - five).abs() <= bound,
            "5-term error {} > bound {bound}",
            (exact - five).abs()
        );
    }
}

fn mean_se(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Hutchinson (truncated series) and Russian roulette over many probes: their
/// means are within 3 standard errors of the exact values they estimate.
#[test]
fn stochastic_estimators_are_unbiased() {
    let m = model_from_toml(SMALL_CONV);
    let r = Reference::new(&m.graph);
    let x = &inputs(1, 32, 9)[0];
    let b = 0;
    let exact = exact_block_logdet(&r, b, x);
    let draws = 3000;
    for kind in [ProbeKind::Gaussian, ProbeKind::Rademacher] {
        let terms = 30; // truncation negligible (< 1e-9 here), so the target is the exact log-det
        let method = LogDetMethod::Series {
            terms,
            probes: 1,
            kind,
            seed: 3,
        };
        let v: Vec<f64> = (0..draws)
            .map(|s| method.block_logdet(&r, b, s, x))
            .collect();
        let (mean, se) = mean_se(&v);
        let target = series_exact_traces(&r, b, x, terms);
        assert!((target - exact).abs() < 1e-9);
        assert!(
            (mean - target).abs() < 3.0 * se,
            "{kind:?}: mean {mean} target {target} se {se}"
        );
    }
    for (dist, param) in [(RouletteDist::Geometric, 0.5), (RouletteDist::Poisson, 2.0)] {
        let method = LogDetMethod::Roulette {
            terms: 2,
            probes: 1,
            kind: ProbeKind::Gaussian,
            seed: 4,
            dist,
            param,
        };
        let v: Vec<f64> = (0..draws)
            .map(|s| method.block_logdet(&r, b, s, x))
            .collect();
        let (mean, se) = mean_se(&v);
        assert!(
            (mean - exact).abs() < 3.0 * se,
            "{dist:?}: mean {mean} exact {exact} se {se}"
        );
    }
}

/// The certificate's iteration count (Banach, from the certified L and the
/// first step) is never below the count the fixed point actually needs.
#[test]
fn certified_iteration_count_is_never_below_actual() {
    for file in ["toy2d.toml", "cifar-tiny.toml"] {
        let m = model_file(file);
        let r = Reference::new(&m.graph);
        let tol = m.graph.spec.inverse.tol;
        for (s, x) in inputs(3, m.graph.input_dim(), 21).iter().enumerate() {
            for (b, block) in m.lipschitz.blocks.iter().enumerate() {
                // y = a + g(a) for a random block input a.
                let a: Vec<f64> = x.iter().cycle().take(block.dim).copied().collect();
                let (ga, _) = r.branch(b, &a);
                let y: Vec<f64> = a.iter().zip(&ga).map(|(a, g)| a + g).collect();
                let (gy, _) = r.branch(b, &y);
                let first_step = gy.iter().map(|v| v * v).sum::<f64>().sqrt();
                let predicted = banach_iters(block.lipschitz_bound, tol, first_step);
                // Iterations actually needed: the first n with |x_n - a|_2 <= tol.
                let mut xn = y.clone();
                let mut needed = None;
                for n in 1..=predicted + 100 {
                    let (g, _) = r.branch(b, &xn);
                    xn = y.iter().zip(&g).map(|(y, g)| y - g).collect();
                    let err = xn
                        .iter()
                        .zip(&a)
                        .map(|(p, q)| (p - q).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    if err <= tol {
                        needed = Some(n);
                        break;
                    }
                }
                let needed = needed.expect("the fixed point converges");
                assert!(
                    predicted >= needed,
                    "{file} sample {s} block {b}: predicted {predicted} < needed {needed}"
                );
                // The executor's stopping rule (step <= tol) stops at most one step later.
                let (_, used, _, converged) = r.invert_block(b, &y);
                assert!(
                    converged && used <= predicted + 1,
                    "used {used}, predicted {predicted}"
                );
            }
        }
    }
}

/// Bits/dim of a model whose branches are zero (g = 0), worked out by hand:
/// z = x * exp(s) + b per channel, log p = sum log N(z; mu, sigma) + H W sum(s).
#[test]
fn bits_per_dim_by_hand() {
    let toml = r#"
name = "hand"
kind = "flow"
input = [1, 2, 2]
[[stages]]
blocks = 1
width = 1
kernels = [1]
[data]
dequantize = true
"#;
    let mut m = model_from_toml(toml);
    for (name, t) in m.graph.params.iter_mut() {
        let v = match name.as_str() {
            "stage0.block0.actnorm.log_scale" => 0.3,
            "stage0.block0.actnorm.bias" => -0.1,
            "prior.mean" => 0.2,
            "prior.log_std" => -0.5,
            _ => 0.0, // conv weight and bias: g = 0
        };
        t.data.iter_mut().for_each(|x| *x = v);
    }
    let r = Reference::new(&m.graph);
    let x = vec![vec![0.0, 0.25, 0.5, 1.0]];
    let seed = 77;
    let got = r.density(&x, &LogDetMethod::Exact, seed).unwrap()[0];
    // By hand: the dequantization noise comes from the documented stream.
    let mut rng = iresnetc_runtime::rng::Rng::for_stream(
        seed,
        &[iresnetc_runtime::rng::streams::DEQUANTIZE, 0],
    );
    let mut logp = 4.0 * 0.3; // H*W*log_scale, g contributes ln det(I) = 0
    for &v in &x[0] {
        let xd = (255.0 * v + rng.uniform()) / 256.0 - 0.5;
        let z: f64 = xd * 0.3f64.exp() - 0.1;
        let t = (z - 0.2) / (-0.5f64).exp();
        logp += -0.5 * t * t - (-0.5) - 0.5 * (2.0 * std::f64::consts::PI).ln();
    }
    let bpd = -logp / (4.0 * std::f64::consts::LN_2) + 8.0;
    assert!((got.0 - logp).abs() < 1e-12, "log p {} vs {logp}", got.0);
    assert!((got.1 - bpd).abs() < 1e-12, "bpd {} vs {bpd}", got.1);
}

/// Exact 2x2 log-det of toy2d agrees with the closed form
/// ln|(1+J00)(1+J11) - J01 J10| from a finite-difference Jacobian.
#[test]
fn toy2d_exact_logdet_matches_finite_differences() {
    let m = model_file("toy2d.toml");
    let r = Reference::new(&m.graph);
    let x = vec![0.3, -0.7];
    for b in 0..m.graph.blocks.len() {
        let h = 1e-5;
        let mut j = [[0.0; 2]; 2];
        for c in 0..2 {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[c] += h;
            xm[c] -= h;
            let (gp, _) = r.branch(b, &xp);
            let (gm, _) = r.branch(b, &xm);
            for row in 0..2 {
                j[row][c] = (gp[row] - gm[row]) / (2.0 * h);
            }
        }
        let closed = ((1.0 + j[0][0]) * (1.0 + j[1][1]) - j[0][1] * j[1][0])
            .abs()
            .ln();
        let exact = exact_block_logdet(&r, b, &x);
        assert!(
            (closed - exact).abs() < 1e-8,
            "block {b}: {closed} vs {exact}"
        );
    }
}

/// Sampling is deterministic for a seed and forward(sample) returns the prior draw.
#[test]
fn sampling_round_trips() {
    let m = model_file("cifar-tiny.toml");
    let r = Reference::new(&m.graph);
    let (x1, _) = r.sample(2, 5).unwrap();
    let (x2, _) = r.sample(2, 5).unwrap();
    assert_eq!(x1, x2);
    let z = r.forward(&x1, &LogDetMethod::None).unwrap().outputs;
    let (back, _) = r.inverse(&z).unwrap();
    assert!(max_abs_diff(&x1, &back) < 1e-6);
}
