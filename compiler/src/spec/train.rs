//! The `[train]` table of a model file and its range checks.

use serde::{Deserialize, Serialize};

use super::Estimator;

/// The `[train]` table: optimizer, schedule and estimator of `iresnetc train`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// adam | adamax | sgd
    pub optimizer: crate::train::optim::OptimKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// SGD momentum.
    pub momentum: f64,
    pub weight_decay: f64,
    /// Steps of linear learning-rate warm-up.
    pub warmup: u64,
    /// Gradient-norm clipping threshold (0: off).
    pub clip: f64,
    /// EMA decay of the parameters, used for evaluation and the final weights (0: off).
    pub ema: f64,
    pub batch: usize,
    pub steps: u64,
    /// Log-det during training: exact (small dimensions), series (fixed
    /// truncation) or roulette (unbiased); terms, probes and the roulette
    /// distribution come from `[logdet]`. Default: `[logdet].estimator`.
    pub estimator: Option<Estimator>,
    /// Power iterations per step for the spectral norm's persistent u, v.
    pub power_iters: usize,
    /// ActNorm initialized from the first batch (zero mean, unit variance).
    pub actnorm_init: bool,
    /// Initial LipSwish beta of a fresh run (default: the initialization's,
    /// softplus(1) = 1.31). Wide spectrally normalized layers feed each unit
    /// only about `c / sqrt(width)` of the input, where a small beta leaves the
    /// activation nearly linear and the flow stuck at its Gaussian fit.
    pub lipswish_beta: Option<f64>,
    /// Held-out evaluation every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Held-out evaluation size during training: points of a 2-D density's
    /// independent sample, or the first samples of an image test set.
    pub heldout: usize,
    /// Image data: zero pixels added on every side.
    pub pad: usize,
    /// Image data: repeat a single channel to the model's channel count.
    pub repeat_channels: bool,
    /// Momentum of the classifier batch norm's running averages.
    pub bn_momentum: f64,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            optimizer: crate::train::optim::OptimKind::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            momentum: 0.9,
            weight_decay: 0.0,
            warmup: 0,
            clip: 0.0,
            ema: 0.0,
            batch: 64,
            steps: 1000,
            estimator: None,
            power_iters: 5,
            actnorm_init: true,
            lipswish_beta: None,
            eval_every: 0,
            checkpoint_every: 0,
            heldout: 10_000,
            pad: 0,
            repeat_channels: false,
            bn_momentum: 0.1,
        }
    }
}

impl TrainSpec {
    /// Range checks of the `[train]` table (also run on flag overrides).
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let pos = |v: f64| v > 0.0 && v.is_finite();
        let unit = |v: f64| (0.0..1.0).contains(&v);
        if !pos(self.lr) {
            return Err(("train.lr", "must be a positive number".into()));
        }
        for (f, v) in [
            ("train.beta1", self.beta1),
            ("train.beta2", self.beta2),
            ("train.momentum", self.momentum),
            ("train.ema", self.ema),
        ] {
            if !unit(v) {
                return Err((f, format!("must be in [0, 1), got {v}")));
            }
        }
        if !pos(self.eps) {
            return Err(("train.eps", "must be positive".into()));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(("train.weight_decay", "must be >= 0".into()));
        }
        if !(self.clip >= 0.0 && self.clip.is_finite()) {
            return Err(("train.clip", "must be >= 0 (0: off)".into()));
        }
        if self.batch == 0 {
            return Err(("train.batch", "must be >= 1".into()));
        }
        if self.heldout == 0 || self.heldout > crate::limits::MAX_SAMPLES {
            return Err((
                "train.heldout",
                format!(
                    "{} is outside 1..={}",
                    self.heldout,
                    crate::limits::MAX_SAMPLES
                ),
            ));
        }
        if self.batch > crate::limits::MAX_BATCH {
            return Err((
                "train.batch",
                format!("{} is outside 1..={}", self.batch, crate::limits::MAX_BATCH),
            ));
        }
        if self.steps == 0 || self.steps > crate::limits::MAX_TRAIN_STEPS {
            return Err((
                "train.steps",
                format!(
                    "{} is outside 1..={}",
                    self.steps,
                    crate::limits::MAX_TRAIN_STEPS
                ),
            ));
        }
        if self.power_iters > crate::limits::MAX_TRAIN_POWER_ITERS {
            return Err((
                "train.power_iters",
                format!(
                    "{} power iterations per step, at most {}",
                    self.power_iters,
                    crate::limits::MAX_TRAIN_POWER_ITERS
                ),
            ));
        }
        if !(self.bn_momentum > 0.0 && self.bn_momentum <= 1.0) {
            return Err(("train.bn_momentum", "must be in (0, 1]".into()));
        }
        if let Some(b) = self.lipswish_beta {
            if !(b > 0.0 && b <= 100.0) {
                return Err((
                    "train.lipswish_beta",
                    format!("must be in (0, 100], got {b}"),
                ));
            }
        }
        Ok(())
    }
}
