//! Shared test helpers: build models from inline TOML.
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
