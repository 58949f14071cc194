//! The CPU backend: the ONNX graphs `iresnetc` exports, run by tract.
//!
//! A bundle holds `forward.onnx`, for flows `forward_logdet.onnx` and
//! `inverse.onnx`, and `onnx.json` ([`Manifest`]) describing them, so this
//! module runs a bundle without the compiler. Probes for the log-det graph
//! come from [`crate::rng::probe_vector`], the generator every backend shares,
//! so tract reproduces the reference estimate for the same seed.
//!
//! Graphs declare a symbolic batch (`batch`); tract optimizes best with every
//! shape known, so a graph is loaded for one concrete batch size
//! ([`TractGraph::load`]) and callers keep one per batch size they run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

use crate::bundle::{check_relative, load_plan, read_verified};
use crate::error::{Result, RuntimeError};
use crate::fsread::{clip, read_bounded, read_text_bounded, MAX_JSON_FILE};
use crate::onnx_data::DATA_FILES;
use crate::rng::probe_vector;
use prost::Message;
use tract_onnx::pb::ModelProto;

/// Name of the manifest next to the bundle's ONNX files.
pub const MANIFEST_FILE: &str = "onnx.json";
/// Format tag and version of [`Manifest`]. Version 2: graphs list typed ports, bundles carry
/// the model cut into per-block [`Segment`]s instead of whole log-det and inverse graphs.
pub const MANIFEST_FORMAT: &str = "iresnetc-onnx";
pub const MANIFEST_VERSION: u32 = 2;

/// `onnx.json`: what each exported graph takes and returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model: String,
    /// `flow` or `classifier`.
    pub kind: String,
    /// Per-sample input shape (`[C, H, W]` or `[D]`).
    pub input_shape: Vec<usize>,
    /// Per-sample output length (latent dimension, or number of classes).
    pub output_dim: usize,
    /// The whole model in one graph: `input [batch, ...] -> z [batch, D]` (flows) or
    /// `logits [batch, classes]`. Bundles keep it for runtimes other than iresnetc's.
    pub forward: GraphEntry,
    /// The whole model with its log-det: `input, probes -> z, logdet [batch]`
    /// (`export-onnx --with-logdet`; bundles carry per-segment graphs instead).
    pub forward_logdet: Option<GraphEntry>,
    /// The whole inverse `z -> x`, block b's fixed point unrolled `inverse_steps[b]` times
    /// (`export-onnx --inverse-steps`; bundles carry per-segment step graphs instead).
    pub inverse: Option<GraphEntry>,
    pub inverse_steps: Vec<usize>,
    /// How a whole-model `probes` input is laid out (None: no probe input); a segment's
    /// `probes` input is its block's columns of this layout.
    pub probes: Option<ProbeLayout>,
    /// `series` (Hutchinson, truncated), `exact2d` (closed form for 2-D blocks) or `none`.
    pub logdet_estimator: String,
    pub logdet_terms: usize,
    /// The model file's default probe seed.
    pub default_probe_seed: u64,
    /// Flows: z's parts in concatenation order.
    pub latents: Vec<LatentPart>,
    /// The model cut at block boundaries, in forward order (bundles; empty in the file
    /// `export-onnx` writes). tract's optimizer is superlinear in a graph's node count,
    /// so many small graphs load far faster than one big one.
    pub segments: Vec<Segment>,
}

/// One ONNX file and its graph's inputs and outputs, in graph order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GraphEntry {
    pub file: String,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

/// A graph input or output: its tensor name, what it holds, its per-sample shape
/// (the tensor is `[batch, shape...]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub name: String,
    pub value: Value,
    pub shape: Vec<usize>,
}

/// What a [`Port`] carries.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Value {
    /// The model input x.
    Input,
    /// z, every latent part concatenated.
    Z,
    Logits,
    /// Per-sample log-det (`[batch]`): the whole model's, or a segment's share.
    Logdet,
    /// Log-det probes: the whole [`ProbeLayout`], or one block's columns of it.
    Probes,
    /// The tensor between two segments: the model input for the first segment, then the
    /// output of the previous segment's block.
    Carry,
    /// Latent part `index` of [`Manifest::latents`].
    Latent {
        index: usize,
    },
    /// A block's output `y = a + g(a)`: the right-hand side of its fixed point.
    BlockOutput,
    /// A block's input `a`: the fixed point's unknown, `a = y - g(a)`.
    BlockInput,
}

/// Where latent part `i` sits in z.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatentPart {
    pub name: String,
    pub offset: usize,
    pub shape: Vec<usize>,
}

/// One residual block and the layout ops before it (squeeze, channel padding, factor-out
/// slices, ActNorm); the last segment also holds the ops after the last block.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// Index of the block (in [`Manifest::probes`] and the plan's block list); None only
    /// for a model without blocks, which is one segment.
    pub block: Option<usize>,
    /// `Carry -> [Carry], Latent..., [Logits]`.
    pub forward: GraphEntry,
    /// Flows with an exportable estimator: `Carry, [Probes] -> [Carry], Latent..., Logdet`.
    pub forward_logdet: Option<GraphEntry>,
    /// Flows: how to run the segment backwards.
    pub inverse: Option<SegmentInverse>,
}

/// A segment backwards: find y, iterate `x <- y - g(x)` from `x = y` (at most `steps`
/// times, the certified count), then undo the layout ops.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegmentInverse {
    pub steps: usize,
    /// Where y comes from.
    pub block_output: BlockOutputSource,
    /// One fixed-point step: `BlockOutput, BlockInput -> BlockInput`.
    pub step: GraphEntry,
    /// `BlockInput, Latent... -> Carry`: the inverse of the ops before the block.
    pub layout: GraphEntry,
}

/// How the inverse of a segment obtains its block's output y.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BlockOutputSource {
    /// y is the segment's forward output (the next segment's input).
    Carry,
    /// y is latent part `index`.
    Latent { index: usize },
    /// y is this graph's `BlockOutput`, from the segment's forward outputs (the inverse
    /// of the ops after the block).
    Graph(GraphEntry),
}

/// `probes` is `[batch, total]`; block b's probe p of sample i occupies
/// columns `offset + p*dim .. offset + (p+1)*dim` of row i and equals
/// `probe_vector(seed, b, i, p, dim, rademacher)` (i counted from the first
/// sample of the array being run).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProbeLayout {
    pub total: usize,
    pub rademacher: bool,
    pub blocks: Vec<ProbeBlock>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProbeBlock {
    pub name: String,
    pub dim: usize,
    pub offset: usize,
    pub count: usize,
}

impl ProbeLayout {
    /// Block `b`'s `[batch, count * dim]` columns of [`Self::matrix`].
    pub fn block_matrix(&self, b: usize, seed: u64, first_sample: usize, batch: usize) -> Vec<f32> {
        let Some(blk) = self.blocks.get(b) else {
            return vec![];
        };
        let width = blk.count * blk.dim;
        let mut m = Vec::with_capacity(batch * width);
        for i in 0..batch {
            for p in 0..blk.count {
                let v = probe_vector(seed, b, first_sample + i, p, blk.dim, self.rademacher);
                m.extend(v.into_iter().map(|x| x as f32));
            }
        }
        m
    }

    /// The `[batch, total]` probe matrix (row-major, f32) for samples
    /// `first_sample .. first_sample + batch`.
    pub fn matrix(&self, seed: u64, first_sample: usize, batch: usize) -> Vec<f32> {
        let mut m = vec![0f32; batch * self.total];
        for i in 0..batch {
            let row = &mut m[i * self.total..(i + 1) * self.total];
            for (b, blk) in self.blocks.iter().enumerate() {
                for p in 0..blk.count {
                    let v = probe_vector(seed, b, first_sample + i, p, blk.dim, self.rademacher);
                    let at = blk.offset + p * blk.dim;
                    for (dst, src) in row[at..at + blk.dim].iter_mut().zip(v) {
                        *dst = src as f32;
                    }
                }
            }
        }
        m
    }
}

impl Manifest {
    /// Reads `dir/onnx.json` without a plan to check it against (the export-onnx layout).
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        if !path.exists() {
            return Err(RuntimeError::MissingFile(path));
        }
        let text = read_text_bounded(&path, MAX_JSON_FILE, "ONNX manifest")?;
        Manifest::parse(&text).map_err(|reason| RuntimeError::corrupt(&path, reason))
    }

    /// Parses and checks a manifest: format and version first (so an older bundle is told to
    /// recompile rather than shown the first field its manifest lacks), then file names inside
    /// the directory, sizes, probe offsets inside the probe matrix (checked arithmetic: a
    /// tampered offset must be an error, not a slice out of range), and at least one inverse
    /// step per block.
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        #[derive(Deserialize)]
        struct Head {
            format: Option<String>,
            version: Option<u32>,
        }
        let head: Head = serde_json::from_str(text).map_err(|e| clip(&e.to_string(), 200))?;
        if head.format.as_deref() != Some(MANIFEST_FORMAT) || head.version != Some(MANIFEST_VERSION)
        {
            return Err(format!(
                "format {:?} version {:?}, expected {MANIFEST_FORMAT:?} version {MANIFEST_VERSION}: recompile the bundle with `iresnetc compile`",
                head.format.as_deref().map(|f| clip(f, 40)),
                head.version
            ));
        }
        let m: Manifest = serde_json::from_str(text).map_err(|e| clip(&e.to_string(), 200))?;
        let mut files: Vec<&GraphEntry> = vec![&m.forward];
        files.extend(m.forward_logdet.as_ref());
        files.extend(m.inverse.as_ref());
        for seg in &m.segments {
            files.push(&seg.forward);
            files.extend(seg.forward_logdet.as_ref());
            if let Some(inv) = &seg.inverse {
                files.push(&inv.step);
                files.push(&inv.layout);
                if let BlockOutputSource::Graph(g) = &inv.block_output {
                    files.push(g);
                }
                if inv.steps == 0 {
                    return Err(format!(
                        "segment of block {:?}: 0 inverse steps; a block inverted with no fixed-point step is not certified",
                        seg.block
                    ));
                }
            }
        }
        for e in files {
            check_relative(&e.file)
                .map_err(|r| format!("graph file {:?}: {r}", clip(&e.file, 60)))?;
        }
        if m.input_shape.is_empty() || m.input_shape.contains(&0) || m.output_dim == 0 {
            return Err(format!(
                "input_shape {:?} / output_dim {}: sizes must be positive",
                m.input_shape, m.output_dim
            ));
        }
        m.input_shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_SAMPLE_ELEMS)
            .ok_or_else(|| format!("input_shape {:?} is too large", m.input_shape))?;
        if m.output_dim > MAX_SAMPLE_ELEMS {
            return Err(format!("output_dim {} is too large", m.output_dim));
        }
        if m.inverse.is_some() {
            if m.inverse_steps.is_empty() {
                return Err("an inverse graph with no inverse_steps".into());
            }
            if let Some(b) = m.inverse_steps.iter().position(|&k| k == 0) {
                return Err(format!(
                    "inverse_steps[{b}] is 0: a block inverted with no fixed-point step is not certified"
                ));
            }
        }
        if let Some(p) = &m.probes {
            if p.total > MAX_SAMPLE_ELEMS {
                return Err(format!("probes.total {} is too large", p.total));
            }
            for (b, blk) in p.blocks.iter().enumerate() {
                // dim 0 with a huge count passes the size check below but makes
                // `ProbeLayout::matrix` loop for ever (found by the fuzzer).
                if blk.dim == 0 || blk.count == 0 {
                    return Err(format!(
                        "probes.blocks[{b}] has {} probes of dimension {}: both must be >= 1",
                        blk.count, blk.dim
                    ));
                }
                let end = blk
                    .count
                    .checked_mul(blk.dim)
                    .and_then(|n| n.checked_add(blk.offset));
                if end.is_none_or(|e| e > p.total) {
                    return Err(format!(
                        "probes.blocks[{b}] (offset {}, {} probes of {}) does not fit in probes.total {}",
                        blk.offset, blk.count, blk.dim, p.total
                    ));
                }
            }
        }
        Ok(m)
    }
}

/// Most elements of one sample (input, output or probe row) a manifest may declare.
const MAX_SAMPLE_ELEMS: usize = 1 << 28;

fn tract_err(context: impl Into<String>, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Tract {
        context: context.into(),
        // tract's errors carry a chain; `{:#}`-style joining keeps it on one line.
        message: e.to_string().replace('\n', "; "),
    }
}

/// One ONNX graph, optimized by tract for a fixed batch size.
#[derive(Clone)]
pub struct TractGraph {
    plan: Arc<TypedRunnableModel>,
    /// Full input shapes (batch first), in graph input order.
    input_shapes: Vec<Vec<usize>>,
    label: String,
}

/// A run's outputs: `(shape, row-major f32 data)` per graph output.
pub type TractOutputs = Vec<(Vec<usize>, Vec<f32>)>;

impl TractGraph {
    /// Parses ONNX bytes and optimizes them with every input shape fixed
    /// (`input_shapes` include the batch). `label` names the graph in errors.
    pub fn load(bytes: &[u8], input_shapes: &[Vec<usize>], label: &str) -> Result<TractGraph> {
        TractGraph::load_with_data(bytes, &|_| None, input_shapes, label)
    }

    /// [`TractGraph::load`] of a bundle's graph: `data` gives the contents of the bundle's
    /// [`DATA_FILES`], which hold the initializers the graph references as external data.
    pub fn load_with_data<'d>(
        bytes: &[u8],
        data: &dyn Fn(&str) -> Option<&'d [u8]>,
        input_shapes: &[Vec<usize>],
        label: &str,
    ) -> Result<TractGraph> {
        threads();
        // Output shapes carry the symbolic batch; inputs pin it, so the declared
        // outputs are only a consistency check tract need not redo.
        let onnx = tract_onnx::onnx().with_ignore_output_shapes(true);
        let mut proto = ModelProto::decode(bytes)
            .map_err(|e| tract_err(format!("{label}: reading ONNX"), e))?;
        crate::onnx_data::resolve(&mut proto, data)
            .map_err(|reason| RuntimeError::corrupt(label, reason))?;
        let mut model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| tract_err(format!("{label}: reading ONNX"), e))?;
        for (i, s) in input_shapes.iter().enumerate() {
            model = model
                .with_input_fact(i, f32::fact(s).into())
                .map_err(|e| tract_err(format!("{label}: input {i} shape {s:?}"), e))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| tract_err(format!("{label}: optimizing"), e))?;
        Ok(TractGraph {
            plan,
            input_shapes: input_shapes.to_vec(),
            label: label.to_string(),
        })
    }

    pub fn load_file(path: &Path, input_shapes: &[Vec<usize>]) -> Result<TractGraph> {
        if !path.exists() {
            return Err(RuntimeError::MissingFile(path.to_path_buf()));
        }
        let bytes = read_bounded(path, crate::fsread::memory_budget()?, "ONNX graph")?;
        // A standalone file (from `export-onnx`) embeds its weights.
        TractGraph::load(&bytes, input_shapes, &path.display().to_string())
    }

    pub fn batch(&self) -> usize {
        self.input_shapes
            .first()
            .and_then(|s| s.first())
            .copied()
            .unwrap_or(0)
    }

    /// Runs on row-major f32 inputs whose lengths match the loaded shapes.
    pub fn run(&self, inputs: &[&[f32]]) -> Result<TractOutputs> {
        if inputs.len() != self.input_shapes.len() {
            return Err(RuntimeError::bad_input(
                &self.label,
                format!(
                    "{} inputs given, the graph takes {}",
                    inputs.len(),
                    self.input_shapes.len()
                ),
            ));
        }
        let mut tv: TVec<TValue> = tvec!();
        for (i, (data, shape)) in inputs.iter().zip(&self.input_shapes).enumerate() {
            let t = Tensor::from_shape(shape, data).map_err(|e| {
                RuntimeError::bad_input(
                    format!("{} input {i}", self.label),
                    format!("{} values for shape {shape:?}: {e}", data.len()),
                )
            })?;
            tv.push(t.into_tvalue());
        }
        let outs = self
            .plan
            .run(tv)
            .map_err(|e| tract_err(format!("{}: running", self.label), e))?;
        outs.iter()
            .map(|t| {
                let view = t
                    .to_plain_array_view::<f32>()
                    .map_err(|e| tract_err(format!("{}: reading an output", self.label), e))?;
                Ok((t.shape().to_vec(), view.iter().copied().collect()))
            })
            .collect()
    }
}

/// Where a bundle's ONNX files are: its directory, or memory (a model compiled for one run).
#[derive(Clone, Debug)]
pub enum GraphFiles {
    /// A bundle directory, its files checked against the hashes of its plan.
    Dir {
        dir: PathBuf,
        plan: Box<crate::plan::Plan>,
    },
    Memory(std::collections::BTreeMap<String, Vec<u8>>),
}

/// A bundle's ONNX graphs on tract (loaded lazily per graph and batch size).
pub struct TractBundle {
    pub files: GraphFiles,
    pub manifest: Manifest,
    /// The files the graphs' external initializers live in ([`DATA_FILES`]), read (and
    /// hash-checked) once when the bundle is opened.
    data: std::collections::BTreeMap<&'static str, Arc<Vec<u8>>>,
}

impl TractBundle {
    /// Opens a bundle's ONNX graphs: `plan.json` is read first (format, version and the file
    /// hashes, as every backend does), then `onnx.json`, checked against its hash.
    pub fn open(dir: &Path) -> Result<TractBundle> {
        let plan = load_plan(dir)?;
        let path = dir.join(MANIFEST_FILE);
        let bytes = read_verified(dir, &plan, MANIFEST_FILE, MAX_JSON_FILE, "ONNX manifest")?;
        let text =
            String::from_utf8(bytes).map_err(|_| RuntimeError::corrupt(&path, "not UTF-8 text"))?;
        let manifest =
            Manifest::parse(&text).map_err(|reason| RuntimeError::corrupt(&path, reason))?;
        if manifest.input_shape != plan.input_shape {
            return Err(RuntimeError::corrupt(
                &path,
                format!(
                    "input_shape {:?} differs from plan.json's {:?}",
                    manifest.input_shape, plan.input_shape
                ),
            ));
        }
        let mut data = std::collections::BTreeMap::new();
        for file in DATA_FILES {
            if plan.integrity.contains_key(file) || dir.join(file).exists() {
                let max = crate::fsread::memory_budget()?;
                let bytes = read_verified(dir, &plan, file, max, "ONNX weights")?;
                data.insert(file, Arc::new(bytes));
            }
        }
        Ok(TractBundle {
            files: GraphFiles::Dir {
                dir: dir.to_path_buf(),
                plan: Box::new(plan),
            },
            manifest,
            data,
        })
    }

    /// Graphs held in memory, named as in `manifest`.
    pub fn from_memory(
        manifest: Manifest,
        files: std::collections::BTreeMap<String, Vec<u8>>,
    ) -> TractBundle {
        let data = DATA_FILES
            .into_iter()
            .filter_map(|f| Some((f, Arc::new(files.get(f)?.clone()))))
            .collect();
        TractBundle {
            files: GraphFiles::Memory(files),
            manifest,
            data,
        }
    }

    fn load(&self, file: &str, shapes: &[Vec<usize>]) -> Result<TractGraph> {
        match &self.files {
            GraphFiles::Dir { dir, plan } => {
                // Hash-checked against plan.json and bounded by the memory budget.
                let max = crate::fsread::memory_budget()?;
                let bytes = read_verified(dir, plan, file, max, "ONNX graph")?;
                let label = dir.join(file).display().to_string();
                TractGraph::load_with_data(
                    &bytes,
                    &|f| self.data.get(f).map(|d| d.as_slice()),
                    shapes,
                    &label,
                )
            }
            GraphFiles::Memory(m) => {
                let bytes = m
                    .get(file)
                    .ok_or_else(|| RuntimeError::MissingFile(PathBuf::from(file)))?;
                TractGraph::load_with_data(
                    bytes,
                    &|f| self.data.get(f).map(|d| d.as_slice()),
                    shapes,
                    file,
                )
            }
        }
    }

    /// Graph `e` for `batch` samples (its inputs' shapes from the manifest).
    pub fn load_entry(&self, e: &GraphEntry, batch: usize) -> Result<TractGraph> {
        let shapes: Vec<Vec<usize>> = e
            .inputs
            .iter()
            .map(|p| {
                std::iter::once(batch)
                    .chain(p.shape.iter().copied())
                    .collect()
            })
            .collect();
        self.load(&e.file, &shapes)
    }

    /// The whole-model forward graph for `batch` samples.
    pub fn forward(&self, batch: usize) -> Result<TractGraph> {
        self.load_entry(&self.manifest.forward, batch)
    }
}

/// Environment variable that sets how many threads tract's matrix products use.
pub const THREADS_ENV: &str = "IRESNETC_THREADS";

/// Threads in use; 0 until the first graph is loaded or [`set_threads`] is called.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many threads tract's matrix products use, process-wide (1 = tract's
/// own single-threaded default). tract 0.23 parallelizes only inside matrix
/// products, which is where an i-ResNet spends nearly all its time.
pub fn set_threads(n: usize) {
    let n = n.clamp(1, MAX_THREADS);
    let exec = if n == 1 {
        Executor::SingleThread
    } else {
        Executor::multithread(n)
    };
    tract_linalg::multithread::set_default_executor(exec);
    THREADS.store(n, Ordering::SeqCst);
}

/// Most threads `IRESNETC_THREADS` may ask for: more only costs memory (a stack each).
pub const MAX_THREADS: usize = 1024;

/// `IRESNETC_THREADS`, parsed and bounded: None when unset, an error naming the variable
/// when it is not a whole number in `1..=MAX_THREADS`. The CLI checks it before any work.
pub fn threads_from_env() -> Result<Option<usize>> {
    let Ok(v) = std::env::var(THREADS_ENV) else {
        return Ok(None);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(Some(n)),
        _ => Err(RuntimeError::BadEnv {
            var: THREADS_ENV.into(),
            value: clip(&v, 40),
            reason: format!("expected a whole number of threads from 1 to {MAX_THREADS}"),
        }),
    }
}

/// Threads tract uses: set explicitly, else `IRESNETC_THREADS` (when valid), else every core.
pub fn threads() -> usize {
    let n = THREADS.load(Ordering::SeqCst);
    if n > 0 {
        return n;
    }
    let n = threads_from_env().ok().flatten().unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    set_threads(n);
    n
}

/// Wall-clock statistics of repeated runs.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub samples: usize,
    /// Seconds tract spent parsing and optimizing the graph.
    pub load_s: f64,
}

impl Timing {
    /// GFLOP/s at the median for `flops` floating-point operations per run.
    pub fn gflops(&self, flops: f64) -> f64 {
        flops / self.median_s / 1e9
    }
}

/// Times `graph.run(inputs)`: `warmup` untimed runs, then `samples` timed ones.
pub fn time_graph(
    graph: &TractGraph,
    inputs: &[&[f32]],
    warmup: usize,
    samples: usize,
) -> Result<Timing> {
    for _ in 0..warmup {
        graph.run(inputs)?;
    }
    let mut times = Vec::with_capacity(samples.max(1));
    for _ in 0..samples.max(1) {
        let t = Instant::now();
        graph.run(inputs)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_s: times[times.len() / 2],
        min_s: times[0],
        samples: times.len(),
        load_s: 0.0,
    })
}

/// Loads an ONNX file for the given input shapes and times it on
/// deterministic inputs in [-1, 1] (probe-like inputs are fine for timing).
pub fn time_onnx_file(
    path: &Path,
    input_shapes: &[Vec<usize>],
    warmup: usize,
    samples: usize,
) -> Result<Timing> {
    let t = Instant::now();
    let graph = TractGraph::load_file(path, input_shapes)?;
    let load_s = t.elapsed().as_secs_f64();
    let mut rng = crate::rng::Rng::new(1);
    let data: Vec<Vec<f32>> = input_shapes
        .iter()
        .map(|s| {
            (0..s.iter().product::<usize>())
                .map(|_| (2.0 * rng.uniform() - 1.0) as f32)
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
    let mut timing = time_graph(&graph, &refs, warmup, samples)?;
    timing.load_s = load_s;
    Ok(timing)
}
