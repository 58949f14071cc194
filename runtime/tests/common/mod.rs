//! A tiny hand-made bundle shared by the runtime's integration tests.
//!
//! Entry point `forward`: `y[s, i] = a[s, i] * w[i] + 1` over per-sample buffers, with the
//! sample taken from `workgroup_id.z`. Entry point `iterate`: copy `x` into a state buffer,
//! apply `x <- 0.5 x + 1` ten times (a `Repeat` of 2 around a `Repeat` of 5), copy the state
//! out, and exercise `Fill` with a nonzero value and with zero.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use iresnetc_runtime::{
    BufferDecl, BufferInit, EntryPoint, GpuDevice, IoDecl, KernelDecl, ModelKind, Plan, Step,
    BUNDLE_FORMAT, BUNDLE_VERSION,
};
use sha2::{Digest, Sha256};

pub mod gpu_policy;

/// Elements of one sample.
pub const N: usize = 300;
pub const SHAPE: [usize; 3] = [3, 10, 10];
pub const WEIGHT_TENSOR: &str = "layer0.weight";
pub const WORKGROUP: u32 = 64;
pub const GROUPS_X: u32 = (N as u32).div_ceil(WORKGROUP);
pub const FILL_VALUE: f32 = 2.5;

pub const AFFINE_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const N: u32 = 300u;
const Z_PER_SAMPLE: u32 = 1u;

@compute @workgroup_size(64)
fn affine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let sample = wg.z / Z_PER_SAMPLE;
    let i = wg.x * 64u + lid.x;
    if (i >= N) {
        return;
    }
    let k = sample * N + i;
    y[k] = a[k] * w[i] + 1.0;
}
"#;

pub const HALVE_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> state: array<f32>;

const N: u32 = 300u;

@compute @workgroup_size(64)
fn halve_plus_one(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wg.x * 64u + lid.x;
    if (i >= N) {
        return;
    }
    let k = wg.z * N + i;
    state[k] = 0.5 * state[k] + 1.0;
}
"#;

fn buffer(name: &str, per_sample: bool, init: BufferInit) -> BufferDecl {
    BufferDecl {
        name: name.to_string(),
        elems: N as u64,
        per_sample,
        init,
    }
}

fn io(name: &str, buffer: &str) -> IoDecl {
    IoDecl {
        name: name.to_string(),
        buffer: buffer.to_string(),
        shape: SHAPE.to_vec(),
    }
}

pub fn test_plan() -> Plan {
    let halve = Step::Dispatch {
        kernel: "halve".to_string(),
        workgroups: [GROUPS_X, 1, 1],
        large_batch: None,
    };
    let mut entry_points = BTreeMap::new();
    entry_points.insert(
        "forward".to_string(),
        EntryPoint {
            inputs: vec![io("a", "a")],
            outputs: vec![io("y", "y")],
            steps: vec![Step::Dispatch {
                kernel: "affine".to_string(),
                workgroups: [GROUPS_X, 1, 1],
                large_batch: None,
            }],
        },
    );
    entry_points.insert(
        "iterate".to_string(),
        EntryPoint {
            inputs: vec![io("x", "x")],
            outputs: vec![
                io("x_out", "x_out"),
                io("filled", "filled"),
                io("zeroed", "zeroed"),
            ],
            steps: vec![
                Step::Copy {
                    src: "x".to_string(),
                    dst: "state".to_string(),
                },
                Step::Repeat {
                    times: 2,
                    steps: vec![Step::Repeat {
                        times: 5,
                        steps: vec![halve],
                    }],
                },
                Step::Copy {
                    src: "state".to_string(),
                    dst: "x_out".to_string(),
                },
                Step::Fill {
                    buffer: "filled".to_string(),
                    value: FILL_VALUE,
                },
                Step::Fill {
                    buffer: "zeroed".to_string(),
                    value: 7.0,
                },
                Step::Fill {
                    buffer: "zeroed".to_string(),
                    value: 0.0,
                },
            ],
        },
    );
    Plan {
        format: BUNDLE_FORMAT.to_string(),
        version: BUNDLE_VERSION,
        compiler_version: "test".to_string(),
        model: "runtime-test".to_string(),
        kind: ModelKind::Flow,
        input_shape: SHAPE.to_vec(),
        buffers: vec![
            buffer("a", true, BufferInit::Input),
            buffer(
                "w",
                false,
                BufferInit::Weight {
                    tensor: WEIGHT_TENSOR.to_string(),
                    layout: Default::default(),
                },
            ),
            buffer("y", true, BufferInit::Output),
            buffer("x", true, BufferInit::Input),
            buffer("state", true, BufferInit::Scratch),
            buffer("x_out", true, BufferInit::Output),
            buffer("filled", true, BufferInit::Output),
            buffer("zeroed", true, BufferInit::Zero),
        ],
        kernels: vec![
            KernelDecl {
                name: "affine".to_string(),
                file: "affine.wgsl".to_string(),
                entry: "affine".to_string(),
                workgroup_size: [WORKGROUP, 1, 1],
                bindings: vec!["a".to_string(), "w".to_string(), "y".to_string()],
                read_only: vec![],
            },
            KernelDecl {
                name: "halve".to_string(),
                file: "halve.wgsl".to_string(),
                entry: "halve_plus_one".to_string(),
                workgroup_size: [WORKGROUP, 1, 1],
                bindings: vec!["state".to_string()],
                read_only: vec![false],
            },
        ],
        entry_points,
        logdet: None,
        info: None,
        limits: None,
        meta: serde_json::json!({ "note": "hand-made test bundle" }),
        integrity: Default::default(),
    }
}

/// Deterministic weights in [0.5, 1.5).
pub fn test_weights() -> Vec<f32> {
    (0..N)
        .map(|i| 0.5 + (i * 37 % 101) as f32 / 101.0)
        .collect()
}

pub fn safetensors_bytes(tensors: &[(&str, Vec<usize>, &[f32])]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (
                name.to_string(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytemuck::cast_slice(data),
                )
                .expect("valid view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// A directory under the system temp dir, removed when dropped (also when a test panics).
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("iresnetc-runtime-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

/// Writes the test bundle (plan, both WGSL files, weights) into a fresh directory; the plan
/// records every file's SHA-256 (`integrity`), as a compiled bundle's does.
pub fn write_test_bundle(name: &str) -> TempDir {
    let dir = temp_dir(name);
    std::fs::write(dir.join("affine.wgsl"), AFFINE_WGSL).unwrap();
    std::fs::write(dir.join("halve.wgsl"), HALVE_WGSL).unwrap();
    let w = test_weights();
    std::fs::write(
        dir.join("weights.safetensors"),
        safetensors_bytes(&[(WEIGHT_TENSOR, vec![N], &w)]),
    )
    .unwrap();
    std::fs::write(dir.join("report.json"), "{}").unwrap();
    write_plan(&dir, &test_plan());
    dir
}

/// Lower-case hex SHA-256, computed here with `sha2` rather than by the runtime's helper.
pub fn sha256_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `integrity` table of `plan` for the files now in `dir`: every WGSL file the plan names
/// and the weights file, each that exists.
pub fn hashes(dir: &Path, plan: &Plan) -> BTreeMap<String, String> {
    plan.kernels
        .iter()
        .map(|k| k.file.clone())
        .chain(std::iter::once("weights.safetensors".to_string()))
        .filter_map(|f| {
            let bytes = std::fs::read(dir.join(&f)).ok()?;
            Some((f, sha256_of(&bytes)))
        })
        .collect()
}

/// Writes `plan` with the hashes of the files now in `dir` (what a compiler that wrote those
/// files would record), so a test that replaces a file on purpose reaches the check it is
/// about rather than the hash check.
pub fn write_plan(dir: &Path, plan: &Plan) {
    let mut plan = plan.clone();
    plan.integrity = hashes(dir, &plan);
    write_plan_as_is(dir, &plan);
}

/// Writes `plan` exactly as given (its `integrity` included, empty or not).
pub fn write_plan_as_is(dir: &Path, plan: &Plan) {
    std::fs::write(
        dir.join("plan.json"),
        serde_json::to_string_pretty(plan).unwrap(),
    )
    .unwrap();
}

/// Replaces `dir/file` by `bytes` and re-records the hashes in `plan.json`.
pub fn replace_file(dir: &Path, file: &str, bytes: &[u8]) {
    std::fs::write(dir.join(file), bytes).unwrap();
    write_plan(dir, &test_plan());
}

/// The device for a GPU test, or `None` where [`gpu_policy`] says to skip (only when the person
/// running the tests set `IRESNETC_ALLOW_NO_GPU` on a machine without an adapter).
pub fn gpu_or_skip(test: &str) -> Option<GpuDevice> {
    gpu_policy::open_gpu(test)
}

/// `|a - b| <= tol * (1 + |b|)` elementwise, with the first mismatch in the message.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}
