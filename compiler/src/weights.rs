//! Weights: deterministic initialization from a seed, and safetensors I/O.
//!
//! Naming (see docs/model-files.md#weights): `{node}.{param}`, e.g. `stage0.block3.conv1.weight`
//! (`[cout, cin, k, k]`), `stage0.block3.actnorm.log_scale`, `prior.mean`.
//! Files may hold F32 or F64 tensors; files we write are F32, the dtype every
//! runtime (and PyTorch's default) reads.

use std::collections::BTreeSet;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::tensor::{Params, Tensor};
use iresnetc_runtime::rng::Rng;

/// Initial values for every parameter the graph expects, from `seed`.
///
/// Linear maps get PyTorch's default (uniform in +-1/sqrt(fan_in)); ActNorm and
/// the prior get small random values rather than zeros so that a wrong
/// convention in any consumer of the weights shows up in comparisons.
pub fn init(graph: &Graph, seed: u64) -> Params {
    let expected = graph.expected_params();
    let shapes: std::collections::BTreeMap<&str, &Vec<usize>> =
        expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut params = Params::new();
    for (name, shape) in expected.iter().cloned() {
        let n: usize = shape.iter().product();
        let mut rng = Rng::for_name(seed, &name);
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let bound = 1.0 / (fan_in as f64).sqrt();
        let data: Vec<f64> = if name.ends_with(".weight") && shape.len() >= 2 {
            (0..n)
                .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                .collect()
        } else if name.ends_with(".running_var") {
            (0..n).map(|_| 1.0 + 0.1 * rng.uniform()).collect()
        } else if name.ends_with(".beta") {
            vec![1.0; n]
        } else if name.starts_with("head.bn.") && name.ends_with(".weight") {
            (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
        } else if name.ends_with(".bias")
            && !name.contains("actnorm")
            && !name.starts_with("head.bn")
        {
            // Bias of a linear map: fan_in is that of the weight next to it.
            let wname = format!("{}.weight", name.trim_end_matches(".bias"));
            let fan = shapes
                .get(wname.as_str())
                .map(|s| s.iter().skip(1).product::<usize>().max(1))
                .unwrap_or(1);
            let b = 1.0 / (fan as f64).sqrt();
            (0..n).map(|_| (2.0 * rng.uniform() - 1.0) * b).collect()
        } else {
            (0..n).map(|_| 0.05 * rng.normal()).collect()
        };
        params.insert(name, Tensor::new(shape, data));
    }
    params
}

/// Reads a safetensors file and checks it against the graph's expectations:
/// missing, extra, mis-shaped or wrongly typed tensors are errors naming the tensor.
pub fn load(graph: &Graph, path: &Path) -> Result<Params> {
    // The largest file the model can need: 8 bytes (F64) per parameter plus the JSON header.
    let max = graph
        .expected_params()
        .iter()
        .try_fold(16u64 << 20, |acc, (_, shape)| {
            let n = shape
                .iter()
                .try_fold(8u64, |a, &d| a.checked_mul(d as u64))?;
            acc.checked_add(n)
        })
        .unwrap_or(u64::MAX);
    let bytes = iresnetc_runtime::fsread::read_bounded(path, max, "weights file")?;
    load_bytes(graph, &bytes, path)
}

/// [`load`] on bytes already read; `path` is only used in messages.
pub fn load_bytes(graph: &Graph, bytes: &[u8], path: &Path) -> Result<Params> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::WeightsFile {
        file: path.to_path_buf(),
        reason: format!("not a valid safetensors file ({e})"),
    })?;
    let expected = graph.expected_params();
    let names: BTreeSet<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    let want: BTreeSet<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    if let Some(extra) = names.difference(&want).next() {
        return Err(Error::Weights {
            file: path.to_path_buf(),
            tensor: extra.clone(),
            reason: format!(
                "unexpected tensor: model `{}` has no such parameter",
                graph.spec.name
            ),
        });
    }
    let mut params = Params::new();
    for (name, shape) in expected {
        let bad = |reason: String| Error::Weights {
            file: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let view = st
            .tensor(&name)
            .map_err(|_| bad(format!("missing (expected shape {shape:?})")))?;
        if view.shape() != shape.as_slice() {
            return Err(bad(format!("shape {:?}, expected {shape:?}", view.shape())));
        }
        let data = to_f64(&view).map_err(bad)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "element {i} is {} (weights must be finite)",
                data[i]
            )));
        }
        // Log-scales are exponentiated in f32 by every backend: beyond +-80 the scale (or its
        // inverse) overflows and the density is inf or NaN. Refuse here, naming the tensor.
        if name.ends_with("log_std") || name.ends_with("log_scale") {
            if let Some(i) = data.iter().position(|v| v.abs() > MAX_LOG_SCALE) {
                return Err(bad(format!(
                    "element {i} is {:e}: a log-scale must lie in [-{MAX_LOG_SCALE}, {MAX_LOG_SCALE}] (exp overflows f32 beyond)",
                    data[i]
                )));
            }
        }
        params.insert(name, Tensor::new(shape, data));
    }
    Ok(params)
}

/// Largest |log-scale| accepted in a weights file (e^80 ~ 5.5e34 < f32::MAX ~ 3.4e38).
pub const MAX_LOG_SCALE: f64 = 80.0;

fn to_f64(view: &TensorView<'_>) -> std::result::Result<Vec<f64>, String> {
    let b = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect()),
        Dtype::F64 => Ok(b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()),
        other => Err(format!("dtype {other:?}, expected F32 or F64")),
    }
}

/// Serializes parameters as F32 safetensors bytes.
pub fn to_safetensors(params: &Params) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(n, t)| {
            let bytes = t
                .data
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            (n.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views = bufs
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Codegen {
            context: "weights".into(),
            message: e.to_string(),
        })?;
    safetensors::tensor::serialize(views, None).map_err(|e| Error::Codegen {
        context: "weights".into(),
        message: e.to_string(),
    })
}

/// Writes parameters atomically (temp file + rename), so a failure never
/// leaves a half-written file behind.
pub fn save(params: &Params, path: &Path) -> Result<()> {
    let bytes = to_safetensors(params)?;
    crate::fsutil::write_atomic(path, &bytes)
}
