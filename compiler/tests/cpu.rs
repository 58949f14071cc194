//! The native f32 CPU engine against the f64 reference executor, on every shipped model at a
//! small size (same structure: squeezes, padding, factor-outs, activations, head; narrower,
//! shallower, 8x8 images).
//!
//! Tolerances: z and logits within 1e-5 of the reference relative to the largest |value| (f32
//! carries ~6e-8 per operation over a few dozen layers); log-det within 1e-4 relative to
//! max(1, |log-det|) with the same probes; inverse round trip within 1e-5 relative.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use iresnetc::netdesc;
use iresnetc::pipeline::{load_spec, LoadOptions, Model};
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{Estimator, ModelKind, ModelSpec};
use iresnetc_runtime::cpu::net::{FactorOutHalf, SqueezeOrder};
use iresnetc_runtime::cpu::{CpuEngine, LogDetRequest};

const MODELS: [&str; 6] = [
    "cifar.toml",
    "cifar-block.toml",
    "cifar-tiny.toml",
    "cifar-classifier.toml",
    "mnist.toml",
    "toy2d.toml",
];

/// A shipped model with the same structure at a test size.
fn small(name: &str) -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    let mut spec = ModelSpec::from_file(&path).expect("shipped model parses");
    if spec.input.len() == 3 {
        spec.input[1] = 8;
        spec.input[2] = 8;
    }
    for st in &mut spec.stages {
        st.blocks = st.blocks.min(2);
        st.width = st.width.map(|w| w.min(16));
        st.hidden = st
            .hidden
            .clone()
            .map(|h| h.into_iter().map(|w| w.min(16)).collect());
    }
    load_spec(spec, &LoadOptions::default(), &|_, _| {}).expect("small model builds")
}

fn engine(m: &Model, threads: usize) -> CpuEngine {
    let net = netdesc::describe(m).expect("describable");
    CpuEngine::with_threads(net, &netdesc::weights_f32(&m.graph.params), threads)
        .expect("engine builds")
}

fn flat32(xs: &[Vec<f64>]) -> Vec<f32> {
    xs.iter().flatten().map(|&v| v as f32).collect()
}

/// max |a - b| / max(max |b|, floor).
fn rel_err(a: &[f32], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn request(m: &Model, est: Estimator) -> (LogDetMethod, LogDetRequest) {
    let mut s = m.graph.spec.logdet.clone();
    s.estimator = est;
    s.seed = 17;
    s.probes = 2;
    let req = LogDetRequest::from_settings(&netdesc::logdet_settings(&s));
    (s.method(), req)
}

#[test]
fn forward_logdet_inverse_and_logits_match_the_reference_on_every_model() {
    for name in MODELS {
        let m = small(name);
        let g = &m.graph;
        let r = Reference::new(g);
        let mut e = engine(&m, 2);
        let xs = common::inputs(3, g.input_dim(), 5);
        let x = flat32(&xs);
        if g.spec.kind == ModelKind::Classifier {
            let want = r.forward(&xs, &LogDetMethod::None).unwrap().outputs;
            let got = e.classify(&x, 3).unwrap();
            let err = rel_err(&got, &want.concat(), 1e-3);
            assert!(err < 1e-5, "{name}: logits error {err:e}");
            continue;
        }
        // toy2d's own estimator is exact; the image flows use the series (and roulette below).
        let est = g.spec.logdet.estimator;
        let (method, req) = request(&m, est);
        let want = r.forward(&xs, &method).unwrap();
        let (z, ld) = e.encode(&x, 3, Some(&req)).unwrap();
        let err = rel_err(&z, &want.outputs.concat(), 1e-3);
        assert!(err < 1e-5, "{name}: z error {err:e}");
        for (i, (a, b)) in ld.iter().zip(&want.logdet).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{name} ({est:?}): sample {i} log-det {a} vs reference {b}"
            );
        }
        // The inverse: back to x, and the same as the reference's inverse of the same z.
        let (back, rep) = e.decode(&z, 3).unwrap();
        let err = rel_err(&back, &xs.concat(), 1.0);
        assert!(err < 1e-5, "{name}: round trip error {err:e}");
        assert_eq!(rep.blocks.len(), g.blocks.len());
        assert!(rep.converged(), "{name}: {rep:?}");
        for b in &rep.blocks {
            assert!(b.iters >= 1 && b.residual.is_finite(), "{name}: {b:?}");
        }
        let (ref_back, _) = r.inverse(&want.outputs).unwrap();
        let err = rel_err(&back, &ref_back.concat(), 1.0);
        assert!(err < 1e-5, "{name}: inverse vs reference {err:e}");
    }
}

/// Russian roulette with the same seed draws the same number of terms and probes as the
/// reference, so the unbiased estimates agree sample by sample (they differ by far more than
/// the tolerance when the draws differ: the reweighted extra terms are large).
#[test]
fn roulette_uses_the_reference_draws() {
    for name in ["cifar-tiny.toml", "toy2d.toml"] {
        let m = small(name);
        let r = Reference::new(&m.graph);
        let mut e = engine(&m, 2);
        let xs = common::inputs(4, m.graph.input_dim(), 9);
        let (method, mut req) = request(&m, Estimator::Roulette);
        // A chunk that starts at sample 4 of a larger array draws for samples 4..8.
        req.first_sample = 4;
        let want = r.forward_from(&xs, &method, 4).unwrap().logdet;
        let (_, got) = e.encode(&flat32(&xs), 4, Some(&req)).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{name}: roulette {a} vs reference {b}"
            );
        }
    }
}

#[test]
fn thread_counts_agree_and_a_fixed_count_is_repeatable() {
    let m = small("cifar-tiny.toml");
    let (_, req) = request(&m, Estimator::Series);
    let x = flat32(&common::inputs(4, m.graph.input_dim(), 3));
    let mut one = engine(&m, 1);
    let mut two = engine(&m, 2);
    let (z1, l1) = one.encode(&x, 4, Some(&req)).unwrap();
    let (z2, l2) = two.encode(&x, 4, Some(&req)).unwrap();
    let (z2b, l2b) = two.encode(&x, 4, Some(&req)).unwrap();
    assert_eq!(z2, z2b, "same thread count, same bits");
    assert_eq!(l2, l2b);
    let zmax = z1.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let dz = z1
        .iter()
        .zip(&z2)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    assert!(
        dz <= 1e-6 * zmax.max(1.0),
        "1 vs 2 threads: z differs by {dz:e}"
    );
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "log-det {a} vs {b}"
        );
    }
}

#[test]
fn a_bundle_gives_the_numbers_of_its_model_file() {
    let m = small("cifar-tiny.toml");
    let dir = std::env::temp_dir().join(format!("iresnetc-cpu-bundle-{}", std::process::id()));
    iresnetc::bundle::write_bundle(&m, &dir, &Default::default()).unwrap();
    let mut from_bundle = CpuEngine::open_bundle(&dir).unwrap();
    let threads = from_bundle.threads();
    let mut from_model = engine(&m, threads);
    std::fs::remove_dir_all(&dir).ok();
    let (_, req) = request(&m, Estimator::Series);
    let x = flat32(&common::inputs(2, m.graph.input_dim(), 21));
    let a = from_bundle.encode(&x, 2, Some(&req)).unwrap();
    let b = from_model.encode(&x, 2, Some(&req)).unwrap();
    assert_eq!(a, b);
}

/// The other conventions (official i-ResNet: SpaceToDepth squeeze, first half to z) run and
/// invert; z then holds, for the first factor-out, the channels the index arithmetic says.
#[test]
fn both_squeeze_orders_and_factor_out_halves_invert() {
    let m = small("cifar-tiny.toml");
    let x = flat32(&common::inputs(2, m.graph.input_dim(), 4));
    let w = netdesc::weights_f32(&m.graph.params);
    let base = netdesc::describe(&m).unwrap();
    let mut zs = BTreeMap::new();
    for order in [SqueezeOrder::SpaceToDepth, SqueezeOrder::PixelUnshuffle] {
        for half in [FactorOutHalf::First, FactorOutHalf::Second] {
            let mut net = base.clone();
            net.squeeze_order = order;
            net.factor_out_half = half;
            let mut e = CpuEngine::with_threads(net, &w, 2).unwrap();
            let (z, _) = e.encode(&x, 2, None).unwrap();
            let (back, _) = e.decode(&z, 2).unwrap();
            let err = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{order:?}/{half:?}: round trip {err:e}");
            zs.insert(format!("{order:?}/{half:?}"), z);
        }
    }
    // Different conventions are different functions.
    assert_ne!(zs["SpaceToDepth/First"], zs["PixelUnshuffle/Second"]);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let m = small("cifar-tiny.toml");
    let mut e = engine(&m, 1);
    let d = m.graph.input_dim();
    assert!(e.encode(&vec![0.0; d + 1], 1, None).is_err());
    let mut x = vec![0.0; d];
    x[3] = f32::NAN;
    let msg = e.encode(&x, 1, None).unwrap_err().to_string();
    assert!(msg.contains("element 3"), "{msg}");
    assert!(e.classify(&vec![0.0; d], 1).is_err());
    assert!(e.decode(&[0.0; 3], 1).is_err());
}

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_iresnetc"))
}

/// `iresnetc run --backend cpu` against `--backend reference` on a model file: z, log-det,
/// density, and the inverse of the reference's z.
#[test]
fn cli_cpu_backend_matches_the_reference_backend() {
    let d = std::env::temp_dir().join(format!("iresnetc-cpu-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cifar-tiny.toml");
    let xs = common::inputs(3, 3 * 8 * 8, 2);
    let x = d.join("x.npy");
    iresnetc::npy::write(&x, &xs, &[3, 8, 8], false).unwrap();
    let run = |backend: &str, mode: &str, input: &Path, tag: &str| {
        let out = d.join(format!("{mode}.{tag}.npy"));
        let ld = d.join(format!("ld.{tag}.npy"));
        let mut cmd = bin();
        cmd.arg("run")
            .arg(&model)
            .args(["--backend", backend, "--mode", mode, "--input"])
            .arg(input)
            .arg("--output")
            .arg(&out);
        // Only the forward mode writes a separate log-det file.
        if mode == "forward" {
            cmd.arg("--logdet-out").arg(&ld);
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{backend} {mode}: {err}");
        (out, ld, err)
    };
    let read = |p: &Path, s: &[usize]| iresnetc::npy::read_batch(p, "a", s).unwrap().samples;
    let (zc, ldc, log) = run("cpu", "forward", &x, "cpu");
    assert!(
        log.contains("backend cpu (") && log.contains("f32)"),
        "{log}"
    );
    let (zr, ldr, _) = run("reference", "forward", &x, "ref");
    let (zc, zr) = (read(&zc, &[192]), read(&zr, &[192]));
    let err = rel_err(&flat32(&zc), &zr.concat(), 1e-3);
    assert!(err < 1e-5, "z {err:e}");
    for (a, b) in read(&ldc, &[]).iter().zip(read(&ldr, &[])) {
        assert!(
            (a[0] - b[0]).abs() <= 1e-4 * b[0].abs().max(1.0),
            "{a:?} {b:?}"
        );
    }
    let (dc, _, _) = run("cpu", "density", &x, "cpu");
    let (dr, _, _) = run("reference", "density", &x, "ref");
    for (a, b) in read(&dc, &[2]).iter().zip(read(&dr, &[2])) {
        assert!(
            (a[0] - b[0]).abs() <= 1e-4 * b[0].abs().max(1.0),
            "{a:?} {b:?}"
        );
    }
    let zref = d.join("forward.ref.npy");
    let (xc, _, log) = run("cpu", "inverse", &zref, "cpu");
    assert!(log.contains("iterations per block"), "{log}");
    let err = rel_err(&flat32(&read(&xc, &[3, 8, 8])), &xs.concat(), 1.0);
    assert!(err < 1e-5, "inverse {err:e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn cli_rejects_a_bad_thread_count_in_one_line() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/toy2d.toml");
    let out = std::env::temp_dir().join(format!("iresnetc-cpu-thr-{}.npy", std::process::id()));
    for bad in ["two", "0"] {
        let o = bin()
            .env("IRESNETC_THREADS", bad)
            .arg("run")
            .arg(&model)
            .args([
                "--backend",
                "cpu",
                "--mode",
                "sample",
                "--num",
                "2",
                "--output",
            ])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("IRESNETC_THREADS"), "{err}");
        assert!(!out.exists(), "nothing written");
    }
}
