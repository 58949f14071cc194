//! Writes the fuzz seed corpus with the current compiler, so the seeds are always inputs the
//! loaders accept (the check is `compiler/tests/fuzz_smoke.rs`); rerun it after any change
//! to a format the fuzz targets read:
//!
//! cargo run --release -p iresnetc --example fuzz_seeds -- fuzz/corpus
//!
//! Per target (`iresnetc::fuzzing::TARGETS`), into `CORPUS/<target>/`:
//! - `model_file`: every shipped `models/*.toml` and the fuzz model;
//! - `weights`: the fuzz model's initial weights (the model the target loads them against);
//! - `plan`: `plan.json` of bundles compiled from the fuzz model (dense) and from
//!   `models/cifar-tiny.toml` cut to one block per stage (convolutions, squeezes, factor-outs);
//! - `manifest`: `onnx.json` of the fuzz model's, `models/toy2d-small.toml`'s and
//!   `models/cifar-tiny.toml`'s bundles (the conv flow's probe layout has several shapes);
//! - `npy`: small f32 and f64 vector arrays and an f32 image array, the shapes the target reads.
//!
//! Files in those five directories that this run did not write are removed (they would be
//! seeds of an older format), each named on stdout; nothing outside CORPUS is touched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use iresnetc::fuzzing::{accepts, FUZZ_MODEL, TARGETS};
use iresnetc::pipeline::{load_model, load_spec, LoadOptions, Model};
use iresnetc::spec::ModelSpec;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn fuzz_model() -> Result<Model> {
    let spec = ModelSpec::from_toml(FUZZ_MODEL, Path::new("fuzz-flow.toml"))?;
    Ok(load_spec(spec, &LoadOptions::default(), &|_, _| {})?)
}

fn shipped(name: &str) -> Result<Model> {
    Ok(load_model(
        &models_dir().join(name),
        &LoadOptions::default(),
        &|_, _| {},
    )?)
}

/// A shipped model with one block per stage (same stages, squeezes and factor-outs).
fn shipped_one_block(name: &str) -> Result<Model> {
    let mut spec = ModelSpec::from_file(&models_dir().join(name))?;
    for st in &mut spec.stages {
        st.blocks = 1;
    }
    Ok(load_spec(spec, &LoadOptions::default(), &|_, _| {})?)
}

/// `(plan.json, onnx.json)` of `model` compiled into a scratch directory under `tmp`.
fn bundle_files(model: &Model, tmp: &Path, name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let dir = tmp.join(name);
    iresnetc::bundle::write_bundle(model, &dir, &Default::default())?;
    let plan = std::fs::read(dir.join(iresnetc_runtime::plan::PLAN_FILE))?;
    let manifest = std::fs::read(dir.join(iresnetc_runtime::tract::MANIFEST_FILE))?;
    Ok((plan, manifest))
}

/// The bytes of an `.npy` file of `rows` (per-sample shape `per_sample`), via a scratch file.
fn npy_bytes(
    tmp: &Path,
    rows: &[Vec<f64>],
    per_sample: &[usize],
    f32_out: bool,
) -> Result<Vec<u8>> {
    let path = tmp.join("array.npy");
    iresnetc::npy::write(&path, rows, per_sample, f32_out)?;
    Ok(std::fs::read(&path)?)
}

fn main() -> Result<()> {
    let Some(corpus) = std::env::args_os().nth(1).map(PathBuf::from) else {
        bail!("usage: fuzz_seeds CORPUS_DIR (the repository's is fuzz/corpus)");
    };
    let tmp = std::env::temp_dir().join(format!("iresnetc-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    let result = generate(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let seeds = result?;

    for (target, _) in TARGETS {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let mine: Vec<&(String, String, Vec<u8>)> =
            seeds.iter().filter(|(t, _, _)| t == target).collect();
        if mine.is_empty() {
            bail!("no seed generated for target {target}");
        }
        let mut written = BTreeSet::new();
        for (_, file, bytes) in mine {
            // A seed its loader refuses is a generator bug: stop before writing it.
            accepts(target, bytes).map_err(|e| anyhow::anyhow!("{target}/{file}: {e}"))?;
            let path = dir.join(file);
            std::fs::write(&path, bytes).with_context(|| path.display().to_string())?;
            println!("wrote {} ({} bytes)", path.display(), bytes.len());
            written.insert(file.clone());
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_file() && !written.contains(&name) {
                std::fs::remove_file(entry.path())?;
                println!("removed stale seed {}", entry.path().display());
            }
        }
    }
    Ok(())
}

/// Every seed as `(target, file name, bytes)`.
fn generate(tmp: &Path) -> Result<Vec<(String, String, Vec<u8>)>> {
    let mut seeds = vec![];
    let mut add = |target: &str, file: &str, bytes: Vec<u8>| {
        seeds.push((target.to_string(), file.to_string(), bytes));
    };

    let mut tomls: Vec<PathBuf> = std::fs::read_dir(models_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    tomls.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    tomls.sort();
    for p in &tomls {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        add("model_file", &name.unwrap_or_default(), std::fs::read(p)?);
    }
    add(
        "model_file",
        "fuzz-flow.toml",
        FUZZ_MODEL.as_bytes().to_vec(),
    );

    let fuzz = fuzz_model()?;
    add(
        "weights",
        "fuzz-flow.safetensors",
        iresnetc::weights::to_safetensors(&iresnetc::weights::init(&fuzz.graph, 1))?,
    );

    let (plan, manifest) = bundle_files(&fuzz, tmp, "fuzz-flow")?;
    add("plan", "fuzz-flow.json", plan);
    add("manifest", "fuzz-flow.json", manifest);
    let (_, manifest) = bundle_files(&shipped("toy2d-small.toml")?, tmp, "toy2d-small")?;
    add("manifest", "toy2d-small.json", manifest);
    let (_, manifest) = bundle_files(&shipped("cifar-tiny.toml")?, tmp, "cifar-tiny")?;
    add("manifest", "cifar-tiny.json", manifest);
    // A whole shipped model's plan runs to 100s of kB (one kernel per op and block), which
    // makes each execution slow; one block per stage keeps every kind of step and layout.
    let (plan, _) = bundle_files(&shipped_one_block("cifar-tiny.toml")?, tmp, "cifar-tiny-1")?;
    add("plan", "cifar-tiny-1-block.json", plan);

    let row =
        |n: usize, k: usize| -> Vec<f64> { (0..n).map(|i| (i + k) as f64 * 0.25 - 1.0).collect() };
    add(
        "npy",
        "f32-vector.npy",
        npy_bytes(tmp, &[row(4, 0), row(4, 1), row(4, 2)], &[4], true)?,
    );
    add(
        "npy",
        "f64-vector.npy",
        npy_bytes(tmp, &[row(4, 3), row(4, 4)], &[4], false)?,
    );
    add(
        "npy",
        "f32-image.npy",
        npy_bytes(tmp, &[row(4, 5), row(4, 6)], &[1, 2, 2], true)?,
    );
    Ok(seeds)
}
