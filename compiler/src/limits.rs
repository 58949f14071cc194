//! Limits on what a model file may ask for, and the memory estimate checked against the
//! machine before anything is allocated (see docs/reliability.md#limits).
//!
//! Every size derived from the model file is computed here with checked arithmetic, so a
//! product that would wrap (`input = [4, 4294967296, 4294967296]`) is an error naming the
//! field rather than a dimension of 0, and a model the machine cannot hold is refused with the
//! bytes it would need instead of an allocation abort. Work bounds (series terms, probes,
//! iteration counts) keep a typo from turning into a run of hours.

use crate::spec::{ModelKind, ModelSpec};

/// Longest model name (it becomes a directory name).
pub const MAX_NAME_LEN: usize = 64;
/// Elements of one sample at any point of the network.
pub const MAX_SAMPLE_ELEMS: u64 = 1 << 26;
/// Channels, hidden widths, classes.
pub const MAX_WIDTH: usize = 1 << 16;
/// Odd kernel sizes up to this.
pub const MAX_KERNEL: usize = 31;
/// Blocks per stage and in the whole model.
pub const MAX_BLOCKS: usize = 10_000;
pub const MAX_STAGES: usize = 1_000;
pub const MAX_LAYERS_PER_BRANCH: usize = 64;
pub const MAX_POWER_ITERS: usize = 100_000;
pub const MAX_INVERSE_ITERS: usize = 10_000;
/// Below this a tolerance is beyond f64 resolution and only burns iterations.
pub const MIN_TOL: f64 = 1e-15;
pub const MAX_TERMS: usize = 1_000;
pub const MAX_PROBES: usize = 1_000;
/// `terms x probes` vector-Jacobian products per block and sample.
pub const MAX_TERMS_X_PROBES: usize = 10_000;
/// Geometric roulette: expected extra terms are 1/p.
pub const MIN_GEOMETRIC_P: f64 = 0.01;
pub const MAX_POISSON_MEAN: f64 = 100.0;
/// `run --repeats`: independent log-det estimates per sample (each a full log-det pass).
pub const MAX_REPEATS: usize = 1000;

/// `--num` and sample counts: samples generated in one command.
pub const MAX_SAMPLES: usize = 1 << 20;
/// Optimizer steps of one training run (`--steps`, `--epochs` converted, `train.steps`).
pub const MAX_TRAIN_STEPS: u64 = 100_000_000;
/// Power iterations per training step (`train.power_iters`): the persistent u, v need a few.
pub const MAX_TRAIN_POWER_ITERS: usize = 1_000;
/// Samples of one training batch (`train.batch`, `--batch`); the memory budget may say less.
pub const MAX_BATCH: usize = 1 << 16;
/// The exact log-det estimator costs one vjp per dimension of every block: refused above
/// this total unless `IRESNETC_EXACT_MAX_VJPS` raises it.
pub const EXACT_MAX_VJPS: u64 = 16_384;
pub const EXACT_ENV: &str = "IRESNETC_EXACT_MAX_VJPS";

/// Sizes of a model, derived from its spec with checked arithmetic.
#[derive(Clone, Debug, Default)]
pub struct Footprint {
    /// Parameters (elements).
    pub params: u64,
    /// Largest per-sample activation (elements), hidden layers included.
    pub max_activation: u64,
    /// Dimension of each block (elements of its input), in order.
    pub block_dims: Vec<u64>,
    /// The field that holds the most parameters (for the budget message).
    pub heaviest: String,
}

impl Footprint {
    /// Bytes a run needs for the model and `batch` samples in flight: f64 parameters (the
    /// loaded and the normalized copy, plus f32 for the backends) and activations with room
    /// for the hidden layers and gradients of the log-det.
    pub fn bytes(&self, batch: u64) -> Option<u64> {
        let params = self.params.checked_mul(8 + 8 + 4)?;
        let acts = self.max_activation.checked_mul(8 * 8)?.checked_mul(batch)?;
        params.checked_add(acts)
    }

    /// Vector-Jacobian products of the exact log-det for one sample.
    pub fn exact_vjps(&self) -> u64 {
        self.block_dims
            .iter()
            .fold(0u64, |a, &d| a.saturating_add(d))
    }
}

/// `a * b` or an error message naming `field`.
pub fn mul(field: &str, a: u64, b: u64) -> Result<u64, (String, String)> {
    a.checked_mul(b).ok_or_else(|| {
        (
            field.to_string(),
            format!("{a} x {b} overflows: sizes are far too large"),
        )
    })
}

/// Elements of a shape, checked against [`MAX_SAMPLE_ELEMS`].
pub fn elems(field: &str, shape: &[usize]) -> Result<u64, (String, String)> {
    let n = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .filter(|&n| n <= MAX_SAMPLE_ELEMS)
        .ok_or_else(|| {
            (
                field.to_string(),
                format!("shape {shape:?} has more than {MAX_SAMPLE_ELEMS} elements per sample"),
            )
        })?;
    Ok(n)
}

/// The footprint of a spec whose shapes were already walked by `validate` (`stage_shapes[i]`
/// is the shape stage i runs at). Errors are `(field, reason)`.
pub fn footprint(
    spec: &ModelSpec,
    stage_shapes: &[Vec<usize>],
) -> Result<Footprint, (String, String)> {
    let mut f = Footprint::default();
    let mut heaviest = 0u64;
    let mut last_channels = 0u64;
    for (i, (st, shape)) in spec.stages.iter().zip(stage_shapes).enumerate() {
        let field = |n: &str| format!("stages[{i}].{n}");
        let dim = elems(&field("squeeze"), shape)?;
        let c = shape[0] as u64;
        let spatial = dim / c.max(1);
        // Widths of the branch: c -> hidden... -> c, with kernel sizes for images.
        let (widths, kernels): (Vec<u64>, Vec<u64>) = if spec.is_image() {
            let w = st.width.unwrap_or(1) as u64;
            let ks: Vec<u64> = st
                .kernels
                .clone()
                .unwrap_or_else(|| vec![3, 1, 3])
                .iter()
                .map(|&k| k as u64)
                .collect();
            let mut ws = vec![c];
            ws.extend(std::iter::repeat_n(w, ks.len().saturating_sub(1)));
            ws.push(c);
            (ws, ks)
        } else {
            let mut ws = vec![c];
            ws.extend(
                st.hidden
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .map(|&h| h as u64),
            );
            ws.push(c);
            let n = ws.len() - 1;
            (ws, vec![1; n])
        };
        let mut per_block = 2 * c; // ActNorm
        for (l, k) in kernels.iter().enumerate() {
            let name = if spec.is_image() { "width" } else { "hidden" };
            let w = mul(&field(name), widths[l], widths[l + 1])?;
            let w = mul(&field("kernels"), w, k * k)?;
            per_block = per_block
                .checked_add(w + widths[l + 1])
                .ok_or_else(|| (field(name), "parameter count overflows".to_string()))?;
            let act = mul(&field(name), widths[l + 1], spatial)?;
            if act > MAX_SAMPLE_ELEMS {
                return Err((
                    field(name),
                    format!("a hidden activation of {act} elements per sample exceeds {MAX_SAMPLE_ELEMS}"),
                ));
            }
            f.max_activation = f.max_activation.max(act);
        }
        let stage_params = mul(&field("blocks"), per_block, st.blocks as u64)?;
        if stage_params > heaviest {
            heaviest = stage_params;
            f.heaviest = field(if spec.is_image() { "width" } else { "hidden" });
        }
        f.params = f
            .params
            .checked_add(stage_params)
            .ok_or_else(|| (field("blocks"), "parameter count overflows".to_string()))?;
        f.max_activation = f.max_activation.max(dim);
        f.block_dims.extend(std::iter::repeat_n(dim, st.blocks));
        last_channels = c;
    }
    // Every block is a handful of graph nodes and kernels: bound the total, not only per stage.
    if f.block_dims.len() > MAX_BLOCKS {
        return Err((
            "stages".to_string(),
            format!("{} blocks in all, at most {MAX_BLOCKS}", f.block_dims.len()),
        ));
    }
    if let (ModelKind::Classifier, Some(h)) = (spec.kind, &spec.head) {
        let head = mul("head.classes", last_channels, h.classes as u64)?;
        f.params = f.params.saturating_add(head);
    }
    if spec.kind == ModelKind::Flow {
        // prior.mean and prior.log_std over the latent.
        let latent = elems("input", &spec.input)?;
        f.params = f.params.saturating_add(2 * latent);
    }
    Ok(f)
}

/// The exact estimator's vjp limit (the constant, or `IRESNETC_EXACT_MAX_VJPS`).
pub fn exact_max_vjps() -> u64 {
    std::env::var(EXACT_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(EXACT_MAX_VJPS)
}

/// The single check of the exact estimator's cost, whether it comes from the model file or
/// from `--estimator exact`.
pub fn check_exact(spec: &ModelSpec) -> Result<(), String> {
    let vjps = spec.footprint().map(|f| f.exact_vjps()).unwrap_or(u64::MAX);
    let max = exact_max_vjps();
    if vjps > max {
        return Err(format!(
            "the exact log-det needs {vjps} vector-Jacobian products per sample (one per dimension of every block), more than the limit {max}; use the series or roulette estimator, or raise {EXACT_ENV}"
        ));
    }
    Ok(())
}

/// The work and memory of a training or evaluation run, before its first step: `batch`
/// samples in flight (activations kept for the backward pass), `held` samples of a held-out
/// or evaluation set held in memory, `steps` optimizer steps. Errors are `(field, reason)`
/// with the field of the model file; the caller names a flag instead where one set it.
pub fn check_train(
    spec: &ModelSpec,
    batch: usize,
    held: usize,
    steps: u64,
) -> Result<(), (String, String)> {
    if steps == 0 || steps > MAX_TRAIN_STEPS {
        return Err((
            "train.steps".into(),
            format!("{steps} steps is outside 1..={MAX_TRAIN_STEPS}"),
        ));
    }
    if batch == 0 || batch > MAX_BATCH {
        return Err((
            "train.batch".into(),
            format!("{batch} is outside 1..={MAX_BATCH}"),
        ));
    }
    if held == 0 || held > MAX_SAMPLES {
        return Err((
            "train.heldout".into(),
            format!("{held} samples is outside 1..={MAX_SAMPLES}"),
        ));
    }
    let budget =
        iresnetc_runtime::fsread::memory_budget().map_err(|e| ("memory".into(), e.to_string()))?;
    let fp = spec.footprint().ok_or_else(|| {
        (
            "stages".to_string(),
            "the model does not validate".to_string(),
        )
    })?;
    // The backward pass keeps every node's activation of the batch: a few per layer.
    let layers = fp.block_dims.len() as u64 * (MAX_LAYERS_PER_BRANCH as u64).min(8) + 8;
    let need = fp
        .max_activation
        .checked_mul(8)
        .and_then(|b| b.checked_mul(layers))
        .and_then(|b| b.checked_mul(batch as u64))
        .and_then(|b| b.checked_add(fp.bytes(1)?));
    if need.is_none_or(|n| n > budget) {
        return Err((
            "train.batch".into(),
            format!(
                "a batch of {batch} needs about {} bytes of memory for its activations, more than the {budget} available (IRESNETC_MEMORY_LIMIT sets the budget)",
                need.map_or("more than 2^64".to_string(), |n| n.to_string())
            ),
        ));
    }
    let dim = elems("input", &spec.input)?;
    let held_bytes = dim
        .checked_mul(8)
        .and_then(|b| b.checked_mul(held as u64))
        .and_then(|b| b.checked_mul(2));
    if held_bytes.is_none_or(|n| n > budget) {
        return Err((
            "train.heldout".into(),
            format!(
                "{held} samples of {dim} values need about {} bytes, more than the {budget} available (IRESNETC_MEMORY_LIMIT sets the budget)",
                held_bytes.map_or("more than 2^64".to_string(), |n| n.to_string())
            ),
        ));
    }
    Ok(())
}
