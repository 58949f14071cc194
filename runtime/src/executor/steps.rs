//! A plan's steps flattened into the GPU operations of one submission (`Repeat` unrolled,
//! within a bound), and the fill kernel's grid.

use super::*;

/// Appends the GPU operations of `steps` to `ops`, unrolling `Repeat`.
pub(super) fn flatten(
    steps: &[Step],
    buffers: &HashMap<&str, usize>,
    kernels: &HashMap<&str, usize>,
    ops: &mut Vec<Op>,
) -> Result<()> {
    for step in steps {
        match step {
            Step::Dispatch {
                kernel,
                workgroups,
                large_batch,
            } => ops.push(Op::Dispatch {
                kernel: kernels[kernel.as_str()],
                workgroups: *workgroups,
                folded: large_batch.as_ref().map(|f| FoldedOp {
                    min_batch: f.min_batch,
                    kernel: kernels[f.kernel.as_str()],
                    fold: [f.rows, f.rows_per_group, f.groups_y],
                }),
            }),
            Step::Repeat { times, steps } => {
                let start = ops.len();
                flatten(steps, buffers, kernels, ops)?;
                let body = ops.len() - start;
                if body.saturating_mul(*times as usize) > MAX_UNROLLED_OPS {
                    return Err(RuntimeError::corrupt(
                        crate::plan::PLAN_FILE,
                        format!(
                            "a Repeat of {times} x {body} steps unrolls to more than {MAX_UNROLLED_OPS} GPU operations"
                        ),
                    ));
                }
                if *times == 0 {
                    ops.truncate(start);
                } else {
                    for _ in 1..*times {
                        ops.extend_from_within(start..start + body);
                    }
                }
            }
            Step::Copy { src, dst } => ops.push(Op::Copy {
                src: buffers[src.as_str()],
                dst: buffers[dst.as_str()],
            }),
            // clear_buffer is the cheapest zeroing; other values need the fill kernel.
            Step::Fill { buffer, value } if *value == 0.0 && value.is_sign_positive() => {
                ops.push(Op::Clear {
                    buffer: buffers[buffer.as_str()],
                })
            }
            Step::Fill { buffer, value } => ops.push(Op::Fill {
                buffer: buffers[buffer.as_str()],
                value: *value,
            }),
        }
    }
    if ops.len() > MAX_UNROLLED_OPS {
        return Err(RuntimeError::corrupt(
            crate::plan::PLAN_FILE,
            format!("entry point unrolls to more than {MAX_UNROLLED_OPS} GPU operations"),
        ));
    }
    Ok(())
}

/// Records an operation that runs outside compute passes (a clear or a copy).
pub(super) fn encode_transfer(
    encoder: &mut wgpu::CommandEncoder,
    buffers: &[wgpu::Buffer],
    op: Op,
) {
    match op {
        Op::Clear { buffer } => encoder.clear_buffer(&buffers[buffer], 0, None),
        Op::Copy { src, dst } => {
            let size = buffers[src].size();
            encoder.copy_buffer_to_buffer(&buffers[src], 0, &buffers[dst], 0, size);
        }
        Op::Dispatch { .. } | Op::Fill { .. } => {
            unreachable!("dispatches and fills are recorded inside compute passes")
        }
    }
}

pub(super) fn count_passes(ops: &[Op]) -> usize {
    let mut passes = 0;
    let mut in_pass = false;
    for op in ops {
        if op.in_pass() && !in_pass {
            passes += 1;
        }
        in_pass = op.in_pass();
    }
    passes
}

/// Workgroup grid `[x, y]` covering `elems` elements with the fill kernel.
pub(super) fn fill_grid(elems: u64, max_per_dim: u32) -> [u32; 2] {
    let groups = elems.div_ceil(FILL_WORKGROUP).max(1);
    let x = groups.min(u64::from(max_per_dim.max(1)));
    [x as u32, groups.div_ceil(x) as u32]
}
