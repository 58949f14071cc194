//! The execution API: one trait every backend implements.
//!
//! A backend runs one model in three directions: [`Backend::encode`] (`x -> z`, with the
//! per-sample log-det of a chosen estimator), [`Backend::decode`] (`z -> x` by fixed-point
//! inversion, with what the backend knows of its convergence) and [`Backend::classify`]
//! (`x -> logits`). Everything built from those (density and bits/dim, sampling from the
//! prior, dequantization) is written once, in [`crate::modes`], over this trait.
//!
//! Arrays cross the trait as [`Batch`]: row-major f64 with the batch size beside it. f64 keeps
//! the reference's precision; f32 backends convert at their boundary with
//! [`Batch::to_f32`], which refuses values f32 cannot hold instead of turning them into
//! infinities.

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::logdet::{LogDetMethod, LogDetSpec};
use crate::plan::ModelKind;

/// What a model is, as every backend needs to know it: shapes, kind, the model file's data and
/// log-det settings, the blocks and their certified inversion. Written by the compiler into
/// `plan.json` (`info`), so a bundle describes itself without the compiler.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    pub kind: ModelKind,
    /// Shape of one input sample (`[C, H, W]` or `[D]`).
    pub input_shape: Vec<usize>,
    /// Flows: latent dimension per sample; classifiers: number of classes.
    pub output_dim: usize,
    /// Inputs are 8-bit images in [0, 1]: density dequantizes and reports bits/dim + 8.
    pub dequantize: bool,
    /// The model file's `[logdet]` table (the default estimator of a run).
    pub logdet: LogDetSpec,
    /// Block names (`stage{s}.block{b}`), in forward order.
    pub blocks: Vec<String>,
    /// Per block: the fixed-point iterations the certificate guarantees for `inverse_tol`
    /// (the cap of an adaptive inverse, the count of a fixed one).
    pub inverse_iters: Vec<usize>,
    /// The model file's `inverse.tol`.
    pub inverse_tol: f64,
}

impl ModelInfo {
    pub fn input_dim(&self) -> usize {
        self.input_shape.iter().product()
    }

    pub fn is_flow(&self) -> bool {
        self.kind == ModelKind::Flow
    }
}

/// The learned diagonal Gaussian prior over z.
#[derive(Clone, Debug, PartialEq)]
pub struct Prior {
    pub mean: Vec<f64>,
    pub log_std: Vec<f64>,
}

/// Row-major samples: `data.len() == batch * per_sample`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub data: Vec<f64>,
    pub batch: usize,
}

impl Batch {
    /// A batch from flat data; the length must be a multiple of `per_sample`.
    pub fn new(data: Vec<f64>, per_sample: usize) -> Result<Batch> {
        if per_sample == 0 || !data.len().is_multiple_of(per_sample) {
            return Err(RuntimeError::bad_input(
                "batch",
                format!(
                    "{} values are not a whole number of samples of {per_sample}",
                    data.len()
                ),
            ));
        }
        Ok(Batch {
            batch: data.len() / per_sample,
            data,
        })
    }

    pub fn from_rows(rows: &[Vec<f64>]) -> Batch {
        Batch {
            batch: rows.len(),
            data: rows.iter().flatten().copied().collect(),
        }
    }

    /// Elements per sample.
    pub fn per_sample(&self) -> usize {
        if self.batch == 0 {
            0
        } else {
            self.data.len() / self.batch
        }
    }

    pub fn rows(&self) -> impl Iterator<Item = &[f64]> {
        self.data.chunks(self.per_sample().max(1))
    }

    /// f32 copy for f32 backends; a finite value beyond f32's range (or NaN / inf) is an error
    /// naming `what`, never a silent infinity.
    pub fn to_f32(&self, what: &str) -> Result<Vec<f32>> {
        self.data
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let f = v as f32;
                if f.is_finite() {
                    Ok(f)
                } else {
                    Err(RuntimeError::bad_input(
                        what,
                        format!(
                            "value {v:e} at flat index {i} is not representable in f32 (this backend computes in f32)"
                        ),
                    ))
                }
            })
            .collect()
    }

    /// The f32 results of a backend, widened exactly.
    pub fn from_f32(data: &[f32], batch: usize) -> Batch {
        Batch {
            data: data.iter().map(|&v| f64::from(v)).collect(),
            batch,
        }
    }
}

/// Result of [`Backend::encode`].
#[derive(Clone, Debug)]
pub struct Encoded {
    /// Flows: z (`[batch, latent]`); classifiers: logits.
    pub z: Batch,
    /// Per-sample total log-det, when one was asked for.
    pub logdet: Option<Vec<f64>>,
}

/// How one block's inversion went, over the samples of a batch (worst case).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockInversion {
    pub block: String,
    /// Fixed-point iterations run (the most over the batch).
    pub iters: usize,
    /// The last step's largest elementwise change (the most over the batch).
    pub residual: f64,
}

/// Result of [`Backend::decode`].
#[derive(Clone, Debug)]
pub struct Decoded {
    pub x: Batch,
    /// Per block, where the backend measures it (backends that run a fixed, certified count
    /// without reading back report none).
    pub blocks: Vec<BlockInversion>,
    /// Whether every block met the model's tolerance (None: not measured).
    pub converged: Option<bool>,
}

/// Numeric precision a backend computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F64,
}

/// What a backend is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendInfo {
    /// `reference`, `cpu`, `wgpu`, `tract`.
    pub name: &'static str,
    /// The device it runs on (the adapter, or the CPU and its threads).
    pub device: String,
    pub precision: Precision,
}

impl std::fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.precision {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        };
        write!(f, "{} ({}, {p})", self.name, self.device)
    }
}

/// One model on one backend. Implementations: the f64 reference (in the compiler crate), the
/// native CPU engine, wgpu and tract. Training adds a gradient method here later; keep state
/// that depends on the batch size (buffers, optimized graphs) inside the implementation.
pub trait Backend {
    fn info(&self) -> BackendInfo;

    fn model(&self) -> &ModelInfo;

    /// The prior over z (flows).
    fn prior(&self) -> Result<Prior>;

    /// `x -> z` and, unless `logdet` is [`LogDetMethod::None`], each sample's log-det.
    /// `first_sample` is the index of `x`'s first row in the whole array being run, so that
    /// probes and roulette draws do not depend on how an array is split into batches.
    fn encode(&mut self, x: &Batch, logdet: &LogDetMethod, first_sample: usize) -> Result<Encoded>;

    /// `z -> x` (flows).
    fn decode(&mut self, z: &Batch) -> Result<Decoded>;

    /// `x -> logits` (classifiers).
    fn classify(&mut self, x: &Batch) -> Result<Batch>;
}

/// The shared refusal for a flow-only request on a classifier and the reverse.
pub fn require_kind(model: &ModelInfo, kind: ModelKind, what: &str) -> Result<()> {
    if model.kind == kind {
        return Ok(());
    }
    let want = match kind {
        ModelKind::Flow => "a flow (kind = \"flow\")",
        ModelKind::Classifier => "a classifier (kind = \"classifier\")",
    };
    Err(RuntimeError::Unsupported(format!(
        "model {:?}: {what} needs {want}",
        model.name
    )))
}
