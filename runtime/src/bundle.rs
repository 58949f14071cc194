//! Loading a compiled bundle directory and checking it before any GPU work.
//!
//! Everything that can be checked without a device is checked here, so that a damaged or
//! mismatched bundle fails with a message naming the file, not with a wgpu validation error
//! halfway through a run. Loading never panics on bad data.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, RuntimeError};
use crate::fsread::{read_bounded, read_text_bounded, sha256_hex, MAX_JSON_FILE};
use crate::plan::{BufferInit, Plan, BUNDLE_FORMAT, BUNDLE_VERSION, PLAN_FILE, WEIGHTS_FILE};

/// One f32 tensor from `weights.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A bundle in memory: the plan, the WGSL sources and the weights, all checked against each other.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// Where it was loaded from (empty for `from_parts`).
    pub dir: PathBuf,
    pub plan: Plan,
    /// WGSL source by file name as written in `KernelDecl::file`.
    pub shaders: BTreeMap<String, String>,
    pub weights: BTreeMap<String, WeightTensor>,
}

impl Bundle {
    /// Reads and checks `dir/plan.json`, the WGSL files it names and `dir/weights.safetensors`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Bundle> {
        let dir = dir.as_ref();
        let plan = load_plan(dir)?;
        let plan_path = dir.join(PLAN_FILE);

        let mut shaders = BTreeMap::new();
        for kernel in &plan.kernels {
            if shaders.contains_key(&kernel.file) {
                continue;
            }
            check_relative(&kernel.file).map_err(|reason| {
                RuntimeError::corrupt(
                    &plan_path,
                    format!("kernel {:?} file {:?}: {reason}", kernel.name, kernel.file),
                )
            })?;
            let bytes = read_verified(dir, &plan, &kernel.file, MAX_JSON_FILE, "WGSL file")?;
            let source = String::from_utf8(bytes).map_err(|e| {
                RuntimeError::corrupt(
                    dir.join(&kernel.file),
                    format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
                )
            })?;
            shaders.insert(kernel.file.clone(), source);
        }

        let weights_path = dir.join(WEIGHTS_FILE);
        let weights = if plan.weight_tensors().is_empty() && !weights_path.exists() {
            // A plan without weights (a test kernel, an identity model) needs no weight file.
            BTreeMap::new()
        } else {
            let bytes = read_verified(
                dir,
                &plan,
                WEIGHTS_FILE,
                max_weights_bytes(&plan),
                "weights file",
            )?;
            parse_weights(&bytes).map_err(|reason| RuntimeError::corrupt(&weights_path, reason))?
        };

        let mut bundle =
            Bundle::from_parts(plan, shaders, weights).map_err(|e| with_file(e, &weights_path))?;
        bundle.dir = dir.to_path_buf();
        Ok(bundle)
    }

    /// A bundle from data already in memory (used by the compiler to run what it just
    /// generated without writing files). Performs the same checks as [`Bundle::load`].
    pub fn from_parts(
        plan: Plan,
        shaders: BTreeMap<String, String>,
        weights: BTreeMap<String, WeightTensor>,
    ) -> Result<Bundle> {
        plan.validate()?;
        // What the plan's buffers take for one sample, before any is allocated.
        let bytes = plan.buffers.iter().fold(0u64, |acc, b| {
            acc.saturating_add(crate::buffers::buffer_bytes(b, 1))
        });
        crate::fsread::check_budget("the plan's buffers (plan.json) at batch 1", bytes)?;
        for kernel in &plan.kernels {
            if !shaders.contains_key(&kernel.file) {
                return Err(RuntimeError::MissingFile(PathBuf::from(&kernel.file)));
            }
        }
        check_weights(&plan, &weights)?;
        Ok(Bundle {
            dir: PathBuf::new(),
            plan,
            shaders,
            weights,
        })
    }

    /// WGSL source of a kernel of this bundle's plan.
    pub fn shader_source(&self, kernel: &str) -> Option<&str> {
        let decl = self.plan.kernel(kernel)?;
        self.shaders.get(&decl.file).map(String::as_str)
    }
}

/// Reads and checks `dir/plan.json` (format, version, internal consistency), bounded in size.
/// Every loader of a bundle (wgpu, tract, the compiler's reference path) starts here.
pub fn load_plan(dir: &Path) -> Result<Plan> {
    if !dir.is_dir() {
        return Err(RuntimeError::MissingFile(dir.to_path_buf()));
    }
    let plan_path = dir.join(PLAN_FILE);
    if !plan_path.exists() {
        return Err(RuntimeError::MissingFile(plan_path));
    }
    let plan_text = read_text_bounded(&plan_path, MAX_JSON_FILE, "plan.json")?;
    parse_plan(&plan_text).map_err(|e| with_file(e, &plan_path))
}

/// Reads `dir/file` (bounded by `max`) and, when the plan records file hashes, checks the
/// bytes against `plan.integrity[file]`: a file edited after compiling, or one the plan does
/// not vouch for, is refused naming the file.
pub fn read_verified(dir: &Path, plan: &Plan, file: &str, max: u64, what: &str) -> Result<Vec<u8>> {
    check_relative(file).map_err(|reason| {
        RuntimeError::corrupt(dir.join(PLAN_FILE), format!("file {file:?}: {reason}"))
    })?;
    let path = dir.join(file);
    if !path.exists() {
        return Err(RuntimeError::MissingFile(path));
    }
    let bytes = read_bounded(&path, max, what)?;
    if plan.integrity.is_empty() {
        return Ok(bytes);
    }
    match plan.integrity.get(file) {
        None => Err(RuntimeError::corrupt(
            path,
            "plan.json records no hash for this file; recompile the bundle",
        )),
        Some(want) if *want != sha256_hex(&bytes) => Err(RuntimeError::corrupt(
            path,
            "SHA-256 differs from the one plan.json records: the file was changed after compiling; recompile the bundle",
        )),
        Some(_) => Ok(bytes),
    }
}

/// Refuses a bundle whose plan records no file hashes (compiled before hashes existed, or
/// with the field removed): nothing it holds could be checked.
pub fn require_integrity(dir: &Path, plan: &Plan) -> Result<()> {
    if plan.integrity.is_empty() {
        return Err(RuntimeError::corrupt(
            dir.join(PLAN_FILE),
            "no \"integrity\" hashes: the bundle cannot be checked; recompile it with this iresnetc",
        ));
    }
    Ok(())
}

/// The largest `weights.safetensors` the plan can need: 4 bytes per declared weight element
/// plus room for the JSON header.
fn max_weights_bytes(plan: &Plan) -> u64 {
    plan.buffers
        .iter()
        .filter(|b| b.init.is_weight())
        .fold(16u64 << 20, |acc, b| {
            acc.saturating_add(b.elems.saturating_mul(4))
        })
}

/// Parses `plan.json`, checking format and version *before* the full schema, so that a bundle
/// from another version is refused as such rather than as "unknown field".
pub fn parse_plan(text: &str) -> Result<Plan> {
    let corrupt = |reason: String| RuntimeError::corrupt(PLAN_FILE, reason);
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| corrupt("top level is not a JSON object".to_string()))?;
    match object.get("format").and_then(|f| f.as_str()) {
        Some(BUNDLE_FORMAT) => {}
        Some(other) => {
            return Err(corrupt(format!(
                "format is {other:?}, expected {BUNDLE_FORMAT:?}: not an iresnetc bundle"
            )))
        }
        None => {
            return Err(corrupt(format!(
                "no \"format\": {BUNDLE_FORMAT:?} field: not an iresnetc bundle"
            )))
        }
    }
    let version = object
        .get("version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| corrupt("no numeric \"version\" field".to_string()))?;
    if version != u64::from(BUNDLE_VERSION) {
        return Err(RuntimeError::BundleVersion {
            found: u32::try_from(version).unwrap_or(u32::MAX),
            expected: BUNDLE_VERSION,
        });
    }
    // Parse the text again rather than the Value: serde_json then reports line and column.
    let plan: Plan = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    plan.validate()?;
    Ok(plan)
}

/// Decodes a safetensors file into f32 tensors; any other dtype is refused.
pub fn parse_weights(bytes: &[u8]) -> std::result::Result<BTreeMap<String, WeightTensor>, String> {
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor {name:?} has dtype {:?}; the runtime reads F32 only",
                view.dtype()
            ));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // A NaN or infinite weight would run and give NaN outputs with exit code 0.
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "tensor {name:?} element {i} is {} (weights must be finite)",
                data[i]
            ));
        }
        out.insert(
            name,
            WeightTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Weights must be exactly the tensors the plan names, with matching element counts.
/// Errors are reported on `weights.safetensors`.
fn check_weights(plan: &Plan, weights: &BTreeMap<String, WeightTensor>) -> Result<()> {
    let corrupt = |reason: String| RuntimeError::corrupt(WEIGHTS_FILE, reason);
    let needed = plan.weight_tensors();
    let missing: Vec<String> = plan
        .buffers
        .iter()
        .flat_map(|b| {
            b.init
                .tensors()
                .into_iter()
                .filter(|t| !weights.contains_key(*t))
                .map(move |t| format!("{t:?} (for buffer {:?})", b.name))
        })
        .collect();
    if !missing.is_empty() {
        return Err(corrupt(format!("missing tensors: {}", missing.join(", "))));
    }
    let extra: Vec<&str> = weights
        .keys()
        .map(String::as_str)
        .filter(|name| !needed.contains(name))
        .collect();
    if !extra.is_empty() {
        return Err(corrupt(format!(
            "tensors not used by plan.json (bundle files out of sync?): {}",
            extra.join(", ")
        )));
    }
    for b in &plan.buffers {
        if let BufferInit::Weight { tensor, .. } = &b.init {
            let t = &weights[tensor];
            let count: usize = t.shape.iter().product();
            if count != t.data.len() {
                return Err(corrupt(format!(
                    "tensor {tensor:?} has shape {:?} but {} values",
                    t.shape,
                    t.data.len()
                )));
            }
            if count as u64 != b.elems {
                return Err(corrupt(format!(
                    "tensor {tensor:?} has {count} elements (shape {:?}) but buffer {:?} declares {}",
                    t.shape, b.name, b.elems
                )));
            }
        }
        if let BufferInit::Packed { parts } = &b.init {
            let total = parts
                .iter()
                .fold(0u64, |a, t| a.saturating_add(weights[t].data.len() as u64));
            if total != b.elems {
                return Err(corrupt(format!(
                    "tensors {parts:?} hold {total} elements together but buffer {:?} packs {}",
                    b.name, b.elems
                )));
            }
        }
    }
    Ok(())
}

/// A file named by a plan or manifest must stay inside the bundle directory.
pub fn check_relative(file: &str) -> std::result::Result<(), &'static str> {
    let path = Path::new(file);
    if path.is_absolute() {
        return Err("must be relative to the bundle directory");
    }
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err("must not leave the bundle directory");
    }
    Ok(())
}

/// Replaces the bare file name of a `BundleCorrupt` error by the full path.
fn with_file(e: RuntimeError, full: &Path) -> RuntimeError {
    match e {
        RuntimeError::BundleCorrupt { file, reason } if full.ends_with(&file) => {
            RuntimeError::BundleCorrupt {
                file: full.to_path_buf(),
                reason,
            }
        }
        other => other,
    }
}
