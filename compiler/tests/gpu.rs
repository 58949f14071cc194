//! The wgpu backend against the f64 reference executor, on whatever adapter wgpu finds
//! (lavapipe in CI). Without an adapter the tests fail, unless the person running them set
//! `IRESNETC_ALLOW_NO_GPU` (the rule of `tests/common/gpu_policy`).
//!
//! Tolerances are relative in the max norm: `max_i |gpu_i - ref_i| / max(1, max_i |ref_i|)`
//! for arrays (z, x, logits), `|gpu - ref| / max(1, |ref|)` per sample for log-dets.
//! GPU work is serialized (lavapipe shares the machine's two cores); model loading is not.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{device, gpu_lock, inputs, model_file};
use iresnetc::codegen::{self, entries, CodegenOptions, LogDetLayout, Tiling};
use iresnetc::pipeline::Model;
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{ProbeKind, RouletteDist};
use iresnetc_runtime::{Bundle, GpuDevice, GpuExecutor, RuntimeError};

const TOL: f64 = 1e-4;
const FUSION_TOL: f64 = 1e-5;

fn bundle(model: &Model, fuse: bool) -> Bundle {
    bundle_tiled(model, fuse, Tiling::CPU)
}

fn bundle_tiled(model: &Model, fuse: bool, tiling: Tiling) -> Bundle {
    let opts = CodegenOptions { fuse, tiling };
    let (bundle, _) = codegen::compile_in_memory(model, &opts).expect("codegen");
    // Every generated module parses and validates with naga (codegen checks too).
    for (file, source) in &bundle.shaders {
        let module = naga::front::wgsl::parse_str(source)
            .unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(source)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(source)));
    }
    bundle
}

fn executor(dev: &GpuDevice, model: &Model, fuse: bool) -> GpuExecutor {
    GpuExecutor::new(dev, &bundle(model, fuse)).expect("executor")
}

fn executor_tiled(dev: &GpuDevice, model: &Model, fuse: bool, tiling: Tiling) -> GpuExecutor {
    GpuExecutor::new(dev, &bundle_tiled(model, fuse, tiling)).expect("executor")
}

fn flat(xs: &[Vec<f64>]) -> Vec<f32> {
    xs.iter().flatten().map(|&v| v as f32).collect()
}

fn rel_err(gpu: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(gpu.len(), reference.len(), "output length");
    let scale = reference.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    gpu.iter()
        .zip(reference)
        .map(|(&g, &r)| (f64::from(g) - r).abs())
        .fold(0.0, f64::max)
        / scale
}

fn rel_err32(a: &[f32], b: &[f32]) -> f64 {
    let b64: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
    rel_err(a, &b64)
}

fn logdet_err(gpu: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(gpu.len(), reference.len());
    gpu.iter()
        .zip(reference)
        .map(|(&g, &r)| (f64::from(g) - r).abs() / r.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn series(model: &Model) -> LogDetMethod {
    let s = &model.graph.spec.logdet;
    LogDetMethod::Series {
        terms: s.terms,
        probes: s.probes,
        kind: s.probe,
        seed: s.seed,
    }
}

fn layout(ex: &GpuExecutor) -> LogDetLayout {
    ex.plan()
        .logdet
        .clone()
        .expect("log-det layout in the plan")
}

/// Runs the log-det forward of `method` on the GPU: (z, logdet).
fn gpu_forward(
    ex: &mut GpuExecutor,
    method: &LogDetMethod,
    x: &[f32],
    batch: usize,
) -> (Vec<f32>, Vec<f32>) {
    let layout = layout(ex);
    let (entry, coef) = layout
        .coefs_for(method, 0, batch)
        .expect("coefficients")
        .expect("a GPU estimator");
    let probes = layout.probes_for(method, 0, batch);
    let mut out = ex
        .run(
            entry,
            batch,
            &[("x", x), ("probes", &probes), ("coef", &coef)],
        )
        .expect("gpu forward");
    (
        out.remove("z").expect("z"),
        out.remove("logdet").expect("logdet"),
    )
}

/// A flow against the reference: forward z and log-det (identical probes), the inverse of
/// the GPU's own z, the inverse against the reference's, and fused = unfused.
fn check_flow(model: &Model, batch: usize, check_unfused: bool) {
    check_flow_tiled(model, batch, check_unfused, Tiling::CPU);
    // The tiling chosen for hardware GPUs, checked numerically on lavapipe too, fused and
    // unfused; two samples exercise its per-sample indexing, and keep lavapipe's time (it
    // runs the split-K kernels' barriers slowly) and CI's within bounds.
    check_flow_tiled(model, batch.min(2), check_unfused, Tiling::GPU);
    // The GPU tiling's batch-folded GEMM kernels, chosen here from batch 2 on (a target of
    // one workgroup): three samples leave partial row tiles whenever a sample's pixels are
    // not a multiple of the tile's 64 rows.
    check_flow_tiled(model, 3, check_unfused, GEMM_FROM_BATCH_2);
}

/// Dispatches of the forward entry point that switch to a GEMM kernel from batch 2 on.
fn gemm_dispatches(model: &Model) -> usize {
    fn walk(steps: &[iresnetc_runtime::Step]) -> usize {
        steps
            .iter()
            .map(|s| match s {
                iresnetc_runtime::Step::Dispatch {
                    large_batch: Some(f),
                    ..
                } => usize::from(f.min_batch <= 2),
                iresnetc_runtime::Step::Repeat { steps, .. } => walk(steps),
                _ => 0,
            })
            .sum()
    }
    let b = bundle_tiled(model, true, GEMM_FROM_BATCH_2);
    walk(&b.plan.entry_points[entries::FORWARD].steps)
}

/// The GPU tiling with every layer of 32 or more output channels on its GEMM kernel from
/// batch 2 (the real tiling waits for the batch at which it fills 128 workgroups).
const GEMM_FROM_BATCH_2: Tiling = Tiling::SplitK {
    workgroup: 128,
    target_groups: 1,
    max_chain: 1152,
};

fn check_flow_tiled(model: &Model, batch: usize, check_unfused: bool, tiling: Tiling) {
    let g = &model.graph;
    let xs = inputs(batch, g.input_dim(), 11);
    let method = series(model);
    let r = Reference::new(g);
    let fwd = r.forward(&xs, &method).expect("reference forward");
    let z_ref: Vec<f64> = fwd.outputs.iter().flatten().copied().collect();
    let (x_ref, _) = r.inverse(&fwd.outputs).expect("reference inverse");
    let x_ref: Vec<f64> = x_ref.into_iter().flatten().collect();

    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    let x = flat(&xs);
    let mut fused = executor_tiled(dev, model, true, tiling);
    let (z, ld) = gpu_forward(&mut fused, &method, &x, batch);
    let (ez, eld) = (rel_err(&z, &z_ref), logdet_err(&ld, &fwd.logdet));
    let x_back = fused
        .run(entries::INVERSE, batch, &[("z", &z)])
        .expect("gpu inverse")
        .remove("x")
        .expect("x");
    let zin = flat(&fwd.outputs);
    let x_inv = fused
        .run(entries::INVERSE, batch, &[("z", &zin)])
        .expect("gpu inverse")
        .remove("x")
        .expect("x");
    let (e_round, e_inv) = (rel_err(&x_back, &flat64(&x)), rel_err(&x_inv, &x_ref));
    // The other entry points: encode (z alone) and logdet (the log-det alone).
    let (e_enc, e_ld) = other_entries(&mut fused, &method, &x, batch, &z_ref, &fwd.logdet);
    assert!(
        e_enc < TOL && e_ld < TOL,
        "encode {e_enc}, logdet entry {e_ld}"
    );
    eprintln!(
        "{} {tiling:?} batch {batch}: z {ez:.1e}, logdet {eld:.1e}, inverse(gpu z) vs x {e_round:.1e}, inverse vs reference {e_inv:.1e} ({} forward / {} inverse dispatches)",
        g.spec.name,
        fused.dispatch_count(entries::FORWARD),
        fused.dispatch_count(entries::INVERSE)
    );
    assert!(ez < TOL, "{}: z rel err {ez}", g.spec.name);
    assert!(eld < TOL, "{}: logdet rel err {eld}", g.spec.name);
    assert!(
        e_round < TOL,
        "{}: inverse of forward {e_round}",
        g.spec.name
    );
    assert!(e_inv < TOL, "{}: inverse vs reference {e_inv}", g.spec.name);

    if check_unfused {
        let mut unfused = executor_tiled(dev, model, false, tiling);
        let (z2, ld2) = gpu_forward(&mut unfused, &method, &x, batch);
        let x2 = unfused
            .run(entries::INVERSE, batch, &[("z", &zin)])
            .expect("unfused inverse")
            .remove("x")
            .expect("x");
        let (e_enc, e_ld) = other_entries(&mut unfused, &method, &x, batch, &z_ref, &fwd.logdet);
        assert!(
            e_enc < TOL && e_ld < TOL,
            "unfused: encode {e_enc}, logdet entry {e_ld}"
        );
        let (a, b, c) = (
            rel_err32(&z2, &z),
            rel_err32(&ld2, &ld),
            rel_err32(&x2, &x_inv),
        );
        eprintln!(
            "{} fused vs unfused: z {a:.1e}, logdet {b:.1e}, inverse {c:.1e} ({} vs {} forward dispatches)",
            g.spec.name,
            fused.dispatch_count(entries::FORWARD),
            unfused.dispatch_count(entries::FORWARD)
        );
        assert!(a < FUSION_TOL && b < FUSION_TOL && c < FUSION_TOL);
        assert!(unfused.dispatch_count(entries::FORWARD) > fused.dispatch_count(entries::FORWARD));
    }
}

/// Errors of the `encode` and `logdet` entry points against the reference's z and log-det.
fn other_entries(
    ex: &mut GpuExecutor,
    method: &LogDetMethod,
    x: &[f32],
    batch: usize,
    z_ref: &[f64],
    ld_ref: &[f64],
) -> (f64, f64) {
    let z = ex
        .run(entries::ENCODE, batch, &[("x", x)])
        .expect("encode")
        .remove("z")
        .expect("z");
    let layout = layout(ex);
    let (_, coef) = layout
        .coefs_for(method, 0, batch)
        .expect("coefficients")
        .expect("a GPU estimator");
    let probes = layout.probes_for(method, 0, batch);
    let ld = ex
        .run(
            entries::LOGDET,
            batch,
            &[("x", x), ("probes", &probes), ("coef", &coef)],
        )
        .expect("logdet")
        .remove("logdet")
        .expect("logdet");
    (rel_err(&z, z_ref), logdet_err(&ld, ld_ref))
}

fn flat64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

#[test]
fn toy2d_matches_reference() {
    let m = model_file("toy2d.toml");
    // The 128-wide dense layers and their vjps: the GEMM check below does run GEMMs.
    assert!(gemm_dispatches(&m) >= 8, "{}", gemm_dispatches(&m));
    check_flow(&m, 8, true);
}

/// Two probes and three terms: the probe and term indices the kernels derive from the
/// one counter of terms started; branches of two layers (the shortest the WGSL codegen
/// takes), where the kernel that advances the counter directly precedes the one reading it.
#[test]
fn two_probes_short_branches_match_reference() {
    for body in [
        "input = [2, 4, 4]\n[[stages]]\nblocks = 2\nwidth = 4\nkernels = [3, 1]",
        "input = [3]\n[[stages]]\nblocks = 2\nhidden = [5]",
    ] {
        let m = common::model_from_toml(&format!(
            "name = \"short\"\nkind = \"flow\"\n{body}\n[logdet]\nterms = 3\nprobes = 2\n"
        ));
        check_flow(&m, 3, true);
    }
}

#[test]
fn cifar_tiny_matches_reference() {
    check_flow(&model_file("cifar-tiny.toml"), 4, true);
}

#[test]
fn cifar_block_matches_reference() {
    let mut m = model_file("cifar-block.toml");
    // The certified count for the default tolerance is long on lavapipe; both sides run the
    // same fixed number of steps when the tolerance cannot be reached.
    m.graph.spec.inverse.max_iters = 12;
    m.graph.spec.inverse.tol = 1e-30;
    assert!(gemm_dispatches(&m) >= 2, "{}", gemm_dispatches(&m));
    check_flow(&m, 4, true);
}

/// The big flows at batch 1: forward z and log-det, and the inverse with the same fixed
/// number of fixed-point steps on both sides (the certified count would take minutes on
/// lavapipe and in the reference).
fn check_big_flow(name: &str) {
    let mut m = model_file(name);
    m.graph.spec.inverse.max_iters = 2;
    m.graph.spec.inverse.tol = 1e-30;
    let g = &m.graph;
    let xs = inputs(1, g.input_dim(), 5);
    let method = series(&m);
    let r = Reference::new(g);
    let fwd = r.forward(&xs, &method).expect("reference forward");
    let (x_ref, _) = r.inverse(&fwd.outputs).expect("reference inverse");
    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    // The adapter's own tiling: register blocks on lavapipe, split-K on a real GPU (where
    // examples/gpu/device_check.sh runs this test).
    let tiling = Tiling::for_adapter(dev.adapter());
    let mut ex = executor_tiled(dev, &m, true, tiling);
    let (z, ld) = gpu_forward(&mut ex, &method, &flat(&xs), 1);
    let z_ref: Vec<f64> = fwd.outputs.iter().flatten().copied().collect();
    let x = ex
        .run(entries::INVERSE, 1, &[("z", &flat(&fwd.outputs))])
        .expect("gpu inverse")
        .remove("x")
        .expect("x");
    let x_ref: Vec<f64> = x_ref.into_iter().flatten().collect();
    let (ez, eld, ex_) = (
        rel_err(&z, &z_ref),
        logdet_err(&ld, &fwd.logdet),
        rel_err(&x, &x_ref),
    );
    eprintln!("{name} {tiling:?} batch 1: z {ez:.1e}, logdet {eld:.1e}, 2-step inverse {ex_:.1e}");
    assert!(ez < TOL && eld < TOL && ex_ < TOL);
}

#[test]
fn cifar_matches_reference() {
    check_big_flow("cifar.toml");
}

#[test]
fn mnist_matches_reference() {
    check_big_flow("mnist.toml");
}

#[test]
fn classifier_matches_reference() {
    let m = model_file("cifar-classifier.toml");
    let batch = 4;
    let xs = inputs(batch, m.graph.input_dim(), 2);
    let r = Reference::new(&m.graph)
        .forward(&xs, &LogDetMethod::None)
        .expect("reference");
    let logits_ref: Vec<f64> = r.outputs.iter().flatten().copied().collect();
    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    let x = flat(&xs);
    for tiling in [Tiling::CPU, Tiling::GPU] {
        let mut outs = Vec::new();
        for fuse in [true, false] {
            let mut ex = executor_tiled(dev, &m, fuse, tiling);
            let l = ex
                .run(entries::CLASSIFY, batch, &[("x", &x)])
                .expect("classify")
                .remove("logits")
                .expect("logits");
            let e = rel_err(&l, &logits_ref);
            eprintln!(
                "cifar-classifier {tiling:?} fused={fuse}: logits {e:.1e} ({} dispatches)",
                ex.dispatch_count(entries::CLASSIFY)
            );
            assert!(e < TOL, "logits rel err {e}");
            outs.push(l);
        }
        assert!(rel_err32(&outs[0], &outs[1]) < FUSION_TOL);
    }
}

#[test]
fn roulette_matches_reference() {
    let m = model_file("cifar-tiny.toml");
    let batch = 4;
    let s = &m.graph.spec.logdet;
    let method = LogDetMethod::Roulette {
        terms: s.terms,
        probes: s.probes,
        kind: ProbeKind::Rademacher,
        seed: 7,
        dist: RouletteDist::Geometric,
        param: 0.5,
    };
    let xs = inputs(batch, m.graph.input_dim(), 4);
    let r = Reference::new(&m.graph)
        .forward(&xs, &method)
        .expect("reference");
    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    for tiling in [Tiling::CPU, Tiling::GPU] {
        for fuse in [true, false] {
            let mut ex = executor_tiled(dev, &m, fuse, tiling);
            let (_, ld) = gpu_forward(&mut ex, &method, &flat(&xs), batch);
            let e = logdet_err(&ld, &r.logdet);
            eprintln!("cifar-tiny roulette {tiling:?} fused={fuse}: logdet {e:.1e}");
            assert!(e < TOL);
        }
    }
}

/// Batches larger than the limits allow are split into chunks with the same results; a
/// buffer that cannot fit at all is refused naming the limit.
#[test]
fn limits_split_or_refuse() {
    let m = model_file("cifar-tiny.toml");
    let b = bundle(&m, true);
    let limits = iresnetc_runtime::wgpu::Limits::default();
    let huge = 1usize << 40;
    match iresnetc_runtime::check_limits(&b.plan, &limits, huge) {
        Err(RuntimeError::LimitExceeded { limit, .. }) => {
            assert!(limit.starts_with("max_"), "{limit}")
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    let mut ex = GpuExecutor::new(dev, &b).expect("executor");
    let batch = 5;
    let x = flat(&inputs(batch, m.graph.input_dim(), 9));
    let whole = ex.run(entries::ENCODE, batch, &[("x", &x)]).expect("run");
    ex.set_max_batch(2);
    let split = ex
        .run(entries::ENCODE, batch, &[("x", &x)])
        .expect("split run");
    assert_eq!(whole["z"], split["z"]);
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_iresnetc"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("iresnetc-gpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// Exit code 2 and a one-line message containing every needle.
fn fails_with(cmd: &mut Command, needles: &[&str]) {
    let out = cmd.output().expect("run iresnetc");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

/// `iresnetc compile` then `iresnetc run DIR --backend wgpu` (no compiler work at run time),
/// against the reference backend on the same bundle; then damaged bundles and a missing
/// adapter, each a clear one-line error with exit code 2.
#[test]
fn cli_compile_run_and_bad_bundles() {
    let dir = tmpdir("cli");
    let out = dir.join("bundle");
    let status = bin()
        .args([
            "compile",
            &models().join("cifar-tiny.toml").to_string_lossy(),
        ])
        .arg("-o")
        .arg(&out)
        .output()
        .expect("compile");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for f in [
        "plan.json",
        "weights.safetensors",
        "model.toml",
        "report.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!dir.read_dir().expect("dir").any(|e| e
        .map(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .unwrap_or(false)));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report"))
            .expect("report json");
    assert!(report["codegen"]["entry_points"]["forward"]["dispatches"].as_u64() > Some(0));
    assert!(report["lipschitz"]["blocks"].is_array());

    let x = dir.join("x.npy");
    let xs = inputs(3, 3 * 8 * 8, 1);
    iresnetc::npy::write(&x, &xs, &[3, 8, 8], false).expect("x.npy");
    let run = |backend: &str, z: &Path, ld: &Path| {
        let o = bin()
            .args(["run"])
            .arg(&out)
            .args(["--backend", backend, "--mode", "forward", "--input"])
            .arg(&x)
            .arg("--output")
            .arg(z)
            .arg("--logdet-out")
            .arg(ld)
            .output()
            .expect("run");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let have_gpu = {
        let _l = gpu_lock();
        device().is_some()
    };
    if have_gpu {
        let (zg, lg, zc, lc) = (
            dir.join("zg.npy"),
            dir.join("lg.npy"),
            dir.join("zc.npy"),
            dir.join("lc.npy"),
        );
        let _l = gpu_lock();
        let (code, err) = run("wgpu", &zg, &lg);
        assert_eq!(code, Some(0), "{err}");
        drop(_l);
        let (code, err) = run("reference", &zc, &lc);
        assert_eq!(code, Some(0), "{err}");
        let read = |p: &Path, s: &[usize]| -> Vec<f64> {
            iresnetc::npy::read_batch(p, "a", s)
                .expect("read")
                .samples
                .into_iter()
                .flatten()
                .collect()
        };
        let (a, b) = (read(&zg, &[192]), read(&zc, &[192]));
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        assert!(rel_err(&a32, &b) < TOL);
        let (a, b) = (read(&lg, &[]), read(&lc, &[]));
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        assert!(logdet_err(&a32, &b) < TOL);
    }

    // No adapter by that name.
    fails_with(
        bin()
            .env("IRESNETC_ADAPTER", "nonexistent")
            .args(["run"])
            .arg(&out)
            .args(["--backend", "wgpu", "--mode", "forward", "--input"])
            .arg(&x)
            .arg("--output")
            .arg(dir.join("never.npy")),
        &["nonexistent"],
    );
    assert!(!dir.join("never.npy").exists());

    // A truncated plan.json, then one from another version.
    let plan = std::fs::read_to_string(out.join("plan.json")).expect("plan");
    let damaged = dir.join("damaged");
    std::fs::create_dir_all(&damaged).expect("dir");
    copy_dir(&out, &damaged);
    let run_damaged = |needles: &[&str]| {
        fails_with(
            bin()
                .args(["run"])
                .arg(&damaged)
                .args(["--backend", "wgpu", "--mode", "forward", "--input"])
                .arg(&x)
                .arg("--output")
                .arg(dir.join("never.npy")),
            needles,
        )
    };
    std::fs::write(damaged.join("plan.json"), &plan[..plan.len() / 2]).expect("truncate");
    run_damaged(&["plan.json", "damaged"]);
    let other = plan.replacen(
        &format!("\"version\": {}", iresnetc_runtime::BUNDLE_VERSION),
        "\"version\": 999",
        1,
    );
    assert_ne!(other, plan, "version field not found");
    std::fs::write(damaged.join("plan.json"), other).expect("write");
    run_damaged(&["version 999"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Not a timed test. `cargo test --release -p iresnetc --test gpu -- --ignored --nocapture
/// bench_cifar_block` prints dispatches and median wall times (upload, one submission, device
/// sync, read-back) of fused vs unfused plans on cifar-block at batch 8.
#[test]
#[ignore]
fn bench_cifar_block() {
    let m = model_file("cifar-block.toml");
    let batch = 8;
    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    for fuse in [true, false] {
        let mut ex = executor(dev, &m, fuse);
        let layout = layout(&ex);
        let x = flat(&inputs(batch, m.graph.input_dim(), 3));
        let method = LogDetMethod::Series {
            terms: layout.terms,
            probes: layout.probes,
            kind: ProbeKind::Gaussian,
            seed: 0,
        };
        let probes = layout.probes_for(&method, 0, batch);
        let (_, coef) = layout
            .coefs_for(&method, 0, batch)
            .expect("coefficients")
            .expect("a series");
        let z = vec![0.1f32; batch * m.graph.latent_dim()];
        for entry in [entries::ENCODE, entries::FORWARD, entries::INVERSE] {
            let ins: Vec<(&str, &[f32])> = match entry {
                entries::ENCODE => vec![("x", &x)],
                entries::INVERSE => vec![("z", &z)],
                _ => vec![("x", &x), ("probes", &probes), ("coef", &coef)],
            };
            ex.run(entry, batch, &ins).expect("warm-up");
            let mut times: Vec<f64> = (0..3)
                .map(|_| {
                    ex.run_timed(entry, batch, &ins)
                        .expect("run")
                        .wall
                        .as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            eprintln!(
                "bench cifar-block batch {batch} fused={fuse:<5} {entry:<8} {:>4} dispatches  median {:>8.1} ms",
                ex.dispatch_count(entry),
                times[1] * 1e3
            );
        }
    }
}

/// A copy of a bundle directory, subdirectories (the tract segments) included.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for f in std::fs::read_dir(from).expect("bundle") {
        let f = f.expect("entry").path();
        let dest = to.join(f.file_name().expect("name"));
        if f.is_dir() {
            copy_dir(&f, &dest);
        } else {
            std::fs::copy(&f, dest).expect("copy");
        }
    }
}
