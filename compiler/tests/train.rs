//! Training gradients against independent oracles: central finite differences
//! of the f64 reference executor's log-density (exact log-det) and logits, the
//! exact log-det gradient for the Neumann estimator's mean, and finite
//! differences through the spectral normalization.

mod common;

use common::*;
use iresnetc::ir::Graph;
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{ProbeKind, RouletteDist};
use iresnetc::train::specnorm::SpecNorm;
use iresnetc::train::{loss_grad, Backend, LogDetGrad, Mat, Noise, Options};

const VEC_FLOW: &str = r#"
name = "vec"
kind = "flow"
input = [3]
[[stages]]
blocks = 2
hidden = [6, 5]
activation = "lipswish"
"#;

/// Two stages with a factor-out, ELU convolutions, squeeze and channel padding.
const IMG_FLOW: &str = r#"
name = "img"
kind = "flow"
input = [1, 4, 4]
squeeze = true
pad_channels = 6
[[stages]]
blocks = 1
width = 4
kernels = [3, 1, 3]
factor_out = true
[[stages]]
blocks = 1
width = 3
kernels = [3, 1]
activation = "lipswish"
"#;

const VEC_CLASSIFIER: &str = r#"
name = "cls"
kind = "classifier"
input = [3]
[[stages]]
blocks = 2
hidden = [5]
activation = "elu"
[head]
classes = 4
"#;

fn opts(est: LogDetGrad, total: usize) -> Options {
    Options {
        logdet: est,
        noise: Noise { seed: 3, step: 0 },
        grads: true,
        bn_train: true,
        total,
        first: 0,
        backend: Backend::Reference,
    }
}

/// Mean `-log p(x)` by the reference executor with the exact log-det.
fn ref_nll(g: &Graph, xs: &[Vec<f64>]) -> f64 {
    let d = Reference::new(g)
        .density(xs, &LogDetMethod::Exact, 0)
        .unwrap();
    -d.iter().map(|(lp, _)| lp).sum::<f64>() / xs.len() as f64
}

/// Mean cross-entropy of the reference executor's logits.
fn ref_ce(g: &Graph, xs: &[Vec<f64>], labels: &[usize]) -> f64 {
    let out = Reference::new(g).forward(xs, &LogDetMethod::None).unwrap();
    out.outputs
        .iter()
        .zip(labels)
        .map(|(l, &y)| {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - l[y]
        })
        .sum::<f64>()
        / xs.len() as f64
}

/// Checks up to `per` entries of every parameter (except running statistics)
/// against central differences of `f`; returns how many were checked.
fn fd_check(
    g: &Graph,
    grads: &std::collections::BTreeMap<String, Vec<f64>>,
    per: usize,
    f: impl Fn(&Graph) -> f64,
) -> usize {
    let h = 1e-5;
    let mut checked = 0;
    for (name, t) in &g.params {
        if name.contains("running_") {
            continue;
        }
        let gv = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        assert_eq!(gv.len(), t.data.len(), "{name}: gradient length");
        let n = t.data.len();
        for k in 0..per.min(n) {
            let i = (k * 7919) % n;
            let mut gp = g.clone();
            gp.params.get_mut(name).unwrap().data[i] += h;
            let mut gm = g.clone();
            gm.params.get_mut(name).unwrap().data[i] -= h;
            let fd = (f(&gp) - f(&gm)) / (2.0 * h);
            let tol = 1e-6 + 1e-5 * fd.abs().max(gv[i].abs());
            assert!(
                (fd - gv[i]).abs() < tol,
                "{name}[{i}]: analytic {} vs finite difference {fd}",
                gv[i]
            );
            checked += 1;
        }
    }
    checked
}

/// Every parameter kind of a flow (dense weight and bias, ActNorm, LipSwish
/// beta, prior mean and log-std; conv weight and bias with squeeze, padding and
/// factor-out) against finite differences of the reference's exact density.
#[test]
fn flow_gradients_match_finite_differences() {
    for (text, n) in [(VEC_FLOW, 5), (IMG_FLOW, 3)] {
        let m = model_from_toml(text);
        let g = &m.graph;
        let xs = inputs(n, g.input_dim(), 21);
        let out = loss_grad(
            g,
            &Mat::from_rows(&xs, g.input_dim()),
            None,
            &opts(LogDetGrad::Exact, n),
        )
        .unwrap();
        let loss = out.loss.iter().sum::<f64>() / n as f64;
        let want = ref_nll(g, &xs);
        assert!(
            (loss - want).abs() < 1e-9,
            "{}: loss {loss} vs reference {want}",
            g.spec.name
        );
        let checked = fd_check(g, &out.grads, 4, |gg| ref_nll(gg, &xs));
        assert!(
            checked > 20,
            "{}: only {checked} entries checked",
            g.spec.name
        );
    }
}

/// Classifier cross-entropy gradients (head without batch norm: the reference's
/// eval-form head is then the same function).
#[test]
fn classifier_gradients_match_finite_differences() {
    let m = model_from_toml(VEC_CLASSIFIER);
    let g = &m.graph;
    let xs = inputs(6, 3, 4);
    let labels = [0, 3, 1, 2, 2, 0];
    let out = loss_grad(
        g,
        &Mat::from_rows(&xs, 3),
        Some(&labels),
        &opts(LogDetGrad::Exact, 6),
    )
    .unwrap();
    let loss = out.loss.iter().sum::<f64>() / 6.0;
    assert!((loss - ref_ce(g, &xs, &labels)).abs() < 1e-12);
    fd_check(g, &out.grads, 4, |gg| ref_ce(gg, &xs, &labels));
}

/// An image classifier's head batch norm on batch statistics: the forward
/// equals the reference's eval-form head with the running statistics set to
/// the batch's, and the gradient (through the statistics) matches finite
/// differences of the training loss.
#[test]
fn batchnorm_batch_statistics() {
    let text = r#"
name = "cls-img"
kind = "classifier"
input = [1, 4, 4]
squeeze = true
[[stages]]
blocks = 1
width = 3
[head]
classes = 3
"#;
    let m = model_from_toml(text);
    let g = &m.graph;
    let xs = inputs(5, 16, 9);
    let labels = [0, 1, 2, 1, 0];
    let x = Mat::from_rows(&xs, 16);
    let o = opts(LogDetGrad::Exact, 5);
    let out = loss_grad(g, &x, Some(&labels), &o).unwrap();
    let (_, mean, var, _) = out.bn[0].clone();
    let mut ge = g.clone();
    ge.params.get_mut("head.bn.running_mean").unwrap().data = mean;
    ge.params.get_mut("head.bn.running_var").unwrap().data = var;
    let loss = out.loss.iter().sum::<f64>() / 5.0;
    assert!((loss - ref_ce(&ge, &xs, &labels)).abs() < 1e-12);
    let train_loss = |gg: &Graph| {
        let mut oo = o.clone();
        oo.grads = false;
        let r = loss_grad(gg, &x, Some(&labels), &oo).unwrap();
        r.loss.iter().sum::<f64>() / 5.0
    };
    fd_check(g, &out.grads, 3, train_loss);
}

/// The Neumann estimator with Russian roulette is unbiased: over many probe
/// draws its mean gradient (projected on a fixed random direction, and a few
/// single entries) and its mean log-det are within 3 standard errors of the
/// exact ones.
#[test]
fn neumann_mean_matches_exact_gradient() {
    let text = VEC_FLOW.replace("[[stages]]", "[lipschitz]\ncoeff = 0.6\n[[stages]]");
    let m = model_from_toml(&text);
    let g = &m.graph;
    let xs = inputs(4, 3, 8);
    let x = Mat::from_rows(&xs, 3);
    let exact = loss_grad(g, &x, None, &opts(LogDetGrad::Exact, 4)).unwrap();
    let flat = |gr: &std::collections::BTreeMap<String, Vec<f64>>| -> Vec<f64> {
        gr.values().flatten().copied().collect()
    };
    let ge = flat(&exact.grads);
    let mut r = iresnetc_runtime::rng::Rng::new(77);
    let dir: Vec<f64> = (0..ge.len()).map(|_| r.normal()).collect();
    let picks = [0, ge.len() / 3, ge.len() / 2, ge.len() - 1];
    let est = LogDetGrad::Neumann {
        terms: 2,
        probes: 1,
        kind: ProbeKind::Gaussian,
        roulette: Some((RouletteDist::Geometric, 0.5)),
    };
    let draws = 3000;
    // Statistics per scalar: projection, loss, and the picked entries.
    let mut sum = vec![0.0; 2 + picks.len()];
    let mut sq = vec![0.0; 2 + picks.len()];
    for step in 0..draws {
        let mut o = opts(est.clone(), 4);
        o.noise = Noise { seed: 5, step };
        let out = loss_grad(g, &x, None, &o).unwrap();
        let gn = flat(&out.grads);
        let mut vals = vec![
            gn.iter().zip(&dir).map(|(a, b)| a * b).sum::<f64>(),
            out.loss.iter().sum::<f64>() / 4.0,
        ];
        vals.extend(picks.iter().map(|&i| gn[i]));
        for (k, v) in vals.iter().enumerate() {
            sum[k] += v;
            sq[k] += v * v;
        }
    }
    let mut want = vec![
        ge.iter().zip(&dir).map(|(a, b)| a * b).sum::<f64>(),
        exact.loss.iter().sum::<f64>() / 4.0,
    ];
    want.extend(picks.iter().map(|&i| ge[i]));
    let n = draws as f64;
    for k in 0..want.len() {
        let mean = sum[k] / n;
        let se = ((sq[k] / n - mean * mean).max(0.0) / n).sqrt();
        assert!(
            se > 0.0,
            "scalar {k}: no variance, the estimator is not random"
        );
        assert!(
            (mean - want[k]).abs() < 3.0 * se,
            "scalar {k}: Neumann mean {mean} vs exact {} (se {se})",
            want[k]
        );
    }
}

/// Gradients with respect to the raw weights through `W / max(1, u^T W v / c)`
/// (u, v held constant) against finite differences of the reference density.
#[test]
fn spectral_norm_gradient_matches_finite_differences() {
    for text in [VEC_FLOW, IMG_FLOW] {
        let text = text.replacen("[[stages]]", "[lipschitz]\ncoeff = 0.5\n[[stages]]", 1);
        let m = model_from_toml(&text);
        let mut raw = m.graph.params.clone();
        // Make every layer's sigma exceed c so that the scaling is active.
        for (k, t) in raw.iter_mut() {
            if k.ends_with(".weight") {
                t.data.iter_mut().for_each(|v| *v *= 2.5);
            }
        }
        let mut sn = SpecNorm::new(&m.graph, 1);
        sn.power_iterate(&raw, 3);
        let (eff, scales) = sn.normalize(&raw);
        assert!(scales.iter().all(|&s| s > 1.0), "scales {scales:?}");
        let mut g = m.graph.clone();
        g.params = eff;
        let n = 3;
        let xs = inputs(n, g.input_dim(), 2);
        let mut out = loss_grad(
            &g,
            &Mat::from_rows(&xs, g.input_dim()),
            None,
            &opts(LogDetGrad::Exact, n),
        )
        .unwrap();
        sn.backprop(&raw, &mut out.grads);
        let mut graw = m.graph.clone();
        graw.params = raw;
        let f = |gr: &Graph| {
            let mut ge = gr.clone();
            ge.params = sn.normalize(&gr.params).0;
            ref_nll(&ge, &xs)
        };
        fd_check(&graw, &out.grads, 4, f);
    }
}
