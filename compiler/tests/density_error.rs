//! The standard error `--mode density --repeats R` reports, against the spread it claims to
//! measure: the same density estimated again and again with fresh probes.

mod common;

use iresnetc::reference::ReferenceBackend;
use iresnetc_runtime::engine::{Backend, Batch};
use iresnetc_runtime::logdet::LogDetMethod;
use iresnetc_runtime::modes::{self, DEFAULT_CHUNK};

/// cifar-tiny with a one-probe, 5-term series: a noisy estimator, cheap on the reference.
fn backend() -> ReferenceBackend {
    ReferenceBackend::new(common::model_file("cifar-tiny.toml"))
}

fn input(be: &ReferenceBackend, n: usize) -> Batch {
    let dim = be.model().input_dim();
    // Pixels in [0, 1] (the model dequantizes 8-bit images).
    let rows = common::inputs(n, dim, 7);
    Batch {
        data: rows
            .into_iter()
            .flatten()
            .map(|v| ((v + 1.0) * 127.5).round() / 255.0)
            .collect(),
        batch: n,
    }
}

#[test]
fn reported_standard_error_matches_the_spread_of_repeated_estimates() {
    let mut be = backend();
    let method = be.model().logdet.method();
    assert!(
        method.is_stochastic(),
        "cifar-tiny's log-det must be random here"
    );
    let n = 4;
    let x = input(&be, n);
    let (runs, repeats) = (40, 4);
    // Per sample: the means of independent runs, and the squared errors each run reported.
    let mut means = vec![vec![]; n];
    let mut reported = vec![vec![]; n];
    for k in 0..runs {
        let m = method.with_seed(1000 + k as u64);
        let d = modes::density_with_error(&mut be, &x, &m, 3, repeats, DEFAULT_CHUNK, &mut |_| {})
            .expect("density with error");
        for (i, e) in d.iter().enumerate() {
            means[i].push(e.mean.logp);
            reported[i].push(e.stderr.logp.powi(2));
            // bits/dim is -log p / (D ln 2) + 8: its error is log p's scaled.
            let want = e.stderr.logp / (be.model().input_dim() as f64 * 2f64.ln());
            assert!(
                (e.stderr.bits_per_dim - want).abs() <= 1e-12 * (1.0 + want),
                "sample {i}: bits/dim error {} vs {want}",
                e.stderr.bits_per_dim
            );
        }
    }
    // Pooled over samples: the variance of the run means (what the error bar should describe)
    // against the mean reported squared error. Each is an estimate from 4 x 40 runs; with
    // Gaussian-like noise their ratio lies well within [0.5, 2] (about 4 standard deviations).
    let mut empirical = 0.0;
    let mut claimed = 0.0;
    for i in 0..n {
        let mu = means[i].iter().sum::<f64>() / runs as f64;
        empirical += means[i].iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (runs - 1) as f64;
        claimed += reported[i].iter().sum::<f64>() / runs as f64;
    }
    let ratio = empirical / claimed;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "variance of repeated means {empirical:.4e} vs reported {claimed:.4e} (ratio {ratio:.3})"
    );
    assert!(claimed > 0.0, "a random estimator reported no error");
}

#[test]
fn first_repeat_is_the_plain_density_and_exact_has_no_error() {
    let mut be = backend();
    let method = be.model().logdet.method();
    let x = input(&be, 3);
    let plain = modes::density(&mut be, &x, &method, 5, DEFAULT_CHUNK, &mut |_| {}).unwrap();
    // Two repeats: the mean is (repeat 0 + repeat 1) / 2 and the error |r0 - r1| / 2.
    let two =
        modes::density_with_error(&mut be, &x, &method, 5, 2, DEFAULT_CHUNK, &mut |_| {}).unwrap();
    for (p, e) in plain.iter().zip(&two) {
        let other = 2.0 * e.mean.logp - p.logp;
        let want = (p.logp - other).abs() / 2.0;
        assert!(
            (e.stderr.logp - want).abs() <= 1e-9 * (1.0 + want),
            "{} vs {want}",
            e.stderr.logp
        );
        assert!(want > 0.0, "two seeds gave the same estimate");
    }
    let err = modes::density_with_error(&mut be, &x, &method, 5, 1, DEFAULT_CHUNK, &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("at least 2"), "{err}");
    let exact = LogDetMethod::Exact;
    let d =
        modes::density_with_error(&mut be, &x, &exact, 5, 4, DEFAULT_CHUNK, &mut |_| {}).unwrap();
    let once = modes::density(&mut be, &x, &exact, 5, DEFAULT_CHUNK, &mut |_| {}).unwrap();
    for (e, o) in d.iter().zip(&once) {
        assert_eq!(e.mean, *o);
        assert_eq!(e.stderr.logp, 0.0);
    }
}
