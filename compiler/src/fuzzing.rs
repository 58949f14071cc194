//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz layout) and of the stable-Rust
//! mutation harness (`compiler/tests/fuzz_smoke.rs`): each takes arbitrary bytes and must
//! return (an `Ok` or an error) without panicking, hanging or allocating beyond what the
//! bytes justify. Shared so both drivers exercise exactly the same code.

use std::path::Path;
use std::sync::OnceLock;

use crate::ir::Graph;
use crate::spec::ModelSpec;

/// The model whose weights [`weights`] loads (small, so each execution is cheap).
pub const FUZZ_MODEL: &str = r#"
name = "fuzz-flow"
kind = "flow"
input = [4]
[[stages]]
blocks = 2
hidden = [8]
"#;

fn graph() -> &'static Graph {
    static G: OnceLock<Graph> = OnceLock::new();
    G.get_or_init(|| {
        let spec = ModelSpec::from_toml(FUZZ_MODEL, Path::new("fuzz.toml"))
            .unwrap_or_else(|e| unreachable!("the fuzz model is valid: {e}"));
        crate::ir::build(&spec).unwrap_or_else(|e| unreachable!("the fuzz model builds: {e}"))
    })
}

/// The model-file parser and validator (TOML -> [`ModelSpec`]), then the size estimate.
pub fn model_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = ModelSpec::from_toml(text, Path::new("fuzz.toml")) {
        let _ = spec.footprint();
    }
}

/// The safetensors weights loader, against [`FUZZ_MODEL`]'s parameters.
pub fn weights(data: &[u8]) {
    let _ = crate::weights::load_bytes(graph(), data, Path::new("fuzz.safetensors"));
    let _ = iresnetc_runtime::bundle::parse_weights(data);
}

/// The `.npy` reader, for a vector model and an image model.
pub fn npy(data: &[u8]) {
    let p = Path::new("fuzz.npy");
    let _ = crate::npy::parse_batch(data, p, "x", &[4]);
    let _ = crate::npy::parse_batch(data, p, "x", &[1, 2, 2]);
}

/// The bundle loader's `plan.json` parser and validator.
pub fn plan(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = iresnetc_runtime::bundle::parse_plan(text);
    }
}

/// The tract backend's `onnx.json` manifest parser and validator, then the probe matrix it
/// describes (offsets checked by the parser must keep this in bounds).
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = iresnetc_runtime::tract::Manifest::parse(text) {
        if let Some(p) = &m.probes {
            // Small matrices only: the point is the offsets, not generating 2^16 normals.
            let work = p.blocks.iter().fold(0usize, |a, b| {
                a.saturating_add(b.count.saturating_mul(b.dim))
            });
            if p.total <= 1 << 12 && work <= 1 << 12 {
                let _ = p.matrix(0, 0, 1);
            }
        }
    }
}

/// Whether `target`'s loader accepts `data` as valid (`Err` says why not). Every committed
/// seed must pass: a seed the loader refuses at its first check (an old format version, say)
/// leaves the mutations almost nothing past that check to exercise.
pub fn accepts(target: &str, data: &[u8]) -> Result<(), String> {
    let text = || std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"));
    match target {
        "model_file" => ModelSpec::from_toml(text()?, Path::new("seed.toml"))
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "weights" => {
            crate::weights::load_bytes(graph(), data, Path::new("seed.safetensors"))
                .map_err(|e| e.to_string())?;
            iresnetc_runtime::bundle::parse_weights(data).map(|_| ())
        }
        "npy" => {
            let p = Path::new("seed.npy");
            // Either of the two shapes the target reads.
            crate::npy::parse_batch(data, p, "x", &[4])
                .map(|_| ())
                .or_else(|_| crate::npy::parse_batch(data, p, "x", &[1, 2, 2]).map(|_| ()))
                .map_err(|e| e.to_string())
        }
        "plan" => iresnetc_runtime::bundle::parse_plan(text()?)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "manifest" => iresnetc_runtime::tract::Manifest::parse(text()?).map(|_| ()),
        other => Err(format!("no fuzz target {other:?}")),
    }
}

/// Every target by name (the harness and the README use these names).
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("model_file", model_file),
    ("weights", weights),
    ("npy", npy),
    ("plan", plan),
    ("manifest", manifest),
];
