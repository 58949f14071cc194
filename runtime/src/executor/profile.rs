//! Per-dispatch GPU times of one run of an entry point, from timestamp queries: written
//! between the dispatches of a compute pass where the adapter allows it
//! (`TIMESTAMP_QUERY_INSIDE_PASSES`), else around a compute pass of its own per dispatch
//! (`TIMESTAMP_QUERY`; the extra passes add a little time of their own). Adapters with
//! neither (lavapipe, most browsers) cannot be profiled: [`GpuExecutor::profile_mode`] says so
//! before any work.

use serde::Serialize;

use super::*;

/// Queries per query set (wgpu's `QUERY_SET_MAX_QUERIES`); two per timed dispatch.
const QUERIES_PER_SET: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileMode {
    /// Timestamps between the dispatches of the run's own passes.
    InsidePasses,
    /// One compute pass per dispatch, timed at its start and end.
    PassPerDispatch,
}

/// One timed dispatch, in recording order.
#[derive(Clone, Debug, Serialize)]
pub struct DispatchTime {
    /// The plan's kernel name (`builtin.fill` for the fill kernel).
    pub kernel: String,
    /// The grid as dispatched (the batch folded into z).
    pub grid: [u32; 3],
    pub ns: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub mode: ProfileMode,
    pub batch: usize,
    pub dispatches: Vec<DispatchTime>,
}

impl GpuExecutor {
    /// How this device can time single dispatches; `None` when it has no timestamp queries.
    pub fn profile_mode(&self) -> Option<ProfileMode> {
        if self.gpu.has_timestamps_inside_passes() {
            Some(ProfileMode::InsidePasses)
        } else if self.gpu.has_timestamps() {
            Some(ProfileMode::PassPerDispatch)
        } else {
            None
        }
    }

    /// Runs `entry` once normally (checking the inputs and leaving them in the device
    /// buffers), then once more recorded with a timestamp before and after every dispatch,
    /// and returns the per-dispatch times of that second run. `batch` must fit one
    /// submission ([`max_batch`](Self::max_batch)).
    pub fn profile(
        &mut self,
        entry: &str,
        batch: usize,
        inputs: &[(&str, &[f32])],
    ) -> Result<Profile> {
        let mode = self.profile_mode().ok_or_else(|| {
            RuntimeError::Gpu(format!(
                "adapter {} has no timestamp queries: per-dispatch GPU times are unavailable",
                self.gpu.adapter()
            ))
        })?;
        if batch > self.max_batch {
            return Err(RuntimeError::bad_input(
                "batch",
                format!(
                    "profiling runs one submission; {batch} exceeds {}",
                    self.max_batch
                ),
            ));
        }
        self.run(entry, batch, inputs)?;
        let slot = self.resources(batch)?;
        let res = &self.cache[slot];
        let program = &self.programs[entry];
        let device = &self.gpu.device;
        let timed: Vec<usize> = (0..program.ops.len())
            .filter(|&i| program.ops[i].in_pass())
            .collect();
        let sets: Vec<wgpu::QuerySet> = (0..timed.len() * 2)
            .step_by(QUERIES_PER_SET as usize)
            .map(|start| {
                device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("profile"),
                    ty: wgpu::QueryType::Timestamp,
                    count: (timed.len() * 2 - start).min(QUERIES_PER_SET as usize) as u32,
                })
            })
            .collect();
        let query = |k: usize| {
            (
                &sets[k / QUERIES_PER_SET as usize],
                (k % QUERIES_PER_SET as usize) as u32,
            )
        };

        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("profile"),
        });
        for &b in &self.zeroed {
            encoder.clear_buffer(&res.set.buffers[b], 0, None);
        }
        let mut names = Vec::with_capacity(timed.len());
        let mut n = 0usize;
        let mut i = 0;
        while i < program.ops.len() {
            let op = program.ops[i];
            if !op.in_pass() {
                encode_transfer(&mut encoder, &res.set.buffers, op);
                i += 1;
                continue;
            }
            let end = match mode {
                ProfileMode::InsidePasses => program.ops[i..]
                    .iter()
                    .position(|op| !op.in_pass())
                    .map_or(program.ops.len(), |k| i + k),
                ProfileMode::PassPerDispatch => i + 1,
            };
            let writes = (mode == ProfileMode::PassPerDispatch).then(|| {
                let ((set, begin), (_, finish)) = (query(2 * n), query(2 * n + 1));
                wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(begin),
                    end_of_pass_write_index: Some(finish),
                }
            });
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("profile"),
                timestamp_writes: writes,
            });
            for op in &program.ops[i..end] {
                if mode == ProfileMode::InsidePasses {
                    let (set, k) = query(2 * n);
                    pass.write_timestamp(set, k);
                }
                let (name, grid) = match *op {
                    Op::Dispatch {
                        kernel,
                        workgroups,
                        folded,
                    } => {
                        let (kernel, grid) = dispatch_grid(
                            kernel,
                            workgroups,
                            folded,
                            batch,
                            self.gpu.limits().max_compute_workgroups_per_dimension,
                        );
                        pass.set_pipeline(&self.kernels[kernel].pipeline);
                        pass.set_bind_group(0, &res.kernel_groups[kernel], &[]);
                        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                        (self.plan.kernels[kernel].name.clone(), grid)
                    }
                    Op::Fill { buffer, value } => {
                        pass.set_pipeline(&self.fill_kernel.pipeline);
                        pass.set_bind_group(0, &res.fill_groups[&(buffer, value.to_bits())], &[]);
                        let [x, y] = fill_grid(
                            res.set.buffers[buffer].size() / 4,
                            self.gpu.limits().max_compute_workgroups_per_dimension,
                        );
                        pass.dispatch_workgroups(x, y, 1);
                        ("builtin.fill".to_string(), [x, y, 1])
                    }
                    Op::Clear { .. } | Op::Copy { .. } => unreachable!(),
                };
                if mode == ProfileMode::InsidePasses {
                    let (set, k) = query(2 * n + 1);
                    pass.write_timestamp(set, k);
                }
                names.push((name, grid));
                n += 1;
            }
            drop(pass);
            i = end;
        }
        let mut readbacks = Vec::with_capacity(sets.len());
        for set in &sets {
            let bytes = 8 * u64::from(QUERIES_PER_SET);
            let resolve = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let readback = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile read-back"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let count = readbacks.len() * QUERIES_PER_SET as usize;
            let used = (timed.len() * 2 - count).min(QUERIES_PER_SET as usize) as u32;
            encoder.resolve_query_set(set, 0..used, &resolve, 0);
            encoder.copy_buffer_to_buffer(&resolve, 0, &readback, 0, 8 * u64::from(used));
            readbacks.push(readback);
        }
        self.gpu.queue.submit([encoder.finish()]);
        if let Some(e) = pollster::block_on(validation.pop()) {
            return Err(RuntimeError::Gpu(format!(
                "profiling {entry:?}: {}",
                wgpu_error(&e)
            )));
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
        polled.map_err(|e| RuntimeError::DeviceLost(format!("profiling {entry:?}: {e}")))?;
        let mut ticks: Vec<u64> = Vec::with_capacity(timed.len() * 2);
        for buffer in &readbacks {
            let data = buffer
                .get_mapped_range(..)
                .map(|view| bytemuck::pod_collect_to_vec::<u8, u64>(&view))
                .map_err(|e| RuntimeError::Gpu(format!("profiling {entry:?}: {e}")));
            buffer.unmap();
            ticks.extend(data?);
        }
        let period = f64::from(self.gpu.queue.get_timestamp_period());
        let dispatches = names
            .into_iter()
            .enumerate()
            .map(|(k, (kernel, grid))| DispatchTime {
                kernel,
                grid,
                ns: ticks[2 * k + 1].saturating_sub(ticks[2 * k]) as f64 * period,
            })
            .collect();
        Ok(Profile {
            mode,
            batch,
            dispatches,
        })
    }
}

/// The two timestamps of a whole run (where the adapter has timestamp queries) and their
/// read-back.
pub(super) struct Timestamps {
    pub(super) queries: wgpu::QuerySet,
    pub(super) resolve: wgpu::Buffer,
    pub(super) readback: wgpu::Buffer,
    /// Nanoseconds per tick.
    pub(super) period: f64,
}

pub(super) fn create_timestamps(gpu: &GpuDevice) -> Timestamps {
    let device = &gpu.device;
    Timestamps {
        queries: device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("run timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        }),
        resolve: device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamp resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }),
        readback: device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamp read-back"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }),
        period: f64::from(gpu.queue.get_timestamp_period()),
    }
}
