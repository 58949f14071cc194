//! The inverse (`decode`): z back to x, blocks in reverse, each by the fixed point
//! `x <- y - g(x)` started at `x = y`, iterated until its step `max|x_{k+1} - x_k|` is below the
//! model's `inverse.tol` (the step of `x_k` is also its residual `max|x_k + g(x_k) - y|`), capped
//! by the block's certified iteration count. In f32 the step stops shrinking around the
//! round-off of `y`; when it has not improved for a few steps, iterating further cannot help,
//! so the block stops there and says so.
//!
//! The update is fused into the last GEMM of g: the next iterate's buffer is pre-filled with
//! `y - bias` and the GEMM accumulates `-W h` onto it.

use rayon::prelude::*;

use super::conv::{affine_rows, grow};
use super::engine::{split, Block, BlockInverse, CpuEngine, InverseReport, Step};
use super::forward::{check_batch, hidden};
use super::layout::{squeeze, to_batch_major};
use super::net::NetKind;
use super::pool::Workspace;
use crate::error::{Result, RuntimeError};

/// Steps without a new smallest step after which the fixed point is at f32's precision floor.
const STALL_STEPS: usize = 3;

impl CpuEngine {
    /// Flows: `z [batch, D] -> x [batch, C*H*W]`, with the per-block iterations and residuals.
    pub fn decode(&mut self, z: &[f32], batch: usize) -> Result<(Vec<f32>, InverseReport)> {
        if self.net.kind != NetKind::Flow {
            return Err(RuntimeError::bad_input(
                "mode",
                format!(
                    "model {:?} is a classifier: only flows are invertible end to end",
                    self.net.name
                ),
            ));
        }
        check_batch("z", z, batch, self.latent_dim)?;
        let mut x = vec![0f32; batch * self.input_dim()];
        let mut report = InverseReport {
            blocks: self
                .blocks()
                .map(|b| BlockInverse {
                    name: b.name.clone(),
                    ..Default::default()
                })
                .collect(),
        };
        if batch == 0 {
            return Ok((x, report));
        }
        let mut ws = std::mem::take(&mut self.ws);
        self.pool
            .install(|| self.decode_in(&mut ws, z, batch, &mut x, &mut report));
        self.ws = ws;
        Ok((x, report))
    }

    fn decode_in(
        &self,
        ws: &mut Workspace,
        z: &[f32],
        batch: usize,
        x: &mut [f32],
        report: &mut InverseReport,
    ) {
        let row = self.latent_dim;
        let (c, h, w) = self.final_chw;
        grow(&mut ws.cur, c * batch * h * w);
        self.z_part_in(z, &mut ws.cur, batch, 0, c, h * w, row - c * h * w);
        for step in self.steps.iter().rev() {
            match step {
                Step::Block(b) => {
                    report.blocks[b.index] = self.invert_block(b, ws, batch);
                }
                Step::FactorOut { c, hw, z_offset } => {
                    let (zr, keep) = split(self.net.factor_out_half, *c);
                    let n = batch * hw;
                    grow(&mut ws.cur, c * n);
                    ws.cur.copy_within(0..keep.1 * n, keep.0 * n);
                    self.z_part_in(z, &mut ws.cur, batch, zr.0, zr.1, *hw, *z_offset);
                }
                Step::Squeeze { c, h, w } => {
                    let len = c * batch * h * w;
                    grow(&mut ws.tmp, len);
                    squeeze(
                        &ws.cur,
                        &mut ws.tmp,
                        self.net.squeeze_order,
                        *c,
                        batch,
                        *h,
                        *w,
                        true,
                    );
                    std::mem::swap(&mut ws.cur, &mut ws.tmp);
                }
                // Channel-major: dropping the padded channels is dropping the tail.
                Step::Pad { .. } => {}
            }
        }
        let (c, h, w) = self.input_chw;
        to_batch_major(&ws.cur, x, batch, 0, c, h * w, c * h * w, 0);
    }

    /// Inverts `y = a + g(a)` (in `ws.cur`) in place, then the ActNorm.
    fn invert_block(&self, b: &Block, ws: &mut Workspace, batch: usize) -> BlockInverse {
        let n = batch * b.h * b.w;
        let len = b.c * n;
        grow(&mut ws.y, len);
        grow(&mut ws.next, len);
        ws.y[..len].copy_from_slice(&ws.cur[..len]);
        let tol = self.net.inverse.tol;
        let (mut iters, mut step, mut best, mut stalled) = (0, f64::INFINITY, f64::INFINITY, 0);
        let (mut converged, mut floor) = (false, false);
        while iters < b.max_iters {
            let src = hidden(
                b,
                &ws.cur[..len],
                &mut ws.h,
                &mut ws.col,
                None,
                batch,
                self.threads,
            );
            // next = y - bias - W h.
            {
                let next = &mut ws.next[..len];
                next.par_chunks_mut(n)
                    .zip(ws.y[..len].par_chunks(n))
                    .zip(b.last.bias.par_iter())
                    .for_each(|((o, y), bias)| {
                        for (o, y) in o.iter_mut().zip(y) {
                            *o = y - bias;
                        }
                    });
            }
            let input: &[f32] = match src {
                Some(i) => &ws.h[i],
                None => &ws.cur,
            };
            b.last.fwd.apply(
                input,
                &mut ws.next[..len],
                batch,
                b.h,
                b.w,
                -1.0,
                true,
                &mut ws.col,
                self.threads,
            );
            step = max_abs_diff(&ws.next[..len], &ws.cur[..len]);
            std::mem::swap(&mut ws.cur, &mut ws.next);
            iters += 1;
            if step <= tol {
                converged = true;
                break;
            }
            if step < best {
                best = step;
                stalled = 0;
            } else {
                stalled += 1;
                if stalled >= STALL_STEPS {
                    floor = true;
                    break;
                }
            }
        }
        // ActNorm inverse: x = (a - shift) / scale.
        let inv: Vec<f32> = b.scale.iter().map(|s| 1.0 / s).collect();
        let shift: Vec<f32> = b.shift.iter().zip(&inv).map(|(t, i)| -t * i).collect();
        affine_rows(&mut ws.cur[..len], &inv, &shift, n);
        BlockInverse {
            name: b.name.clone(),
            iters,
            residual: step,
            converged,
            precision_floor: floor,
        }
    }
}

/// `max |a - b|` (order-independent, so the same on any thread count).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.par_chunks(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        })
        .reduce(|| 0f32, f32::max) as f64
}
