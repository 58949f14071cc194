//! ONNX export: every model's forward, forward + log-det and unrolled inverse
//! graphs, read back and run by tract, against the f64 reference executor.
//!
//! Error norm: `max_i |tract_i - ref_i| / max_i |ref_i|` (the largest error
//! relative to the reference's infinity norm), below 1e-4 for every output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use iresnetc::ir::Graph;
use iresnetc::onnx::{self, ConvStyle, LogDetExport};
use iresnetc::pipeline::Model;
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{Estimator, ModelKind};
use iresnetc_runtime::tract::{ProbeLayout, TractGraph};
use prost::Message;

const TOL: f64 = 1e-4;

fn to_f32(xs: &[Vec<f64>]) -> Vec<f32> {
    xs.iter().flatten().map(|&v| v as f32).collect()
}

/// `max |a - b| / max |a|`, with `a` the reference.
fn rel_err(reference: &[f64], got: &[f32]) -> f64 {
    assert_eq!(reference.len(), got.len(), "output lengths differ");
    let scale = reference
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-30);
    let diff = reference
        .iter()
        .zip(got)
        .fold(0.0f64, |m, (a, &b)| m.max((a - b as f64).abs()));
    diff / scale
}

fn run(bytes: &[u8], shapes: &[Vec<usize>], inputs: &[&[f32]]) -> Vec<(Vec<usize>, Vec<f32>)> {
    let g = TractGraph::load(bytes, shapes, "test").expect("tract loads the export");
    g.run(inputs).expect("tract runs the export")
}

fn batched(b: usize, s: &[usize]) -> Vec<usize> {
    std::iter::once(b).chain(s.iter().copied()).collect()
}

fn check_forward(m: &Model, xs: &[Vec<f64>], style: ConvStyle) {
    let g = &m.graph;
    let r = Reference::new(g).forward(xs, &LogDetMethod::None).unwrap();
    let bytes = onnx::encode(&onnx::forward(g, style).unwrap());
    let outs = run(&bytes, &[batched(xs.len(), &g.spec.input)], &[&to_f32(xs)]);
    let e = rel_err(&r.outputs.concat(), &outs[0].1);
    eprintln!("{}: forward ({style:?}) rel err {e:.2e}", g.spec.name);
    assert!(e < TOL, "{}: forward rel err {e}", g.spec.name);
}

fn check_logdet(m: &Model, xs: &[Vec<f64>], ld: &LogDetExport, method: &LogDetMethod, seed: u64) {
    let g = &m.graph;
    let r = Reference::new(g).forward(xs, method).unwrap();
    let bytes = onnx::encode(&onnx::forward_logdet(g, ld, ConvStyle::default()).unwrap());
    let layout: ProbeLayout = ld.probe_layout(g);
    let mut shapes = vec![batched(xs.len(), &g.spec.input)];
    let x32 = to_f32(xs);
    let probes = layout.matrix(seed, 0, xs.len());
    let mut inputs: Vec<&[f32]> = vec![&x32];
    if layout.total > 0 {
        shapes.push(vec![xs.len(), layout.total]);
        inputs.push(&probes);
    }
    let outs = run(&bytes, &shapes, &inputs);
    let ez = rel_err(&r.outputs.concat(), &outs[0].1);
    let el = rel_err(&r.logdet, &outs[1].1);
    eprintln!(
        "{}: forward+logdet ({ld:?}) z rel err {ez:.2e}, logdet rel err {el:.2e} (ref {:?}, tract {:?})",
        g.spec.name, r.logdet, outs[1].1
    );
    assert_eq!(outs[1].0, vec![xs.len()]);
    assert!(ez < TOL && el < TOL, "{}: z {ez}, logdet {el}", g.spec.name);
}

/// The reference inverse run for exactly `k` fixed-point steps per block.
fn reference_inverse_k(g: &Graph, zs: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    let mut g = g.clone();
    g.spec.inverse.max_iters = k;
    g.spec.inverse.tol = 0.0;
    Reference::new(&g).inverse(zs).unwrap().0
}

fn check_inverse(m: &Model, zs: &[Vec<f64>], steps: Option<usize>) {
    let g = &m.graph;
    let (reference, step_counts) = match steps {
        Some(k) => (reference_inverse_k(g, zs, k), vec![k; g.blocks.len()]),
        None => (
            Reference::new(g).inverse(zs).unwrap().0,
            onnx::certified_steps(m),
        ),
    };
    let bytes = onnx::encode(&onnx::inverse(g, &step_counts, ConvStyle::default()).unwrap());
    let outs = run(&bytes, &[vec![zs.len(), g.latent_dim()]], &[&to_f32(zs)]);
    let e = rel_err(&reference.concat(), &outs[0].1);
    eprintln!("{}: inverse ({steps:?} steps) rel err {e:.2e}", g.spec.name);
    assert!(e < TOL, "{}: inverse rel err {e}", g.spec.name);
}

fn series(g: &Graph) -> (LogDetExport, LogDetMethod, u64) {
    let s = &g.spec.logdet;
    let mut spec = s.clone();
    spec.estimator = Estimator::Series;
    (
        LogDetExport::from_spec(g, &spec).unwrap(),
        spec.method(),
        spec.seed,
    )
}

/// Forward, series log-det and inverse of a flow; `inv_steps` None = certified counts.
fn check_flow(m: &Model, batch: usize, inv_steps: Option<usize>) {
    let g = &m.graph;
    let xs = common::inputs(batch, g.input_dim(), 11);
    // Every conv formulation on the small models; the big ones (slow f64
    // reference) only in the default one, which the other graphs use too.
    if g.forward_macs() < 1_000_000_000 {
        check_forward(m, &xs, ConvStyle::Conv);
        check_forward(m, &xs, ConvStyle::PointwiseMatMul);
    }
    check_forward(m, &xs, ConvStyle::TapSum);
    let (ld, method, seed) = series(g);
    check_logdet(m, &xs, &ld, &method, seed);
    let zs = Reference::new(g)
        .forward(&xs, &LogDetMethod::None)
        .unwrap()
        .outputs;
    check_inverse(m, &zs, inv_steps);
}

#[test]
fn toy2d_all_graphs_match_reference() {
    let m = common::model_file("toy2d.toml");
    check_flow(&m, 8, Some(12));
    // The model's own estimator is exact: closed-form 2x2 log-det in the graph.
    let g = &m.graph;
    let xs = common::inputs(8, 2, 5);
    let ld = LogDetExport::from_spec(g, &g.spec.logdet).unwrap();
    assert_eq!(ld, LogDetExport::Exact2d);
    check_logdet(&m, &xs, &ld, &LogDetMethod::Exact, 0);
}

#[test]
fn cifar_tiny_all_graphs_match_reference() {
    check_flow(&common::model_file("cifar-tiny.toml"), 4, Some(8));
}

#[test]
fn cifar_block_all_graphs_match_reference() {
    check_flow(&common::model_file("cifar-block.toml"), 2, Some(3));
}

#[test]
fn cifar_classifier_forward_matches_reference() {
    let m = common::model_file("cifar-classifier.toml");
    let xs = common::inputs(2, m.graph.input_dim(), 3);
    check_forward(&m, &xs, ConvStyle::Conv);
    check_forward(&m, &xs, ConvStyle::PointwiseMatMul);
    check_forward(&m, &xs, ConvStyle::TapSum);
    let err = onnx::inverse(&m.graph, &[], ConvStyle::Conv)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cifar-classifier") && err.contains("invertible"),
        "{err}"
    );
    let err = onnx::forward_logdet(&m.graph, &LogDetExport::Exact2d, ConvStyle::Conv)
        .unwrap_err()
        .to_string();
    assert!(err.contains("log-det"), "{err}");
}

/// The full-size flows at batch 1; the inverse is compared with the
/// reference fixed point run for the same (small) number of steps.
#[test]
fn cifar_and_mnist_batch1_match_reference() {
    for name in ["cifar.toml", "mnist.toml"] {
        let m = common::model_file(name);
        assert_eq!(m.graph.spec.kind, ModelKind::Flow);
        check_flow(&m, 1, Some(2));
    }
}

#[test]
fn files_are_standard_onnx() {
    let m = common::model_file("cifar-tiny.toml");
    let g = &m.graph;
    let (ld, _, _) = series(g);
    for proto in [
        onnx::forward(g, ConvStyle::Conv).unwrap(),
        onnx::forward_logdet(g, &ld, ConvStyle::Conv).unwrap(),
        onnx::inverse(g, &[2; 6], ConvStyle::Conv).unwrap(),
    ] {
        // Round trip through the wire format.
        let back = tract_onnx::pb::ModelProto::decode(onnx::encode(&proto).as_slice()).unwrap();
        assert_eq!(back.ir_version, 8);
        assert_eq!(back.opset_import.len(), 1);
        assert_eq!(back.opset_import[0].domain, "");
        assert!((13..=17).contains(&back.opset_import[0].version));
        let graph = back.graph.unwrap();
        assert!(
            graph.node.iter().all(|n| n.domain.is_empty()),
            "non-standard domain"
        );
        let names: std::collections::HashSet<&str> =
            graph.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names.len(), graph.node.len(), "node names are unique");
        for io in graph.input.iter().chain(&graph.output) {
            let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
                io.r#type.as_ref().and_then(|t| t.value.clone())
            else {
                panic!("{} has no tensor type", io.name)
            };
            let dims = t.shape.unwrap().dim;
            assert_eq!(
                dims[0].value,
                Some(
                    tract_onnx::pb::tensor_shape_proto::dimension::Value::DimParam("batch".into())
                ),
                "{}: batch is symbolic",
                io.name
            );
            assert!(dims[1..].iter().all(|d| matches!(
                d.value,
                Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(_))
            )));
        }
        if graph.name.ends_with(".forward") {
            for n in [
                "stage0.block0.actnorm",
                "stage0.block0.conv1",
                "stage1.block1.act0",
                "pre.squeeze",
            ] {
                assert!(names.contains(n), "node `{n}` missing");
            }
            assert!(graph
                .initializer
                .iter()
                .any(|t| t.name == "stage0.block0.conv1.weight"));
        }
    }
}

#[test]
fn roulette_is_refused_with_a_clear_error() {
    let m = common::model_from_toml(&format!(
        "{}\n[logdet]\nestimator = \"roulette\"\n",
        common::SMALL_CONV
    ));
    let err = LogDetExport::from_spec(&m.graph, &m.graph.spec.logdet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("roulette"), "{err}");
}

// ---- the CLI ----

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iresnetc"))
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("iresnetc-onnx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{cmd:?}: {err}");
    err + &String::from_utf8_lossy(&out.stdout)
}

fn read(path: &Path, per_sample: &[usize]) -> Vec<Vec<f64>> {
    iresnetc::npy::read_batch(path, "x", per_sample)
        .unwrap()
        .samples
}

#[test]
fn cli_export_validates_and_writes_inverse() {
    let d = tmpdir("export");
    let out = d.join("m.onnx");
    let log = ok(bin()
        .args([
            "export-onnx",
            models().join("cifar-tiny.toml").to_str().unwrap(),
            "-o",
        ])
        .arg(&out)
        .args(["--with-logdet", "--inverse-steps", "3", "--validate"]));
    assert!(log.contains("max abs") && log.contains("max rel"), "{log}");
    for f in ["m.onnx", "m.inverse.onnx", "m.json"] {
        assert!(d.join(f).is_file(), "{f} missing: {log}");
    }
    // Unsupported: clear one-line error, exit 2.
    let out = bin()
        .args([
            "export-onnx",
            models().join("cifar-classifier.toml").to_str().unwrap(),
            "-o",
        ])
        .arg(d.join("c.onnx"))
        .args(["--inverse-steps", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invertible") && !err.contains("panicked"),
        "{err}"
    );
}

/// `--backend tract` against `--backend cpu`: forward, log-det (same probe seed), inverse.
fn cli_tract_matches_cpu(model: &Path, per_sample: &[usize], latent: usize, n: usize) {
    let d = tmpdir(model.file_stem().unwrap().to_str().unwrap());
    let xs = common::inputs(n, per_sample.iter().product(), 21);
    let xin = d.join("x.npy");
    iresnetc::npy::write(&xin, &xs, per_sample, true).unwrap();
    let m = model.to_str().unwrap();
    let run = |backend: &str, mode: &str, input: &Path, out: &Path| {
        let log = ok(bin()
            .args([
                "run",
                m,
                "--backend",
                backend,
                "--mode",
                mode,
                "--probe-seed",
                "7",
                "--input",
            ])
            .arg(input)
            .arg("--output")
            .arg(out));
        if backend == "tract" {
            assert!(log.contains("backend tract"), "{log}");
        }
    };
    let compare = |mode: &str, input: &Path, shape: &[usize]| {
        let (a, b) = (
            d.join(format!("{mode}.cpu.npy")),
            d.join(format!("{mode}.tract.npy")),
        );
        run("reference", mode, input, &a);
        run("tract", mode, input, &b);
        let (ra, rb) = (read(&a, shape).concat(), read(&b, shape).concat());
        let e = rel_err(&ra, &rb.iter().map(|&v| v as f32).collect::<Vec<_>>());
        eprintln!("{m}: cli {mode} tract vs cpu rel err {e:.2e}");
        assert!(e < TOL, "{m} {mode}: {e}");
    };
    compare("forward", &xin, &[latent]);
    compare("logdet", &xin, &[]);
    compare("inverse", &d.join("forward.cpu.npy"), per_sample);
}

#[test]
fn cli_tract_backend_matches_cpu() {
    cli_tract_matches_cpu(&models().join("cifar-tiny.toml"), &[3, 8, 8], 192, 3);
    cli_tract_matches_cpu(&models().join("toy2d.toml"), &[2], 2, 6);
}

/// A bundle's ONNX graphs run by the runtime alone (no compiler types), and by
/// `iresnetc run BUNDLE --backend tract`.
#[test]
fn bundle_graphs_run_in_the_runtime() {
    use iresnetc_runtime::tract::TractBundle;
    use iresnetc_runtime::tract_segments::{ProbeDraw, SegmentRunner};
    let m = common::model_from_toml(common::SMALL_CONV);
    let g = &m.graph;
    let d = tmpdir("bundle");
    // A whole bundle: the tract backend checks plan.json (format, version, file hashes).
    iresnetc::bundle::write_bundle(&m, &d, &Default::default()).unwrap();

    let b = TractBundle::open(&d).unwrap();
    assert_eq!(b.manifest.inverse_steps, onnx::certified_steps(&m));
    assert_eq!(b.manifest.segments.len(), g.blocks.len());
    let xs = common::inputs(2, g.input_dim(), 9);
    let r = Reference::new(g);
    let (_, method, seed) = series(g);
    let want = r.forward(&xs, &method).unwrap();
    // The whole forward graph, kept for other runtimes.
    let outs = b.forward(2).unwrap().run(&[&to_f32(&xs)]).unwrap();
    assert!(rel_err(&want.outputs.concat(), &outs[0].1) < TOL);
    // The segments, chained.
    let mut runner = SegmentRunner::new(b).unwrap();
    let draw = ProbeDraw {
        seed,
        first_sample: 0,
    };
    let out = runner.forward(&to_f32(&xs), 2, Some(Some(draw))).unwrap();
    assert!(rel_err(&want.outputs.concat(), &out.out) < TOL);
    assert!(rel_err(&want.logdet, &out.logdet.unwrap()) < TOL);
    let (back, stats) = runner
        .inverse(&to_f32(&want.outputs), 2, g.spec.inverse.tol)
        .unwrap();
    let e = rel_err(&xs.concat(), &back);
    eprintln!("bundle: inverse round trip rel err {e:.2e}, fixed points {stats:?}");
    assert!(e < TOL);
    for (s, cap) in stats.iter().zip(onnx::certified_steps(&m)) {
        assert!(s.iters >= 1 && s.iters <= cap, "{s:?} (cap {cap})");
    }

    // The CLI on the bundle uses its files and says so.
    let xin = d.join("x.npy");
    iresnetc::npy::write(&xin, &xs, &g.spec.input, true).unwrap();
    let out = d.join("z.npy");
    let log = ok(bin()
        .args([
            "run",
            d.to_str().unwrap(),
            "--backend",
            "tract",
            "--mode",
            "forward",
            "--input",
        ])
        .arg(&xin)
        .arg("--output")
        .arg(&out));
    assert!(
        log.contains("backend tract") && log.contains("bundle"),
        "{log}"
    );
    let z = read(&out, &[g.latent_dim()]).concat();
    assert!(
        rel_err(
            &want.outputs.concat(),
            &z.iter().map(|&v| v as f32).collect::<Vec<_>>()
        ) < TOL
    );

    // A damaged manifest is a one-line error naming the file.
    std::fs::write(d.join("onnx.json"), "{").unwrap();
    let err = TractBundle::open(&d).err().unwrap().to_string();
    assert!(err.contains("onnx.json"), "{err}");
    // So is a manifest of another version, which is told to recompile; inside a bundle the
    // edited file is caught first by its hash, which also says to recompile.
    let old = r#"{"format": "iresnetc-onnx", "version": 1, "forward": {}}"#;
    let reason = iresnetc_runtime::tract::Manifest::parse(old).err().unwrap();
    assert!(
        reason.contains("version") && reason.contains("recompile"),
        "{reason}"
    );
    std::fs::write(d.join("onnx.json"), old).unwrap();
    let err = TractBundle::open(&d).err().unwrap().to_string();
    assert!(
        err.contains("onnx.json") && err.contains("recompile"),
        "{err}"
    );
}

/// The per-block segment graphs a bundle carries, chained by the runtime, compute what the
/// whole-model graphs compute: forward, forward + log-det with the same probes, and the
/// inverse with the same number of fixed-point steps. cifar-tiny has every boundary kind:
/// squeezes, factor-out slices (latent parts leaving mid-model) and the trailing latent.
#[test]
fn segments_chain_to_the_whole_graphs() {
    use iresnetc_runtime::tract::TractBundle;
    use iresnetc_runtime::tract_segments::{ProbeDraw, SegmentRunner};
    const CHAIN_TOL: f64 = 1e-5;
    const STEPS: usize = 3;
    let m = common::model_file("cifar-tiny.toml");
    let g = &m.graph;
    let n = 2;
    let xs = common::inputs(n, g.input_dim(), 21);
    let x32 = to_f32(&xs);
    let (mut manifest, files) = onnx::bundle_graphs(&m).unwrap();
    assert_eq!(manifest.segments.len(), g.blocks.len());
    for s in &mut manifest.segments {
        s.inverse.as_mut().unwrap().steps = STEPS;
    }
    // Latent parts that do not tile z are refused when the runner opens the manifest.
    let mut bad = manifest.clone();
    bad.latents[1].offset += 1;
    let err = SegmentRunner::new(TractBundle::from_memory(bad, files.clone()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("onnx.json") && err.contains("latent part 1"),
        "{err}"
    );
    let mut runner = SegmentRunner::new(TractBundle::from_memory(manifest, files)).unwrap();

    let style = ConvStyle::default();
    let whole_z = run(
        &onnx::encode(&onnx::forward(g, style).unwrap()),
        &[batched(n, &g.spec.input)],
        &[&x32],
    );
    let seg = runner.forward(&x32, n, None).unwrap();
    let as64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let e = rel_err(&as64(&whole_z[0].1), &seg.out);
    eprintln!("segments vs whole: forward rel err {e:.2e}");
    assert!(e < CHAIN_TOL, "forward {e}");

    let ld = LogDetExport::from_spec(g, &g.spec.logdet).unwrap();
    let layout = ld.probe_layout(g);
    let seed = 17;
    let whole = run(
        &onnx::encode(&onnx::forward_logdet(g, &ld, style).unwrap()),
        &[batched(n, &g.spec.input), vec![n, layout.total]],
        &[&x32, &layout.matrix(seed, 0, n)],
    );
    let draw = ProbeDraw {
        seed,
        first_sample: 0,
    };
    let seg = runner.forward(&x32, n, Some(Some(draw))).unwrap();
    let (ez, el) = (
        rel_err(&as64(&whole[0].1), &seg.out),
        rel_err(&as64(&whole[1].1), &seg.logdet.unwrap()),
    );
    eprintln!("segments vs whole: z rel err {ez:.2e}, logdet rel err {el:.2e}");
    assert!(ez < CHAIN_TOL && el < CHAIN_TOL, "z {ez}, logdet {el}");

    let whole_x = run(
        &onnx::encode(&onnx::inverse(g, &vec![STEPS; g.blocks.len()], style).unwrap()),
        &[vec![n, g.latent_dim()]],
        &[&whole_z[0].1],
    );
    // Tolerance 0: every block runs exactly its (capped) step count.
    let (x, stats) = runner.inverse(&whole_z[0].1, n, 0.0).unwrap();
    assert!(stats.iter().all(|s| s.iters == STEPS), "{stats:?}");
    let e = rel_err(&as64(&whole_x[0].1), &x);
    eprintln!("segments vs whole: inverse ({STEPS} steps) rel err {e:.2e}");
    assert!(e < CHAIN_TOL, "inverse {e}");
}

/// A classifier's segments (squeeze, channel padding, the head in the last segment) chained
/// by the runtime give the reference's logits and the whole forward graph's.
#[test]
fn classifier_segments_match_the_reference() {
    use iresnetc_runtime::tract::TractBundle;
    use iresnetc_runtime::tract_segments::SegmentRunner;
    const CLASSIFIER: &str = r#"
name = "small-classifier"
kind = "classifier"
input = [3, 8, 8]
squeeze = true
pad_channels = 16
[[stages]]
blocks = 2
width = 8
[[stages]]
blocks = 1
width = 8
squeeze = true
[head]
classes = 5
batchnorm = true
"#;
    let m = common::model_from_toml(CLASSIFIER);
    let g = &m.graph;
    let n = 3;
    let xs = common::inputs(n, g.input_dim(), 8);
    let x32 = to_f32(&xs);
    let (manifest, files) = onnx::bundle_graphs(&m).unwrap();
    assert_eq!(manifest.segments.len(), g.blocks.len());
    assert!(manifest.segments.iter().all(|s| s.inverse.is_none()));
    let mut runner = SegmentRunner::new(TractBundle::from_memory(manifest, files)).unwrap();
    let logits = runner.forward(&x32, n, None).unwrap().out;
    let want = Reference::new(g)
        .forward(&xs, &LogDetMethod::None)
        .unwrap()
        .outputs
        .concat();
    let e = rel_err(&want, &logits);
    eprintln!("classifier segments vs reference: logits rel err {e:.2e}");
    assert!(e < TOL, "logits {e}");
    let whole = run(
        &onnx::encode(&onnx::forward(g, ConvStyle::default()).unwrap()),
        &[batched(n, &g.spec.input)],
        &[&x32],
    );
    let whole: Vec<f64> = whole[0].1.iter().map(|&v| f64::from(v)).collect();
    let e = rel_err(&whole, &logits);
    assert!(e < 1e-5, "segments vs whole graph: {e}");
}
