//! Subcommands of the `iresnetc` binary, one file each.

mod backend;
mod bench;
mod compile;
mod cost;
mod devices;
mod export;
mod guard;
mod profile;
mod run;
mod serve;
mod train;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use iresnetc::pipeline::{self, LoadOptions, Model};
use iresnetc::spec::ModelKind;

#[derive(Parser, Debug)]
#[command(
    name = "iresnetc",
    version,
    about = "Compiler and runtime for invertible residual networks (i-ResNet)"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Every subcommand lets `-1` reach its flag as a value, so `--steps -1` is reported as the
// flag's bad value rather than as an unknown argument.
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Shapes per stage, parameters, FLOPs and the Lipschitz certificate.
    #[command(allow_negative_numbers = true)]
    Inspect {
        model: PathBuf,
        #[command(flatten)]
        weights: backend::WeightArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cost: cost::CostArgs,
    },
    /// Print the IR (Graphviz DOT with --dot, else one line per node).
    #[command(allow_negative_numbers = true)]
    Graph {
        model: PathBuf,
        #[arg(long)]
        dot: bool,
    },
    /// Run a model: forward, inverse, logdet, density, sample or classify.
    #[command(allow_negative_numbers = true)]
    Run(run::RunArgs),
    /// Compile a model to a bundle: fused WGSL kernels, plan, weights, report, ONNX.
    #[command(allow_negative_numbers = true)]
    Compile(compile::CompileArgs),
    /// Export the forward graph (and optionally log-det / inverse) to ONNX.
    #[command(allow_negative_numbers = true)]
    ExportOnnx(export::ExportArgs),
    /// Train a model (maximum likelihood or cross-entropy) into a run directory.
    #[command(allow_negative_numbers = true)]
    Train(train::TrainArgs),
    /// Evaluate a model or run on a data set: bits/dim, nats, or accuracy.
    #[command(allow_negative_numbers = true)]
    Eval(train::EvalArgs),
    /// List the GPU adapters wgpu can see.
    Devices,
    /// Benchmark backends and entry points.
    #[command(allow_negative_numbers = true)]
    Bench(bench::BenchArgs),
    /// Serve the browser demo and runtime (web/) and compiled bundles on 127.0.0.1.
    Serve(serve::ServeArgs),
    /// Write a random input batch for a model (.npy): uniform [0, 1) pixels for
    /// dequantized image models, standard normal otherwise.
    #[command(allow_negative_numbers = true)]
    RandomInput {
        /// A model file (.toml) or a bundle directory.
        model: PathBuf,
        #[arg(long, default_value_t = 4)]
        num: usize,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    // The environment, once, before any work: a bad value is an error, never ignored.
    iresnetc_runtime::tract::threads_from_env()?;
    iresnetc_runtime::fsread::memory_budget()?;
    guard::begin(&cli.cmd)?;
    match cli.cmd {
        Cmd::Inspect {
            model,
            weights,
            json,
            cost,
        } => {
            if cost.cost {
                let m = load(&model, weights.weights.as_deref(), weights.seed)?;
                cost::print(&m, &cost, json)
            } else {
                inspect(&model, weights.weights.as_deref(), weights.seed, json)
            }
        }
        Cmd::Graph { model, dot } => graph(&model, dot),
        Cmd::Run(args) => run::run(&args),
        Cmd::Compile(args) => compile::run(&args),
        Cmd::ExportOnnx(args) => export::run(&args),
        Cmd::Train(args) => train::train(&args),
        Cmd::Eval(args) => train::eval(&args),
        Cmd::Devices => devices::run(),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Serve(args) => serve::run(&args),
        Cmd::RandomInput {
            model,
            num,
            output,
            seed,
        } => random_input(&model, num, &output, seed),
    }
}

pub(crate) fn bar(len: u64, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>12} [{elapsed_precise}] {bar:30} {pos}/{len} {eta}")
    {
        pb.set_style(style);
    }
    pb.set_message(msg);
    pb
}

pub(crate) fn load(model: &Path, weights: Option<&Path>, seed: Option<u64>) -> Result<Model> {
    let pb = bar(0, "certifying");
    let progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    // A bundle (model.toml next to its own weights and report.json) carries its
    // certificate: reuse it rather than re-running the Lipschitz pass.
    let dir = model.parent().filter(|d| d.join("report.json").is_file());
    let bundle = dir
        .filter(|d| weights.is_none_or(|w| w == d.join("weights.safetensors")) && seed.is_none());
    let m = match bundle {
        Some(d) if model.file_name().is_some_and(|f| f == "model.toml") => {
            pipeline::load_bundle(d, &progress)?
        }
        _ => pipeline::load_model(model, &LoadOptions { weights, seed }, &progress)?,
    };
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
    println!(
        "\nlargest block bound {:.6} (< 1: every block is invertible)",
        lip.max_block_bound
    );
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
            let ins: Vec<&str> = g
                .inputs(ix)
                .iter()
                .map(|&i| g.node(i).name.as_str())
                .collect();
            println!(
                "{:<32} {:<14} {:?} <- {}",
                n.name,
                n.op.kind(),
                n.shape,
                ins.join(", ")
            );
        }
    }
    Ok(())
}

/// The spec of a model file or of a bundle directory.
pub(crate) fn spec_of(path: &Path) -> Result<iresnetc::spec::ModelSpec> {
    let file = if path.is_dir() {
        path.join("model.toml")
    } else {
        path.to_path_buf()
    };
    Ok(iresnetc::spec::ModelSpec::from_file(&file)?)
}

fn random_input(model: &Path, num: usize, output: &Path, seed: u64) -> Result<()> {
    if num == 0 {
        anyhow::bail!("--num must be >= 1");
    }
    let spec = spec_of(model)?;
    let dim: usize = spec.input.iter().product();
    let mut rng = iresnetc_runtime::rng::Rng::new(seed);
    let pixels = spec.data.dequantize;
    let rows: Vec<Vec<f64>> = (0..num)
        .map(|_| {
            (0..dim)
                .map(|_| {
                    if pixels {
                        (rng.uniform() * 256.0).floor().min(255.0) / 255.0
                    } else {
                        rng.normal()
                    }
                })
                .collect()
        })
        .collect();
    iresnetc::npy::write(output, &rows, &spec.input, true)?;
    eprintln!(
        "wrote {num} x {:?} ({}) to {}",
        spec.input,
        if pixels {
            "8-bit pixels in [0, 1]"
        } else {
            "standard normal"
        },
        output.display()
    );
    Ok(())
}
