//! `iresnetc run`: one entry point of a model on a backend.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use super::{bar, load};
use iresnetc::npy;
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{Estimator, LogDetSpec, ModelKind, ModelSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Forward,
    Inverse,
    Logdet,
    Density,
    Sample,
    Classify,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A hardware GPU adapter if there is one, else the native CPU engine.
    Auto,
    /// wgpu on any adapter (lavapipe when forced or nothing else exists).
    Wgpu,
    /// tract running the exported ONNX graphs on the CPU.
    Tract,
    /// The native f32 CPU engine (gemm); before it existed, `cpu` meant the f64 reference.
    Cpu,
    /// The f64 reference executor (the oracle; slow).
    Reference,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A model file (.toml) or a compiled bundle directory.
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
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
    /// Weights (.safetensors); default: deterministic init from the seed.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed of the weight initialization (default: the model file's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EstimatorArg {
    Exact,
    Series,
    Roulette,
}

pub fn run(a: &RunArgs) -> Result<()> {
    match a.backend {
        Backend::Cpu => super::cpu::run_cpu(a),
        Backend::Reference => run_reference(a),
        Backend::Wgpu => super::compile::run_wgpu(a),
        Backend::Tract => super::export::run_tract(a),
        Backend::Auto => {
            if iresnetc_runtime::device::has_hardware_gpu() {
                super::compile::run_wgpu(a)
            } else {
                super::cpu::run_cpu(a)
            }
        }
    }
}

impl RunArgs {
    /// The model file's log-det settings with this run's `--estimator` and `--probe-seed`.
    pub fn logdet_spec(&self, spec: &ModelSpec) -> LogDetSpec {
        let mut s = spec.logdet.clone();
        s.seed = self.probe_seed.unwrap_or(spec.logdet.seed);
        if let Some(e) = self.estimator {
            s.estimator = match e {
                EstimatorArg::Exact => Estimator::Exact,
                EstimatorArg::Series => Estimator::Series,
                EstimatorArg::Roulette => Estimator::Roulette,
            };
        }
        s
    }

    /// `--input`, read and checked against the per-sample shape.
    pub fn read_input(&self, per_sample: &[usize], array: &str) -> Result<npy::Batch> {
        let p = self
            .input
            .as_deref()
            .with_context(|| format!("--mode {:?} needs --input", self.mode).to_lowercase())?;
        Ok(npy::read_batch(p, array, per_sample)?)
    }
}

/// Model file or bundle directory -> (model file, weights file).
pub fn model_and_weights(a: &RunArgs) -> Result<(PathBuf, Option<PathBuf>)> {
    if a.model.is_dir() {
        let toml = a.model.join("model.toml");
        if !toml.is_file() {
            bail!(
                "{}: not a bundle (no model.toml); compile one with `iresnetc compile`",
                a.model.display()
            );
        }
        let w = a
            .weights
            .clone()
            .unwrap_or_else(|| a.model.join("weights.safetensors"));
        return Ok((toml, Some(w)));
    }
    Ok((a.model.clone(), a.weights.clone()))
}

/// The f64 reference executor.
fn run_reference(a: &RunArgs) -> Result<()> {
    let (model, weights) = model_and_weights(a)?;
    let m = load(&model, weights.as_deref(), a.seed)?;
    let g = &m.graph;
    let r = Reference::new(g);
    let probe_seed = a.probe_seed.unwrap_or(g.spec.logdet.seed);
    let ld_spec = a.logdet_spec(&g.spec);
    let method = LogDetMethod::from_spec(&ld_spec);
    let need_flow = |what: &str| -> Result<()> {
        if g.spec.kind != ModelKind::Flow {
            bail!(
                "{}: --mode {what} needs a flow (kind = \"flow\")",
                a.model.display()
            );
        }
        Ok(())
    };
    let input = |per_sample: &[usize], array: &str| a.read_input(per_sample, array);
    let in_shape = g.spec.input.clone();
    let latent = [g.latent_dim()];
    let chunked = |xs: &[Vec<f64>],
                   f: &dyn Fn(usize, &[Vec<f64>]) -> iresnetc::Result<Vec<Vec<f64>>>|
     -> Result<Vec<Vec<f64>>> {
        // Chunks of a few samples so the progress bar moves on long runs.
        let pb = bar(xs.len() as u64, "running");
        let mut out = vec![];
        for (i, c) in xs.chunks(4).enumerate() {
            out.extend(f(4 * i, c)?);
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
            let outs = chunked(&x.samples, &|first, c| {
                let f = r.forward_from(c, &method, first)?;
                Ok(f.outputs
                    .into_iter()
                    .zip(f.logdet)
                    .map(|(o, l)| {
                        let mut o = o;
                        o.push(l);
                        o
                    })
                    .collect())
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
            eprintln!(
                "backend reference (f64): forward of {} samples -> {}",
                z.len(),
                a.output.display()
            );
        }
        Mode::Inverse => {
            need_flow("inverse")?;
            let z = input(&latent, "z")?;
            let (x, stats) = r.inverse(&z.samples)?;
            npy::write(&a.output, &x, &in_shape, false)?;
            eprintln!(
                "backend reference (f64): inverse, at most {} fixed-point iterations per block, max residual {:.3e}{}",
                stats.max_iters,
                stats.max_residual,
                if stats.converged { "" } else { " (NOT converged: raise inverse.max_iters)" }
            );
        }
        Mode::Logdet => {
            need_flow("logdet")?;
            let x = input(&in_shape, "input")?;
            let out = chunked(&x.samples, &|first, c| {
                Ok(r.forward_from(c, &method, first)?
                    .logdet
                    .into_iter()
                    .map(|l| vec![l])
                    .collect())
            })?;
            npy::write(&a.output, &out, &[], false)?;
            eprintln!(
                "backend reference (f64): log-det ({:?}) of {} samples",
                ld_spec.estimator,
                out.len()
            );
        }
        Mode::Density => {
            need_flow("density")?;
            let x = input(&in_shape, "input")?;
            let out = chunked(&x.samples, &|first, c| {
                Ok(r.density_from(c, &method, probe_seed, first)?
                    .into_iter()
                    .map(|(l, b)| vec![l, b])
                    .collect())
            })?;
            let mean_bpd = out.iter().map(|v| v[1]).sum::<f64>() / out.len() as f64;
            npy::write(&a.output, &out, &[2], false)?;
            eprintln!("backend reference (f64): columns (log p(x) nats, bits/dim); mean bits/dim {mean_bpd:.4}");
        }
        Mode::Sample => {
            need_flow("sample")?;
            if a.num == 0 {
                bail!("--num must be >= 1");
            }
            let (x, stats) = r.sample(a.num, probe_seed)?;
            npy::write(&a.output, &x, &in_shape, false)?;
            eprintln!(
                "backend reference (f64): {} samples, at most {} inverse iterations per block",
                x.len(),
                stats.max_iters
            );
        }
        Mode::Classify => {
            if g.spec.kind != ModelKind::Classifier {
                bail!(
                    "{}: --mode classify needs a classifier (kind = \"classifier\")",
                    a.model.display()
                );
            }
            let x = input(&in_shape, "input")?;
            let logits = chunked(&x.samples, &|_, c| {
                Ok(r.forward(c, &LogDetMethod::None)?.outputs)
            })?;
            let classes = logits.first().map(|v| v.len()).unwrap_or(0);
            npy::write(&a.output, &logits, &[classes], false)?;
            eprintln!(
                "backend reference (f64): logits of {} samples",
                logits.len()
            );
        }
    }
    Ok(())
}
