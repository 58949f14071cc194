//! `iresnetc export-onnx` and the tract backend of `iresnetc run`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use super::load;
use super::run::{model_and_weights, EstimatorArg, Mode, RunArgs};
use iresnetc::ir::Graph;
use iresnetc::npy;
use iresnetc::onnx::{self, ConvStyle, LogDetExport};
use iresnetc::pipeline::Model;
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{Estimator, LogDetSpec, ModelKind};
use iresnetc_runtime::rng::{streams, Rng};
use iresnetc_runtime::tract::{TractBundle, TractGraph, MANIFEST_FILE};

/// Largest relative error `--validate` accepts.
const VALIDATE_TOL: f64 = 1e-4;
/// Samples per tract run (a graph is optimized once per batch size).
const CHUNK: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConvStyleArg {
    /// Every convolution as ONNX Conv.
    Conv,
    /// 1x1 convolutions as MatMul.
    PointwiseMatmul,
    /// 1x1 convolutions as MatMul, k x k convolutions that reduce channels as one
    /// MatMul over the taps plus shifted sums (fastest in tract).
    TapSum,
}

impl From<ConvStyleArg> for ConvStyle {
    fn from(c: ConvStyleArg) -> Self {
        match c {
            ConvStyleArg::Conv => ConvStyle::Conv,
            ConvStyleArg::PointwiseMatmul => ConvStyle::PointwiseMatMul,
            ConvStyleArg::TapSum => ConvStyle::TapSum,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A model file (.toml) or a compiled bundle directory.
    pub model: PathBuf,
    /// The ONNX file to write (the inverse goes next to it as `STEM.inverse.onnx`).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Weights (.safetensors); default: deterministic init from the seed.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed of the weight initialization (default: the model file's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Flows: add the log-det estimate as a second output `logdet` [batch]; the
    /// Hutchinson probes become the input `probes` [batch, P] (layout in STEM.json).
    #[arg(long)]
    pub with_logdet: bool,
    /// Override the model file's log-det estimator (series, or exact for 2-D blocks).
    #[arg(long, value_enum)]
    pub estimator: Option<EstimatorArg>,
    /// Flows: also write `STEM.inverse.onnx`, every block's fixed point unrolled K times.
    #[arg(long, value_name = "K")]
    pub inverse_steps: Option<usize>,
    /// How convolutions are written.
    #[arg(long, value_enum, default_value = "tap-sum")]
    pub conv_style: ConvStyleArg,
    /// Run the written graphs in tract on random input, compare with the f64
    /// reference, print the errors; fail (exit 2, nothing written) above 1e-4 relative.
    #[arg(long)]
    pub validate: bool,
    /// After writing, time tract on the written file at this batch size
    /// (median of --time-samples runs after 2 warm-ups) and print GFLOP/s.
    #[arg(long, value_name = "BATCH")]
    pub time_batch: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub time_samples: usize,
}

fn logdet_spec(g: &Graph, over: Option<EstimatorArg>) -> LogDetSpec {
    let mut s = g.spec.logdet.clone();
    if let Some(e) = over {
        s.estimator = match e {
            EstimatorArg::Exact => Estimator::Exact,
            EstimatorArg::Series => Estimator::Series,
            EstimatorArg::Roulette => Estimator::Roulette,
        };
    }
    s
}

/// `dir/STEM{suffix}` for the output path `dir/STEM.onnx`.
pub(crate) fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

fn flat32(xs: &[Vec<f64>]) -> Vec<f32> {
    xs.iter().flatten().map(|&v| v as f32).collect()
}

/// `(max abs error, max abs error / max |reference|)`.
fn errors(reference: &[f64], got: &[f32]) -> (f64, f64) {
    let scale = reference
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-30);
    let abs = reference
        .iter()
        .zip(got)
        .fold(0.0f64, |m, (a, &b)| m.max((a - b as f64).abs()));
    (abs, abs / scale)
}

fn batched(b: usize, s: &[usize]) -> Vec<usize> {
    std::iter::once(b).chain(s.iter().copied()).collect()
}

pub fn run(a: &ExportArgs) -> Result<()> {
    let ra = RunArgs {
        model: a.model.clone(),
        backend: super::run::Backend::Cpu,
        mode: Mode::Forward,
        input: None,
        output: a.output.clone(),
        logdet_out: None,
        weights: a.weights.clone(),
        seed: a.seed,
        probe_seed: None,
        estimator: None,
        num: 1,
        png: None,
    };
    let (model_path, weights) = model_and_weights(&ra)?;
    let m = load(&model_path, weights.as_deref(), a.seed)?;
    let g = &m.graph;
    let style = ConvStyle::from(a.conv_style);
    let flow = g.spec.kind == ModelKind::Flow;
    if (a.with_logdet || a.estimator.is_some()) && !flow {
        bail!(
            "{}: --with-logdet needs a flow (kind = \"flow\")",
            a.model.display()
        );
    }

    let ld_spec = logdet_spec(g, a.estimator);
    let ld = if a.with_logdet {
        Some(LogDetExport::from_spec(g, &ld_spec)?)
    } else {
        None
    };
    let main = match &ld {
        Some(l) => onnx::forward_logdet(g, l, style)?,
        None => onnx::forward(g, style)?,
    };
    let main_bytes = onnx::encode(&main);
    let inv = match a.inverse_steps {
        Some(k) => {
            let steps = vec![k; g.blocks.len()];
            Some((
                steps.clone(),
                onnx::encode(&onnx::inverse(g, &steps, style)?),
            ))
        }
        None => None,
    };

    if a.validate {
        validate(
            &m,
            &main_bytes,
            ld.as_ref(),
            &ld_spec,
            inv.as_ref().map(|(s, b)| (s[0], b.as_slice())),
        )?;
    }

    let inv_path = sibling(&a.output, ".inverse.onnx");
    let json_path = sibling(&a.output, ".json");
    let mut manifest = onnx::manifest(
        g,
        ld.as_ref(),
        inv.as_ref().map(|(s, _)| s.as_slice()).unwrap_or(&[]),
    );
    let file_name = |p: &Path| {
        p.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    manifest.forward.file = file_name(&a.output);
    if let Some(e) = manifest.forward_logdet.as_mut() {
        // Exported as one file: the forward graph with the log-det output.
        e.file = file_name(&a.output);
        manifest.forward = e.clone();
    }
    match &inv {
        Some(_) => {
            if let Some(e) = manifest.inverse.as_mut() {
                e.file = file_name(&inv_path);
            }
        }
        None => manifest.inverse = None,
    }
    iresnetc::fsutil::write_atomic(&a.output, &main_bytes)?;
    if let Some((_, bytes)) = &inv {
        iresnetc::fsutil::write_atomic(&inv_path, bytes)?;
    }
    iresnetc::fsutil::write_atomic(
        &json_path,
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;

    println!(
        "wrote {} ({} MB; ONNX ir_version {}, opset {}, batch dimension `{}`)",
        a.output.display(),
        main_bytes.len() / 1_000_000,
        onnx::IR_VERSION,
        onnx::OPSET,
        onnx::BATCH
    );
    match &ld {
        Some(l) => {
            let p = l.probe_layout(g);
            println!(
                "  inputs: input {:?}{}; outputs: z [batch, {}], logdet [batch]",
                batched(0, &g.spec.input)[1..].to_vec(),
                if p.total > 0 {
                    format!(
                        ", probes [batch, {}] ({} per block, layout in {})",
                        p.total,
                        if p.rademacher {
                            "Rademacher"
                        } else {
                            "Gaussian"
                        },
                        json_path.display()
                    )
                } else {
                    String::new()
                },
                g.latent_dim()
            );
        }
        None => println!(
            "  input: input [batch, {:?}]; output: {} [batch, {}]",
            g.spec.input,
            if flow { "z" } else { "logits" },
            manifest.output_dim
        ),
    }
    if let Some((steps, bytes)) = &inv {
        println!(
            "wrote {} ({} MB; z [batch, {}] -> x, {} fixed-point steps per block)",
            inv_path.display(),
            bytes.len() / 1_000_000,
            g.latent_dim(),
            steps.first().copied().unwrap_or(0)
        );
    }
    println!("wrote {}", json_path.display());
    if let Some(b) = a.time_batch {
        // The file is still staged under a temporary name until the command succeeds.
        let written = iresnetc::output::current_path(&a.output);
        time_written(&m, &written, ld.as_ref(), b, a.time_samples)?;
    }
    Ok(())
}

/// Times tract on the file just written; FLOPs = 2 x MACs of the forward pass
/// (the log-det graph does more work, so its rate is a lower bound).
fn time_written(
    m: &Model,
    path: &Path,
    ld: Option<&LogDetExport>,
    batch: usize,
    samples: usize,
) -> Result<()> {
    if batch == 0 {
        bail!("--time-batch must be >= 1");
    }
    let g = &m.graph;
    let mut shapes = vec![batched(batch, &g.spec.input)];
    if let Some(p) = ld.map(|l| l.probe_layout(g)).filter(|p| p.total > 0) {
        shapes.push(vec![batch, p.total]);
    }
    let t = iresnetc_runtime::tract::time_onnx_file(path, &shapes, 2, samples)?;
    let flops = 2.0 * g.forward_macs() as f64 * batch as f64;
    println!(
        "tract: {} at batch {batch}: median {:.2} ms, min {:.2} ms over {} runs, {:.1} GFLOP/s (forward FLOPs {:.3} G; load + optimize {:.2} s, threads: {})",
        path.display(),
        t.median_s * 1e3,
        t.min_s * 1e3,
        t.samples,
        t.gflops(flops),
        flops / 1e9,
        t.load_s,
        iresnetc_runtime::tract::threads()
    );
    Ok(())
}

/// The reference inverse with exactly `k` fixed-point steps per block.
fn reference_inverse_k(g: &Graph, zs: &[Vec<f64>], k: usize) -> iresnetc::Result<Vec<Vec<f64>>> {
    let mut g = g.clone();
    g.spec.inverse.max_iters = k;
    g.spec.inverse.tol = 0.0;
    Ok(Reference::new(&g).inverse(zs)?.0)
}

/// `--validate`: tract on the exact bytes to be written vs the f64 reference.
fn validate(
    m: &Model,
    main: &[u8],
    ld: Option<&LogDetExport>,
    ld_spec: &LogDetSpec,
    inv: Option<(usize, &[u8])>,
) -> Result<()> {
    let g = &m.graph;
    let r = Reference::new(g);
    // Two samples (one for the big models, whose f64 reference is slow).
    let n = if g.forward_macs() > 1_000_000_000 {
        1
    } else {
        2
    };
    let mut rng = Rng::new(0x5eed);
    let xs: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            (0..g.input_dim())
                .map(|_| 2.0 * rng.uniform() - 1.0)
                .collect()
        })
        .collect();
    let mut worst = 0.0f64;
    let mut report = |what: &str, (abs, rel): (f64, f64)| {
        println!("validate {what}: max abs error {abs:.3e}, max rel error {rel:.3e}");
        worst = worst.max(rel);
    };
    let x32 = flat32(&xs);
    let mut shapes = vec![batched(n, &g.spec.input)];
    let mut inputs: Vec<Vec<f32>> = vec![x32];
    let method = match ld {
        Some(_) => LogDetMethod::from_spec(ld_spec),
        None => LogDetMethod::None,
    };
    if let Some(l) = ld {
        let p = l.probe_layout(g);
        if p.total > 0 {
            shapes.push(vec![n, p.total]);
            inputs.push(p.matrix(ld_spec.seed, 0, n));
        }
    }
    let graph = TractGraph::load(main, &shapes, "export")?;
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let outs = graph.run(&refs)?;
    let want = r.forward(&xs, &method)?;
    report(
        if g.spec.kind == ModelKind::Flow {
            "z"
        } else {
            "logits"
        },
        errors(&want.outputs.concat(), &outs[0].1),
    );
    if ld.is_some() {
        let got = outs.get(1).map(|o| o.1.as_slice()).unwrap_or(&[]);
        report("logdet", errors(&want.logdet, got));
    }
    if let Some((k, bytes)) = inv {
        let zs = match ld {
            Some(_) => r.forward(&xs, &LogDetMethod::None)?.outputs,
            None => want.outputs.clone(),
        };
        let graph = TractGraph::load(bytes, &[vec![n, g.latent_dim()]], "inverse export")?;
        let outs = graph.run(&[&flat32(&zs)])?;
        let reference = reference_inverse_k(g, &zs, k)?;
        report(
            &format!("inverse ({k} steps)"),
            errors(&reference.concat(), &outs[0].1),
        );
    }
    if worst > VALIDATE_TOL {
        bail!("validation failed: max rel error {worst:.3e} > {VALIDATE_TOL:e} (nothing written)");
    }
    Ok(())
}

/// Where the tract backend gets its graphs: a bundle's files, or an export in memory.
enum Graphs<'m> {
    Bundle(TractBundle),
    Memory {
        m: &'m Model,
        style: ConvStyle,
        ld: Option<LogDetExport>,
        steps: Vec<usize>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Which {
    Forward,
    ForwardLogdet,
}

impl Graphs<'_> {
    fn load(&self, which: Which, batch: usize) -> Result<TractGraph> {
        Ok(match self {
            Graphs::Bundle(b) => match which {
                Which::Forward => b.forward(batch)?,
                Which::ForwardLogdet => b.forward_logdet(batch)?,
            },
            Graphs::Memory { m, style, ld, .. } => {
                let g = &m.graph;
                match which {
                    Which::Forward => TractGraph::load(
                        &onnx::encode(&onnx::forward(g, *style)?),
                        &[batched(batch, &g.spec.input)],
                        "forward",
                    )?,
                    Which::ForwardLogdet => {
                        let l = ld.as_ref().context("no log-det graph for this model")?;
                        let p = l.probe_layout(g);
                        let mut shapes = vec![batched(batch, &g.spec.input)];
                        if p.total > 0 {
                            shapes.push(vec![batch, p.total]);
                        }
                        TractGraph::load(
                            &onnx::encode(&onnx::forward_logdet(g, l, *style)?),
                            &shapes,
                            "forward_logdet",
                        )?
                    }
                }
            }
        })
    }
}

/// Runs `which` over `rows` in chunks; `extra(first_sample, batch)` gives the
/// probe matrix when the graph takes one. Returns each output's rows.
fn run_chunked(
    graphs: &Graphs<'_>,
    which: Which,
    rows: &[Vec<f64>],
    extra: &dyn Fn(usize, usize) -> Option<Vec<f32>>,
) -> Result<Vec<Vec<Vec<f64>>>> {
    let mut cache: HashMap<usize, TractGraph> = HashMap::new();
    let mut outputs: Vec<Vec<Vec<f64>>> = vec![];
    let pb = super::bar(rows.len() as u64, "tract");
    for (ci, chunk) in rows.chunks(CHUNK).enumerate() {
        let b = chunk.len();
        if !cache.contains_key(&b) {
            cache.insert(b, graphs.load(which, b)?);
        }
        let graph = &cache[&b];
        let x = flat32(chunk);
        let probes = extra(ci * CHUNK, b);
        let mut inputs: Vec<&[f32]> = vec![&x];
        if let Some(p) = &probes {
            inputs.push(p);
        }
        let outs = graph.run(&inputs)?;
        outputs.resize(outs.len(), vec![]);
        for (o, (_, data)) in outputs.iter_mut().zip(outs) {
            let per = data.len() / b.max(1);
            o.extend(
                data.chunks(per.max(1))
                    .map(|r| r.iter().map(|&v| v as f64).collect::<Vec<f64>>()),
            );
        }
        pb.inc(b as u64);
    }
    pb.finish_and_clear();
    Ok(outputs)
}

/// `iresnetc run --backend tract`: the exported graphs on tract (f32, CPU).
pub fn run_tract(a: &RunArgs) -> Result<()> {
    let (model_path, weights) = model_and_weights(a)?;
    let m = load(&model_path, weights.as_deref(), a.seed)?;
    let g = &m.graph;
    let flow = g.spec.kind == ModelKind::Flow;
    let probe_seed = a.probe_seed.unwrap_or(g.spec.logdet.seed);
    let ld_spec = logdet_spec(g, a.estimator);
    // A bundle's own graphs when they match the request; otherwise export now.
    let use_bundle = a.model.is_dir()
        && a.model.join(MANIFEST_FILE).is_file()
        && a.estimator.is_none()
        && a.weights.is_none();
    let graphs = if use_bundle {
        Graphs::Bundle(TractBundle::open(&a.model)?)
    } else {
        let needs_ld = flow && matches!(a.mode, Mode::Logdet | Mode::Density)
            || (a.mode == Mode::Forward && a.logdet_out.is_some() && flow);
        Graphs::Memory {
            m: &m,
            style: ConvStyle::default(),
            ld: if needs_ld {
                Some(LogDetExport::from_spec(g, &ld_spec)?)
            } else {
                None
            },
            steps: onnx::certified_steps(&m),
        }
    };
    let source = if use_bundle {
        format!("bundle {}", a.model.display())
    } else {
        "exported in memory".to_string()
    };
    let need_flow = |what: &str| -> Result<()> {
        if !flow {
            bail!(
                "{}: --mode {what} needs a flow (kind = \"flow\")",
                a.model.display()
            );
        }
        Ok(())
    };
    let input = |per_sample: &[usize], array: &str| a.read_input(per_sample, array);
    let probe_layout = match &graphs {
        Graphs::Bundle(b) => b.manifest.probes.clone(),
        Graphs::Memory { ld, .. } => ld
            .as_ref()
            .map(|l| l.probe_layout(g))
            .filter(|p| p.total > 0),
    };
    let probes = |first: usize, batch: usize| {
        probe_layout
            .as_ref()
            .map(|p| p.matrix(probe_seed, first, batch))
    };
    let none = |_: usize, _: usize| None;
    let in_shape = g.spec.input.clone();
    let r = Reference::new(g);
    match a.mode {
        Mode::Forward | Mode::Classify => {
            if a.mode == Mode::Classify && flow {
                bail!(
                    "{}: --mode classify needs a classifier (kind = \"classifier\")",
                    a.model.display()
                );
            }
            let x = input(&in_shape, "input")?;
            let with_ld = flow && a.logdet_out.is_some();
            let outs = if with_ld {
                run_chunked(&graphs, Which::ForwardLogdet, &x.samples, &probes)?
            } else {
                run_chunked(&graphs, Which::Forward, &x.samples, &none)?
            };
            let out = &outs[0];
            let dim = out.first().map(Vec::len).unwrap_or(0);
            npy::write(&a.output, out, &[dim], false)?;
            if let (Some(p), true) = (&a.logdet_out, with_ld) {
                let lds: Vec<Vec<f64>> = outs[1].iter().map(|v| vec![v[0]]).collect();
                npy::write(p, &lds, &[], false)?;
            }
            eprintln!(
                "backend tract (CPU, f32, {source}): {} of {} samples -> {}",
                format!("{:?}", a.mode).to_lowercase(),
                out.len(),
                a.output.display()
            );
        }
        Mode::Logdet => {
            need_flow("logdet")?;
            let x = input(&in_shape, "input")?;
            let outs = run_chunked(&graphs, Which::ForwardLogdet, &x.samples, &probes)?;
            let lds: Vec<Vec<f64>> = outs[1].iter().map(|v| vec![v[0]]).collect();
            npy::write(&a.output, &lds, &[], false)?;
            eprintln!(
                "backend tract (CPU, f32, {source}): log-det ({:?}) of {} samples",
                ld_spec.estimator,
                lds.len()
            );
        }
        Mode::Density => {
            need_flow("density")?;
            let x = input(&in_shape, "input")?;
            let deq = g.spec.data.dequantize;
            let xs = if deq {
                r.dequantize(&x.samples, probe_seed, 0)
            } else {
                x.samples.clone()
            };
            let outs = run_chunked(&graphs, Which::ForwardLogdet, &xs, &probes)?;
            let d = g.input_dim() as f64;
            let rows: Vec<Vec<f64>> = outs[0]
                .iter()
                .zip(&outs[1])
                .map(|(z, ld)| {
                    let logp = r.prior_logp(z) + ld[0];
                    vec![
                        logp,
                        -logp / (d * std::f64::consts::LN_2) + if deq { 8.0 } else { 0.0 },
                    ]
                })
                .collect();
            let mean_bpd = rows.iter().map(|v| v[1]).sum::<f64>() / rows.len().max(1) as f64;
            npy::write(&a.output, &rows, &[2], false)?;
            eprintln!("backend tract (CPU, f32, {source}): columns (log p(x) nats, bits/dim); mean bits/dim {mean_bpd:.4}");
        }
        Mode::Inverse | Mode::Sample => {
            need_flow(if a.mode == Mode::Inverse {
                "inverse"
            } else {
                "sample"
            })?;
            let zs = if a.mode == Mode::Inverse {
                input(&[g.latent_dim()], "z")?.samples
            } else {
                if a.num == 0 {
                    bail!("--num must be >= 1");
                }
                prior_samples(g, a.num, probe_seed)
            };
            let steps = match &graphs {
                Graphs::Bundle(b) => b.manifest.inverse_steps.clone(),
                Graphs::Memory { steps, .. } => steps.clone(),
            };
            let xs = inverse_stepwise(&m, &zs, &steps, ConvStyle::default())?;
            npy::write(&a.output, &xs, &in_shape, false)?;
            let outs = [xs];
            eprintln!(
                "backend tract (CPU, f32, per-block step graphs): {} of {} samples, {}..{} fixed-point steps per block (certified)",
                if a.mode == Mode::Inverse { "inverse" } else { "samples" },
                outs[0].len(),
                steps.iter().min().copied().unwrap_or(0),
                steps.iter().max().copied().unwrap_or(0)
            );
        }
    }
    Ok(())
}

/// The inverse on tract, one block at a time: each block's fixed point runs
/// `steps[b]` times through its step graph `y, x -> y - g(x)` (see
/// [`onnx::inverse_step`]: a fully unrolled CIFAR inverse is too big for
/// tract's optimizer); the cheap exact glue between blocks (ActNorm inverse,
/// unsqueeze, re-joining factored-out channels) runs in f64 on the host.
fn inverse_stepwise(
    m: &Model,
    zs: &[Vec<f64>],
    steps: &[usize],
    style: ConvStyle,
) -> Result<Vec<Vec<f64>>> {
    use iresnetc::ops::{actnorm, layout, Op};
    use petgraph::stable_graph::NodeIndex;
    let g = &m.graph;
    let n = zs.len();
    if n == 0 {
        return Ok(vec![]);
    }
    let mut vals: HashMap<NodeIndex, Vec<Vec<f64>>> = HashMap::new();
    let mut off = 0;
    for &l in &g.latents {
        let d: usize = g.node(l).shape.iter().product();
        vals.insert(
            l,
            zs.iter()
                .map(|z| z.get(off..off + d).map(<[f64]>::to_vec).unwrap_or_default())
                .collect(),
        );
        off += d;
    }
    let block_of_residual = g.block_of_residual();
    let mut order = g.topo_order()?;
    order.reverse();
    let pb = super::bar(g.blocks.len() as u64, "inverse");
    for ix in order {
        let node = g.node(ix);
        if node.block.is_some() || node.op == Op::Input {
            continue;
        }
        let Some(y) = vals.remove(&ix) else {
            bail!(
                "inverse: node `{}` has no value (graph not invertible)",
                node.name
            );
        };
        let ins = g.inputs(ix);
        let in_shape = g.input_shape(ix);
        let x: Vec<Vec<f64>> = match &node.op {
            Op::Residual => {
                let b = block_of_residual[&ix];
                let shape = g.node(g.blocks[b].actnorm).shape.clone();
                let graph = TractGraph::load(
                    &onnx::encode(&onnx::inverse_step(g, b, style)?),
                    &[batched(n, &shape), batched(n, &shape)],
                    &g.blocks[b].name,
                )?;
                let y32 = flat32(&y);
                let mut x32 = y32.clone();
                for _ in 0..steps.get(b).copied().unwrap_or(0) {
                    x32 = graph
                        .run(&[&y32, &x32])?
                        .into_iter()
                        .next()
                        .map(|o| o.1)
                        .unwrap_or_default();
                }
                pb.inc(1);
                let per = x32.len() / n;
                x32.chunks(per.max(1))
                    .map(|r| r.iter().map(|&v| v as f64).collect())
                    .collect()
            }
            Op::ActNorm => y
                .iter()
                .map(|v| actnorm::inverse(&node.name, &g.params, v, &in_shape))
                .collect(),
            Op::Squeeze => y.iter().map(|v| layout::unsqueeze(v, &in_shape)).collect(),
            Op::PadChannels { .. } => {
                let len: usize = in_shape.iter().product();
                y.iter().map(|v| v[..len.min(v.len())].to_vec()).collect()
            }
            Op::SliceChannels { start, .. } => {
                let per: usize = in_shape[1..].iter().product::<usize>().max(1);
                let total: usize = in_shape.iter().product();
                let full = vals
                    .entry(ins[0])
                    .or_insert_with(|| vec![vec![0.0; total]; n]);
                for (f, v) in full.iter_mut().zip(&y) {
                    f[start * per..start * per + v.len()].copy_from_slice(v);
                }
                continue;
            }
            other => bail!(
                "inverse: op {} `{}` has no inverse",
                other.kind(),
                node.name
            ),
        };
        vals.insert(ins[0], x);
    }
    pb.finish_and_clear();
    vals.remove(&g.input)
        .context("inverse did not reach the input")
}

/// Prior samples exactly as the reference draws them (same seed, same streams).
fn prior_samples(g: &Graph, num: usize, seed: u64) -> Vec<Vec<f64>> {
    let get = |n: &str| g.params.get(n).map(|t| t.data.clone()).unwrap_or_default();
    let (mu, ls) = (get("prior.mean"), get("prior.log_std"));
    (0..num)
        .map(|i| {
            let mut r = Rng::for_stream(seed, &[streams::PRIOR_SAMPLE, i as u64]);
            mu.iter()
                .zip(&ls)
                .map(|(m, s)| m + s.exp() * r.normal())
                .collect()
        })
        .collect()
}
