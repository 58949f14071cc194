//! Shared by `hostile.rs` and `hostile_trust.rs`: tiny models, a workspace directory, and
//! `fails`, which runs the binary under a memory cap and checks the failure contract (exit
//! code 2, one line on stderr, no panic, the directory unchanged, within seconds).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Address-space cap of every run (KiB): tract and the binary map far less than this.
pub const MEMORY_CAP_KIB: u64 = 4 << 20;
pub const TIME_LIMIT: Duration = Duration::from_secs(20);

pub const FLOW: &str = r#"
name = "tiny-flow"
kind = "flow"
input = [4]
[[stages]]
blocks = 2
hidden = [8]
[logdet]
estimator = "series"
terms = 3
"#;

pub const CLASSIFIER: &str = r#"
name = "tiny-cls"
kind = "classifier"
input = [1, 4, 4]
[[stages]]
blocks = 1
width = 4
[head]
classes = 3
"#;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_iresnetc")
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("iresnetc-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every file under `dir` (relative path -> bytes; directories as empty markers).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.insert(rel, None);
                stack.push(p);
            } else if meta.is_file() {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            } else {
                out.insert(
                    rel,
                    Some(
                        std::fs::read_link(&p)
                            .unwrap_or_default()
                            .into_os_string()
                            .into_encoded_bytes(),
                    ),
                );
            }
        }
    }
    out
}

/// Runs `iresnetc ARGS` in `dir` under the memory cap; asserts the failure contract and that
/// stderr names every needle. Returns stderr.
pub fn fails(dir: &Path, args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let before = snapshot(dir);
    let start = Instant::now();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -v {MEMORY_CAP_KIB}; exec \"$0\" \"$@\""))
        .arg(bin())
        .args(args)
        .current_dir(dir)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .env("IRESNETC_CACHE_DIR", cache_dir())
        .env_remove("IRESNETC_THREADS")
        .env_remove("IRESNETC_MEMORY_LIMIT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let ctx = format!("args {args:?} env {env:?}: stderr {err:?}");
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line: {ctx}");
    assert!(
        err.len() < 1000,
        "message too long ({} bytes): {ctx}",
        err.len()
    );
    assert!(!err.contains("panicked"), "{ctx}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing: {ctx}");
    }
    assert!(took < TIME_LIMIT, "took {took:?}: {ctx}");
    let after = snapshot(dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files changed: {ctx}"
    );
    assert!(before == after, "file contents changed: {ctx}");
    err
}

/// The cache of checked bundles the runs of this test process share (never the user's).
pub fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("iresnetc-hostile-cache-{}", std::process::id()))
}

/// Runs and expects success; returns stderr.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    ok_env(dir, args, &[])
}

/// [`ok`] with extra environment variables.
pub fn ok_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .env("IRESNETC_CACHE_DIR", cache_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "args {args:?}: {err}");
    err
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn npy(dir: &Path, name: &str, rows: &[Vec<f64>], per_sample: &[usize]) {
    iresnetc::npy::write(&dir.join(name), rows, per_sample, false).unwrap();
}

/// A directory with the two tiny models, a valid input for each, and a compiled flow bundle.
pub fn workspace(name: &str, bundle: bool) -> PathBuf {
    let d = tmpdir(name);
    write(&d, "flow.toml", FLOW);
    write(&d, "cls.toml", CLASSIFIER);
    npy(
        &d,
        "x.npy",
        &[vec![0.1, -0.2, 0.3, 0.4], vec![1.0, 0.5, -0.5, 0.0]],
        &[4],
    );
    npy(&d, "img.npy", &[vec![0.25; 16]], &[1, 4, 4]);
    if bundle {
        ok(&d, &["compile", "flow.toml", "-o", "bundle"]);
    }
    d
}

/// Rewrites the bundle's weights with `f` applied to every value (keeping the F32 layout).
pub fn tamper_weights(bundle: &Path, f: impl Fn(&str, f32) -> f32) {
    let path = bundle.join("weights.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .flat_map(|c| f(&n, f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect();
            (n, v.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}
