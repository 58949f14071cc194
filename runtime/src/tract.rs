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
use crate::rng::probe_vector;

/// Name of the manifest next to the bundle's ONNX files.
pub const MANIFEST_FILE: &str = "onnx.json";
/// Format tag and version of [`Manifest`].
pub const MANIFEST_FORMAT: &str = "iresnetc-onnx";
pub const MANIFEST_VERSION: u32 = 1;

/// `onnx.json`: what each exported graph takes and returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
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
    /// `input [batch, ...] -> z [batch, D]` (flows) or `logits [batch, classes]`.
    pub forward: GraphEntry,
    /// Flows: `input, probes -> z, logdet [batch]`.
    pub forward_logdet: Option<GraphEntry>,
    /// Flows: `z -> x`, the fixed point unrolled `inverse_steps[b]` times for block b.
    pub inverse: Option<GraphEntry>,
    pub inverse_steps: Vec<usize>,
    /// How the `probes` input of `forward_logdet` is laid out (None: no probe input).
    pub probes: Option<ProbeLayout>,
    /// `series` (Hutchinson, truncated) or `exact2d` (closed form for 2-D blocks).
    pub logdet_estimator: String,
    pub logdet_terms: usize,
    /// The model file's default probe seed.
    pub default_probe_seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GraphEntry {
    pub file: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
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

    /// Parses and checks a manifest: format and version, file names inside the directory,
    /// probe offsets inside the probe matrix (checked arithmetic: a tampered offset must be
    /// an error, not a slice out of range), and at least one inverse step per block.
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| clip(&e.to_string(), 200))?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(format!(
                "format {:?} version {}, expected {MANIFEST_FORMAT:?} version {MANIFEST_VERSION}",
                clip(&m.format, 40),
                m.version
            ));
        }
        for e in [
            Some(&m.forward),
            m.forward_logdet.as_ref(),
            m.inverse.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
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
        threads();
        // Output shapes carry the symbolic batch; inputs pin it, so the declared
        // outputs are only a consistency check tract need not redo.
        let onnx = tract_onnx::onnx().with_ignore_output_shapes(true);
        let mut model = onnx
            .model_for_read(&mut std::io::Cursor::new(bytes))
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

/// A bundle's ONNX graphs on tract (loaded lazily per graph and batch size).
pub struct TractBundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The bundle's plan: its format, version and file hashes.
    pub plan: crate::plan::Plan,
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
        Ok(TractBundle {
            dir: dir.to_path_buf(),
            manifest,
            plan,
        })
    }

    /// Loads one of the bundle's graph files (hash-checked, bounded) for these input shapes.
    fn load_graph(&self, file: &str, shapes: &[Vec<usize>]) -> Result<TractGraph> {
        let max = crate::fsread::memory_budget()?;
        let bytes = read_verified(&self.dir, &self.plan, file, max, "ONNX graph")?;
        TractGraph::load(&bytes, shapes, &self.dir.join(file).display().to_string())
    }

    fn entry(&self, which: &str) -> Result<&GraphEntry> {
        let m = &self.manifest;
        let e = match which {
            "forward" => Some(&m.forward),
            "forward_logdet" => m.forward_logdet.as_ref(),
            "inverse" => m.inverse.as_ref(),
            _ => None,
        };
        e.ok_or_else(|| RuntimeError::UnknownEntryPoint {
            name: which.into(),
            available: ["forward", "forward_logdet", "inverse"]
                .iter()
                .filter(|w| match **w {
                    "forward_logdet" => m.forward_logdet.is_some(),
                    "inverse" => m.inverse.is_some(),
                    _ => true,
                })
                .map(|s| s.to_string())
                .collect(),
        })
    }

    fn batched(batch: usize, per_sample: &[usize]) -> Vec<usize> {
        std::iter::once(batch)
            .chain(per_sample.iter().copied())
            .collect()
    }

    /// The forward graph for `batch` samples.
    pub fn forward(&self, batch: usize) -> Result<TractGraph> {
        let e = self.entry("forward")?;
        self.load_graph(&e.file, &[Self::batched(batch, &self.manifest.input_shape)])
    }

    /// The forward + log-det graph for `batch` samples.
    pub fn forward_logdet(&self, batch: usize) -> Result<TractGraph> {
        let e = self.entry("forward_logdet")?;
        let mut shapes = vec![Self::batched(batch, &self.manifest.input_shape)];
        if let Some(p) = &self.manifest.probes {
            shapes.push(vec![batch, p.total]);
        }
        self.load_graph(&e.file, &shapes)
    }

    /// The unrolled inverse graph for `batch` samples.
    pub fn inverse(&self, batch: usize) -> Result<TractGraph> {
        let e = self.entry("inverse")?;
        self.load_graph(&e.file, &[vec![batch, self.manifest.output_dim]])
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
