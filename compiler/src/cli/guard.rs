//! Before any work: every command's option values checked against each other and the model,
//! every bundle it reads verified, and its outputs declared to the output transaction
//! ([`iresnetc::output`]). A command that fails here has read a few small files and written
//! nothing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::run::{EstimatorArg, Mode, RunArgs};
use super::Cmd;
use iresnetc::limits;
use iresnetc::output::{self, Output};
use iresnetc::spec::{ModelKind, ModelSpec};

/// Most block evaluations an exported inverse graph may unroll (`--inverse-steps` x blocks).
const MAX_UNROLLED_BLOCK_STEPS: usize = 100_000;

/// The bundle directory `path` refers to, if any: the directory itself, or the directory of
/// a `model.toml` inside one.
fn bundle_of(path: &Path) -> Option<PathBuf> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if path.file_name().is_some_and(|f| f == "model.toml") {
        path.parent()?.to_path_buf()
    } else {
        return None;
    };
    dir.join(iresnetc_runtime::plan::PLAN_FILE)
        .exists()
        .then_some(dir)
}

/// The model's spec (verified through the bundle's hashes when it is one).
fn spec_of(model: &Path) -> Result<ModelSpec> {
    match bundle_of(model) {
        Some(dir) => {
            let plan = iresnetc::bundle::verify_bundle(&dir)?;
            Ok(iresnetc::bundle::read_spec(&dir, &plan)?)
        }
        None => super::spec_of(model),
    }
}

/// `--num`-like counts: at least 1, at most [`limits::MAX_SAMPLES`], and the arrays they make
/// (`per_sample` f64 elements each, a few copies) within the memory budget.
fn check_count(option: &str, n: usize, per_sample: usize) -> Result<()> {
    if n == 0 || n > limits::MAX_SAMPLES {
        bail!("{option} {n} is outside 1..={}", limits::MAX_SAMPLES);
    }
    let bytes =
        iresnetc_runtime::fsread::checked_bytes(option, &[n as u64, per_sample as u64, 8, 4])?;
    iresnetc_runtime::fsread::check_budget(&format!("{option} {n}"), bytes)?;
    Ok(())
}

pub(super) fn begin(cmd: &Cmd) -> Result<()> {
    let (outputs, inputs) = match cmd {
        Cmd::Inspect { model, weights, .. } => {
            for p in [Some(model), weights.weights.as_ref()]
                .into_iter()
                .flatten()
            {
                if let Some(dir) = bundle_of(p) {
                    iresnetc::bundle::verify_bundle(&dir)?;
                }
            }
            // No outputs: any write would be an error.
            (vec![], vec![])
        }
        Cmd::Graph { .. } | Cmd::Devices => (vec![], vec![]),
        Cmd::Eval(a) => {
            super::train::check_eval_args(a)?;
            (vec![], vec![])
        }
        // The run directory is staged whole (a copy of the run when it continues in place)
        // and renamed into place when the command succeeds: a failing or refused run leaves
        // the directory exactly as it was. What -o may be is the train command's policy.
        Cmd::Train(a) => {
            super::train::check_output(a)?;
            let same = a.resume.as_deref().filter(|r| {
                std::fs::canonicalize(r).ok() == std::fs::canonicalize(&a.output).ok() && r.exists()
            });
            let mut inputs = vec![a.model.clone()];
            inputs.extend(a.weights.clone());
            inputs.extend(a.labels.clone());
            if Path::new(&a.data).exists() {
                inputs.push(PathBuf::from(&a.data));
            }
            if let Some(r) = &a.resume {
                if same.is_none() {
                    inputs.push(r.clone());
                }
            }
            (vec![Output::run_dir(&a.output, "-o", same)], inputs)
        }
        Cmd::Bench(a) => {
            super::bench::check_args(a)?;
            let mut outs = vec![];
            if let Some(p) = &a.profile {
                outs.push(Output::file(p, "--profile"));
            }
            if let Some(p) = &a.json_out {
                outs.push(Output::file(p, "--json-out"));
            }
            (outs, a.model.clone())
        }
        // Served read-only: each bundle must be whole and unedited before the server starts.
        Cmd::Serve(a) => {
            for dir in &a.bundles {
                iresnetc::bundle::verify_bundle(dir)?;
            }
            (vec![], vec![])
        }
        Cmd::Run(a) => run_io(a)?,
        Cmd::Compile(a) => {
            let spec = spec_of(&a.model)?;
            let out = match &a.output {
                Some(o) => Output::bundle(o, "--output"),
                None => Output::bundle(
                    &Path::new("build").join(&spec.name),
                    "default output build/<name>",
                ),
            };
            let inputs = [Some(a.model.clone()), a.weights.weights.clone()]
                .into_iter()
                .flatten()
                .collect();
            (vec![out], inputs)
        }
        Cmd::ExportOnnx(a) => {
            let spec = spec_of(&a.model)?;
            let flow = spec.kind == ModelKind::Flow;
            if let Some(k) = a.inverse_steps {
                if !flow {
                    bail!(
                        "{}: --inverse-steps needs a flow (kind = \"flow\"): a classifier is not invertible end to end",
                        a.model.display()
                    );
                }
                if k == 0 || k > limits::MAX_INVERSE_ITERS {
                    bail!(
                        "--inverse-steps {k} is outside 1..={} (0 steps would not invert anything)",
                        limits::MAX_INVERSE_ITERS
                    );
                }
                // The graph unrolls K steps of every block: bound the node count it makes.
                let blocks = spec.footprint().map_or(1, |f| f.block_dims.len().max(1));
                if k.saturating_mul(blocks) > MAX_UNROLLED_BLOCK_STEPS {
                    bail!(
                        "--inverse-steps {k} x {blocks} blocks = {} unrolled block evaluations, more than {MAX_UNROLLED_BLOCK_STEPS} (the ONNX graph would be too large to load)",
                        k.saturating_mul(blocks)
                    );
                }
            }
            if a.time_batch == Some(0) || a.time_batch.is_some_and(|b| b > 4096) {
                bail!("--time-batch must be in 1..=4096");
            }
            if a.time_samples == 0 || a.time_samples > 10_000 {
                bail!("--time-samples must be in 1..=10000");
            }
            if a.estimator == Some(EstimatorArg::Exact) {
                let mut s = spec.clone();
                s.logdet.estimator = iresnetc::spec::Estimator::Exact;
                limits::check_exact(&s).map_err(|r| anyhow::anyhow!("--estimator exact: {r}"))?;
            }
            let mut outs = vec![Output::file(&a.output, "--output")];
            if a.inverse_steps.is_some() {
                outs.push(Output::file(
                    &super::export::sibling(&a.output, ".inverse.onnx"),
                    "the inverse graph STEM.inverse.onnx",
                ));
            }
            outs.push(Output::file(
                &super::export::sibling(&a.output, ".json"),
                "the manifest STEM.json",
            ));
            let inputs = [Some(a.model.clone()), a.weights.weights.clone()]
                .into_iter()
                .flatten()
                .collect();
            (outs, inputs)
        }
        Cmd::RandomInput {
            model, num, output, ..
        } => {
            let spec = spec_of(model)?;
            let dim = limits::elems("input", &spec.input).map_err(|(_, r)| anyhow::anyhow!(r))?;
            check_count("--num", *num, dim as usize)?;
            (vec![Output::file(output, "--output")], vec![model.clone()])
        }
    };
    output::begin(outputs, &inputs)?;
    Ok(())
}

/// `iresnetc run`: options against the mode and the model, then the outputs.
fn run_io(a: &RunArgs) -> Result<(Vec<Output>, Vec<PathBuf>)> {
    let spec = spec_of(&a.model)?;
    let flow = spec.kind == ModelKind::Flow;
    let mode = format!("{:?}", a.mode).to_lowercase();
    let m = a.model.display();
    match a.mode {
        Mode::Inverse | Mode::Logdet | Mode::Density | Mode::Sample if !flow => {
            bail!("{m}: --mode {mode} needs a flow (kind = \"flow\"); this model is a classifier")
        }
        Mode::Classify if flow => {
            bail!("{m}: --mode classify needs a classifier (kind = \"classifier\"); this model is a flow")
        }
        _ => {}
    }
    if a.mode == Mode::Sample {
        if a.input.is_some() {
            bail!("--mode sample draws from the prior and reads no --input");
        }
        let dim = limits::elems("input", &spec.input).map_err(|(_, r)| anyhow::anyhow!(r))?;
        check_count("--num", a.num, dim as usize)?;
    } else if a.input.is_none() {
        bail!("--mode {mode} needs --input");
    }
    if a.repeats != 1 {
        if a.mode != Mode::Density {
            bail!("--repeats is for --mode density (got --mode {mode})");
        }
        if a.repeats == 0 || a.repeats > limits::MAX_REPEATS {
            bail!(
                "--repeats {} is outside 1..={}",
                a.repeats,
                limits::MAX_REPEATS
            );
        }
    }
    if a.logdet_out.is_some() {
        if a.mode != Mode::Forward {
            bail!(
                "--logdet-out is for --mode forward (--mode {mode} writes its result to --output)"
            );
        }
        if !flow {
            bail!("{m}: --logdet-out needs a flow (kind = \"flow\"): a classifier has no log-det");
        }
    }
    if a.estimator.is_some() && !flow {
        bail!("{m}: --estimator needs a flow (kind = \"flow\"): a classifier has no log-det");
    }
    if a.estimator == Some(EstimatorArg::Exact) {
        let mut s = spec.clone();
        s.logdet.estimator = iresnetc::spec::Estimator::Exact;
        limits::check_exact(&s).map_err(|r| anyhow::anyhow!("--estimator exact: {r}"))?;
    }
    if let Some(p) = &a.png {
        if a.mode != Mode::Sample || spec.input.len() != 3 {
            bail!(
                "--png {}: a PNG grid is written for --mode sample of image models only",
                p.display()
            );
        }
    }
    let mut outs = vec![Output::file(&a.output, "--output")];
    if let Some(p) = &a.logdet_out {
        outs.push(Output::file(p, "--logdet-out"));
    }
    if let Some(p) = &a.png {
        outs.push(Output::file(p, "--png"));
    }
    let inputs = [
        Some(a.model.clone()),
        a.weights.weights.clone(),
        a.input.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok((outs, inputs))
}
