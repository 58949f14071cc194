//! Running a bundle's entry points on a wgpu device.
//!
//! [`GpuExecutor::new`] does all the expensive, failure-prone work once: it reflects every
//! WGSL module with naga (bindings, access modes, workgroup size), checks it against the plan,
//! builds explicit bind-group layouts and compute pipelines, uploads the weights and flattens
//! every entry point (`Repeat` unrolled) into a list of GPU operations. A run then only uploads
//! inputs, records that list into one command encoder, submits once and reads outputs back.
//!
//! Bind groups depend on the buffers, whose sizes depend on the batch, so buffers and bind
//! groups are cached per batch size (a few sizes: a chunked run uses at most two).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod profile;
use profile::{create_timestamps, Timestamps};
mod resources;
mod shader;
mod steps;
use shader::{check_kernel_limits, create_kernel, parse_wgsl, reflect_bindings};
use steps::{count_passes, encode_transfer, fill_grid, flatten};

use crate::buffers::{max_batch_for_limits, upload_weights, BufferSet};
use crate::bundle::Bundle;
use crate::device::{one_line, wgpu_error, GpuDevice};
use crate::error::{Result, RuntimeError};
use crate::plan::{BufferInit, IoDecl, KernelDecl, Plan, Step};

/// Buffer sets (with their bind groups) kept for this many batch sizes.
const CACHED_BATCH_SIZES: usize = 3;
/// Guard against a plan whose unrolled `Repeat`s would take minutes just to record.
const MAX_UNROLLED_OPS: usize = 50_000_000;

/// The built-in kernel behind `Step::Fill` with a nonzero value. The value lives in a
/// one-element storage buffer (not an immediate: that would need a device feature).
const FILL_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> dst: array<f32>;
@group(0) @binding(1) var<storage, read> fill_value: array<f32>;

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    // 2-D grid: a large buffer needs more than max_compute_workgroups_per_dimension groups.
    let i = (wg.y * groups.x + wg.x) * 256u + lane;
    if (i < arrayLength(&dst)) {
        dst[i] = fill_value[0];
    }
}
"#;
const FILL_WORKGROUP: u64 = 256;

/// Outputs of a run by output name.
pub type Outputs = BTreeMap<String, Vec<f32>>;
pub use profile::{DispatchTime, Profile, ProfileMode};
/// Outputs of one batch chunk, in the entry point's order.
type ChunkOutputs = Vec<(String, Vec<f32>)>;
/// What each `map_async` callback reported (`None`: not called yet).
type MapStatus = Arc<Mutex<Vec<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>>;

/// Outputs and timings of [`GpuExecutor::run_timed`].
#[derive(Clone, Debug)]
pub struct TimedRun {
    pub outputs: Outputs,
    /// From the first upload to the last byte read back: includes the device sync.
    pub wall: Duration,
    /// GPU time from the start of the first compute pass to the end of the last one, summed
    /// over batch chunks; `None` without `TIMESTAMP_QUERY` or for a plan without dispatches.
    pub gpu: Option<Duration>,
    /// CPU time spent recording the command buffers (encoder, passes, dispatches), summed
    /// over batch chunks.
    pub record: Duration,
}

/// One GPU operation of a flattened entry point; indices are into `plan.buffers` / kernels.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    /// `folded`: from `min_batch` on, `kernel` runs with its grid folded over the batch
    /// (`[rows, rows_per_group, groups_y]`, see [`crate::plan::Folded`]).
    Dispatch {
        kernel: usize,
        workgroups: [u32; 3],
        folded: Option<FoldedOp>,
    },
    Fill {
        buffer: usize,
        value: f32,
    },
    Clear {
        buffer: usize,
    },
    Copy {
        src: usize,
        dst: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct FoldedOp {
    min_batch: u32,
    kernel: usize,
    fold: [u32; 3],
}

impl Op {
    /// Dispatches are recorded inside a compute pass; the others are encoder commands.
    fn in_pass(&self) -> bool {
        matches!(self, Op::Dispatch { .. } | Op::Fill { .. })
    }
}

/// The kernel and grid a dispatch records at `batch` (the limits were checked when the
/// buffers of this batch were allocated, so the grid exists).
fn dispatch_grid(
    kernel: usize,
    workgroups: [u32; 3],
    folded: Option<FoldedOp>,
    batch: usize,
    max_per_dim: u32,
) -> (usize, [u32; 3]) {
    match folded {
        Some(f) if batch >= f.min_batch as usize => (
            f.kernel,
            crate::plan::folded_grid(f.fold, batch, max_per_dim).unwrap_or([0; 3]),
        ),
        _ => (
            kernel,
            [workgroups[0], workgroups[1], workgroups[2] * batch as u32],
        ),
    }
}

struct Program {
    ops: Vec<Op>,
    inputs: Vec<(IoDecl, usize)>,
    outputs: Vec<(IoDecl, usize)>,
    dispatches: usize,
}

#[derive(Clone)]
struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Buffers and bind groups for one batch size.
struct BatchResources {
    set: BufferSet,
    kernel_groups: Vec<wgpu::BindGroup>,
    fill_groups: HashMap<(usize, u32), wgpu::BindGroup>,
    /// MAP_READ copies of every buffer that some entry point outputs.
    staging: HashMap<usize, wgpu::Buffer>,
    last_used: u64,
}

pub struct GpuExecutor {
    gpu: GpuDevice,
    plan: Plan,
    kernels: Vec<Kernel>,
    fill_kernel: Kernel,
    /// One-element buffers holding each distinct nonzero fill value, by its bits.
    fill_values: HashMap<u32, wgpu::Buffer>,
    weights: Vec<Option<wgpu::Buffer>>,
    programs: BTreeMap<String, Program>,
    /// Buffers zeroed at the start of every run (`BufferInit::Zero`).
    zeroed: Vec<usize>,
    max_batch: usize,
    cache: Vec<BatchResources>,
    use_counter: u64,
    timestamps: Option<Timestamps>,
}

impl GpuExecutor {
    /// Compiles every kernel of `bundle` on `gpu` and uploads its weights.
    pub fn new(gpu: &GpuDevice, bundle: &Bundle) -> Result<GpuExecutor> {
        let plan = bundle.plan.clone();
        plan.validate()?;
        let limits = gpu.limits();
        crate::limits::check_device(&plan, limits)?;
        let max_batch = max_batch_for_limits(&plan, limits);
        if max_batch == 0 {
            // Names the buffer or dispatch that does not fit even one sample.
            crate::buffers::check_limits(&plan, limits, 1)?;
        }

        let mut modules: HashMap<&str, (naga::Module, naga::valid::ModuleInfo)> = HashMap::new();
        let mut kernels = Vec::with_capacity(plan.kernels.len());
        type PipelineKey = (String, String, [u32; 3], Vec<bool>);
        let mut pipelines: HashMap<PipelineKey, Kernel> = HashMap::new();
        for decl in &plan.kernels {
            let source = bundle
                .shaders
                .get(&decl.file)
                .ok_or_else(|| RuntimeError::MissingFile(bundle.dir.join(&decl.file)))?;
            if !modules.contains_key(decl.file.as_str()) {
                let parsed = parse_wgsl(decl, source)?;
                modules.insert(decl.file.as_str(), parsed);
            }
            let (module, info) = &modules[decl.file.as_str()];
            let read_only = reflect_bindings(decl, module, info)?;
            check_kernel_limits(decl, limits)?;
            // Kernels that differ only in the buffers they bind (every block of a stage) share
            // one pipeline: compiling a shader is the expensive part (seconds on lavapipe for
            // a big model), bind groups stay per kernel.
            let key = (
                decl.file.clone(),
                decl.entry.clone(),
                decl.workgroup_size,
                read_only,
            );
            let kernel = match pipelines.get(&key) {
                Some(k) => Kernel::clone(k),
                None => {
                    let k = create_kernel(gpu, decl, source, &key.3)?;
                    pipelines.insert(key, Kernel::clone(&k));
                    k
                }
            };
            kernels.push(kernel);
        }
        let fill_decl = KernelDecl {
            name: "builtin.fill".to_string(),
            file: "builtin.fill.wgsl".to_string(),
            entry: "fill".to_string(),
            workgroup_size: [FILL_WORKGROUP as u32, 1, 1],
            bindings: vec!["dst".to_string(), "fill_value".to_string()],
            read_only: vec![false, true],
        };
        let fill_kernel = create_kernel(gpu, &fill_decl, FILL_WGSL, &[false, true])?;

        let buffer_index: HashMap<&str, usize> = plan
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.as_str(), i))
            .collect();
        let kernel_index: HashMap<&str, usize> = plan
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| (k.name.as_str(), i))
            .collect();
        let mut programs = BTreeMap::new();
        for (name, ep) in &plan.entry_points {
            let mut ops = Vec::new();
            flatten(&ep.steps, &buffer_index, &kernel_index, &mut ops)?;
            let io = |decls: &[IoDecl]| -> Vec<(IoDecl, usize)> {
                decls
                    .iter()
                    .map(|d| (d.clone(), buffer_index[d.buffer.as_str()]))
                    .collect()
            };
            let dispatches = ops.iter().filter(|op| op.in_pass()).count();
            programs.insert(
                name.clone(),
                Program {
                    inputs: io(&ep.inputs),
                    outputs: io(&ep.outputs),
                    ops,
                    dispatches,
                },
            );
        }

        let mut fill_values = HashMap::new();
        for program in programs.values() {
            for op in &program.ops {
                if let Op::Fill { value, .. } = op {
                    fill_values.entry(value.to_bits()).or_insert_with(|| {
                        wgpu::util::DeviceExt::create_buffer_init(
                            &gpu.device,
                            &wgpu::util::BufferInitDescriptor {
                                label: Some("fill value"),
                                contents: bytemuck::bytes_of(value),
                                usage: wgpu::BufferUsages::STORAGE,
                            },
                        )
                    });
                }
            }
        }

        let zeroed = plan
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.init == BufferInit::Zero)
            .map(|(i, _)| i)
            .collect();
        let weights = upload_weights(gpu, bundle)?;
        let timestamps = gpu.has_timestamps().then(|| create_timestamps(gpu));
        gpu.take_errors()?;

        Ok(GpuExecutor {
            gpu: gpu.clone(),
            plan,
            kernels,
            fill_kernel,
            fill_values,
            weights,
            programs,
            zeroed,
            max_batch,
            cache: Vec::new(),
            use_counter: 0,
            timestamps,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn device(&self) -> &GpuDevice {
        &self.gpu
    }

    pub fn entry_points(&self) -> impl Iterator<Item = &str> {
        self.programs.keys().map(String::as_str)
    }

    /// Compute dispatches one run of `entry` records per batch chunk, after unrolling `Repeat`s
    /// (built-in fill kernels included, buffer copies and clears not); 0 for an unknown entry.
    pub fn dispatch_count(&self, entry: &str) -> usize {
        self.programs.get(entry).map_or(0, |p| p.dispatches)
    }

    /// Largest batch run in one submission; larger batches are split into chunks.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Lowers the chunk size below what the limits allow (e.g. to bound memory use; the
    /// limits bound each buffer, not their sum). Values above the limit or 0 are clamped.
    pub fn set_max_batch(&mut self, batch: usize) {
        let limit = max_batch_for_limits(&self.plan, self.gpu.limits()).max(1);
        self.max_batch = batch.max(1).min(limit);
    }

    /// Runs entry point `entry` on `batch` samples. `inputs` pairs each input name of the entry
    /// point with its data: `batch * prod(shape)` values for per-sample buffers, `prod(shape)`
    /// for shared ones. Returns every output, `batch * prod(shape)` values each.
    pub fn run(&mut self, entry: &str, batch: usize, inputs: &[(&str, &[f32])]) -> Result<Outputs> {
        self.run_inner(entry, batch, inputs, false)
            .map(|(outputs, _, _)| outputs)
    }

    /// [`run`](Self::run), timed: wall time includes upload, the device sync and read-back.
    pub fn run_timed(
        &mut self,
        entry: &str,
        batch: usize,
        inputs: &[(&str, &[f32])],
    ) -> Result<TimedRun> {
        let start = Instant::now();
        let (outputs, gpu, record) = self.run_inner(entry, batch, inputs, true)?;
        Ok(TimedRun {
            outputs,
            wall: start.elapsed(),
            gpu,
            record,
        })
    }

    fn run_inner(
        &mut self,
        entry: &str,
        batch: usize,
        inputs: &[(&str, &[f32])],
        timed: bool,
    ) -> Result<(Outputs, Option<Duration>, Duration)> {
        let program = self
            .programs
            .get(entry)
            .ok_or_else(|| RuntimeError::UnknownEntryPoint {
                name: entry.to_string(),
                available: self.programs.keys().cloned().collect(),
            })?;
        if batch == 0 {
            return Err(RuntimeError::bad_input("batch", "must be at least 1"));
        }
        // Match every declared input with the caller's data, by name.
        let mut data: Vec<&[f32]> = Vec::with_capacity(program.inputs.len());
        for (decl, buffer) in &program.inputs {
            let mut given = inputs.iter().filter(|(name, _)| *name == decl.name);
            let values = given
                .next()
                .ok_or_else(|| {
                    RuntimeError::bad_input(
                        &decl.name,
                        format!("missing (entry point {entry:?} needs it)"),
                    )
                })?
                .1;
            if given.next().is_some() {
                return Err(RuntimeError::bad_input(&decl.name, "given twice"));
            }
            let per_sample = self.plan.buffers[*buffer].per_sample;
            let expected = decl.elems() as usize * if per_sample { batch } else { 1 };
            if values.len() != expected {
                return Err(RuntimeError::bad_input(
                    &decl.name,
                    if per_sample {
                        format!(
                            "has {} values, expected {expected} (batch {batch} x shape {:?})",
                            values.len(),
                            decl.shape
                        )
                    } else {
                        format!(
                            "has {} values, expected {expected} (shape {:?}, shared by the batch)",
                            values.len(),
                            decl.shape
                        )
                    },
                ));
            }
            data.push(values);
        }
        if let Some((name, _)) = inputs
            .iter()
            .find(|(name, _)| !program.inputs.iter().any(|(d, _)| d.name == *name))
        {
            return Err(RuntimeError::bad_input(
                *name,
                format!(
                    "entry point {entry:?} has no such input; it takes: {}",
                    program
                        .inputs
                        .iter()
                        .map(|(d, _)| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }

        let mut outputs: Outputs = program
            .outputs
            .iter()
            .map(|(d, _)| {
                (
                    d.name.clone(),
                    Vec::with_capacity(batch * d.elems() as usize),
                )
            })
            .collect();
        let mut gpu_time: Option<Duration> = None;
        let mut record = Duration::ZERO;
        let mut start = 0;
        while start < batch {
            let chunk = (batch - start).min(self.max_batch);
            let chunk_inputs: Vec<&[f32]> = self.programs[entry]
                .inputs
                .iter()
                .zip(&data)
                .map(|((decl, buffer), values)| {
                    if self.plan.buffers[*buffer].per_sample {
                        let n = decl.elems() as usize;
                        &values[start * n..(start + chunk) * n]
                    } else {
                        values
                    }
                })
                .collect();
            let (chunk_out, chunk_time, chunk_record) =
                self.run_chunk(entry, chunk, &chunk_inputs, timed)?;
            record += chunk_record;
            for (name, values) in chunk_out {
                outputs
                    .get_mut(&name)
                    .expect("declared output")
                    .extend(values);
            }
            if let Some(t) = chunk_time {
                gpu_time = Some(gpu_time.unwrap_or_default() + t);
            }
            start += chunk;
        }
        Ok((outputs, gpu_time, record))
    }

    /// One submission: upload, record every op, read back.
    fn run_chunk(
        &mut self,
        entry: &str,
        batch: usize,
        inputs: &[&[f32]],
        timed: bool,
    ) -> Result<(ChunkOutputs, Option<Duration>, Duration)> {
        let slot = self.resources(batch)?;
        let res = &self.cache[slot];
        let program = &self.programs[entry];
        let device = &self.gpu.device;
        let queue = &self.gpu.queue;

        // Error scopes catch what this run does wrong; without them wgpu would panic or report
        // the error much later through the uncaptured handler.
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);

        for ((_, buffer), values) in program.inputs.iter().zip(inputs) {
            queue.write_buffer(&res.set.buffers[*buffer], 0, bytemuck::cast_slice(values));
        }
        let recording = Instant::now();
        let mut encoder =
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(entry) });
        for &b in &self.zeroed {
            encoder.clear_buffer(&res.set.buffers[b], 0, None);
        }
        let timestamps = self.timestamps.as_ref().filter(|_| timed);
        let max_per_dim = self.gpu.limits().max_compute_workgroups_per_dimension;
        let passes = count_passes(&program.ops);
        let mut pass_index = 0;
        let mut i = 0;
        while i < program.ops.len() {
            let op = program.ops[i];
            if !op.in_pass() {
                encode_transfer(&mut encoder, &res.set.buffers, op);
                i += 1;
                continue;
            }
            // A run of dispatches shares one compute pass; wgpu inserts the barriers between
            // dispatches that read what an earlier one wrote.
            let end = program.ops[i..]
                .iter()
                .position(|op| !op.in_pass())
                .map_or(program.ops.len(), |n| i + n);
            let timestamp_writes = timestamps.and_then(|ts| {
                let first = pass_index == 0;
                let last = pass_index + 1 == passes;
                (first || last).then_some(wgpu::ComputePassTimestampWrites {
                    query_set: &ts.queries,
                    beginning_of_pass_write_index: first.then_some(0),
                    end_of_pass_write_index: last.then_some(1),
                })
            });
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(entry),
                timestamp_writes,
            });
            // Re-binding the same pipeline and group for consecutive identical dispatches is
            // redundant; skip it.
            let mut bound: Option<(usize, Option<(usize, u32)>)> = None;
            for op in &program.ops[i..end] {
                match *op {
                    Op::Dispatch {
                        kernel,
                        workgroups,
                        folded,
                    } => {
                        let (kernel, grid) =
                            dispatch_grid(kernel, workgroups, folded, batch, max_per_dim);
                        if bound != Some((kernel, None)) {
                            pass.set_pipeline(&self.kernels[kernel].pipeline);
                            pass.set_bind_group(0, &res.kernel_groups[kernel], &[]);
                            bound = Some((kernel, None));
                        }
                        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                    }
                    Op::Fill { buffer, value } => {
                        let key = (buffer, value.to_bits());
                        if bound != Some((usize::MAX, Some(key))) {
                            pass.set_pipeline(&self.fill_kernel.pipeline);
                            pass.set_bind_group(0, &res.fill_groups[&key], &[]);
                            bound = Some((usize::MAX, Some(key)));
                        }
                        let [x, y] = fill_grid(
                            res.set.buffers[buffer].size() / 4,
                            self.gpu.limits().max_compute_workgroups_per_dimension,
                        );
                        pass.dispatch_workgroups(x, y, 1);
                    }
                    Op::Clear { .. } | Op::Copy { .. } => unreachable!(),
                }
            }
            drop(pass);
            pass_index += 1;
            i = end;
        }
        for (_, buffer) in &program.outputs {
            let src = &res.set.buffers[*buffer];
            encoder.copy_buffer_to_buffer(src, 0, &res.staging[buffer], 0, src.size());
        }
        let timestamps = timestamps.filter(|_| passes > 0);
        if let Some(ts) = timestamps {
            encoder.resolve_query_set(&ts.queries, 0..2, &ts.resolve, 0);
            encoder.copy_buffer_to_buffer(&ts.resolve, 0, &ts.readback, 0, 16);
        }
        let commands = encoder.finish();
        let record = recording.elapsed();
        queue.submit([commands]);

        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        if let Some(e) = oom.or(validation) {
            self.gpu.take_errors()?;
            return Err(RuntimeError::Gpu(format!(
                "entry point {entry:?}: {}",
                wgpu_error(&e)
            )));
        }

        // Map every read-back buffer, then wait once for all of them.
        let mut readbacks: Vec<&wgpu::Buffer> = program
            .outputs
            .iter()
            .map(|(_, b)| &res.staging[b])
            .collect();
        if let Some(ts) = timestamps {
            readbacks.push(&ts.readback);
        }
        let status: MapStatus = Arc::new(Mutex::new(vec![None; readbacks.len()]));
        for (k, buffer) in readbacks.iter().enumerate() {
            let status = Arc::clone(&status);
            buffer.map_async(wgpu::MapMode::Read, .., move |r| {
                if let Ok(mut s) = status.lock() {
                    s[k] = Some(r);
                }
            });
        }
        let polled = device.poll(wgpu::PollType::wait_indefinitely());
        self.gpu.take_errors()?;
        polled.map_err(|e| RuntimeError::DeviceLost(format!("waiting for {entry:?}: {e}")))?;
        let status = status.lock().map(|s| s.clone()).unwrap_or_default();
        // Copy every mapped buffer out and unmap it, even when another one failed: a buffer
        // left mapped would make the next run's copy into it fail.
        let mut bytes: Vec<Result<Vec<u8>>> = Vec::with_capacity(readbacks.len());
        for (k, buffer) in readbacks.iter().enumerate() {
            bytes.push(match &status[k] {
                Some(Ok(())) => {
                    let data = buffer
                        .get_mapped_range(..)
                        .map(|view| view.to_vec())
                        .map_err(|e| RuntimeError::Gpu(format!("entry point {entry:?}: {e}")));
                    buffer.unmap();
                    data
                }
                _ => Err(RuntimeError::Gpu(format!(
                    "entry point {entry:?}: mapping read-back buffer {k} failed"
                ))),
            });
        }
        let mut bytes = bytes.into_iter();
        let mut outputs = Vec::with_capacity(program.outputs.len());
        for (decl, _) in &program.outputs {
            let data = bytes.next().expect("one per output")?;
            outputs.push((decl.name.clone(), bytemuck::pod_collect_to_vec(&data)));
        }
        let gpu_time = match timestamps {
            Some(ts) => {
                let ticks: Vec<u64> =
                    bytemuck::pod_collect_to_vec(&bytes.next().expect("timestamps")?);
                let ns = ticks[1].saturating_sub(ticks[0]) as f64 * ts.period;
                Some(Duration::from_nanos(ns as u64))
            }
            None => None,
        };
        Ok((outputs, gpu_time, record))
    }

    fn buffer_index(&self, name: &str) -> usize {
        self.plan
            .buffers
            .iter()
            .position(|b| b.name == name)
            .expect("plan was validated")
    }
}

/// Bind-group entries binding `buffers[i]` whole at `@binding(i)`.
fn entries<'a>(buffers: &[&'a wgpu::Buffer]) -> Vec<wgpu::BindGroupEntry<'a>> {
    buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect()
}
