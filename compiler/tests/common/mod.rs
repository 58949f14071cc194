//! Shared test helpers: models from inline TOML or `models/`, inputs, the GPU device (under
//! the one rule of `gpu_policy`, shared with the runtime's tests).
#![allow(dead_code)]

use std::path::Path;

use iresnetc::pipeline::{load_spec, LoadOptions, Model};
use iresnetc::spec::ModelSpec;

pub fn model_from_toml(text: &str) -> Model {
    let spec = ModelSpec::from_toml(text, Path::new("inline.toml")).expect("valid spec");
    load_spec(spec, &LoadOptions::default(), &|_, _| {}).expect("model builds")
}

pub fn model_file(name: &str) -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    iresnetc::pipeline::load_model(&path, &LoadOptions::default(), &|_, _| {})
        .expect("model builds")
}

/// Deterministic test inputs in [-1, 1].
pub fn inputs(n: usize, dim: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut r = iresnetc_runtime::rng::Rng::new(seed);
    (0..n)
        .map(|_| (0..dim).map(|_| 2.0 * r.uniform() - 1.0).collect())
        .collect()
}

pub fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A one-stage conv flow small enough for exact Jacobians.
pub const SMALL_CONV: &str = r#"
name = "small-conv"
kind = "flow"
input = [2, 4, 4]
squeeze = true
[[stages]]
blocks = 2
width = 8
kernels = [3, 1, 3]
"#;

#[path = "../../../runtime/tests/common/gpu_policy.rs"]
pub mod gpu_policy;

/// The test process's GPU device (lavapipe in CI), opened once and shared by its tests; `None`
/// only where [`gpu_policy`] says to skip (no adapter and `IRESNETC_ALLOW_NO_GPU` set by the
/// person running the tests); otherwise a missing device fails the calling test.
pub fn device() -> Option<&'static iresnetc_runtime::GpuDevice> {
    static DEVICE: std::sync::OnceLock<
        Result<iresnetc_runtime::GpuDevice, iresnetc_runtime::RuntimeError>,
    > = std::sync::OnceLock::new();
    match DEVICE.get_or_init(iresnetc_runtime::GpuDevice::new) {
        Ok(d) => Some(d),
        Err(e) => gpu_policy::on_device_error(&gpu_policy::current_test(), e),
    }
}

/// GPU work is serialized: lavapipe shares the machine's two cores with the other tests.
pub fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `max |a - b| / max(1, max |b|)`: the relative error in the max norm the tests state.
pub fn rel_max(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "arrays of different lengths");
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}
