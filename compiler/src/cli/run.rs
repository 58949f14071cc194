//! `iresnetc run`: one mode of a model on a backend. Parsing and files only: the modes live in
//! the runtime (`iresnetc_runtime::modes`) and the backends behind its `Backend` trait.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use super::backend::{self, BackendArg, Source, TilingArg, WeightArgs};
use iresnetc::npy;
use iresnetc_runtime::logdet::{Estimator, LogDetMethod, LogDetSpec};
use iresnetc_runtime::modes::{self, DEFAULT_CHUNK};
use iresnetc_runtime::{Backend, Batch, Decoded, ModelInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Forward,
    Inverse,
    Logdet,
    Density,
    Sample,
    Classify,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A model file (.toml) or a compiled bundle directory.
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Input array (.npy, f32 or f64): images NCHW, vectors [B, D]; z [B, D] for inverse.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Output array (.npy).
    #[arg(long)]
    pub output: PathBuf,
    /// Per-sample log-det (.npy) for forward mode.
    #[arg(long)]
    pub logdet_out: Option<PathBuf>,
    /// Sample grid (.png) for --mode sample of image models.
    #[arg(long)]
    pub png: Option<PathBuf>,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// Seed of probes, roulette draws, dequantization noise and prior samples
    /// (default: the model file's `logdet.seed`).
    #[arg(long)]
    pub probe_seed: Option<u64>,
    /// Override the model file's log-det estimator.
    #[arg(long, value_enum)]
    pub estimator: Option<EstimatorArg>,
    /// Number of samples for --mode sample.
    #[arg(long, default_value_t = 16)]
    pub num: usize,
    /// --mode density with a stochastic estimator: independent log-det estimates per sample,
    /// averaged; their standard error becomes two more output columns (1: no error bar).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// wgpu kernel tiling when a model file is compiled for the run (default: from the adapter).
    #[arg(long, value_enum)]
    pub tiling: Option<TilingArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EstimatorArg {
    Exact,
    Series,
    Roulette,
}

impl From<EstimatorArg> for Estimator {
    fn from(e: EstimatorArg) -> Estimator {
        match e {
            EstimatorArg::Exact => Estimator::Exact,
            EstimatorArg::Series => Estimator::Series,
            EstimatorArg::Roulette => Estimator::Roulette,
        }
    }
}

/// The model's log-det settings with a run's `--estimator` and `--probe-seed`.
pub fn logdet_spec(
    model: &LogDetSpec,
    estimator: Option<EstimatorArg>,
    probe_seed: Option<u64>,
) -> LogDetSpec {
    let mut s = model.clone();
    s.seed = probe_seed.unwrap_or(model.seed);
    if let Some(e) = estimator {
        s.estimator = e.into();
    }
    s
}

fn read_input(a: &RunArgs, per_sample: &[usize], array: &str) -> Result<Batch> {
    let p = a
        .input
        .as_deref()
        .with_context(|| format!("--mode {:?} needs --input", a.mode).to_lowercase())?;
    let b = npy::read_batch(p, array, per_sample)?;
    Ok(Batch::from_rows(&b.samples))
}

fn write(path: &Path, b: &Batch, per_sample: &[usize]) -> Result<()> {
    let rows: Vec<Vec<f64>> = b.rows().map(|r| r.to_vec()).collect();
    Ok(npy::write(path, &rows, per_sample, false)?)
}

pub fn run(a: &RunArgs) -> Result<()> {
    // Options against the mode and the outputs against the inputs are checked up front by
    // `cli::guard`, before this runs.
    // `--backend cpu` meant the f64 reference before the native engine existed: where the
    // engine refuses what the reference could do (a request it does not support, a log-det
    // beyond its limits), the error says where the old behaviour went.
    let cpu_hint = |e: anyhow::Error| {
        use iresnetc_runtime::RuntimeError as E;
        let engine_refusal = match e.downcast_ref::<E>() {
            Some(E::Unsupported(_)) => true,
            Some(E::BadInput { name, .. }) => name == "logdet",
            _ => false,
        };
        if a.backend == BackendArg::Cpu && engine_refusal {
            anyhow::anyhow!(
                "{e} (--backend cpu is the native f32 engine; the f64 reference it used to be is --backend reference)"
            )
        } else {
            e
        }
    };
    let source = Source::open(&a.model, &a.weights)?;
    let mut be = backend::open(source, a.backend, a.tiling).map_err(cpu_hint)?;
    let start = Instant::now();
    let summary = run_mode(a, be.as_mut()).map_err(cpu_hint)?;
    eprintln!(
        "backend {}: {summary} -> {} in {:.3} s",
        be.info(),
        a.output.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn inversion_note(d: &Decoded) -> String {
    if d.blocks.is_empty() {
        return String::new();
    }
    let iters = d.blocks.iter().map(|b| b.iters).max().unwrap_or(0);
    let res = d.blocks.iter().map(|b| b.residual).fold(0.0, f64::max);
    format!(
        "; at most {iters} fixed-point iterations per block, max residual {res:.3e}{}",
        if d.converged == Some(false) {
            " (NOT converged: raise inverse.max_iters)"
        } else {
            ""
        }
    )
}

/// Runs the mode and writes its outputs; returns the status line.
fn run_mode(a: &RunArgs, be: &mut dyn Backend) -> Result<String> {
    let info: ModelInfo = be.model().clone();
    let ld = logdet_spec(&info.logdet, a.estimator, a.probe_seed);
    let method = ld.method();
    let seed = ld.seed;
    let pb = super::bar(0, "running");
    let mut progress = |n: usize| pb.inc(n as u64);
    let latent = [info.output_dim];
    let summary = match a.mode {
        Mode::Forward => {
            let x = read_input(a, &info.input_shape, "input")?;
            pb.set_length(x.batch as u64);
            if !info.is_flow() {
                let l = modes::classify(be, &x, DEFAULT_CHUNK, &mut progress)?;
                write(&a.output, &l, &latent)?;
                format!("logits of {} samples", x.batch)
            } else {
                let m = if a.logdet_out.is_some() {
                    method.clone()
                } else {
                    LogDetMethod::None
                };
                let e = modes::encode(be, &x, &m, DEFAULT_CHUNK, &mut progress)?;
                write(&a.output, &e.z, &latent)?;
                if let (Some(p), Some(l)) = (&a.logdet_out, &e.logdet) {
                    write(p, &Batch::new(l.clone(), 1)?, &[])?;
                }
                match e.logdet {
                    Some(_) => format!(
                        "forward + log-det ({:?}) of {} samples",
                        ld.estimator, x.batch
                    ),
                    None => format!("forward of {} samples", x.batch),
                }
            }
        }
        Mode::Logdet => {
            let x = read_input(a, &info.input_shape, "input")?;
            pb.set_length(x.batch as u64);
            iresnetc_runtime::engine::require_kind(
                &info,
                iresnetc_runtime::ModelKind::Flow,
                "--mode logdet",
            )?;
            let e = modes::encode(be, &x, &method, DEFAULT_CHUNK, &mut progress)?;
            let l = e.logdet.context("the backend returned no log-det")?;
            write(&a.output, &Batch::new(l, 1)?, &[])?;
            format!("log-det ({:?}) of {} samples", ld.estimator, x.batch)
        }
        Mode::Density => {
            let x = read_input(a, &info.input_shape, "input")?;
            pb.set_length(x.batch as u64);
            if a.repeats > 1 && method.is_stochastic() {
                pb.set_length((x.batch * a.repeats) as u64);
                let d = modes::density_with_error(
                    be,
                    &x,
                    &method,
                    seed,
                    a.repeats,
                    DEFAULT_CHUNK,
                    &mut progress,
                )?;
                let rows: Vec<f64> = d
                    .iter()
                    .flat_map(|d| {
                        let (m, e) = (d.mean, d.stderr);
                        [m.logp, m.bits_per_dim, e.logp, e.bits_per_dim]
                    })
                    .collect();
                write(&a.output, &Batch::new(rows, 4)?, &[4])?;
                let means: Vec<f64> = d.iter().map(|d| d.mean.bits_per_dim).collect();
                let n = means.len().max(1) as f64;
                let mean = means.iter().sum::<f64>() / n;
                // The mean's error from the estimator alone: the per-sample errors are independent.
                let est = d
                    .iter()
                    .map(|d| d.stderr.bits_per_dim.powi(2))
                    .sum::<f64>()
                    .sqrt()
                    / n;
                format!(
                    "columns (log p(x) nats, bits/dim, their standard errors over {} log-det estimates) of {} samples; mean bits/dim {mean:.4} +- {est:.4} (estimator)",
                    a.repeats,
                    d.len()
                )
            } else {
                let d = modes::density(be, &x, &method, seed, DEFAULT_CHUNK, &mut progress)?;
                let rows: Vec<f64> = d.iter().flat_map(|d| [d.logp, d.bits_per_dim]).collect();
                write(&a.output, &Batch::new(rows, 2)?, &[2])?;
                let mean = d.iter().map(|d| d.bits_per_dim).sum::<f64>() / d.len().max(1) as f64;
                let hint = if method.is_stochastic() {
                    " (one stochastic log-det estimate each: --repeats R adds its standard error)"
                } else {
                    ""
                };
                format!(
                    "columns (log p(x) nats, bits/dim) of {} samples; mean bits/dim {mean:.4}{hint}",
                    d.len()
                )
            }
        }
        Mode::Inverse => {
            let z = read_input(a, &latent, "z")?;
            pb.set_length(z.batch as u64);
            let d = modes::decode(be, &z, DEFAULT_CHUNK, &mut progress)?;
            write(&a.output, &d.x, &info.input_shape)?;
            format!("inverse of {} samples{}", z.batch, inversion_note(&d))
        }
        Mode::Sample => {
            pb.set_length(a.num as u64);
            let d = modes::sample(be, a.num, seed, DEFAULT_CHUNK, &mut progress)?;
            write(&a.output, &d.x, &info.input_shape)?;
            if let Some(png) = &a.png {
                if info.input_shape.len() != 3 {
                    bail!("--png needs an image model (input [C, H, W])");
                }
                iresnetc::image::write_grid(
                    png,
                    &d.x.data,
                    &info.input_shape,
                    if info.dequantize { 0.5 } else { 0.0 },
                )?;
            }
            format!("{} samples{}", a.num, inversion_note(&d))
        }
        Mode::Classify => {
            let x = read_input(a, &info.input_shape, "input")?;
            pb.set_length(x.batch as u64);
            let l = modes::classify(be, &x, DEFAULT_CHUNK, &mut progress)?;
            write(&a.output, &l, &latent)?;
            format!("logits of {} samples", x.batch)
        }
    };
    pb.finish_and_clear();
    Ok(summary)
}
