//! GPU buffers of a plan: sizes, limit checks, weight upload, allocation for a batch.
//!
//! All allocation happens in [`BufferSet::allocate`] so that reusing memory between buffers
//! whose lifetimes do not overlap (liveness planning) can later be added in one place.

use wgpu::util::DeviceExt;

use crate::bundle::Bundle;
use crate::device::GpuDevice;
use crate::error::{Result, RuntimeError};
use crate::plan::{dispatch_at, BufferDecl, BufferInit, Folded, Plan, Step};

const F32_BYTES: u64 = 4;

/// Every plan buffer can be bound as storage, copied from (outputs, `Copy` steps) and written
/// to (inputs, `Copy`/`Fill` steps, zeroing).
pub(crate) const PLAN_BUFFER_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Size in bytes of `decl` for a batch of `batch` samples.
pub fn buffer_bytes(decl: &BufferDecl, batch: usize) -> u64 {
    let samples = if decl.per_sample { batch as u64 } else { 1 };
    decl.elems.saturating_mul(samples).saturating_mul(F32_BYTES)
}

/// Checks every buffer and every dispatch of `plan` at `batch` against the device limits;
/// the error names the buffer (or kernel) and the limit.
pub fn check_limits(plan: &Plan, limits: &wgpu::Limits, batch: usize) -> Result<()> {
    for b in &plan.buffers {
        let bytes = buffer_bytes(b, batch);
        let what = || {
            if b.per_sample {
                format!("buffer {:?} at batch {batch} (bytes)", b.name)
            } else {
                format!("buffer {:?} (bytes)", b.name)
            }
        };
        for (limit, max) in [
            ("max_buffer_size", limits.max_buffer_size),
            (
                "max_storage_buffer_binding_size",
                limits.max_storage_buffer_binding_size,
            ),
        ] {
            if bytes > max {
                return Err(RuntimeError::LimitExceeded {
                    limit: limit.to_string(),
                    what: what(),
                    requested: bytes,
                    max,
                });
            }
        }
    }
    let max_groups = limits.max_compute_workgroups_per_dimension;
    let mut result = Ok(());
    for_each_dispatch(plan, &mut |kernel, workgroups, folded| {
        if result.is_err() {
            return;
        }
        let fits = dispatch_at(kernel, workgroups, folded, batch, max_groups)
            .filter(|(_, grid)| grid.iter().all(|&n| n <= max_groups));
        if fits.is_none() {
            let requested = u64::from(workgroups[2]).saturating_mul(batch as u64);
            result = Err(RuntimeError::LimitExceeded {
                limit: "max_compute_workgroups_per_dimension".to_string(),
                what: format!("dispatch of kernel {kernel:?} at batch {batch} (workgroups)"),
                requested,
                max: u64::from(max_groups),
            });
        }
    });
    result
}

/// The largest batch for which every buffer and every dispatch fits the limits; 0 when even a
/// single sample does not fit (then [`check_limits`] at batch 1 says why). Callers split larger
/// batches into chunks of at most this size.
pub fn max_batch_for_limits(plan: &Plan, limits: &wgpu::Limits) -> usize {
    let mut max = u64::MAX;
    let per_buffer = limits
        .max_buffer_size
        .min(limits.max_storage_buffer_binding_size);
    for b in &plan.buffers {
        let bytes = b.elems.saturating_mul(F32_BYTES);
        if b.per_sample {
            max = max.min(per_buffer / bytes.max(1));
        } else if bytes > per_buffer {
            return 0;
        }
    }
    let max_groups = u64::from(limits.max_compute_workgroups_per_dimension);
    for_each_dispatch(plan, &mut |_, workgroups, folded| {
        if u64::from(workgroups[0]) > max_groups || u64::from(workgroups[1]) > max_groups {
            max = 0;
        } else {
            max = max.min(max_groups / u64::from(workgroups[2]).max(1));
        }
        if let Some(f) = folded {
            // Row tiles spill from x into z: at most max_groups^2 of them.
            let tiles = max_groups.saturating_mul(max_groups);
            let rows = tiles.saturating_mul(u64::from(f.rows_per_group));
            max = max.min(rows / u64::from(f.rows.max(1)));
            if u64::from(f.groups_y) > max_groups {
                max = 0;
            }
        }
    });
    usize::try_from(max).unwrap_or(usize::MAX)
}

type DispatchVisitor<'a> = dyn FnMut(&str, [u32; 3], Option<&Folded>) + 'a;

fn for_each_dispatch(plan: &Plan, f: &mut DispatchVisitor) {
    fn walk(steps: &[Step], f: &mut DispatchVisitor) {
        for step in steps {
            match step {
                Step::Dispatch {
                    kernel,
                    workgroups,
                    large_batch,
                } => f(kernel, *workgroups, large_batch.as_ref()),
                Step::Repeat { steps, .. } => walk(steps, f),
                Step::Copy { .. } | Step::Fill { .. } => {}
            }
        }
    }
    for ep in plan.entry_points.values() {
        walk(&ep.steps, f);
    }
}

/// Weight buffers, uploaded once per executor and shared by every batch size; indexed like
/// `plan.buffers` (`None` for non-weight buffers).
pub(crate) fn upload_weights(
    gpu: &GpuDevice,
    bundle: &Bundle,
) -> Result<Vec<Option<wgpu::Buffer>>> {
    check_limits(&bundle.plan, gpu.limits(), 1)?;
    Ok(bundle
        .plan
        .buffers
        .iter()
        .map(|b| match &b.init {
            BufferInit::Weight { tensor, layout } => {
                // Bundle::load checked that the tensor exists with `elems` values, and the
                // plan that the layout divides them (so `arrange` cannot refuse).
                let stored = &bundle.weights[tensor].data;
                let data = layout
                    .arrange(stored)
                    .unwrap_or(std::borrow::Cow::Borrowed(stored));
                Some(
                    gpu.device
                        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                            label: Some(&b.name),
                            contents: bytemuck::cast_slice(&data),
                            usage: PLAN_BUFFER_USAGE,
                        }),
                )
            }
            BufferInit::Packed { parts } => {
                let data: Vec<f32> = parts
                    .iter()
                    .flat_map(|t| bundle.weights[t].data.iter().copied())
                    .collect();
                Some(
                    gpu.device
                        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                            label: Some(&b.name),
                            contents: bytemuck::cast_slice(&data),
                            usage: PLAN_BUFFER_USAGE,
                        }),
                )
            }
            _ => None,
        })
        .collect())
}

/// The plan's buffers for one batch size, indexed like `plan.buffers`.
pub(crate) struct BufferSet {
    pub batch: usize,
    pub buffers: Vec<wgpu::Buffer>,
}

impl BufferSet {
    pub fn allocate(
        gpu: &GpuDevice,
        plan: &Plan,
        batch: usize,
        weights: &[Option<wgpu::Buffer>],
    ) -> Result<BufferSet> {
        check_limits(plan, gpu.limits(), batch)?;
        let buffers = plan
            .buffers
            .iter()
            .zip(weights)
            .map(|(b, weight)| match weight {
                Some(w) => w.clone(),
                None if b.init == BufferInit::Batch => {
                    gpu.device
                        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                            label: Some(&b.name),
                            contents: bytemuck::bytes_of(&(batch as f32)),
                            usage: PLAN_BUFFER_USAGE,
                        })
                }
                None => gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&b.name),
                    size: buffer_bytes(b, batch),
                    usage: PLAN_BUFFER_USAGE,
                    mapped_at_creation: false,
                }),
            })
            .collect();
        Ok(BufferSet { batch, buffers })
    }
}
