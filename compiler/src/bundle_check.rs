//! A bundle's hashes stop accidents, not edits: anyone can recompute them. So loading also
//! checks what the files *mean*: the one model description (`model.toml` plus the weights)
//! is compiled again in memory, and every file derived from it (the plan's buffers, kernels
//! and dispatches with their batch-folded alternatives, the WGSL, `net.json`, the ONNX
//! manifest and graphs, `report.json`) must be exactly what that gives. The contraction of
//! every residual branch is certified again from the weights themselves (per layer, the same
//! certified bounds the compiler uses; nothing estimated), and the certificate the report
//! carries must agree with it. Every path the integrity table names stays inside the bundle
//! and is an existing regular file.

use std::path::Path;
use std::sync::Mutex;

use iresnetc_runtime::bundle::{check_relative, read_verified};
use iresnetc_runtime::fsread::{clip, memory_budget, sha256_hex, MAX_JSON_FILE};
use iresnetc_runtime::plan::{Plan, PLAN_FILE, WEIGHTS_FILE};

use crate::codegen::{self, CodegenOptions, Tiling};
use crate::error::{Error, Result};
use crate::passes::lipschitz::{banach_iters, block_bounds, truncation_bound, LipschitzReport};
use crate::pipeline::Model;
use crate::spec::ModelSpec;

/// Relative slack between a certificate computed at compile time (on the f64 weights) and
/// the one computed here (on the f32 weights the bundle stores).
const ROUNDING_SLACK: f64 = 1e-5;

/// Bundles already checked by this process (keys of [`state_key`]), for when no cache
/// directory can be written.
static CHECKED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Where bundles that passed the check are remembered across commands: `IRESNETC_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/iresnetc`, else `$HOME/.cache/iresnetc`.
pub const CACHE_ENV: &str = "IRESNETC_CACHE_DIR";

fn corrupt(file: &Path, reason: impl Into<String>) -> Error {
    Error::WeightsFile {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

/// The model of the bundle in `dir` with its certificate; unless this exact bundle state
/// already passed, checks its meaning first (see the module doc). `plan` and `spec` have
/// passed their hash checks.
pub fn check_meaning(dir: &Path, plan: &Plan, spec: &ModelSpec) -> Result<Model> {
    let verified = state_key(dir).is_some_and(|k| is_checked(&k));
    if !verified {
        check_integrity_paths(dir, plan)?;
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = read_verified(dir, plan, WEIGHTS_FILE, memory_budget()?, "weights file")?;
    let mut graph = crate::ir::build(spec)?;
    graph.params = crate::weights::load_bytes(&graph, &bytes, &weights_path)?;
    let shapes = crate::passes::infer_shapes(&mut graph)?;
    let lipschitz = read_certificate(dir, plan)?;
    let model = Model {
        graph,
        shapes,
        lipschitz,
    };
    if verified {
        return Ok(model);
    }
    // The contraction, from the weights alone.
    let bounds = block_bounds(&model.graph);
    for (name, bound) in &bounds {
        if bound.is_nan() || *bound >= 1.0 {
            return Err(corrupt(
                &weights_path,
                format!(
                    "block `{}`: the weights certify a Lipschitz bound of {bound:.6} >= 1 for its residual branch: not invertible, refusing the bundle",
                    clip(name, 60)
                ),
            ));
        }
    }
    check_certificate(dir, &model.lipschitz, &model.graph, &bounds)?;
    check_derived(dir, plan, &model)?;
    mark_checked(dir);
    Ok(model)
}

/// [`check_meaning`] without keeping the model (skipped when the state already passed).
pub fn check_meaning_once(dir: &Path, plan: &Plan, spec: &ModelSpec) -> Result<()> {
    if state_key(dir).is_some_and(|k| is_checked(&k)) {
        return Ok(());
    }
    check_meaning(dir, plan, spec).map(|_| ())
}

/// The key of a bundle's state: this compiler's version and the SHA-256 of its plan.json,
/// which holds the hash of every other file (each checked again whenever it is read).
fn state_key(dir: &Path) -> Option<String> {
    let bytes = std::fs::read(dir.join(PLAN_FILE)).ok()?;
    Some(plan_key(&bytes))
}

fn plan_key(plan_bytes: &[u8]) -> String {
    let mut v = format!("iresnetc {}\n", env!("CARGO_PKG_VERSION")).into_bytes();
    v.extend_from_slice(plan_bytes);
    sha256_hex(&v)
}

fn cache_dir() -> Option<std::path::PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = non_empty(CACHE_ENV) {
        return Some(d.into());
    }
    if let Some(d) = non_empty("XDG_CACHE_HOME").filter(|d| Path::new(d).is_absolute()) {
        return Some(Path::new(&d).join("iresnetc"));
    }
    non_empty("HOME").map(|h| Path::new(&h).join(".cache").join("iresnetc"))
}

fn marker(key: &str) -> Option<std::path::PathBuf> {
    Some(cache_dir()?.join("verified-bundles").join(key))
}

fn is_checked(key: &str) -> bool {
    CHECKED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|k| k == key)
        || marker(key).is_some_and(|m| m.is_file())
}

/// Remembers that the bundle whose plan.json is `plan_bytes` passed (or, from the compiler,
/// is right by construction): in this process, and in the cache directory when it can be
/// written (a cache: failing to write it changes nothing but the next load's time).
pub fn remember(plan_bytes: &[u8]) {
    let key = plan_key(plan_bytes);
    if let Some(m) = marker(&key) {
        let write = || -> std::io::Result<()> {
            if let Some(parent) = m.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = m.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, b"checked\n")?;
            std::fs::rename(&tmp, &m)
        };
        let _ = write();
    }
    CHECKED.lock().unwrap_or_else(|p| p.into_inner()).push(key);
}

fn mark_checked(dir: &Path) {
    if let Ok(bytes) = std::fs::read(dir.join(PLAN_FILE)) {
        remember(&bytes);
    }
}

/// Every integrity entry names a relative path inside the bundle that is a regular file (a
/// symlink could point anywhere; a missing file is a hash of nothing).
fn check_integrity_paths(dir: &Path, plan: &Plan) -> Result<()> {
    let plan_path = dir.join(PLAN_FILE);
    for (file, hash) in &plan.integrity {
        let name = clip(file, 80);
        if let Err(reason) = check_relative(file) {
            return Err(corrupt(
                &plan_path,
                format!("integrity entry {name:?}: {reason}"),
            ));
        }
        if file.is_empty() || file == PLAN_FILE {
            return Err(corrupt(
                &plan_path,
                format!("integrity entry {name:?}: not a file the plan can vouch for"),
            ));
        }
        match std::fs::symlink_metadata(dir.join(file)) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(corrupt(
                    &plan_path,
                    format!("integrity entry {name:?}: not a regular file of the bundle (a link or a directory)"),
                ))
            }
            Err(_) => {
                return Err(corrupt(
                    &plan_path,
                    format!("integrity entry {name:?}: no such file in the bundle"),
                ))
            }
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(corrupt(
                &plan_path,
                format!("integrity entry {name:?}: not a SHA-256 in hex"),
            ));
        }
    }
    Ok(())
}

/// The certificate in `report.json`, held to the bounds just computed from the weights: the
/// same blocks, a bound per block no tighter than the weights give (up to f32 rounding),
/// each block's layers multiplying to it, and the inverse step counts and truncation bounds
/// that follow from it.
fn check_certificate(
    dir: &Path,
    report: &LipschitzReport,
    g: &crate::ir::Graph,
    bounds: &[(String, f64)],
) -> Result<()> {
    let path = dir.join("report.json");
    if report.blocks.len() != bounds.len() {
        return Err(corrupt(
            &path,
            format!(
                "field `lipschitz.blocks`: {} blocks, the model has {}",
                report.blocks.len(),
                bounds.len()
            ),
        ));
    }
    let by_name: std::collections::HashMap<&str, f64> = report
        .layers
        .iter()
        .map(|l| (l.name.as_str(), l.certified_bound))
        .collect();
    for (bi, (b, (name, ours))) in report.blocks.iter().zip(bounds).enumerate() {
        let field = format!("lipschitz.blocks[{bi}]");
        let bad = |reason: String| Err(corrupt(&path, format!("field `{field}`: {reason}")));
        if &b.name != name {
            return bad(format!(
                "names block {:?}, the model's is {:?}",
                clip(&b.name, 40),
                clip(name, 40)
            ));
        }
        let l = b.lipschitz_bound;
        if l.is_nan() || l >= 1.0 || l < ours * (1.0 - ROUNDING_SLACK) {
            return bad(format!(
                "claims a Lipschitz bound of {l:.6}, the weights certify {ours:.6}"
            ));
        }
        let layers: f64 = g.blocks[bi]
            .body
            .iter()
            .filter(|&&ix| g.dag[ix].op.is_linear())
            .map(|&ix| {
                by_name
                    .get(g.dag[ix].name.as_str())
                    .copied()
                    .unwrap_or(f64::NAN)
            })
            .product();
        if !close(layers, l) {
            return bad(format!(
                "bound {l:.6} is not the product of its layers' bounds ({layers:.6})"
            ));
        }
        let dim: usize = g.dag[g.blocks[bi].actnorm].shape.iter().product();
        let iters = banach_iters(l, g.spec.inverse.tol, 1.0);
        let trunc = truncation_bound(l, g.spec.logdet.terms, dim);
        if b.inverse_iters != iters
            || b.dim != dim
            || b.macs != g.block_macs(bi)
            || !close(b.logdet_truncation_bound, trunc)
        {
            return bad(format!(
                "inverse_iters {} / dim {} / macs {} do not follow from its bound and the model ({iters} / {dim} / {})",
                b.inverse_iters,
                b.dim,
                b.macs,
                g.block_macs(bi)
            ));
        }
    }
    let max = report
        .blocks
        .iter()
        .map(|b| b.lipschitz_bound)
        .fold(0.0, f64::max);
    if report.max_block_bound != max {
        return Err(corrupt(
            &path,
            format!(
                "field `lipschitz.max_block_bound`: {} but its blocks' largest is {max}",
                report.max_block_bound
            ),
        ));
    }
    Ok(())
}

/// `a` equals `b` to 1e-9 relative (false for NaN).
fn close(a: f64, b: f64) -> bool {
    let d = (a - b).abs();
    d.is_finite() && d <= 1e-9 * b.abs().max(1e-300)
}

/// The certificate `report.json` carries (read through its hash).
fn read_certificate(dir: &Path, plan: &Plan) -> Result<LipschitzReport> {
    let path = dir.join("report.json");
    let bytes = read_verified(dir, plan, "report.json", MAX_JSON_FILE, "report")?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(&path, format!("not valid JSON: {e}")))?;
    value
        .get("lipschitz")
        .cloned()
        .ok_or_else(|| corrupt(&path, "no \"lipschitz\" certificate"))
        .and_then(|v| {
            serde_json::from_value(v).map_err(|e| corrupt(&path, format!("field `lipschitz`: {e}")))
        })
}

/// The first place two JSON values differ, as a path (`entry_points.inverse.steps[3]`).
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                let here = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => {
                        if let Some(d) = first_difference(p, q, &here) {
                            return Some(d);
                        }
                    }
                    _ => return Some(here),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if let Some(d) = first_difference(p, q, &format!("{at}[{i}]")) {
                    return Some(d);
                }
            }
            (x.len() != y.len()).then(|| format!("{at} (length {} vs {})", x.len(), y.len()))
        }
        _ => (a != b).then(|| at.to_string()),
    }
}

fn disagree(dir: &Path, file: &str, place: Option<String>) -> Result<()> {
    match place {
        None => Ok(()),
        Some(p) => Err(corrupt(
            &dir.join(file),
            format!(
                "`{}` does not agree with what model.toml and the weights compile to; the file was edited after compiling (recompile the bundle)",
                clip(&p, 120)
            ),
        )),
    }
}

/// A file's bytes as the plan vouches for them, parsed as JSON.
fn read_json(dir: &Path, plan: &Plan, file: &str) -> Result<serde_json::Value> {
    let bytes = read_verified(dir, plan, file, MAX_JSON_FILE, file)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(&dir.join(file), format!("not valid JSON: {e}")))
}

/// Every derived file against the one the model compiles to.
fn check_derived(dir: &Path, plan: &Plan, model: &Model) -> Result<()> {
    let plan_path = dir.join(PLAN_FILE);
    let fuse = plan.meta.get("fused").and_then(|v| v.as_bool());
    let tiling = [Tiling::CPU, Tiling::GPU]
        .into_iter()
        .find(|t| serde_json::to_value(t).ok().as_ref() == plan.meta.get("tiling"));
    let (Some(fuse), Some(tiling)) = (fuse, tiling) else {
        return Err(corrupt(
            &plan_path,
            "field `meta`: no known \"fused\" and \"tiling\": the plan cannot be checked against the model (recompile the bundle)",
        ));
    };
    let gen = codegen::generate(model, &CodegenOptions { fuse, tiling })?;
    let mut ours = gen.plan.clone();
    ours.integrity = plan.integrity.clone();
    disagree(
        dir,
        PLAN_FILE,
        first_difference(&to_value(&ours)?, &to_value(plan)?, ""),
    )?;
    for (file, source) in &gen.shaders {
        if plan.integrity.get(file) != Some(&sha256_hex(source.as_bytes())) {
            return disagree(dir, file, Some("the WGSL source".into()));
        }
    }
    let net = crate::netdesc::describe(model)?.to_json();
    let net: serde_json::Value = serde_json::from_str(&net).unwrap_or_default();
    let net_file = iresnetc_runtime::cpu::net::NET_FILE;
    disagree(
        dir,
        net_file,
        first_difference(&net, &read_json(dir, plan, net_file)?, ""),
    )?;
    let report = crate::bundle::report_json(model, &gen.report)?;
    disagree(
        dir,
        "report.json",
        first_difference(&report, &read_json(dir, plan, "report.json")?, ""),
    )?;
    let (manifest, files) = crate::onnx::bundle_graphs(model)?;
    let manifest_file = iresnetc_runtime::tract::MANIFEST_FILE;
    disagree(
        dir,
        manifest_file,
        first_difference(
            &to_value(&manifest)?,
            &read_json(dir, plan, manifest_file)?,
            "",
        ),
    )?;
    for (file, bytes) in &files {
        if plan.integrity.get(file) != Some(&sha256_hex(bytes)) {
            return disagree(dir, file, Some("the ONNX graph".into()));
        }
    }
    // And the plan vouches for nothing else: no file the compiler would not write.
    let known = |f: &str| {
        [
            "model.toml",
            WEIGHTS_FILE,
            "report.json",
            net_file,
            manifest_file,
        ]
        .contains(&f)
            || gen.shaders.contains_key(f)
            || files.contains_key(f)
    };
    if let Some(extra) = plan.integrity.keys().find(|f| !known(f)) {
        return Err(corrupt(
            &plan_path,
            format!(
                "integrity entry {:?}: not a file the compiler writes into a bundle",
                clip(extra, 80)
            ),
        ));
    }
    Ok(())
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Codegen {
        context: "JSON".into(),
        message: e.to_string(),
    })
}
