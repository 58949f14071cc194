//! Forward passes: `encode` (flows: z and the per-sample log-det) and `classify` (logits).
//!
//! Per block: the ActNorm in place, the branch's hidden layers into ping-pong buffers (each
//! linear layer's output pre-filled with its bias, so bias + GEMM is one pass), then the last
//! linear accumulated straight onto the ActNorm output: `y = a + b + W h` with no separate
//! residual add.

use super::conv::{add_rows, affine_rows, fill_rows, grow};
use super::engine::{split, BLayer, Block, CpuEngine, LogDetRequest, Step};
use super::layout::{from_batch_major, squeeze, to_batch_major, to_channel_major};
use super::net::{EstimatorKind, NetKind};
use super::pool::Workspace;
use crate::error::{Result, RuntimeError};

/// Checks a caller's batch: `batch * dim` values, all finite.
pub(crate) fn check_batch(what: &str, data: &[f32], batch: usize, dim: usize) -> Result<()> {
    let want = batch
        .checked_mul(dim)
        .ok_or_else(|| RuntimeError::bad_input(what, format!("batch {batch} x {dim} overflows")))?;
    if data.len() != want {
        return Err(RuntimeError::bad_input(
            what,
            format!(
                "{} values, expected batch {batch} x {dim} = {want}",
                data.len()
            ),
        ));
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(RuntimeError::bad_input(
            what,
            format!(
                "sample {} element {} is {}",
                i / dim.max(1),
                i % dim.max(1),
                data[i]
            ),
        ));
    }
    Ok(())
}

/// Runs the hidden layers of `blk`'s branch on `a` (its ActNorm output). Returns which of `h`
/// holds the input of the last linear layer, or `None` when that input is `a` itself. With
/// `masks`, each activation also stores its derivative (for the log-det's vjps).
#[allow(clippy::too_many_arguments)]
pub(crate) fn hidden(
    blk: &Block,
    a: &[f32],
    h: &mut [Vec<f32>; 2],
    col: &mut Vec<f32>,
    mut masks: Option<&mut Vec<Vec<f32>>>,
    imgs: usize,
    threads: usize,
) -> Option<usize> {
    let n = imgs * blk.h * blk.w;
    let mut src: Option<usize> = None;
    let mut ch = blk.c;
    let mut mi = 0;
    if let Some(m) = masks.as_deref_mut() {
        if m.len() < blk.acts {
            m.resize_with(blk.acts, Vec::new);
        }
    }
    for layer in &blk.hidden {
        match layer {
            BLayer::Act(f) => {
                let len = ch * n;
                let mask = match masks.as_deref_mut() {
                    Some(m) => {
                        grow(&mut m[mi], len);
                        Some(&mut m[mi][..len])
                    }
                    None => None,
                };
                match src {
                    None => {
                        grow(&mut h[0], len);
                        f.apply_to(&a[..len], &mut h[0][..len], mask);
                        src = Some(0);
                    }
                    Some(i) => f.apply(&mut h[i][..len], mask),
                }
                mi += 1;
            }
            BLayer::Linear(l) => {
                let d = src.map_or(0, |i| 1 - i);
                grow(&mut h[d], l.cout * n);
                let (h0, h1) = h.split_at_mut(1);
                let (input, out): (&[f32], &mut Vec<f32>) = match (src, d) {
                    (None, 0) => (a, &mut h0[0]),
                    (None, _) => (a, &mut h1[0]),
                    (Some(_), 0) => (&h1[0], &mut h0[0]),
                    (Some(_), _) => (&h0[0], &mut h1[0]),
                };
                let out = &mut out[..l.cout * n];
                fill_rows(out, &l.bias, n);
                l.fwd
                    .apply(input, out, imgs, blk.h, blk.w, 1.0, true, col, threads);
                src = Some(d);
                ch = l.cout;
            }
        }
    }
    src
}

impl CpuEngine {
    /// Flows: `x [batch, C*H*W] -> (z [batch, D], log-det per sample)`. The log-det is computed
    /// when `logdet` is given (ActNorms included), else zeros.
    pub fn encode(
        &mut self,
        x: &[f32],
        batch: usize,
        logdet: Option<&LogDetRequest>,
    ) -> Result<(Vec<f32>, Vec<f64>)> {
        if self.net.kind != NetKind::Flow {
            return Err(RuntimeError::bad_input(
                "mode",
                format!("model {:?} is a classifier: use classify", self.net.name),
            ));
        }
        check_batch("input", x, batch, self.input_dim())?;
        if let Some(req) = logdet {
            self.check_logdet(req)?;
        }
        let mut z = vec![0f32; batch * self.latent_dim];
        let mut lds = vec![0f64; batch];
        if batch == 0 {
            return Ok((z, lds));
        }
        let mut ws = std::mem::take(&mut self.ws);
        let r = self
            .pool
            .install(|| self.run_steps(&mut ws, x, batch, Some(&mut z), logdet, &mut lds));
        self.ws = ws;
        r?;
        Ok((z, lds))
    }

    /// Classifiers: `x [batch, C*H*W] -> logits [batch, classes]`.
    pub fn classify(&mut self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        let Some(head) = self.head.as_ref() else {
            return Err(RuntimeError::bad_input(
                "mode",
                format!("model {:?} is a flow: use encode", self.net.name),
            ));
        };
        check_batch("input", x, batch, self.input_dim())?;
        let classes = head.linear.cout;
        let mut logits = vec![0f32; batch * classes];
        if batch == 0 {
            return Ok(logits);
        }
        let mut ws = std::mem::take(&mut self.ws);
        let r = self.pool.install(|| -> Result<()> {
            self.run_steps(&mut ws, x, batch, None, None, &mut [])?;
            let (c, h, w) = self.final_chw;
            let hw = h * w;
            let n = batch * hw;
            let cur = &mut ws.cur[..c * n];
            if let Some((scale, shift)) = &head.bn {
                affine_rows(cur, scale, shift, n);
            }
            // Features [C][B]: ReLU then the spatial mean, or the state itself (vectors).
            grow(&mut ws.tmp, c * batch);
            let feat = &mut ws.tmp[..c * batch];
            if head.relu_pool {
                for (ci, f) in feat.chunks_mut(batch).enumerate() {
                    for (img, v) in f.iter_mut().enumerate() {
                        let px = &cur[(ci * batch + img) * hw..][..hw];
                        let s: f64 = px.iter().map(|&p| p.max(0.0) as f64).sum();
                        *v = (s / hw as f64) as f32;
                    }
                }
            } else {
                feat.copy_from_slice(&cur[..c * batch]);
            }
            grow(&mut ws.h[0], classes * batch);
            let out = &mut ws.h[0][..classes * batch];
            fill_rows(out, &head.linear.bias, batch);
            head.linear
                .fwd
                .apply(feat, out, batch, 1, 1, 1.0, true, &mut ws.col, self.threads);
            to_batch_major(out, &mut logits, batch, 0, classes, 1, classes, 0);
            Ok(())
        });
        self.ws = ws;
        r?;
        Ok(logits)
    }

    fn check_logdet(&self, req: &LogDetRequest) -> Result<()> {
        let bad = |r: String| RuntimeError::bad_input("logdet", r);
        match req.estimator {
            EstimatorKind::Exact => {
                if let Some(b) = self
                    .blocks()
                    .find(|b| b.c * b.h * b.w > super::logdet::EXACT_MAX_DIM)
                {
                    return Err(bad(format!(
                        "estimator \"exact\" on block `{}`: its dimension {} exceeds {} (a dense \
                         Jacobian per sample); use \"series\" or \"roulette\"",
                        b.name,
                        b.c * b.h * b.w,
                        super::logdet::EXACT_MAX_DIM
                    )));
                }
            }
            EstimatorKind::Series | EstimatorKind::Roulette => {
                if req.terms == 0 && req.estimator == EstimatorKind::Series {
                    return Err(bad("series with 0 terms".into()));
                }
                if req.probes == 0 {
                    return Err(bad("0 probes".into()));
                }
                if req.estimator == EstimatorKind::Roulette
                    && !(req.roulette_param > 0.0 && req.roulette_param.is_finite())
                {
                    return Err(bad(format!("roulette parameter {}", req.roulette_param)));
                }
            }
        }
        Ok(())
    }

    /// Every step on the batch; flows write their z parts into `z`.
    fn run_steps(
        &self,
        ws: &mut Workspace,
        x: &[f32],
        batch: usize,
        mut z: Option<&mut [f32]>,
        logdet: Option<&LogDetRequest>,
        lds: &mut [f64],
    ) -> Result<()> {
        let (c0, h0, w0) = self.input_chw;
        grow(&mut ws.cur, c0 * batch * h0 * w0);
        to_channel_major(x, &mut ws.cur, batch, c0, h0 * w0);
        let row = self.latent_dim;
        for step in &self.steps {
            match step {
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
                        false,
                    );
                    std::mem::swap(&mut ws.cur, &mut ws.tmp);
                }
                Step::Pad { cin, cout, hw } => {
                    // Channel-major: the new channels are appended zeros.
                    grow(&mut ws.cur, cout * batch * hw);
                    ws.cur[cin * batch * hw..cout * batch * hw].fill(0.0);
                }
                Step::FactorOut { c, hw, z_offset } => {
                    let (zr, keep) = split(self.net.factor_out_half, *c);
                    if let Some(z) = z.as_deref_mut() {
                        to_batch_major(&ws.cur, z, batch, zr.0, zr.1, *hw, row, *z_offset);
                    }
                    let n = batch * hw;
                    ws.cur.copy_within(keep.0 * n..(keep.0 + keep.1) * n, 0);
                }
                Step::Block(b) => self.block_forward(b, ws, batch, logdet, lds)?,
            }
        }
        if let Some(z) = z {
            let (c, h, w) = self.final_chw;
            to_batch_major(&ws.cur, z, batch, 0, c, h * w, row, row - c * h * w);
        }
        Ok(())
    }

    fn block_forward(
        &self,
        b: &Block,
        ws: &mut Workspace,
        batch: usize,
        logdet: Option<&LogDetRequest>,
        lds: &mut [f64],
    ) -> Result<()> {
        let n = batch * b.h * b.w;
        let len = b.c * n;
        affine_rows(&mut ws.cur[..len], &b.scale, &b.shift, n);
        if logdet.is_some() {
            lds.iter_mut().for_each(|l| *l += b.actnorm_logdet);
        }
        let masks = logdet.map(|_| &mut ws.masks);
        let src = hidden(
            b,
            &ws.cur[..len],
            &mut ws.h,
            &mut ws.col,
            masks,
            batch,
            self.threads,
        );
        if src.is_none() {
            // A one-layer branch reads a itself: keep a copy, as the output overwrites it.
            grow(&mut ws.tmp, len);
            ws.tmp[..len].copy_from_slice(&ws.cur[..len]);
        }
        // y = a + bias + W h, accumulated onto a (the residual add and bias fused in the GEMM).
        add_rows(&mut ws.cur[..len], &b.last.bias, n);
        let input: &[f32] = match src {
            Some(i) => &ws.h[i],
            None => &ws.tmp,
        };
        b.last.fwd.apply(
            input,
            &mut ws.cur[..len],
            batch,
            b.h,
            b.w,
            1.0,
            true,
            &mut ws.col,
            self.threads,
        );
        if let Some(req) = logdet {
            self.block_logdet(b, ws, batch, req, lds)?;
        }
        Ok(())
    }

    /// Reads z's parts back into the state layout (used by the inverse).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn z_part_in(
        &self,
        z: &[f32],
        cur: &mut [f32],
        batch: usize,
        c0: usize,
        len: usize,
        hw: usize,
        offset: usize,
    ) {
        from_batch_major(z, cur, batch, c0, len, hw, self.latent_dim, offset);
    }
}
