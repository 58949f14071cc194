//! A bundle's per-block segment graphs ([`crate::tract::Segment`]) run in sequence on tract.
//!
//! Forward: the carried tensor goes through every segment; the latent parts each segment
//! outputs are placed at their offsets in z and the segments' log-dets are summed. Inverse:
//! segments in reverse; per block, y is found, the one-step graph `x <- y - g(x)` is run
//! from `x = y` until the step changes x by no more than the tolerance (at most the
//! certified count), and the layout graph undoes the ops before the block.
//!
//! Each graph is optimized once per batch size and kept: loading many small graphs costs
//! time linear in the model's size, where one whole-model graph costs tract's optimizer
//! time superlinear in its node count (a minute for CIFAR's forward + log-det).

use std::collections::HashMap;

use crate::error::{Result, RuntimeError};
use crate::tract::{
    BlockOutputSource, GraphEntry, Manifest, Segment, TractBundle, TractGraph, Value, MANIFEST_FILE,
};

/// Which graph of a segment.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Part {
    Forward,
    ForwardLogdet,
    BlockOutput,
    Step,
    Layout,
}

/// Below this many f32 ulps of y's largest magnitude, a fixed-point step changes x only by
/// rounding: further steps cannot bring x closer, so the iteration stops there even when
/// the model's tolerance is finer than f32 resolves.
const F32_FLOOR_ULPS: f64 = 4.0;

/// How one block's fixed point went (the worst sample of the batch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Steps run.
    pub iters: usize,
    /// The last step's largest elementwise change of x.
    pub change: f64,
    /// The change met the tolerance (or f32's resolution) before the step cap.
    pub converged: bool,
}

/// Results of [`SegmentRunner::forward`].
pub struct ForwardOut {
    /// z (`[batch, latent]`) for flows, logits for classifiers.
    pub out: Vec<f32>,
    /// Per-sample log-det, when probes (or an exact estimator) were asked for.
    pub logdet: Option<Vec<f32>>,
}

/// Probes for the log-det segment graphs: the seed and the index of the batch's first
/// sample in the whole array.
#[derive(Clone, Copy, Debug)]
pub struct ProbeDraw {
    pub seed: u64,
    pub first_sample: usize,
}

pub struct SegmentRunner {
    bundle: TractBundle,
    loaded: HashMap<(usize, Part, usize), TractGraph>,
}

fn corrupt(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::corrupt(MANIFEST_FILE, msg)
}

/// Per-sample element count of a shape, checked (shapes come from a file).
fn numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| corrupt(format!("shape {shape:?} overflows")))
}

impl SegmentRunner {
    /// Checks that the manifest describes segments whose latent parts tile z.
    pub fn new(bundle: TractBundle) -> Result<SegmentRunner> {
        let m = &bundle.manifest;
        if m.segments.is_empty() {
            return Err(corrupt(
                "no `segments` (an ONNX export, not a bundle): compile the model with `iresnetc compile`",
            ));
        }
        if m.kind == "flow" {
            let mut next = 0usize;
            for (i, l) in m.latents.iter().enumerate() {
                if l.offset != next {
                    return Err(corrupt(format!(
                        "latent part {i} starts at {}, expected {next}",
                        l.offset
                    )));
                }
                next = next
                    .checked_add(numel(&l.shape)?)
                    .ok_or_else(|| corrupt("latent offsets overflow"))?;
            }
            if next != m.output_dim {
                return Err(corrupt(format!(
                    "latent parts cover {next} values, output_dim is {}",
                    m.output_dim
                )));
            }
        }
        Ok(SegmentRunner {
            bundle,
            loaded: HashMap::new(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.bundle.manifest
    }

    fn entry(&self, seg: usize, part: Part) -> Result<&GraphEntry> {
        let s: &Segment = self
            .bundle
            .manifest
            .segments
            .get(seg)
            .ok_or_else(|| corrupt(format!("no segment {seg}")))?;
        let missing = |what: &str| corrupt(format!("segment {seg} has no {what} graph"));
        let inv = || s.inverse.as_ref().ok_or_else(|| missing("inverse"));
        Ok(match part {
            Part::Forward => &s.forward,
            Part::ForwardLogdet => s
                .forward_logdet
                .as_ref()
                .ok_or_else(|| missing("log-det"))?,
            Part::BlockOutput => match &inv()?.block_output {
                BlockOutputSource::Graph(e) => e,
                _ => return Err(missing("block-output")),
            },
            Part::Step => &inv()?.step,
            Part::Layout => &inv()?.layout,
        })
    }

    /// Runs graph `part` of segment `seg` on `batch` samples, each input taken from `bind`;
    /// returns each output with what it holds, lengths checked against the manifest.
    fn run(
        &mut self,
        seg: usize,
        part: Part,
        batch: usize,
        bind: &dyn Fn(Value) -> Option<Vec<f32>>,
    ) -> Result<Vec<(Value, Vec<f32>)>> {
        let entry = self.entry(seg, part)?.clone();
        let mut inputs = Vec::with_capacity(entry.inputs.len());
        for p in &entry.inputs {
            let v = bind(p.value).ok_or_else(|| {
                corrupt(format!(
                    "segment {seg} graph {} takes {:?}, which this direction does not have",
                    entry.file, p.value
                ))
            })?;
            inputs.push(v);
        }
        let key = (seg, part, batch);
        if !self.loaded.contains_key(&key) {
            let g = self.bundle.load_entry(&entry, batch)?;
            self.loaded.insert(key, g);
        }
        let graph = self
            .loaded
            .get(&key)
            .ok_or_else(|| RuntimeError::Unsupported("tract graph cache".into()))?;
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let outs = graph.run(&refs)?;
        if outs.len() != entry.outputs.len() {
            return Err(corrupt(format!(
                "{} returns {} outputs, the manifest lists {}",
                entry.file,
                outs.len(),
                entry.outputs.len()
            )));
        }
        entry
            .outputs
            .iter()
            .zip(outs)
            .map(|(p, (_, data))| {
                let want = numel(&p.shape)?.checked_mul(batch);
                if want != Some(data.len()) {
                    return Err(corrupt(format!(
                        "{} output {} has {} values, expected {batch} x {:?}",
                        entry.file,
                        p.name,
                        data.len(),
                        p.shape
                    )));
                }
                Ok((p.value, data))
            })
            .collect()
    }

    /// `x -> z` (flows, with the log-det when `probes` is given or the estimator needs none)
    /// or `x -> logits` (classifiers). `logdet` asks for the log-det segment graphs.
    pub fn forward(
        &mut self,
        x: &[f32],
        batch: usize,
        logdet: Option<Option<ProbeDraw>>,
    ) -> Result<ForwardOut> {
        let nseg = self.bundle.manifest.segments.len();
        let dim = self.bundle.manifest.output_dim;
        let flow = self.bundle.manifest.kind == "flow";
        check_len("input", x, batch, numel(&self.bundle.manifest.input_shape)?)?;
        let mut out = vec![0f32; if flow { batch * dim } else { 0 }];
        let mut ld: Option<Vec<f32>> = logdet.map(|_| vec![0f32; batch]);
        let mut carry = x.to_vec();
        for s in 0..nseg {
            let probes = match (logdet, self.bundle.manifest.segments[s].block) {
                (Some(Some(d)), Some(b)) => self
                    .bundle
                    .manifest
                    .probes
                    .as_ref()
                    .map(|layout| layout.block_matrix(b, d.seed, d.first_sample, batch)),
                _ => None,
            };
            let part = if logdet.is_some() {
                Part::ForwardLogdet
            } else {
                Part::Forward
            };
            let c = std::mem::take(&mut carry);
            let outs = self.run(s, part, batch, &|v| match v {
                Value::Carry => Some(c.clone()),
                Value::Probes => probes.clone(),
                _ => None,
            })?;
            for (value, data) in outs {
                match value {
                    Value::Carry => carry = data,
                    Value::Latent { index } => {
                        self.scatter_latent(index, &data, &mut out, batch)?
                    }
                    Value::Logdet => {
                        if let Some(ld) = ld.as_mut() {
                            for (a, b) in ld.iter_mut().zip(&data) {
                                *a += b;
                            }
                        }
                    }
                    Value::Logits => out = data,
                    other => return Err(corrupt(format!("segment {s} forward returns {other:?}"))),
                }
            }
        }
        Ok(ForwardOut { out, logdet: ld })
    }

    fn latent_span(&self, index: usize) -> Result<(usize, usize)> {
        let l = self
            .bundle
            .manifest
            .latents
            .get(index)
            .ok_or_else(|| corrupt(format!("no latent part {index}")))?;
        Ok((l.offset, numel(&l.shape)?))
    }

    /// Writes latent part `index` (`[batch, d]`) into its columns of z.
    fn scatter_latent(
        &self,
        index: usize,
        part: &[f32],
        z: &mut [f32],
        batch: usize,
    ) -> Result<()> {
        let (off, d) = self.latent_span(index)?;
        let dim = self.bundle.manifest.output_dim;
        if part.len() != batch * d || z.len() != batch * dim {
            return Err(corrupt(format!(
                "latent part {index} has {} values, its shape in `latents` gives {batch} x {d}",
                part.len()
            )));
        }
        for i in 0..batch {
            z[i * dim + off..i * dim + off + d].copy_from_slice(&part[i * d..(i + 1) * d]);
        }
        Ok(())
    }

    /// Latent part `index` of z (`[batch, d]`).
    fn gather_latent(&self, index: usize, z: &[f32], batch: usize) -> Result<Vec<f32>> {
        let (off, d) = self.latent_span(index)?;
        let dim = self.bundle.manifest.output_dim;
        let mut v = Vec::with_capacity(batch * d);
        for i in 0..batch {
            v.extend_from_slice(&z[i * dim + off..i * dim + off + d]);
        }
        Ok(v)
    }

    /// `z -> x`: per block, fixed-point steps until a step changes x by at most `tol` (or by
    /// f32 rounding only), capped by the segment's certified count. Returns x and, per
    /// segment with a block, how its fixed point went.
    pub fn inverse(
        &mut self,
        z: &[f32],
        batch: usize,
        tol: f64,
    ) -> Result<(Vec<f32>, Vec<StepStats>)> {
        let m = &self.bundle.manifest;
        if m.kind != "flow" {
            return Err(RuntimeError::Unsupported(
                "only flows are invertible end to end".into(),
            ));
        }
        check_len("z", z, batch, m.output_dim)?;
        let nlat = m.latents.len();
        let latents: Vec<Vec<f32>> = (0..nlat)
            .map(|i| self.gather_latent(i, z, batch))
            .collect::<Result<_>>()?;
        let lat = |v: Value| match v {
            Value::Latent { index } => latents.get(index).cloned(),
            _ => None,
        };
        let nseg = self.bundle.manifest.segments.len();
        let mut stats = vec![];
        // The forward output of the segment being inverted (the next one's input).
        let mut carry: Option<Vec<f32>> = None;
        for s in (0..nseg).rev() {
            let inv = self.bundle.manifest.segments[s]
                .inverse
                .clone()
                .ok_or_else(|| corrupt(format!("segment {s} has no inverse")))?;
            let y = match &inv.block_output {
                BlockOutputSource::Carry => carry
                    .take()
                    .ok_or_else(|| corrupt(format!("the last segment ({s}) reads a carry")))?,
                BlockOutputSource::Latent { index } => lat(Value::Latent { index: *index })
                    .ok_or_else(|| corrupt(format!("no latent part {index}")))?,
                BlockOutputSource::Graph(_) => {
                    let c = carry.take();
                    let outs = self.run(s, Part::BlockOutput, batch, &|v| match v {
                        Value::Carry => c.clone(),
                        other => lat(other),
                    })?;
                    take(outs, Value::BlockOutput, s)?
                }
            };
            let ymax = y.iter().fold(0f64, |a, &v| a.max(f64::from(v).abs()));
            let limit = tol.max(F32_FLOOR_ULPS * f64::from(f32::EPSILON) * ymax);
            let mut x = y.clone();
            let mut st = StepStats {
                iters: 0,
                change: f64::INFINITY,
                converged: false,
            };
            while st.iters < inv.steps {
                let prev = std::mem::take(&mut x);
                let outs = self.run(s, Part::Step, batch, &|v| match v {
                    Value::BlockOutput => Some(y.clone()),
                    Value::BlockInput => Some(prev.clone()),
                    _ => None,
                })?;
                x = take(outs, Value::BlockInput, s)?;
                st.iters += 1;
                st.change = x
                    .iter()
                    .zip(&prev)
                    .fold(0f64, |a, (n, p)| a.max(f64::from(n - p).abs()));
                if st.change <= limit {
                    st.converged = true;
                    break;
                }
            }
            if inv.steps == 0 {
                st.change = 0.0;
            }
            stats.push(st);
            let outs = self.run(s, Part::Layout, batch, &|v| match v {
                Value::BlockInput => Some(x.clone()),
                other => lat(other),
            })?;
            carry = Some(take(outs, Value::Carry, s)?);
        }
        stats.reverse();
        let x = carry.ok_or_else(|| corrupt("no segments"))?;
        Ok((x, stats))
    }
}

/// `data` must hold `batch` samples of `per_sample` values.
fn check_len(what: &str, data: &[f32], batch: usize, per_sample: usize) -> Result<()> {
    if batch.checked_mul(per_sample) != Some(data.len()) {
        return Err(RuntimeError::bad_input(
            what,
            format!(
                "{} values are not {batch} samples of {per_sample}",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// The output holding `value`.
fn take(outs: Vec<(Value, Vec<f32>)>, value: Value, seg: usize) -> Result<Vec<f32>> {
    outs.into_iter()
        .find(|(v, _)| *v == value)
        .map(|(_, d)| d)
        .ok_or_else(|| corrupt(format!("a segment {seg} graph does not return {value:?}")))
}
