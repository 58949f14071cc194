//! `plan.json`: the contract between the compiler's codegen and this runtime.
//!
//! A plan lists flat f32 storage buffers, WGSL kernels that bind them, and entry points
//! (`forward`, `inverse`, `logdet`, ...) made of steps. Everything the runtime does is spelled
//! out here, so the runtime needs no knowledge of the model. Field names are part of the bundle
//! format: renaming one is a `BUNDLE_VERSION` bump; adding an optional one (`#[serde(default)]`)
//! is not.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// Value of `Plan::format`; anything else is not an iresnetc bundle.
pub const BUNDLE_FORMAT: &str = "iresnetc-bundle";
/// The one plan version this runtime reads. 2: the bundle's `model.toml` defaults
/// changed meaning (squeeze order and factor-out half follow the official i-ResNet
/// code); a version-1 bundle's kernels were generated for the old conventions, and
/// reading its spec with the new defaults would silently disagree with them.
/// 3: dispatches may carry a batch-folded alternative kernel (`Step::Dispatch::large_batch`)
/// that reads the run's batch size from a `BufferInit::Batch` buffer; a version-2 runtime
/// would ignore both and run the wrong grid.
pub const BUNDLE_VERSION: u32 = 3;

/// Most steps an entry point may unroll to (`Repeat`s multiplied out): the executor records
/// every one into a single command encoder, so this bounds its memory and the run's length.
pub const MAX_UNROLLED_STEPS: u64 = 4_000_000;
/// WebGPU's default `maxComputeWorkgroupsPerDimension`.
pub const MAX_WORKGROUPS_PER_DIM: u32 = 65_535;
/// Invocations of one dispatch (per sample) may exceed the largest buffer's element count by
/// at most this factor: generated kernels run about one invocation per output element.
const INVOCATIONS_PER_ELEMENT: u64 = 64;

/// File name of the plan inside a bundle directory.
pub const PLAN_FILE: &str = "plan.json";
/// File name of the weights inside a bundle directory.
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// Entry point names of a plan.
pub mod entries {
    /// Flows: x, probes, coef -> z, logdet (series terms). Classifiers: see CLASSIFY.
    pub const FORWARD: &str = "forward";
    /// Flows: like forward with room for the roulette's extra terms.
    pub const FORWARD_ROULETTE: &str = "forward_roulette";
    /// Flows: x -> z without the log-det.
    pub const ENCODE: &str = "encode";
    /// Flows: x, probes, coef -> logdet.
    pub const LOGDET: &str = "logdet";
    /// Flows: z_in -> x_out.
    pub const INVERSE: &str = "inverse";
    /// Classifiers: x -> logits.
    pub const CLASSIFY: &str = "classify";
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// Always [`BUNDLE_VERSION`] for bundles this runtime reads.
    pub version: u32,
    pub compiler_version: String,
    pub model: String,
    pub kind: ModelKind,
    /// Shape of one sample, without the batch dimension.
    pub input_shape: Vec<usize>,
    pub buffers: Vec<BufferDecl>,
    pub kernels: Vec<KernelDecl>,
    pub entry_points: BTreeMap<String, EntryPoint>,
    /// Flows: where the log-det entry points' `probes` and `coef` inputs sit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logdet: Option<crate::logdet::LogDetLayout>,
    /// What the model is (shapes, settings, certified inversion), for every backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<crate::engine::ModelInfo>,
    /// The device limits the bundle needs (at batch 1), checked against the device before
    /// anything is built. Optional: plans built by hand have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::limits::RequiredLimits>,
    /// Free-form data for tools (the runtime never reads it).
    #[serde(default)]
    pub meta: serde_json::Value,
    /// SHA-256 (lower-case hex) of every other file of the bundle, by file name, recorded
    /// at compile time. When present, loading checks each file it reads against it, so a
    /// bundle edited after compiling (scaled weights, another model.toml) is refused.
    /// Optional: plans built in memory have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub integrity: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Flow,
    Classifier,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct BufferDecl {
    pub name: String,
    /// Number of f32 elements; per sample when `per_sample` (the runtime multiplies by the batch).
    pub elems: u64,
    pub per_sample: bool,
    pub init: BufferInit,
}

/// What a buffer holds when a run starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BufferInit {
    /// Zeroed at the start of *every* run (an accumulator never carries a previous run's sum).
    Zero,
    /// Uploaded once from `weights.safetensors`; the tensor's element count must equal `elems`.
    Weight {
        tensor: String,
        /// How the buffer arranges the tensor's values (as stored unless said).
        #[serde(default, skip_serializing_if = "WeightLayout::is_stored")]
        layout: WeightLayout,
    },
    /// Written from the caller's data before every run.
    Input,
    /// Read back after a run (if an entry point lists it as an output).
    Output,
    /// Contents undefined at the start of a run.
    Scratch,
    /// One element holding the number of samples of the run (as f32), written when the
    /// buffers of a batch size are allocated: batch-folded kernels bound their rows with it.
    Batch,
    /// Uploaded once: the named weight tensors (as stored) one after the other, in order.
    /// Kernels read their small parameters (biases, ActNorm scales, ...) through one such
    /// binding, which keeps them within WebGPU's default of 8 storage buffers per stage.
    Packed { parts: Vec<String> },
}

impl BufferInit {
    /// Filled from `weights.safetensors` once, never written by a run.
    pub fn is_weight(&self) -> bool {
        matches!(self, BufferInit::Weight { .. } | BufferInit::Packed { .. })
    }

    /// The weight tensors this buffer is filled from, in order.
    pub fn tensors(&self) -> Vec<&str> {
        match self {
            BufferInit::Weight { tensor, .. } => vec![tensor.as_str()],
            BufferInit::Packed { parts } => parts.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// How a weight buffer arranges its tensor's values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WeightLayout {
    #[default]
    Stored,
    /// A convolution weight `[cout][cin][k][k]` (a dense one: `k = 1`) rearranged for its
    /// adjoint, `[cin][cout][k][k]` with the taps flipped: the transposed convolution of the
    /// log-det's vjp then reads its weights in the forward order, contiguous along the
    /// reduction (the GPU tiling's kernels stage them that way).
    Adjoint { cout: u32, k: u32 },
}

impl WeightLayout {
    pub fn is_stored(&self) -> bool {
        *self == WeightLayout::Stored
    }

    /// The buffer's values from the tensor's; None when the sizes do not fit the layout.
    pub fn arrange<'d>(&self, data: &'d [f32]) -> Option<std::borrow::Cow<'d, [f32]>> {
        match *self {
            WeightLayout::Stored => Some(std::borrow::Cow::Borrowed(data)),
            WeightLayout::Adjoint { cout, k } => {
                let (cout, k) = (cout as usize, k as usize);
                let per_out = cout.checked_mul(k)?.checked_mul(k)?;
                if per_out == 0 || !data.len().is_multiple_of(per_out) {
                    return None;
                }
                let (cin, taps) = (data.len() / per_out, k * k);
                let mut out = vec![0f32; data.len()];
                for (o, row) in data.chunks_exact(cin * taps).enumerate() {
                    for (i, kernel) in row.chunks_exact(taps).enumerate() {
                        let dst = &mut out[(i * cout + o) * taps..][..taps];
                        for (t, &v) in kernel.iter().enumerate() {
                            dst[taps - 1 - t] = v;
                        }
                    }
                }
                Some(std::borrow::Cow::Owned(out))
            }
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct KernelDecl {
    pub name: String,
    /// WGSL file, relative to the bundle directory.
    pub file: String,
    /// Name of the `@compute` function in that file.
    pub entry: String,
    /// Must equal the `@workgroup_size` of `entry` (the runtime checks).
    pub workgroup_size: [u32; 3],
    /// Buffer names; element `i` is bound to `@group(0) @binding(i)`.
    pub bindings: Vec<String>,
    /// Optional: whether binding `i` is read-only. Empty means "take it from the WGSL"
    /// (`var<storage, read>` vs `var<storage, read_write>`); when given, it must agree with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_only: Vec<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct EntryPoint {
    pub inputs: Vec<IoDecl>,
    pub outputs: Vec<IoDecl>,
    pub steps: Vec<Step>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct IoDecl {
    /// Name the caller uses (`run(entry, batch, &[(name, data)])`).
    pub name: String,
    /// The plan buffer the data goes to / comes from.
    pub buffer: String,
    /// Per-sample shape; its product must equal the buffer's `elems`.
    pub shape: Vec<usize>,
}

impl IoDecl {
    /// Elements of one sample.
    pub fn elems(&self) -> u64 {
        // Saturating: a tampered shape must fail validation, not wrap to a small count.
        self.shape
            .iter()
            .fold(1u64, |a, &d| a.saturating_mul(d as u64))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `workgroups = [x, y, z_per_sample]`; the runtime dispatches `[x, y, z_per_sample * batch]`,
    /// and the kernel derives the sample index as `workgroup_id.z / z_per_sample`.
    Dispatch {
        kernel: String,
        workgroups: [u32; 3],
        /// From `min_batch` samples on, the runtime dispatches this kernel instead, with the
        /// batch folded into its grid (the GPU tiling's shared-memory GEMM kernels).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        large_batch: Option<Folded>,
    },
    /// Unrolled into the same submission: no CPU round trip between iterations.
    Repeat { times: u32, steps: Vec<Step> },
    /// Whole-buffer copy; both buffers must have the same size.
    Copy { src: String, dst: String },
    /// Sets every element of `buffer` to `value`.
    Fill { buffer: String, value: f32 },
}

/// A kernel whose grid covers every sample of a run at once: the samples' `rows` are
/// concatenated (sample-major) and cut into tiles of `rows_per_group`, one workgroup row each,
/// times `groups_y` workgroups along y. The kernel reads the batch from a `Batch` buffer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Folded {
    pub min_batch: u32,
    pub kernel: String,
    pub rows: u32,
    pub rows_per_group: u32,
    pub groups_y: u32,
}

impl Folded {
    /// Workgroups `[x, y, z]` at `batch`: the row tiles along x, spilling into z past
    /// `max_per_dim` (the kernel numbers its tile `z * num_workgroups.x + x`); None when
    /// they overflow even that.
    pub fn grid(&self, batch: usize, max_per_dim: u32) -> Option<[u32; 3]> {
        folded_grid(
            [self.rows, self.rows_per_group, self.groups_y],
            batch,
            max_per_dim,
        )
    }
}

/// [`Folded::grid`] from `[rows, rows_per_group, groups_y]`.
pub fn folded_grid(fold: [u32; 3], batch: usize, max_per_dim: u32) -> Option<[u32; 3]> {
    let [rows, rows_per_group, groups_y] = fold;
    let rows = u64::from(rows).checked_mul(batch as u64)?;
    let tiles = rows.div_ceil(u64::from(rows_per_group.max(1))).max(1);
    let x = tiles.min(u64::from(max_per_dim.max(1)));
    let z = tiles.div_ceil(x);
    Some([
        u32::try_from(x).ok()?,
        groups_y,
        u32::try_from(z).ok().filter(|&z| z <= max_per_dim)?,
    ])
}

/// The kernel and grid that a `Dispatch` step records at `batch`: the folded alternative
/// from its `min_batch` on, else the per-sample grid with z multiplied by the batch; None
/// when a count overflows `u32` or the folded grid exceeds `max_per_dim`.
pub fn dispatch_at<'s>(
    kernel: &'s str,
    workgroups: [u32; 3],
    large_batch: Option<&'s Folded>,
    batch: usize,
    max_per_dim: u32,
) -> Option<(&'s str, [u32; 3])> {
    match large_batch {
        Some(f) if batch >= f.min_batch as usize => Some((&f.kernel, f.grid(batch, max_per_dim)?)),
        _ => {
            let z = u32::try_from(batch).ok()?.checked_mul(workgroups[2])?;
            Some((kernel, [workgroups[0], workgroups[1], z]))
        }
    }
}

/// Steps after unrolling every `Repeat`; None on overflow.
fn unrolled_steps(steps: &[Step]) -> Option<u64> {
    steps.iter().try_fold(0u64, |acc, s| {
        let n = match s {
            Step::Repeat { times, steps } => {
                u64::from(*times).checked_mul(unrolled_steps(steps)?)?
            }
            _ => 1,
        };
        acc.checked_add(n)
    })
}

/// Finds a buffer by name; the second argument describes the reference for the error message.
type BufferLookup<'p> = dyn Fn(&str, &dyn Fn() -> String) -> Result<&'p BufferDecl> + 'p;

impl Plan {
    /// The typed log-det layout drives loops and allocations in every backend that fills the
    /// `probes` and `coef` inputs, and plan.json itself is not covered by the file hashes: its
    /// sizes must agree with the inputs the plan declares (whose buffers are bounded), so a
    /// tampered layout is an error, never a huge loop.
    fn validate_logdet(&self) -> Result<()> {
        let Some(l) = &self.logdet else {
            return Ok(());
        };
        let bad = |reason: String| Err(RuntimeError::corrupt(PLAN_FILE, reason));
        if l.probes == 0 || l.block_dims.is_empty() || l.block_dims.contains(&0) {
            return bad("logdet: probes and every block dimension must be positive".into());
        }
        if l.coef_stride < l.terms || l.terms == 0 {
            return bad(format!(
                "logdet: {} terms in {} coefficient slots per block",
                l.terms, l.coef_stride
            ));
        }
        let probe_elems = l
            .block_dims
            .iter()
            .try_fold(0u64, |a, &d| a.checked_add(d as u64))
            .and_then(|s| s.checked_mul(l.probes as u64));
        let coef_elems = (l.block_dims.len() as u64).checked_mul(l.coef_stride as u64);
        for (name, ep) in &self.entry_points {
            for io in &ep.inputs {
                let want = match io.name.as_str() {
                    "probes" => probe_elems,
                    "coef" => coef_elems,
                    _ => continue,
                };
                if want != Some(io.elems()) {
                    return bad(format!(
                        "logdet layout does not match entry point {name:?}'s input {:?} ({} values per sample)",
                        io.name,
                        io.elems()
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn buffer(&self, name: &str) -> Option<&BufferDecl> {
        self.buffers.iter().find(|b| b.name == name)
    }

    pub fn kernel(&self, name: &str) -> Option<&KernelDecl> {
        self.kernels.iter().find(|k| k.name == name)
    }

    /// Names of the weight tensors the plan needs, each once.
    pub fn weight_tensors(&self) -> BTreeSet<&str> {
        self.buffers.iter().flat_map(|b| b.init.tensors()).collect()
    }

    /// Checks the plan's internal consistency: every name resolves, sizes agree, no count is
    /// zero. Says nothing about the WGSL or the weights (see `Bundle::load` and
    /// `GpuExecutor::new`). Errors are `BundleCorrupt` on `plan.json`.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(RuntimeError::corrupt(PLAN_FILE, reason));
        if self.format != BUNDLE_FORMAT {
            return bad(format!(
                "format is {:?}, expected {BUNDLE_FORMAT:?}",
                self.format
            ));
        }
        if self.version != BUNDLE_VERSION {
            return Err(RuntimeError::BundleVersion {
                found: self.version,
                expected: BUNDLE_VERSION,
            });
        }

        self.validate_logdet()?;

        let mut buffers = BTreeMap::new();
        for b in &self.buffers {
            if buffers.insert(b.name.as_str(), b).is_some() {
                return bad(format!("buffer {:?} is declared twice", b.name));
            }
            // wgpu refuses zero-sized bindings, and a zero-sized buffer is always a codegen bug.
            if b.elems == 0 {
                return bad(format!("buffer {:?} has 0 elements", b.name));
            }
            if let BufferInit::Weight { tensor, layout } = &b.init {
                if let WeightLayout::Adjoint { cout, k } = *layout {
                    let per_out = u64::from(cout)
                        .checked_mul(u64::from(k))
                        .and_then(|n| n.checked_mul(u64::from(k)))
                        .unwrap_or(0);
                    if per_out == 0 || !b.elems.is_multiple_of(per_out) {
                        return bad(format!(
                            "buffer {:?} arranges {tensor:?} as the adjoint of {cout} outputs x {k}x{k} taps, which does not divide its {} elements",
                            b.name, b.elems
                        ));
                    }
                }
                if b.per_sample {
                    return bad(format!(
                        "buffer {:?} holds weight {tensor:?} but is per_sample (weights are shared by the batch)",
                        b.name
                    ));
                }
            }
            if let BufferInit::Packed { parts } = &b.init {
                if parts.is_empty() || b.per_sample {
                    return bad(format!(
                        "buffer {:?} packs weights but has no parts or is per_sample",
                        b.name
                    ));
                }
            }
            if b.init == BufferInit::Batch && (b.per_sample || b.elems != 1) {
                return bad(format!(
                    "buffer {:?} holds the batch size but is not one shared element",
                    b.name
                ));
            }
        }
        let buffer = |name: &str, context: &dyn Fn() -> String| {
            buffers.get(name).copied().ok_or_else(|| {
                RuntimeError::corrupt(
                    PLAN_FILE,
                    format!("{} refers to unknown buffer {name:?}", context()),
                )
            })
        };

        let mut kernels = BTreeSet::new();
        for k in &self.kernels {
            if !kernels.insert(k.name.as_str()) {
                return bad(format!("kernel {:?} is declared twice", k.name));
            }
            if k.file.is_empty() || k.entry.is_empty() {
                return bad(format!("kernel {:?} has an empty file or entry", k.name));
            }
            if k.workgroup_size.contains(&0) {
                return bad(format!(
                    "kernel {:?} has workgroup_size {:?} (every dimension must be >= 1)",
                    k.name, k.workgroup_size
                ));
            }
            if k.bindings.is_empty() {
                return bad(format!("kernel {:?} binds no buffer", k.name));
            }
            let mut bound = BTreeSet::new();
            for (i, name) in k.bindings.iter().enumerate() {
                buffer(name, &|| format!("kernel {:?} binding {i}", k.name))?;
                // WebGPU forbids binding one buffer twice in a dispatch when one use writes it.
                if !bound.insert(name.as_str()) {
                    return bad(format!("kernel {:?} binds buffer {name:?} twice", k.name));
                }
            }
            if !k.read_only.is_empty() && k.read_only.len() != k.bindings.len() {
                return bad(format!(
                    "kernel {:?} has {} bindings but {} read_only flags",
                    k.name,
                    k.bindings.len(),
                    k.read_only.len()
                ));
            }
        }

        if self.entry_points.is_empty() {
            return bad("no entry point".to_string());
        }
        // Bound of a dispatch's invocations: generated kernels use about one per element.
        let largest = self.buffers.iter().map(|b| b.elems).max().unwrap_or(1);
        let max_invocations = largest
            .saturating_mul(INVOCATIONS_PER_ELEMENT)
            .saturating_add(1 << 16);
        for (ep_name, ep) in &self.entry_points {
            for (role, ios) in [("input", &ep.inputs), ("output", &ep.outputs)] {
                let mut names = BTreeSet::new();
                for io in ios {
                    if !names.insert(io.name.as_str()) {
                        return bad(format!(
                            "entry point {ep_name:?} has two {role}s named {:?}",
                            io.name
                        ));
                    }
                    let b = buffer(&io.buffer, &|| {
                        format!("entry point {ep_name:?} {role} {:?}", io.name)
                    })?;
                    if io.elems() != b.elems {
                        return bad(format!(
                            "entry point {ep_name:?} {role} {:?} has shape {:?} ({} elements) but buffer {:?} has {} elements per {}",
                            io.name,
                            io.shape,
                            io.elems(),
                            b.name,
                            b.elems,
                            if b.per_sample { "sample" } else { "run" }
                        ));
                    }
                    if role == "input" && b.init.is_weight() {
                        return bad(format!(
                            "entry point {ep_name:?} input {:?} would overwrite weight buffer {:?}",
                            io.name, b.name
                        ));
                    }
                    // Outputs are concatenated over batch chunks, which only means something
                    // for per-sample data.
                    if role == "output" && !b.per_sample {
                        return bad(format!(
                            "entry point {ep_name:?} output {:?} reads buffer {:?}, which is not per_sample",
                            io.name, b.name
                        ));
                    }
                }
            }
            self.validate_steps(ep_name, &ep.steps, &buffer, max_invocations)?;
            let unrolled = unrolled_steps(&ep.steps);
            if unrolled.is_none_or(|n| n > MAX_UNROLLED_STEPS) {
                return bad(format!(
                    "entry point {ep_name:?} unrolls to {} steps, more than the {MAX_UNROLLED_STEPS} a run may record (repeat counts too large)",
                    unrolled.map_or("more than 2^64".to_string(), |n| n.to_string())
                ));
            }
        }
        Ok(())
    }

    fn validate_steps<'p>(
        &'p self,
        ep_name: &str,
        steps: &[Step],
        buffer: &BufferLookup<'p>,
        max_invocations: u64,
    ) -> Result<()> {
        let bad = |reason: String| Err(RuntimeError::corrupt(PLAN_FILE, reason));
        let writable = |name: &str, what: &str| -> Result<()> {
            let b = buffer(name, &|| format!("entry point {ep_name:?} {what}"))?;
            if b.init.is_weight() || b.init == BufferInit::Batch {
                return bad(format!(
                    "entry point {ep_name:?} {what} writes read-only buffer {name:?}"
                ));
            }
            Ok(())
        };
        let check_grid = |kernel: &str, workgroups: &[u32; 3]| -> Result<()> {
            if self.kernel(kernel).is_none() {
                return bad(format!(
                    "entry point {ep_name:?} dispatches unknown kernel {kernel:?}"
                ));
            }
            if workgroups.contains(&0) {
                return bad(format!(
                    "entry point {ep_name:?} dispatches kernel {kernel:?} with workgroups {workgroups:?} (every count must be >= 1)"
                ));
            }
            if workgroups.iter().any(|&w| w > MAX_WORKGROUPS_PER_DIM) {
                return bad(format!(
                    "entry point {ep_name:?} dispatches kernel {kernel:?} with workgroups {workgroups:?} (at most {MAX_WORKGROUPS_PER_DIM} per dimension)"
                ));
            }
            let size = self.kernel(kernel).map_or([1; 3], |k| k.workgroup_size);
            let invocations = workgroups
                .iter()
                .chain(&size)
                .try_fold(1u64, |acc, &w| acc.checked_mul(u64::from(w)));
            if invocations.is_none_or(|n| n > max_invocations) {
                return bad(format!(
                    "entry point {ep_name:?} dispatches kernel {kernel:?} with workgroups {workgroups:?} of {size:?}: more invocations than the plan's buffers could use (at most {max_invocations})"
                ));
            }
            Ok(())
        };
        for step in steps {
            match step {
                Step::Dispatch {
                    kernel,
                    workgroups,
                    large_batch,
                } => {
                    check_grid(kernel, workgroups)?;
                    if let Some(f) = large_batch {
                        // Its grid for one sample is held to the bounds of a per-sample one
                        // (tiles past the buffers' size would be work for nothing).
                        let tiles = f.rows.div_ceil(f.rows_per_group.max(1));
                        check_grid(&f.kernel, &[tiles, f.groups_y, 1])?;
                        if f.min_batch == 0 || f.rows == 0 || f.rows_per_group == 0 {
                            return bad(format!(
                                "entry point {ep_name:?} folds kernel {:?} with a zero min_batch, rows or rows_per_group",
                                f.kernel
                            ));
                        }
                    }
                }
                Step::Repeat { steps, times } => {
                    if *times == 0 {
                        return bad(format!("entry point {ep_name:?} has a repeat of 0 times"));
                    }
                    self.validate_steps(ep_name, steps, buffer, max_invocations)?
                }
                Step::Copy { src, dst } => {
                    let s = buffer(src, &|| format!("entry point {ep_name:?} copy source"))?;
                    writable(dst, "copy destination")?;
                    let d = buffer(dst, &|| String::new())?;
                    if src == dst {
                        return bad(format!(
                            "entry point {ep_name:?} copies buffer {src:?} onto itself"
                        ));
                    }
                    if s.elems != d.elems || s.per_sample != d.per_sample {
                        return bad(format!(
                            "entry point {ep_name:?} copies {src:?} ({} elements{}) to {dst:?} ({} elements{}): sizes differ",
                            s.elems,
                            if s.per_sample { " per sample" } else { "" },
                            d.elems,
                            if d.per_sample { " per sample" } else { "" },
                        ));
                    }
                }
                Step::Fill {
                    buffer: name,
                    value,
                } => {
                    writable(name, "fill")?;
                    if !value.is_finite() {
                        return bad(format!(
                            "entry point {ep_name:?} fills {name:?} with {value}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod fold_tests;
