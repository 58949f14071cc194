//! `iresnetc train` and `iresnetc eval`: training runs in a run directory
//! (checkpoint, metrics, final weights, certificate, pictures) and evaluation
//! of a model or run on a data set.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::bar;
use iresnetc::spec::{Estimator, ModelKind, ModelSpec};
use iresnetc::train::data::{self, Data, Fit};
use iresnetc::train::optim::OptimKind;
use iresnetc::train::trainer::{evaluate, init_lipswish_beta, Config, EvalMetrics, Trainer};
use iresnetc::train::{plots, sample, Backend};
use iresnetc::weights;
use iresnetc::{ir, limits};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Model file (.toml); its `[train]` table holds the defaults of the flags below.
    pub model: PathBuf,
    /// Data: a 2-D density (8gaussians, checkerboard, 2spirals, pinwheel, moons,
    /// rings, circles, swissroll), a .npy file [N, C, H, W] (uint8, or float in
    /// [0, 1]), an IDX images file, or a directory with MNIST-format files.
    #[arg(long)]
    pub data: String,
    /// Labels (.npy or IDX) for classifiers (default: a sibling file).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Run directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Total optimizer steps (default: train.steps).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Total epochs over a finite data set (instead of --steps).
    #[arg(long)]
    pub epochs: Option<f64>,
    #[arg(long)]
    pub batch: Option<usize>,
    /// Continue the run in this directory from its checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Seed of initialization, data order, probes and noise (default: the model's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimArg>,
    /// Log-det estimator during training (default: train.estimator, else logdet.estimator).
    #[arg(long, value_enum)]
    pub estimator: Option<EstimatorArg>,
    /// Initial weights (.safetensors) instead of the seeded initialization.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the matrix products run: the native CPU engine (f32 GEMMs) or the f64 reference.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Stop after this many steps of this invocation (the run stays resumable).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// No pictures at the end.
    #[arg(long)]
    pub no_plots: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimArg {
    Adam,
    Adamax,
    Sgd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EstimatorArg {
    Exact,
    Series,
    Roulette,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A model file (.toml, with --weights) or a run directory.
    pub model: PathBuf,
    /// Data as for `train`; directories give their test split, 2-D densities their held-out sample.
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub labels: Option<PathBuf>,
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed of the held-out sample, probes and dequantization (default: the run's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate the first N samples (default: the whole set, or train.heldout
    /// points of a 2-D density's held-out sample).
    #[arg(long)]
    pub num: Option<usize>,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Cpu,
    Reference,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Cpu => Backend::Cpu,
            BackendArg::Reference => Backend::Reference,
        }
    }
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
    .max(1)
}

fn fit(spec: &ModelSpec) -> Fit {
    Fit {
        pad: spec.train.pad,
        repeat_channels: spec.train.repeat_channels,
    }
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| path.display().to_string())?;
    writeln!(f, "{line}").with_context(|| path.display().to_string())?;
    Ok(())
}

/// A training step allocates and frees the same large batch matrices every step. glibc hands
/// blocks above its (adaptive) mmap threshold back to the kernel on free, so every step would
/// fault them in and zero them again (measured: about a third of a step of the image flow).
/// Fixing the threshold at its 32 MiB maximum and never trimming keeps freed memory for reuse.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    use std::ffi::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    // SAFETY: mallopt only sets two of glibc's allocator tunables (documented parameters and
    // in-range values); it is called before any worker thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, c_int::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

pub fn train(a: &TrainArgs) -> Result<()> {
    keep_freed_memory();
    let mut spec = ModelSpec::from_file(&a.model)?;
    // Flags override the [train] table; the result is checked like the file.
    let t = &mut spec.train;
    if let Some(b) = a.batch {
        t.batch = b;
    }
    if let Some(lr) = a.lr {
        t.lr = lr;
    }
    if let Some(o) = a.optimizer {
        t.optimizer = match o {
            OptimArg::Adam => OptimKind::Adam,
            OptimArg::Adamax => OptimKind::Adamax,
            OptimArg::Sgd => OptimKind::Sgd,
        };
    }
    if let Some(e) = a.estimator {
        t.estimator = Some(match e {
            EstimatorArg::Exact => Estimator::Exact,
            EstimatorArg::Series => Estimator::Series,
            EstimatorArg::Roulette => Estimator::Roulette,
        });
    }
    if let Some(e) = a.eval_every {
        t.eval_every = e;
    }
    if let Some(c) = a.checkpoint_every {
        t.checkpoint_every = c;
    }
    if let Err((field, reason)) = t.check() {
        match flag_of(a, field) {
            Some(flag) => bail!("{flag}: {reason}"),
            None => bail!("{}: field `{field}`: {reason}", a.model.display()),
        }
    }
    check_threads(a.threads)?;
    if let Some(s) = a.steps {
        if s == 0 || s > limits::MAX_TRAIN_STEPS {
            bail!("--steps {s}: outside 1..={}", limits::MAX_TRAIN_STEPS);
        }
    }
    if let Some(e) = a.epochs {
        if !(e > 0.0 && e.is_finite()) {
            bail!("--epochs {e}: must be a positive finite number of epochs");
        }
    }
    let seed = a.seed.unwrap_or(spec.seed);
    // The data are checked against the model before anything is written.
    let train_data = data::open(&a.data, a.labels.as_deref(), &spec, fit(&spec), false)?;
    let test_data = match &train_data {
        Data::Toy { .. } => train_data.clone(),
        Data::Set { .. } if Path::new(&a.data).is_dir() => {
            data::open(&a.data, a.labels.as_deref(), &spec, fit(&spec), true)?
        }
        Data::Set { .. } => train_data.clone(),
    };
    if spec.kind == ModelKind::Classifier && matches!(train_data, Data::Toy { .. }) {
        bail!("{}: a classifier needs labelled data", a.data);
    }
    let steps = match (a.steps, a.epochs, train_data.len()) {
        (Some(s), _, _) => s,
        (None, Some(e), Some(n)) if e > 0.0 => {
            let s = ((e * n as f64) / spec.train.batch as f64).ceil();
            if !(s >= 1.0 && s <= limits::MAX_TRAIN_STEPS as f64) {
                bail!(
                    "--epochs {e}: {e} epochs of {n} samples at batch {} are {s:.3e} steps, outside 1..={}",
                    spec.train.batch,
                    limits::MAX_TRAIN_STEPS
                );
            }
            s as u64
        }
        (None, Some(_), None) => bail!(
            "--epochs needs a finite data set ({} is a generator); use --steps",
            a.data
        ),
        (None, Some(e), _) => bail!("--epochs must be positive, got {e}"),
        (None, None, _) => spec.train.steps,
    };
    // The work and memory of the run, before its first step (the same budget as run/compile).
    if let Err((field, reason)) =
        limits::check_train(&spec, spec.train.batch, spec.train.heldout, steps)
    {
        match flag_of(a, &field) {
            Some(flag) => bail!("{flag}: {reason}"),
            None => bail!("{}: field `{field}`: {reason}", a.model.display()),
        }
    }
    let graph = ir::build(&spec)?;
    let init = match &a.weights {
        Some(w) => weights::load(&graph, w)?,
        None => {
            let mut w = weights::init(&graph, seed);
            if let Some(b) = spec.train.lipswish_beta {
                init_lipswish_beta(&mut w, b);
            }
            w
        }
    };
    let cfg = Config {
        train: spec.train.clone(),
        seed,
        threads: threads(a.threads),
        backend: a.backend.into(),
    };
    let mut tr = Trainer::new(spec.clone(), init, cfg)?;
    let mut kept = String::new();
    let mut resumed_from = None;
    if let Some(r) = &a.resume {
        let ck = r.join("checkpoint.safetensors");
        tr.restore(&ck)?;
        if tr.step > steps {
            bail!(
                "{}: the checkpoint is at step {}, past the {steps} steps of this run",
                ck.display(),
                tr.step
            );
        }
        // Keep the metrics of the steps the checkpoint covers.
        if let Ok(text) = std::fs::read_to_string(r.join("metrics.jsonl")) {
            for line in text.lines() {
                let step = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
                if step.is_some_and(|s| s <= tr.step) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        // Said once the command succeeded: a failing one prints its error line only.
        resumed_from = Some(format!("resumed {} at step {}", ck.display(), tr.step));
    }
    // Only now, with the data and the checkpoint read, is anything written: into the staged
    // run directory, which replaces -o only when the whole command succeeded.
    let out = &match iresnetc::output::stage_dir(&a.output)? {
        Some(tmp) => tmp,
        None => {
            std::fs::create_dir_all(&a.output).with_context(|| a.output.display().to_string())?;
            a.output.clone()
        }
    };
    let metrics_path = out.join("metrics.jsonl");
    iresnetc::fsutil::write_atomic(&metrics_path, kept.as_bytes())?;
    let model_text = toml::to_string(&spec).context("model spec")?;
    iresnetc::fsutil::write_atomic(&out.join("model.toml"), model_text.as_bytes())?;
    let run_info = serde_json::json!({
        "seed": seed,
        "data": a.data,
        "steps": steps,
        "backend": Backend::from(a.backend).name(),
        "threads": threads(a.threads),
    });
    iresnetc::fsutil::write_atomic(&out.join("run.json"), run_info.to_string().as_bytes())?;

    let (held_x, held_y) = test_data.eval_set(seed, spec.train.heldout);
    let flow = spec.kind == ModelKind::Flow;
    let pb = bar(steps, "training");
    pb.set_position(tr.step);
    let start = Instant::now();
    let mut done_here = 0u64;
    while tr.step < steps {
        if a.stop_after.is_some_and(|s| done_here >= s) {
            break;
        }
        let m = tr.train_step(&train_data)?;
        done_here += 1;
        let mut line = serde_json::to_value(&m)?;
        let every = |k: u64| k > 0 && tr.step % k == 0;
        if every(spec.train.eval_every) {
            let e = tr.evaluate(&held_x, held_y.as_deref())?;
            line["heldout"] = serde_json::to_value(&e)?;
        }
        append_line(&metrics_path, &line.to_string())?;
        if every(spec.train.checkpoint_every) {
            iresnetc::train::checkpoint::save(
                &tr.checkpoint(),
                &out.join("checkpoint.safetensors"),
            )?;
        }
        pb.set_position(tr.step);
        pb.set_message(if flow {
            format!("nll {:.3}", m.loss)
        } else {
            format!("ce {:.3}", m.loss)
        });
    }
    pb.finish_and_clear();
    if let Some(note) = &resumed_from {
        eprintln!("{note}");
    }
    iresnetc::train::checkpoint::save(&tr.checkpoint(), &out.join("checkpoint.safetensors"))?;
    if tr.step < steps {
        println!(
            "stopped at step {} of {steps}; continue with --resume {}",
            tr.step,
            a.output.display()
        );
        return Ok(());
    }
    let (final_graph, cert) = tr.final_model()?;
    weights::save(&final_graph.params, &out.join("final.safetensors"))?;
    iresnetc::fsutil::write_atomic(
        &out.join("certificate.json"),
        serde_json::to_string_pretty(&cert)?.as_bytes(),
    )?;
    let e = evaluate(
        &final_graph,
        &held_x,
        held_y.as_deref(),
        seed,
        threads(a.threads),
        a.backend.into(),
    )?;
    iresnetc::fsutil::write_atomic(
        &out.join("eval.json"),
        serde_json::to_string_pretty(&e)?.as_bytes(),
    )?;
    if !a.no_plots {
        pictures(&final_graph, &test_data, out, seed, &metrics_path)?;
    }
    println!(
        "trained {} for {steps} steps in {:.1} s -> {}: held-out {} (largest certified block bound {:.4})",
        spec.name,
        start.elapsed().as_secs_f64(),
        a.output.display(),
        describe(&e, &spec),
        cert.max_block_bound
    );
    Ok(())
}

fn describe(e: &EvalMetrics, spec: &ModelSpec) -> String {
    match (spec.kind, e.bits_per_dim, e.accuracy) {
        (_, _, Some(acc)) => format!(
            "accuracy {:.4}, cross-entropy {:.4} on {} samples",
            acc, e.loss, e.samples
        ),
        (_, Some(b), _) => format!("{b:.4} bits/dim on {} samples", e.samples),
        _ => format!("NLL {:.4} nats on {} samples", e.loss, e.samples),
    }
}

fn pictures(
    g: &iresnetc::ir::Graph,
    data: &Data,
    out: &Path,
    seed: u64,
    metrics: &Path,
) -> Result<()> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let (mut tl, mut hl) = (vec![], vec![]);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v["step"].as_u64().unwrap_or(0);
        if let Some(l) = v["loss"].as_f64() {
            tl.push((step, l));
        }
        if let Some(l) = v["heldout"]["loss"].as_f64() {
            hl.push((step, l));
        }
    }
    plots::loss_curve(&out.join("loss.png"), &tl, &hl)?;
    if g.spec.kind != ModelKind::Flow {
        return Ok(());
    }
    if g.spec.input == [2] {
        let n = 128;
        let pts = plots::grid(n);
        let logp = sample::log_density(g, &pts)?;
        let (shown, _) = data.eval_set(seed ^ 0xD47A, 20_000);
        let samples = sample::sample(g, 20_000, seed)?;
        plots::density_panels(&out.join("density.png"), &shown, &logp, n, &samples)?;
    } else if g.spec.is_image() && g.spec.input[0] <= 3 {
        let s = sample::sample(g, 64, seed)?;
        // Back from the dequantized range to [0, 1].
        let shift = if g.spec.data.dequantize { 0.5 } else { 0.0 };
        let imgs: Vec<Vec<f64>> = s
            .iter()
            .map(|x| x.iter().map(|v| v + shift).collect())
            .collect();
        plots::image_grid(&out.join("samples.png"), &imgs, &g.spec.input, 8)?;
        // Reconstructions: 32 images, then inverse(forward(x)) of each, row by row.
        let (xs, _) = data.eval_set(seed, 32);
        let model_in: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| x.iter().map(|v| v - shift).collect())
            .collect();
        let z = iresnetc::reference::Reference::new(g)
            .forward(&model_in, &iresnetc::reference::LogDetMethod::None)?
            .outputs;
        let back = sample::inverse(g, &iresnetc::train::Mat::from_rows(&z, g.latent_dim()))?;
        let mut grid = Vec::with_capacity(2 * xs.len());
        for (chunk, rec) in xs.chunks(8).zip(back.to_rows().chunks(8)) {
            grid.extend(chunk.iter().cloned());
            grid.extend(
                rec.iter()
                    .map(|x| x.iter().map(|v| v + shift).collect::<Vec<f64>>()),
            );
        }
        plots::image_grid(&out.join("reconstructions.png"), &grid, &g.spec.input, 8)?;
    }
    Ok(())
}

/// The flag that set a `[train]` field in this invocation, if one did.
fn flag_of(a: &TrainArgs, field: &str) -> Option<&'static str> {
    match field {
        "train.batch" if a.batch.is_some() => Some("--batch"),
        "train.lr" if a.lr.is_some() => Some("--lr"),
        "train.steps" if a.steps.is_some() => Some("--steps"),
        "train.steps" if a.epochs.is_some() => Some("--epochs"),
        "train.eval_every" if a.eval_every.is_some() => Some("--eval-every"),
        "train.checkpoint_every" if a.checkpoint_every.is_some() => Some("--checkpoint-every"),
        _ => None,
    }
}

/// Most worker threads asked for (more than any machine has; a typo otherwise).
const MAX_THREADS: usize = 4096;

fn check_threads(t: Option<usize>) -> Result<()> {
    match t {
        Some(n) if n == 0 || n > MAX_THREADS => {
            bail!("--threads {n}: outside 1..={MAX_THREADS}")
        }
        _ => Ok(()),
    }
}

/// `eval`'s numbers, before anything is read.
pub fn check_eval_args(a: &EvalArgs) -> Result<()> {
    check_threads(a.threads)?;
    if let Some(n) = a.num {
        if n == 0 || n > limits::MAX_SAMPLES {
            bail!(
                "--num {n}: outside 1..={} (samples to evaluate)",
                limits::MAX_SAMPLES
            );
        }
    }
    Ok(())
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    keep_freed_memory();
    let (model_file, weights_file, run_seed) = if a.model.is_dir() {
        let seed = std::fs::read_to_string(a.model.join("run.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["seed"].as_u64());
        let w = a
            .weights
            .clone()
            .unwrap_or_else(|| a.model.join("final.safetensors"));
        (a.model.join("model.toml"), Some(w), seed)
    } else {
        (a.model.clone(), a.weights.clone(), None)
    };
    let spec = ModelSpec::from_file(&model_file)?;
    let d = data::open(&a.data, a.labels.as_deref(), &spec, fit(&spec), true)?;
    let m = super::load(&model_file, weights_file.as_deref(), None)?;
    let seed = a.seed.or(run_seed).unwrap_or(spec.seed);
    // Default: a 2-D density's held-out sample of train.heldout points, or the whole set.
    let n = a.num.unwrap_or(match d {
        Data::Toy { .. } => spec.train.heldout,
        Data::Set { .. } => usize::MAX,
    });
    if let Err((_, reason)) = limits::check_train(&spec, 1, n.min(d.len().unwrap_or(n)), 1) {
        match a.num {
            Some(n) => bail!("--num {n}: {reason}"),
            None => bail!("{}: field `train.heldout`: {reason}", model_file.display()),
        }
    }
    let (xs, ys) = d.eval_set(seed, n);
    let e = evaluate(
        &m.graph,
        &xs,
        ys.as_deref(),
        seed,
        threads(a.threads),
        a.backend.into(),
    )?;
    println!("{}", serde_json::to_string(&e)?);
    eprintln!("{}: {}", spec.name, describe(&e, &spec));
    Ok(())
}

/// `-o RUN_DIR` may be a new path, an empty directory, or the run being resumed; anything else
/// (a file, another run, a directory of other files) is refused before any work, so training
/// never mixes its files into a directory it was not given for that purpose.
pub fn check_output(a: &TrainArgs) -> Result<()> {
    let out = &a.output;
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("-o {}: exists and is not a directory", out.display());
    }
    let same_as_resume = a.resume.as_ref().is_some_and(|r| {
        r == out || matches!((r.canonicalize(), out.canonicalize()), (Ok(p), Ok(q)) if p == q)
    });
    let empty = std::fs::read_dir(out)
        .with_context(|| out.display().to_string())?
        .next()
        .is_none();
    if empty || same_as_resume {
        return Ok(());
    }
    bail!(
        "-o {}: the directory is not empty; give a new path (or --resume {} to continue the run it holds)",
        out.display(),
        out.display()
    )
}
