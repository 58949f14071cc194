//! `iresnetc bench`: per model and entry point, the time per image, GFLOP/s and
//! dispatches of every backend (wgpu fused and unfused, tract on the exported
//! ONNX, the f64 reference). Timings include a device sync; each number is the
//! median of `--samples` runs after a warm-up run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use iresnetc::codegen::{self, CodegenOptions, Tiling};
use iresnetc::pipeline::{self, LoadOptions, Model};
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::ModelKind;
use iresnetc_runtime::rng::Rng;
use iresnetc_runtime::{GpuDevice, GpuExecutor};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model files; default: the single CIFAR block (batch 8) and models/cifar.toml (batch 1).
    pub model: Vec<PathBuf>,
    /// Batch sizes, comma-separated (default: 8 for the block and small models, 1 for the
    /// 25M-parameter flows).
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Kernel tiling of the wgpu plans (default: from the adapter, `cpu` on software ones).
    #[arg(long, value_enum)]
    pub tiling: Option<super::backend::TilingArg>,
    /// Fixed-point steps per block of the inverse (default: the certified count for the
    /// model's tolerance, within its max_iters).
    #[arg(long)]
    pub inverse_steps: Option<usize>,
    /// Per-kernel GPU times of one run of every wgpu measurement, written to this JSON file
    /// (needs timestamp queries; adapters without them are reported and skipped).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// Backends to measure: wgpu, tract, cpu (the native f32 engine), reference (f64).
    #[arg(long, value_delimiter = ',', default_value = "wgpu,tract,cpu")]
    pub backends: Vec<String>,
    /// Entry points to measure (forward, forward+logdet, inverse; classify for classifiers).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "forward,forward+logdet,inverse,classify"
    )]
    pub entries: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the rows as JSON to this file (the table is still printed).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    model: String,
    entry: String,
    backend: String,
    batch: usize,
    dispatches: Option<usize>,
    /// Wall time: upload, recording, submission, device sync and read-back.
    median_ms: f64,
    ms_per_image: f64,
    gflops: f64,
    /// wgpu: GPU time from the first pass's start to the last one's end (timestamp queries;
    /// absent where the adapter has none).
    gpu_ms: Option<f64>,
    /// wgpu: CPU time recording the command buffer.
    record_ms: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `samples` runs after one warm-up.
fn time(samples: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = vec![];
    for _ in 0..samples.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.uniform() - 0.5) as f32).collect()
}

/// FLOPs per sample of the entry points, from the IR: forward; forward plus
/// `terms * probes` vjps of every branch; the inverse's fixed-point steps.
struct Flops {
    forward: f64,
    logdet_extra: f64,
    inverse: f64,
}

fn flops(m: &Model, inverse_iters: &[usize]) -> Flops {
    let g = &m.graph;
    let ld = &g.spec.logdet;
    let branch: f64 = (0..g.blocks.len()).map(|b| g.block_macs(b) as f64).sum();
    Flops {
        forward: 2.0 * g.forward_macs() as f64,
        logdet_extra: 2.0 * (ld.terms * ld.probes) as f64 * branch,
        inverse: (0..g.blocks.len())
            .map(|b| {
                2.0 * inverse_iters.get(b).copied().unwrap_or(1) as f64 * g.block_macs(b) as f64
            })
            .sum(),
    }
}

/// Backends and entry points `bench` knows; anything else is a typo, refused before work
/// (it used to give exit 0 and an empty table).
const BACKENDS: &[&str] = &["wgpu", "tract", "cpu"];
const ENTRIES: &[&str] = &["forward", "forward+logdet", "inverse", "classify"];

pub fn check_args(a: &BenchArgs) -> Result<()> {
    for (option, given, known) in [
        ("--backends", &a.backends, BACKENDS),
        ("--entries", &a.entries, ENTRIES),
    ] {
        if given.is_empty() {
            anyhow::bail!("{option} is empty; choose from {}", known.join(", "));
        }
        if let Some(bad) = given.iter().find(|g| !known.contains(&g.as_str())) {
            anyhow::bail!(
                "{option}: unknown {:?}; choose from {}",
                iresnetc_runtime::fsread::clip(bad, 40),
                known.join(", ")
            );
        }
    }
    if a.batch.iter().any(|&b| b == 0 || b > 4096) {
        anyhow::bail!("--batch must be in 1..=4096");
    }
    if a.inverse_steps.is_some_and(|n| n == 0 || n > 1000) {
        anyhow::bail!("--inverse-steps must be in 1..=1000");
    }
    if a.samples == 0 || a.samples > 10_000 {
        anyhow::bail!("--samples must be in 1..=10000");
    }
    Ok(())
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = if a.model.is_empty() {
        vec![
            root.join("models/cifar-block.toml"),
            root.join("models/cifar.toml"),
        ]
    } else {
        a.model.clone()
    };
    let mut rows = vec![];
    let dev = if a.backends.iter().any(|b| b == "wgpu") {
        Some(GpuDevice::new()?)
    } else {
        None
    };
    let mut profiles = Vec::new();
    for path in &models {
        eprintln!("loading {}", path.display());
        let mut m = pipeline::load_model(path, &LoadOptions::default(), &|_, _| {})?;
        if let Some(n) = a.inverse_steps {
            // Exactly n steps: a tolerance no certificate reaches, capped at n.
            m.graph.spec.inverse.max_iters = n;
            m.graph.spec.inverse.tol = 1e-30;
        }
        let batches = if a.batch.is_empty() {
            vec![if m.graph.param_count() > 5_000_000 {
                1
            } else {
                8
            }]
        } else {
            a.batch.clone()
        };
        for batch in batches {
            bench_model(&m, batch, a, dev.as_ref(), &mut rows, &mut profiles)?;
        }
    }
    finish(a, &rows, &profiles)
}

fn bench_model(
    m: &Model,
    batch: usize,
    a: &BenchArgs,
    dev: Option<&GpuDevice>,
    rows: &mut Vec<Row>,
    profiles: &mut Vec<super::profile::KernelProfile>,
) -> Result<()> {
    {
        let g = &m.graph;
        let name = g.spec.name.clone();
        let flow = g.spec.kind == ModelKind::Flow;
        let iters: Vec<usize> = match a.inverse_steps {
            Some(n) => vec![n; g.blocks.len()],
            None => m
                .lipschitz
                .blocks
                .iter()
                .map(|b| b.inverse_iters.min(g.spec.inverse.max_iters))
                .collect(),
        };
        let f = flops(m, &iters);
        let row =
            |entry: &str, backend: &str, dispatches: Option<usize>, secs: f64, flops: f64| Row {
                model: name.clone(),
                entry: entry.to_string(),
                backend: backend.to_string(),
                batch,
                dispatches,
                median_ms: secs * 1e3,
                ms_per_image: secs * 1e3 / batch as f64,
                gflops: flops * batch as f64 / secs / 1e9,
                gpu_ms: None,
                record_ms: None,
            };
        let wanted = |e: &str| a.entries.iter().any(|w| w == e);
        let entries: Vec<(&str, f64)> = if flow {
            vec![
                ("forward", f.forward),
                ("forward+logdet", f.forward + f.logdet_extra),
                ("inverse", f.inverse),
            ]
        } else {
            vec![("classify", f.forward)]
        }
        .into_iter()
        .filter(|(e, _)| wanted(e))
        .collect();

        if let Some(dev) = dev {
            let tiling = match a.tiling {
                Some(t) => t.into(),
                None if dev.adapter().is_software => Tiling::CPU,
                None => Tiling::GPU,
            };
            for fuse in [true, false] {
                let label = if fuse { "wgpu fused" } else { "wgpu unfused" };
                let gen = codegen::generate(m, &CodegenOptions { fuse, tiling })?;
                let costs = codegen::cost::report(&gen.plan, &gen.costs, batch);
                let bundle = iresnetc_runtime::Bundle::from_parts(
                    gen.plan,
                    gen.shaders,
                    iresnetc::netdesc::weights_f32(&g.params),
                )?;
                let mut ex = GpuExecutor::new(dev, &bundle)?;
                for (entry, fl) in &entries {
                    let plan_entry = match *entry {
                        "forward" => codegen::entries::ENCODE,
                        "forward+logdet" => codegen::entries::FORWARD,
                        "inverse" => codegen::entries::INVERSE,
                        _ => codegen::entries::CLASSIFY,
                    };
                    let Some(ep) = bundle.plan.entry_points.get(plan_entry) else {
                        continue;
                    };
                    let data: Vec<(String, Vec<f32>)> = ep
                        .inputs
                        .iter()
                        .map(|io| {
                            let per = io.shape.iter().product::<usize>();
                            let per_sample = bundle
                                .plan
                                .buffer(&io.buffer)
                                .map(|b| b.per_sample)
                                .unwrap_or(true);
                            (
                                io.name.clone(),
                                random(if per_sample { per * batch } else { per }, 7),
                            )
                        })
                        .collect();
                    let inputs: Vec<(&str, &[f32])> = data
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_slice()))
                        .collect();
                    ex.run(plan_entry, batch, &inputs)?;
                    let (mut wall, mut gpu, mut record) = (vec![], vec![], vec![]);
                    for _ in 0..a.samples.max(1) {
                        let t = ex.run_timed(plan_entry, batch, &inputs)?;
                        wall.push(t.wall.as_secs_f64());
                        record.push(t.record.as_secs_f64());
                        if let Some(g) = t.gpu {
                            gpu.push(g.as_secs_f64());
                        }
                    }
                    let d = ex.dispatch_count(plan_entry);
                    let mut r = row(entry, label, Some(d), median(wall), *fl);
                    r.record_ms = Some(median(record) * 1e3);
                    r.gpu_ms = (!gpu.is_empty()).then(|| median(gpu) * 1e3);
                    rows.push(r);
                    if a.profile.is_some() {
                        profiles.extend(super::profile::profile(
                            &mut ex,
                            &costs,
                            super::profile::Measured {
                                model: &name,
                                entry,
                                plan_entry,
                                variant: label,
                                batch,
                            },
                            &inputs,
                        )?);
                    }
                }
            }
        }

        let mut push =
            |entry: &str, backend: &str, dispatches: Option<usize>, secs: f64, flops: f64| {
                rows.push(row(entry, backend, dispatches, secs, flops));
            };
        if a.backends.iter().any(|b| b == "tract") {
            // Export only the graphs being measured: the unrolled inverse of a
            // big model is large, and tract's load time grows with its size.
            use iresnetc::onnx;
            use iresnetc_runtime::tract::{time_graph, TractGraph};
            let style = Default::default();
            let in_shape: Vec<usize> = std::iter::once(batch)
                .chain(g.spec.input.iter().copied())
                .collect();
            let x = random(batch * g.input_dim(), 3);
            if wanted("forward") || wanted("classify") {
                let bytes = onnx::encode(&onnx::forward(g, style)?);
                let tg = TractGraph::load(&bytes, &[in_shape.clone()], "forward")?;
                let t = time_graph(&tg, &[&x], 1, a.samples)?;
                push(
                    if flow { "forward" } else { "classify" },
                    "tract",
                    None,
                    t.median_s,
                    f.forward,
                );
            }
            if flow && wanted("forward+logdet") {
                let ld = onnx::LogDetExport::from_spec(g, &g.spec.logdet)?;
                let total = ld.probe_layout(g).total;
                let bytes = onnx::encode(&onnx::forward_logdet(g, &ld, style)?);
                let tg = TractGraph::load(
                    &bytes,
                    &[in_shape.clone(), vec![batch, total]],
                    "forward+logdet",
                )?;
                let probes = random(batch * total, 4);
                let t = time_graph(&tg, &[&x, &probes], 1, a.samples)?;
                push(
                    "forward+logdet",
                    "tract",
                    None,
                    t.median_s,
                    f.forward + f.logdet_extra,
                );
            }
            if flow && wanted("inverse") {
                let bytes = onnx::encode(&onnx::inverse(g, &iters, style)?);
                let tg = TractGraph::load(&bytes, &[vec![batch, g.latent_dim()]], "inverse")?;
                let z = random(batch * g.latent_dim(), 5);
                let t = time_graph(&tg, &[&z], 1, a.samples)?;
                push("inverse", "tract", None, t.median_s, f.inverse);
            }
        }

        if a.backends.iter().any(|b| b == "cpu") {
            bench_cpu(m, batch, a.samples, &wanted, &mut push)?;
        }

        if a.backends.iter().any(|b| b == "reference") {
            let r = Reference::new(g);
            let xs: Vec<Vec<f64>> = (0..batch)
                .map(|s| {
                    random(g.input_dim(), 10 + s as u64)
                        .iter()
                        .map(|&v| v as f64)
                        .collect()
                })
                .collect();
            // The reference is slow on the big models: one timed run there.
            let samples = if g.param_count() > 5_000_000 {
                1
            } else {
                a.samples.min(3)
            };
            if wanted("forward") || wanted("classify") {
                let secs = time(samples, || {
                    r.forward(&xs, &LogDetMethod::None)?;
                    Ok(())
                })?;
                let entry = if flow { "forward" } else { "classify" };
                push(entry, "reference (f64)", None, secs, f.forward);
            }
            if flow && wanted("forward+logdet") {
                let method = g.spec.logdet.method();
                let secs = time(samples, || {
                    r.forward(&xs, &method)?;
                    Ok(())
                })?;
                push(
                    "forward+logdet",
                    "reference (f64)",
                    None,
                    secs,
                    f.forward + f.logdet_extra,
                );
            }
        }
    }
    Ok(())
}

fn finish(a: &BenchArgs, rows: &[Row], profiles: &[super::profile::KernelProfile]) -> Result<()> {
    eprintln!("peak resident memory {:.0} MiB", peak_rss_mib());
    if let Some(path) = &a.profile {
        super::profile::write(path, profiles)?;
    }
    if let Some(path) = &a.json_out {
        let json = serde_json::to_string_pretty(&rows).context("serializing")?;
        iresnetc::fsutil::write_atomic(path, json.as_bytes())?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("serializing")?
        );
        return Ok(());
    }
    println!(
        "{:<12} {:<15} {:<20} {:>5} {:>9} {:>11} {:>10} {:>10} {:>10} {:>9}",
        "model",
        "entry",
        "backend",
        "batch",
        "dispatch",
        "wall ms",
        "gpu ms",
        "record ms",
        "ms/image",
        "GFLOP/s"
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    for r in rows {
        println!(
            "{:<12} {:<15} {:<20} {:>5} {:>9} {:>11.2} {:>10} {:>10} {:>10.2} {:>9.2}",
            r.model,
            r.entry,
            r.backend,
            r.batch,
            r.dispatches
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
            r.median_ms,
            opt(r.gpu_ms),
            opt(r.record_ms),
            r.ms_per_image,
            r.gflops
        );
    }
    println!("wall: upload, recording, submission, device sync and read-back (median); gpu: first pass start to last pass end (timestamp queries, '-' where the adapter has none); record: CPU time encoding the commands");
    Ok(())
}

/// The native CPU engine: forward (or classify), forward + log-det with the model file's
/// settings, and the inverse of a real z (GFLOP/s from the fixed-point steps it took).
/// `push(entry, backend, dispatches, seconds, flops)` of `run`.
type Push<'a> = dyn FnMut(&str, &str, Option<usize>, f64, f64) + 'a;

fn bench_cpu(
    m: &Model,
    batch: usize,
    samples: usize,
    wanted: &dyn Fn(&str) -> bool,
    push: &mut Push<'_>,
) -> Result<()> {
    use iresnetc_runtime::cpu::{CpuEngine, LogDetRequest};
    let g = &m.graph;
    let flow = g.spec.kind == ModelKind::Flow;
    let net = iresnetc::netdesc::describe(m)?;
    let mut e = CpuEngine::from_parts(net, &iresnetc::netdesc::weights_f32(&g.params))?;
    let label = format!("cpu (f32, {} thr)", e.threads());
    let f = flops(m, &[]);
    let x = random(batch * g.input_dim(), 3);
    if wanted("forward") || wanted("classify") {
        let secs = if flow {
            time(samples, || Ok(e.encode(&x, batch, None).map(|_| ())?))?
        } else {
            time(samples, || Ok(e.classify(&x, batch).map(|_| ())?))?
        };
        push(
            if flow { "forward" } else { "classify" },
            &label,
            None,
            secs,
            f.forward,
        );
    }
    if flow && wanted("forward+logdet") {
        let req = LogDetRequest::from_settings(&e.net().logdet);
        let secs = time(samples, || {
            Ok(e.encode(&x, batch, Some(&req)).map(|_| ())?)
        })?;
        push(
            "forward+logdet",
            &label,
            None,
            secs,
            f.forward + f.logdet_extra,
        );
    }
    if flow && wanted("inverse") {
        let (z, _) = e.encode(&x, batch, None)?;
        let (_, rep) = e.decode(&z, batch)?;
        let steps: Vec<usize> = rep.blocks.iter().map(|b| b.iters).collect();
        let secs = time(samples, || Ok(e.decode(&z, batch).map(|_| ())?))?;
        let total: usize = steps.iter().sum();
        push(
            "inverse",
            &format!("{label}, {total} steps"),
            None,
            secs,
            flops(m, &steps).inverse,
        );
    }
    Ok(())
}

/// Peak resident set of this process (Linux `VmHWM`), 0 where unknown.
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
