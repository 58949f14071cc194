//! Subcommands of the `iresnetc` binary.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use iresnetc::npy;
use iresnetc::pipeline::{self, LoadOptions, Model};
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{Estimator, ModelKind};

#[derive(Parser, Debug)]
#[command(name = "iresnetc", version, about = "Compiler and runtime for invertible residual networks (i-ResNet)")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Shapes per stage, parameters, FLOPs and the Lipschitz certificate.
    Inspect {
        model: PathBuf,
        #[arg(long)]
        weights: Option<PathBuf>,
        #[arg(long)]
        seed: Option<u64>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the IR (Graphviz DOT with --dot, else one line per node).
    Graph {
        model: PathBuf,
        #[arg(long)]
        dot: bool,
    },
    /// Run a model: forward, inverse, logdet, density, sample or classify.
    Run(RunArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Forward,
    Inverse,
    Logdet,
    Density,
    Sample,
    Classify,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// The f64 reference executor.
    Cpu,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A model file (.toml).
    model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Input array (.npy, f32 or f64): images NCHW, vectors [B, D]; z [B, D] for inverse.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Output array (.npy).
    #[arg(long)]
    output: PathBuf,
    /// Per-sample log-det (.npy) for forward mode.
    #[arg(long)]
    logdet_out: Option<PathBuf>,
    /// Weights (.safetensors); default: deterministic init from the seed.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed of the weight initialization (default: the model file's `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Seed of probes, roulette draws, dequantization noise and prior samples
    /// (default: the model file's `logdet.seed`).
    #[arg(long)]
    probe_seed: Option<u64>,
    /// Override the model file's log-det estimator.
    #[arg(long, value_enum)]
    estimator: Option<EstimatorArg>,
    /// Number of samples for --mode sample.
    #[arg(long, default_value_t = 16)]
    num: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EstimatorArg {
    Exact,
    Series,
    Roulette,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect {
            model,
            weights,
            seed,
            json,
        } => inspect(&model, weights.as_deref(), seed, json),
        Cmd::Graph { model, dot } => graph(&model, dot),
        Cmd::Run(args) => run_model(&args),
    }
}

fn bar(len: u64, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{elapsed_precise}] {bar:30} {pos}/{len} {eta}") {
        pb.set_style(style);
    }
    pb.set_message(msg);
    pb
}

fn load(model: &Path, weights: Option<&Path>, seed: Option<u64>) -> Result<Model> {
    let pb = bar(0, "certifying");
    let progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let m = pipeline::load_model(model, &LoadOptions { weights, seed }, &progress)?;
    pb.finish_and_clear();
    Ok(m)
}

fn inspect(model: &Path, weights: Option<&Path>, seed: Option<u64>, json: bool) -> Result<()> {
    let m = load(model, weights, seed)?;
    let s = m.summary();
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let g = &m.graph;
    println!("model {} ({:?}), input {:?}", s.model, s.kind, s.input);
    for (i, sh) in s.stage_shapes.iter().enumerate() {
        let blocks = g.blocks.iter().filter(|b| b.stage == i).count();
        println!("  stage {i}: {blocks} blocks at {sh:?}");
    }
    if g.spec.kind == ModelKind::Flow {
        println!("  latent dim {}", s.latent_dim);
    }
    println!(
        "parameters {} ({:.2}M), forward {:.3} GFLOP/sample",
        s.parameters,
        s.parameters as f64 / 1e6,
        s.forward_flops_per_sample as f64 / 1e9
    );
    let lip = s.lipschitz;
    println!("\nlayers (c = {}):", lip.coeff);
    println!(
        "  {:<28} {:>8} {:>12} {:>7} {:>10} {:>10}",
        "name", "kind", "sigma est.", "iters", "scale", "certified"
    );
    for l in &lip.layers {
        println!(
            "  {:<28} {:>8} {:>12.6} {:>6}{} {:>10.4} {:>10.6}",
            l.name,
            l.kind,
            l.sigma_estimate,
            l.power_iterations,
            if l.converged { " " } else { "*" },
            l.scale,
            l.certified_bound
        );
    }
    println!(
        "\nblocks (inverse tol {:e}, {} log-det terms):",
        g.spec.inverse.tol, g.spec.logdet.terms
    );
    println!(
        "  {:<20} {:>10} {:>14} {:>16}",
        "name", "Lip bound", "inverse iters", "trunc. bound"
    );
    for b in &lip.blocks {
        println!(
            "  {:<20} {:>10.6} {:>14} {:>16.4e}",
            b.name, b.lipschitz_bound, b.inverse_iters, b.logdet_truncation_bound
        );
    }
    println!("\nlargest block bound {:.6} (< 1: every block is invertible)", lip.max_block_bound);
    if lip.layers.iter().any(|l| !l.converged) {
        println!("* power iteration hit lipschitz.power_max_iters before the relative change fell below lipschitz.power_tol; the certified bound is unaffected");
    }
    println!("inverse iters: fixed-point steps after which the Banach bound guarantees an error below tol x |first step|");
    Ok(())
}

fn graph(model: &Path, dot: bool) -> Result<()> {
    let spec = iresnetc::spec::ModelSpec::from_file(model)?;
    let g = iresnetc::ir::build(&spec)?;
    if dot {
        print!("{}", iresnetc::ir::to_dot(&g));
    } else {
        for ix in g.topo_order()? {
            let n = g.node(ix);
            let ins: Vec<&str> = g.inputs(ix).iter().map(|&i| g.node(i).name.as_str()).collect();
            println!("{:<32} {:<14} {:?} <- {}", n.name, n.op.kind(), n.shape, ins.join(", "));
        }
    }
    Ok(())
}

fn run_model(a: &RunArgs) -> Result<()> {
    if a.model.is_dir() || a.model.extension().is_some_and(|e| e != "toml") {
        bail!("{}: expected a model file (.toml)", a.model.display());
    }
    let m = load(&a.model, a.weights.as_deref(), a.seed)?;
    let g = &m.graph;
    let r = Reference::new(g);
    let probe_seed = a.probe_seed.unwrap_or(g.spec.logdet.seed);
    let mut ld_spec = g.spec.logdet.clone();
    ld_spec.seed = probe_seed;
    if let Some(e) = a.estimator {
        ld_spec.estimator = match e {
            EstimatorArg::Exact => Estimator::Exact,
            EstimatorArg::Series => Estimator::Series,
            EstimatorArg::Roulette => Estimator::Roulette,
        };
    }
    let method = LogDetMethod::from_spec(&ld_spec);
    let need_flow = |what: &str| -> Result<()> {
        if g.spec.kind != ModelKind::Flow {
            bail!("{}: --mode {what} needs a flow (kind = \"flow\")", a.model.display());
        }
        Ok(())
    };
    let input = |per_sample: &[usize], array: &str| -> Result<npy::Batch> {
        let p = a
            .input
            .as_deref()
            .with_context(|| format!("--mode {:?} needs --input", a.mode).to_lowercase())?;
        Ok(npy::read_batch(p, array, per_sample)?)
    };
    let in_shape = g.spec.input.clone();
    let latent = [g.latent_dim()];
    let chunked = |xs: &[Vec<f64>], f: &dyn Fn(&[Vec<f64>]) -> iresnetc::Result<Vec<Vec<f64>>>| -> Result<Vec<Vec<f64>>> {
        // Chunks of a few samples so the progress bar moves on long runs.
        let pb = bar(xs.len() as u64, "running");
        let mut out = vec![];
        for c in xs.chunks(4) {
            out.extend(f(c)?);
            pb.inc(c.len() as u64);
        }
        pb.finish_and_clear();
        Ok(out)
    };
    match a.mode {
        Mode::Forward => {
            let x = input(&in_shape, "input")?;
            let method = if g.spec.kind == ModelKind::Flow && a.logdet_out.is_some() {
                method
            } else {
                LogDetMethod::None
            };
            let mut lds = vec![];
            let outs = chunked(&x.samples, &|c| {
                let f = r.forward(c, &method)?;
                Ok(f.outputs.into_iter().zip(f.logdet).map(|(o, l)| {
                    let mut o = o;
                    o.push(l);
                    o
                }).collect())
            })?;
            let mut z = vec![];
            for mut o in outs {
                lds.push(vec![o.pop().unwrap_or(0.0)]);
                z.push(o);
            }
            let out_dim = z.first().map(|v| v.len()).unwrap_or(0);
            npy::write(&a.output, &z, &[out_dim], false)?;
            if let Some(p) = &a.logdet_out {
                npy::write(p, &lds, &[], false)?;
            }
            eprintln!("backend cpu (f64 reference): forward of {} samples -> {}", z.len(), a.output.display());
        }
        Mode::Inverse => {
            need_flow("inverse")?;
            let z = input(&latent, "z")?;
            let (x, stats) = r.inverse(&z.samples)?;
            npy::write(&a.output, &x, &in_shape, false)?;
            eprintln!(
                "backend cpu (f64 reference): inverse, at most {} fixed-point iterations per block, max residual {:.3e}{}",
                stats.max_iters,
                stats.max_residual,
                if stats.converged { "" } else { " (NOT converged: raise inverse.max_iters)" }
            );
        }
        Mode::Logdet => {
            need_flow("logdet")?;
            let x = input(&in_shape, "input")?;
            let out = chunked(&x.samples, &|c| Ok(r.forward(c, &method)?.logdet.into_iter().map(|l| vec![l]).collect()))?;
            npy::write(&a.output, &out, &[], false)?;
            eprintln!("backend cpu (f64 reference): log-det ({:?}) of {} samples", ld_spec.estimator, out.len());
        }
        Mode::Density => {
            need_flow("density")?;
            let x = input(&in_shape, "input")?;
            let out = chunked(&x.samples, &|c| {
                Ok(r.density(c, &method, probe_seed)?.into_iter().map(|(l, b)| vec![l, b]).collect())
            })?;
            let mean_bpd = out.iter().map(|v| v[1]).sum::<f64>() / out.len() as f64;
            npy::write(&a.output, &out, &[2], false)?;
            eprintln!("backend cpu (f64 reference): columns (log p(x) nats, bits/dim); mean bits/dim {mean_bpd:.4}");
        }
        Mode::Sample => {
            need_flow("sample")?;
            if a.num == 0 {
                bail!("--num must be >= 1");
            }
            let (x, stats) = r.sample(a.num, probe_seed)?;
            npy::write(&a.output, &x, &in_shape, false)?;
            eprintln!(
                "backend cpu (f64 reference): {} samples, at most {} inverse iterations per block",
                x.len(),
                stats.max_iters
            );
        }
        Mode::Classify => {
            if g.spec.kind != ModelKind::Classifier {
                bail!("{}: --mode classify needs a classifier (kind = \"classifier\")", a.model.display());
            }
            let x = input(&in_shape, "input")?;
            let logits = chunked(&x.samples, &|c| Ok(r.forward(c, &LogDetMethod::None)?.outputs))?;
            let classes = logits.first().map(|v| v.len()).unwrap_or(0);
            npy::write(&a.output, &logits, &[classes], false)?;
            eprintln!("backend cpu (f64 reference): logits of {} samples", logits.len());
        }
    }
    Ok(())
}
