//! The model file: a TOML description of an i-ResNet flow or classifier.
//!
//! Parsing is strict (`deny_unknown_fields`) so that a typo is an error rather
//! than a silently ignored setting; [`ModelSpec::validate`] then checks what serde
//! cannot (shapes that cannot be squeezed, `c` outside (0,1), ...), always naming
//! the file and the field.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits;

mod toml_error;
mod train;

use toml_error::toml_message;
pub use train::TrainSpec;

/// Flow (density model, z + log-det) or classifier (logits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Flow,
    Classifier,
}

/// Activations with Lipschitz constant <= 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Elu,
    Relu,
    /// `x * sigmoid(softplus(b) * x) / 1.1`, one learned scalar `b` per activation.
    LipSwish,
}

/// Where a 2x2 squeeze puts input channel `c` at pixel offset `(dy, dx)`, for
/// `C` input channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SqueezeOrder {
    /// Output channel `(2*dy + dx)*C + c`: the official i-ResNet code (the i-RevNet
    /// "psi" module), ONNX `SpaceToDepth`, TensorFlow `space_to_depth`.
    #[default]
    SpaceToDepth,
    /// Output channel `4*c + 2*dy + dx`: PyTorch `pixel_unshuffle`, used by
    /// Residual Flows.
    PixelUnshuffle,
}

/// Which half of the channels a factor-out sends to the latent z (the other
/// half continues through the next stage). With an odd count the first half
/// has `C/2` channels (rounded down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FactorOutHalf {
    /// Channels `0..C/2` go to z: the official i-ResNet multiscale model.
    #[default]
    First,
    /// Channels `C/2..C` go to z, the first half continues.
    Second,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub kind: ModelKind,
    /// Per-sample input shape: `[C, H, W]` for images, `[D]` for vectors.
    pub input: Vec<usize>,
    /// Space-to-depth 2x2 on the input, before anything else.
    #[serde(default)]
    pub squeeze: bool,
    /// Channel order of every squeeze in the model (see [`SqueezeOrder`]).
    #[serde(default)]
    pub squeeze_order: SqueezeOrder,
    /// Which half of the channels a factor-out sends to z (see [`FactorOutHalf`]).
    #[serde(default)]
    pub factor_out_half: FactorOutHalf,
    /// Injective zero-padding of the channels up to this count (after the initial squeeze).
    #[serde(default)]
    pub pad_channels: Option<usize>,
    /// Seed of the deterministic initialization used when no weights file is given.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub lipschitz: LipschitzSpec,
    pub stages: Vec<StageSpec>,
    #[serde(default)]
    pub head: Option<HeadSpec>,
    #[serde(default)]
    pub inverse: InverseSpec,
    #[serde(default)]
    pub logdet: LogDetSpec,
    #[serde(default)]
    pub data: DataSpec,
    /// Training settings (`iresnetc train`; flags override them).
    #[serde(default)]
    pub train: TrainSpec,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub blocks: usize,
    /// Hidden channels of the convolutional residual branch (image models).
    #[serde(default)]
    pub width: Option<usize>,
    /// Kernel sizes of the branch's convolutions, `[3, 1, 3]` by default (image models).
    #[serde(default)]
    pub kernels: Option<Vec<usize>>,
    /// Hidden widths of the MLP branch, e.g. `[128, 128, 128, 128]` (vector models).
    #[serde(default)]
    pub hidden: Option<Vec<usize>>,
    #[serde(default)]
    pub activation: Activation,
    /// Space-to-depth 2x2 at the start of the stage.
    #[serde(default)]
    pub squeeze: bool,
    /// Factor out half of the channels after the stage (flows only).
    #[serde(default)]
    pub factor_out: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LipschitzSpec {
    /// Target spectral norm per layer; `W <- W / max(1, sigma / coeff)`.
    pub coeff: f64,
    /// Power iteration stops when the relative change of sigma is below this.
    pub power_tol: f64,
    /// ... or after this many iterations.
    pub power_max_iters: usize,
    /// When the pass rescales the given weights (see [`Normalize`]).
    pub normalize: Normalize,
}

/// What the Lipschitz pass does with the weights it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Every linear layer whose estimated sigma exceeds `coeff` is scaled down to
    /// it, `W <- W / max(1, sigma / coeff)` (weights at or below `coeff` stay).
    #[default]
    Always,
    /// A block whose layers, as given, already have a certified Lipschitz bound
    /// below 1 keeps its weights bit for bit (imported weights, e.g. from the
    /// official code, whose own normalization may leave a layer a hair above
    /// `coeff`); other blocks are normalized as with `always`.
    IfNeeded,
    /// Weights are never changed; a block whose certified bound is not below 1 is
    /// an error.
    Never,
}

impl Default for LipschitzSpec {
    fn default() -> Self {
        Self {
            coeff: 0.9,
            power_tol: 1e-8,
            power_max_iters: 200,
            normalize: Normalize::Always,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadSpec {
    pub classes: usize,
    /// Eval-form batch norm before the ReLU -> global average pool -> linear head.
    pub batchnorm: bool,
    pub bn_eps: f64,
}

impl Default for HeadSpec {
    fn default() -> Self {
        Self {
            classes: 10,
            batchnorm: true,
            bn_eps: 1e-5,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InverseSpec {
    /// Stop the fixed point when the largest elementwise step is below this.
    pub tol: f64,
    pub max_iters: usize,
}

impl Default for InverseSpec {
    fn default() -> Self {
        Self {
            tol: 1e-6,
            max_iters: 100,
        }
    }
}

// The log-det settings are the runtime's own types (every backend reads them from a bundle
// without the compiler); the model file's `[logdet]` table deserializes straight into them.
pub use iresnetc_runtime::logdet::{Estimator, LogDetSpec, ProbeKind, RouletteDist};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// Inputs are 8-bit images scaled to [0, 1]: density mode dequantizes
    /// `x <- (255 x + U(0,1)) / 256 - 0.5` and reports bits/dim.
    pub dequantize: bool,
}

impl ModelSpec {
    /// Parse and validate a model file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = iresnetc_runtime::fsread::read_text_bounded(
            path,
            iresnetc_runtime::fsread::MAX_MODEL_FILE,
            "model file",
        )?;
        Self::from_toml(&text, path)
    }

    /// Parse and validate TOML text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let spec: ModelSpec = toml::from_str(text).map_err(|e| Error::SpecParse {
            file: path.to_path_buf(),
            message: toml_message(&e, text),
        })?;
        spec.validate(path)?;
        Ok(spec)
    }

    pub fn is_image(&self) -> bool {
        self.input.len() == 3
    }

    /// Checks what the types cannot express; every error names file and field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| Error::SpecInvalid {
            file: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        check_name(&self.name).map_err(|r| bad("name", r))?;
        if !matches!(self.input.len(), 1 | 3) || self.input.contains(&0) {
            return Err(bad(
                "input",
                format!(
                    "expected [C, H, W] or [D] with positive sizes, got {:?}",
                    self.input
                ),
            ));
        }
        let lip = &self.lipschitz;
        if !(lip.coeff > 0.0 && lip.coeff < 1.0) {
            return Err(bad(
                "lipschitz.coeff",
                format!(
                    "must be in (0, 1) for the blocks to be invertible, got {}",
                    lip.coeff
                ),
            ));
        }
        if !(lip.power_tol >= limits::MIN_TOL && lip.power_tol < 1.0) {
            return Err(bad(
                "lipschitz.power_tol",
                format!("must be in [{:e}, 1)", limits::MIN_TOL),
            ));
        }
        in_range(
            "lipschitz.power_max_iters",
            lip.power_max_iters,
            limits::MAX_POWER_ITERS,
        )
        .map_err(|(f, r)| bad(&f, r))?;
        if !(self.inverse.tol >= limits::MIN_TOL && self.inverse.tol.is_finite()) {
            return Err(bad(
                "inverse.tol",
                format!(
                    "must be a number >= {:e} (smaller is below f64 resolution)",
                    limits::MIN_TOL
                ),
            ));
        }
        in_range(
            "inverse.max_iters",
            self.inverse.max_iters,
            limits::MAX_INVERSE_ITERS,
        )
        .map_err(|(f, r)| bad(&f, r))?;
        let ld = &self.logdet;
        in_range("logdet.terms", ld.terms, limits::MAX_TERMS).map_err(|(f, r)| bad(&f, r))?;
        in_range("logdet.probes", ld.probes, limits::MAX_PROBES).map_err(|(f, r)| bad(&f, r))?;
        if ld.terms * ld.probes > limits::MAX_TERMS_X_PROBES {
            return Err(bad(
                "logdet.probes",
                format!(
                    "terms x probes = {} vector-Jacobian products per block and sample, more than {}",
                    ld.terms * ld.probes,
                    limits::MAX_TERMS_X_PROBES
                ),
            ));
        }
        match ld.roulette {
            RouletteDist::Geometric
                if !(ld.roulette_param >= limits::MIN_GEOMETRIC_P && ld.roulette_param < 1.0) =>
            {
                return Err(bad(
                    "logdet.roulette_param",
                    format!(
                        "geometric success probability must be in [{}, 1) (the expected number of extra terms is 1/p)",
                        limits::MIN_GEOMETRIC_P
                    ),
                ))
            }
            RouletteDist::Poisson
                if !(ld.roulette_param > 0.0
                    && ld.roulette_param <= limits::MAX_POISSON_MEAN) =>
            {
                return Err(bad(
                    "logdet.roulette_param",
                    format!("Poisson mean must be in (0, {}]", limits::MAX_POISSON_MEAN),
                ))
            }
            _ => {}
        }
        if self.stages.len() > limits::MAX_STAGES {
            return Err(bad(
                "stages",
                format!(
                    "{} stages, at most {}",
                    self.stages.len(),
                    limits::MAX_STAGES
                ),
            ));
        }
        if self.stages.is_empty() {
            return Err(bad(
                "stages",
                "at least one [[stages]] table is needed".into(),
            ));
        }
        match (self.kind, &self.head) {
            (ModelKind::Classifier, None) => {
                return Err(bad("head", "a classifier needs a [head] table".into()))
            }
            (ModelKind::Flow, Some(_)) => {
                return Err(bad("head", "a flow has no classifier head".into()))
            }
            (_, Some(h)) if h.classes == 0 => {
                return Err(bad("head.classes", "must be >= 1".into()))
            }
            (_, Some(h)) if !(h.bn_eps > 0.0 && h.bn_eps.is_finite()) => {
                return Err(bad("head.bn_eps", "must be a positive number".into()))
            }
            (_, Some(h)) if h.classes > limits::MAX_WIDTH => {
                return Err(bad(
                    "head.classes",
                    format!("{} classes, at most {}", h.classes, limits::MAX_WIDTH),
                ))
            }
            _ => {}
        }
        if self.data.dequantize && !self.is_image() {
            return Err(bad(
                "data.dequantize",
                "only image models ([C, H, W] input) can be dequantized".into(),
            ));
        }

        self.train
            .check()
            .map_err(|(field, reason)| bad(field, reason))?;

        // Padding must leave room for some data: a pad as large as the image is a typo.
        if self.train.pad > 0 {
            let room = if self.is_image() {
                self.input[1].min(self.input[2])
            } else {
                0
            };
            if self.train.pad.saturating_mul(2) >= room {
                return Err(bad(
                    "train.pad",
                    format!(
                        "{} zero pixels on every side leave nothing of the data in the {:?} input",
                        self.train.pad, self.input
                    ),
                ));
            }
        }

        // Walk the shapes the way the graph builder will, so impossible
        // configurations are reported against the field that causes them.
        limits::elems("input", &self.input).map_err(|(f, r)| bad(&f, r))?;
        let mut stage_shapes = vec![];
        let mut shape = self.input.clone();
        if self.squeeze {
            shape = squeezed(&shape).map_err(|r| bad("squeeze", r))?;
        }
        if let Some(c) = self.pad_channels {
            if !self.is_image() {
                return Err(bad("pad_channels", "only for image models".into()));
            }
            if c > limits::MAX_WIDTH {
                return Err(bad(
                    "pad_channels",
                    format!("{c} channels, at most {}", limits::MAX_WIDTH),
                ));
            }
            if c < shape[0] {
                return Err(bad(
                    "pad_channels",
                    format!(
                        "{c} is fewer than the {} channels it pads (padding must be injective)",
                        shape[0]
                    ),
                ));
            }
            shape[0] = c;
        }
        let last = self.stages.len() - 1;
        for (i, st) in self.stages.iter().enumerate() {
            let f = |name: &str| format!("stages[{i}].{name}");
            in_range(&f("blocks"), st.blocks, limits::MAX_BLOCKS).map_err(|(f, r)| bad(&f, r))?;
            if st.squeeze {
                shape = squeezed(&shape).map_err(|r| bad(&f("squeeze"), r))?;
            }
            limits::elems(&f("squeeze"), &shape).map_err(|(f, r)| bad(&f, r))?;
            stage_shapes.push(shape.clone());
            for (w, name) in [
                (st.width, "width"),
                (
                    st.hidden.as_ref().and_then(|h| h.iter().max().copied()),
                    "hidden",
                ),
            ] {
                if let Some(w) = w.filter(|&w| w > limits::MAX_WIDTH) {
                    return Err(bad(
                        &f(name),
                        format!("width {w}, at most {}", limits::MAX_WIDTH),
                    ));
                }
            }
            for (list, name) in [(&st.kernels, "kernels"), (&st.hidden, "hidden")] {
                if list
                    .as_ref()
                    .is_some_and(|l| l.len() > limits::MAX_LAYERS_PER_BRANCH)
                {
                    return Err(bad(
                        &f(name),
                        format!(
                            "more than {} layers per branch",
                            limits::MAX_LAYERS_PER_BRANCH
                        ),
                    ));
                }
            }
            if self.is_image() {
                if st.hidden.is_some() {
                    return Err(bad(
                        &f("hidden"),
                        "MLP widths are for vector models; use width and kernels".into(),
                    ));
                }
                match st.width {
                    None => {
                        return Err(bad(&f("width"), "image stages need a hidden width".into()))
                    }
                    Some(0) => return Err(bad(&f("width"), "must be >= 1".into())),
                    _ => {}
                }
                let ks = st.kernels.clone().unwrap_or_else(|| vec![3, 1, 3]);
                if ks.is_empty() {
                    return Err(bad(&f("kernels"), "needs at least one kernel size".into()));
                }
                if let Some(k) = ks.iter().find(|&&k| k > limits::MAX_KERNEL) {
                    return Err(bad(
                        &f("kernels"),
                        format!("kernel size {k}, at most {}", limits::MAX_KERNEL),
                    ));
                }
                if let Some(k) = ks.iter().find(|&&k| k % 2 == 0 || k == 0) {
                    return Err(bad(
                        &f("kernels"),
                        format!("kernel size {k} is not odd: 'same' padding needs odd sizes"),
                    ));
                }
            } else {
                if st.width.is_some() || st.kernels.is_some() {
                    return Err(bad(
                        &f("width"),
                        "width/kernels are for image models; use hidden for vectors".into(),
                    ));
                }
                match &st.hidden {
                    None => {
                        return Err(bad(
                            &f("hidden"),
                            "vector stages need MLP widths, e.g. [128, 128]".into(),
                        ))
                    }
                    Some(h) if h.is_empty() || h.contains(&0) => {
                        return Err(bad(
                            &f("hidden"),
                            "widths must be a non-empty list of positive sizes".into(),
                        ))
                    }
                    _ => {}
                }
            }
            if st.factor_out {
                if self.kind != ModelKind::Flow {
                    return Err(bad(&f("factor_out"), "only flows factor out".into()));
                }
                if i == last {
                    return Err(bad(
                        &f("factor_out"),
                        "the last stage keeps all its channels (they are the final latent)".into(),
                    ));
                }
                if !shape[0].is_multiple_of(2) || shape[0] < 2 {
                    return Err(bad(
                        &f("factor_out"),
                        format!("cannot factor out half of {} channels", shape[0]),
                    ));
                }
                shape[0] /= 2;
            }
        }
        // What the model needs, checked before anything is allocated.
        let fp = limits::footprint(self, &stage_shapes).map_err(|(f, r)| bad(&f, r))?;
        let need = fp.bytes(4).unwrap_or(u64::MAX);
        let budget = iresnetc_runtime::fsread::memory_budget()?;
        if need > budget {
            return Err(bad(
                &fp.heaviest,
                format!(
                    "the model needs about {need} bytes of memory ({} parameters, {} activations per sample), more than the {budget} available (IRESNETC_MEMORY_LIMIT sets the budget)",
                    fp.params, fp.max_activation
                ),
            ));
        }
        if self.logdet.estimator == Estimator::Exact {
            limits::check_exact(self).map_err(|r| bad("logdet.estimator", r))?;
        }
        Ok(())
    }

    /// Sizes derived from the spec (parameters, activations, block dimensions); None for a
    /// spec that does not validate.
    pub fn footprint(&self) -> Option<limits::Footprint> {
        let mut shape = self.input.clone();
        if self.squeeze {
            shape = squeezed(&shape).ok()?;
        }
        if let Some(c) = self.pad_channels {
            *shape.first_mut()? = c;
        }
        let mut stage_shapes = vec![];
        for st in &self.stages {
            if st.squeeze {
                shape = squeezed(&shape).ok()?;
            }
            stage_shapes.push(shape.clone());
            if st.factor_out {
                shape[0] /= 2;
            }
        }
        limits::footprint(self, &stage_shapes).ok()
    }
}

/// `1 <= value <= max` for a count field.
fn in_range(field: &str, value: usize, max: usize) -> std::result::Result<(), (String, String)> {
    if value == 0 || value > max {
        return Err((field.to_string(), format!("{value} is outside 1..={max}")));
    }
    Ok(())
}

/// A model name becomes a directory name (`build/<name>`): letters, digits, `-`, `_`, `.`,
/// not `.` or `..`, at most [`limits::MAX_NAME_LEN`] characters.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > limits::MAX_NAME_LEN {
        return Err(format!("longer than {} characters", limits::MAX_NAME_LEN));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{:?} contains {c:?}: a name may hold only letters, digits, '-', '_' and '.' (it is used as a directory name)",
            iresnetc_runtime::fsread::clip(name, 40)
        ));
    }
    Ok(())
}

/// One line from a TOML error: position and message, never the source line itself, with
/// quoted input cut short (a 10 MB line must not become a 10 MB message).
/// Space-to-depth 2x2 on a `[C, H, W]` shape.
pub fn squeezed(shape: &[usize]) -> std::result::Result<Vec<usize>, String> {
    if shape.len() != 3 {
        return Err("squeeze needs an image shape [C, H, W]".into());
    }
    let (c, h, w) = (shape[0], shape[1], shape[2]);
    if h % 2 != 0 || w % 2 != 0 {
        return Err(format!(
            "cannot squeeze a {h}x{w} image: sizes must be even"
        ));
    }
    Ok(vec![4 * c, h / 2, w / 2])
}
