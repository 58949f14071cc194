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

/// Generates and writes the bundle of `model` to `dir` (replacing an existing bundle there).
pub fn write_bundle(model: &Model, dir: &Path, opts: &BundleOptions) -> Result<CodegenReport> {
    let gen = codegen::generate(model, &opts.codegen)?;
    let tmp = tmp_dir(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    if let Some(parent) = tmp.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
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
        // Last of the GPU files: a directory with a plan.json is a bundle to the runtime.
        write(
            iresnetc_runtime::plan::PLAN_FILE,
            json(&gen.plan)?.as_bytes(),
        )?;
        // ONNX: the graphs the tract backend runs (forward, forward + log-det, inverse).
        crate::onnx::write_bundle_graphs(model, &tmp)?;
        // The network description the native CPU engine runs.
        write(
            iresnetc_runtime::cpu::net::NET_FILE,
            crate::netdesc::describe(model)?.to_json().as_bytes(),
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        io(dir)(e)
    })?;
    Ok(gen.report)
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
