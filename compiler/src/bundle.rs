//! Writing a compiled bundle directory, atomically: everything goes into `DIR.tmp-<pid>`,
//! which is renamed to `DIR` only when complete, so a failed or interrupted compile never
//! leaves a half-written bundle where the runtime would load it.
//!
//! Contents: `model.toml` (the spec), `weights.safetensors` (normalized, f32), `plan.json`,
//! one `.wgsl` per distinct kernel source, `report.json` (the model summary with the
//! Lipschitz certificate, plus per entry point dispatch counts and FLOPs), and the ONNX graphs
//! of the tract backend ([`crate::onnx::write_bundle_graphs`]), and `net.json`, the network
//! description the native CPU engine runs ([`crate::netdesc`]).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::codegen::{self, CodegenOptions, CodegenReport};
use crate::error::{Error, Result};
use crate::pipeline::{Model, Summary};

#[derive(Clone, Copy, Debug, Default)]
pub struct BundleOptions {
    pub codegen: CodegenOptions,
}

/// `report.json`.
#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    summary: Summary<'a>,
    codegen: &'a CodegenReport,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Generates and writes the bundle of `model` to `dir` (replacing an existing bundle there;
/// any other existing directory is refused, see [`crate::output`]). `plan.json` records the
/// SHA-256 of every other file, so a loader can tell a bundle changed after compiling.
pub fn write_bundle(model: &Model, dir: &Path, opts: &BundleOptions) -> Result<CodegenReport> {
    // Everything in the bundle derives from the weights it stores (f32): a loader compiles
    // them again and compares (`bundle_check`), so constants folded from the weights (ActNorm
    // scales in the ONNX graphs) must come from the f32 values, not the f64 ones before
    // rounding.
    let mut stored = model.clone();
    for t in stored.graph.params.values_mut() {
        t.data.iter_mut().for_each(|v| *v = f64::from(*v as f32));
    }
    let model = &stored;
    let mut gen = codegen::generate(model, &opts.codegen)?;
    // Inside a command's output transaction the directory is staged there and renamed at
    // commit; otherwise (library use) here, with the same checks.
    let staged = crate::output::stage_dir(dir)?;
    let tmp = match &staged {
        Some(t) => t.clone(),
        None => {
            crate::output::check_target(&crate::output::Output::bundle(dir, "bundle"))?;
            let tmp = tmp_dir(dir);
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
            }
            if let Some(parent) = tmp.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::create_dir(&tmp).map_err(io(&tmp))?;
            tmp
        }
    };
    let result = (|| -> Result<()> {
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(io(&p))
        };
        let spec = toml::to_string(&model.graph.spec).map_err(|e| Error::Codegen {
            context: "model.toml".into(),
            message: e.to_string(),
        })?;
        write("model.toml", spec.as_bytes())?;
        write(
            iresnetc_runtime::plan::WEIGHTS_FILE,
            &crate::weights::to_safetensors(&model.graph.params)?,
        )?;
        for (file, source) in &gen.shaders {
            write(file, source.as_bytes())?;
        }
        let json = |v: &dyn erased::Json| v.to_json();
        write(
            "report.json",
            json(&Report {
                summary: model.summary(),
                codegen: &gen.report,
            })?
            .as_bytes(),
        )?;
        // ONNX: the whole forward graph, and the per-block segments the tract backend runs.
        crate::onnx::write_bundle_graphs(model, &tmp)?;
        // The network description the native CPU engine runs.
        write(
            iresnetc_runtime::cpu::net::NET_FILE,
            crate::netdesc::describe(model)?.to_json().as_bytes(),
        )?;
        gen.plan.integrity = hash_files(&tmp)?;
        // Last: a directory with a plan.json is a bundle to the runtime. It is right by
        // construction: a loader need not compile it again to check it.
        let plan = json(&gen.plan)?;
        write(iresnetc_runtime::plan::PLAN_FILE, plan.as_bytes())?;
        crate::bundle_check::remember(plan.as_bytes());
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if staged.is_none() {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            io(dir)(e)
        })?;
    }
    Ok(gen.report)
}

/// SHA-256 of every file under `dir` (the bundle being written, before its plan.json), keyed by
/// the path relative to `dir` with `/` separators (`segments/000.forward.onnx`).
fn hash_files(dir: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = pending.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let entry = entry.map_err(io(&d))?;
            let path = entry.path();
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.file_type().map_err(io(&path))?.is_dir() {
                pending.push((path, format!("{name}/")));
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            out.insert(name, iresnetc_runtime::fsread::sha256_hex(&bytes));
        }
    }
    Ok(out)
}

/// Checks a bundle directory before anything relies on it: `plan.json` (format, version,
/// consistency), file hashes present, `model.toml` (read through its hash) agreeing with
/// the plan (name, kind, input shape), and what every file means
/// ([`crate::bundle_check`]: derived files agree with the model, weights contractive). Every command that takes a bundle goes through this,
/// whatever the backend. Every other file is checked against its hash when it is read
/// (`iresnetc_runtime::bundle::read_verified`, the one reader all loaders use), so each file
/// is hashed once, and a file a backend does not use costs nothing.
pub fn verify_bundle(dir: &Path) -> Result<iresnetc_runtime::Plan> {
    let plan = verify_bytes(dir)?;
    let spec = read_spec(dir, &plan)?;
    crate::bundle_check::check_meaning_once(dir, &plan, &spec)?;
    Ok(plan)
}

/// The model a bundle holds, after every check of [`verify_bundle`], with the certificate
/// verified against its weights.
pub fn load_verified(dir: &Path) -> Result<Model> {
    let plan = verify_bytes(dir)?;
    let spec = read_spec(dir, &plan)?;
    crate::bundle_check::check_meaning(dir, &plan, &spec)
}

/// The byte-level half of [`verify_bundle`]: plan, hashes present, model.toml agreeing with
/// the plan's name, kind and input.
fn verify_bytes(dir: &Path) -> Result<iresnetc_runtime::Plan> {
    use iresnetc_runtime::bundle::{load_plan, require_integrity};
    let plan = load_plan(dir)?;
    require_integrity(dir, &plan)?;
    let spec = read_spec(dir, &plan)?;
    let toml = dir.join("model.toml");
    let kind = match spec.kind {
        crate::spec::ModelKind::Flow => iresnetc_runtime::ModelKind::Flow,
        crate::spec::ModelKind::Classifier => iresnetc_runtime::ModelKind::Classifier,
    };
    if spec.name != plan.model || kind != plan.kind || spec.input != plan.input_shape {
        return Err(Error::SpecInvalid {
            file: toml,
            field: "name / kind / input".into(),
            reason: format!(
                "model.toml says {:?} ({:?}, input {:?}) but plan.json says {:?} ({:?}, input {:?})",
                iresnetc_runtime::fsread::clip(&spec.name, 40),
                spec.kind,
                spec.input,
                iresnetc_runtime::fsread::clip(&plan.model, 40),
                plan.kind,
                plan.input_shape
            ),
        });
    }
    Ok(plan)
}

/// A bundle's `model.toml`, read through the plan's hash check.
pub fn read_spec(dir: &Path, plan: &iresnetc_runtime::Plan) -> Result<crate::spec::ModelSpec> {
    let bytes = iresnetc_runtime::bundle::read_verified(
        dir,
        plan,
        "model.toml",
        iresnetc_runtime::fsread::MAX_MODEL_FILE,
        "model file",
    )?;
    let path = dir.join("model.toml");
    let text = String::from_utf8(bytes).map_err(|_| Error::SpecParse {
        file: path.clone(),
        message: "not UTF-8 text".into(),
    })?;
    crate::spec::ModelSpec::from_toml(&text, &path)
}

/// `report.json` of `model` with `codegen` as a JSON value (what a loader compares with).
pub(crate) fn report_json(model: &Model, codegen: &CodegenReport) -> Result<serde_json::Value> {
    serde_json::to_value(Report {
        summary: model.summary(),
        codegen,
    })
    .map_err(|e| Error::Codegen {
        context: "report.json".into(),
        message: e.to_string(),
    })
}

/// `DIR.tmp-<pid>` next to `DIR`.
fn tmp_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    dir.with_file_name(format!("{name}.tmp-{}", std::process::id()))
}

/// Pretty JSON of any serializable value, as a crate error on failure.
mod erased {
    use crate::error::{Error, Result};

    pub trait Json {
        fn to_json(&self) -> Result<String>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String> {
            serde_json::to_string_pretty(self).map_err(|e| Error::Codegen {
                context: "JSON".into(),
                message: e.to_string(),
            })
        }
    }
}
