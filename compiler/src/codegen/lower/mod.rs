//! Lowering a certified graph to plan steps: the forward pass (with the log-det series
//! interleaved block by block), the inverse (fixed point per block, in one submission) and
//! the classifier's forward. Fused or unfused per [`Fusion::enabled`].
//!
//! Buffers: every value outside a residual branch has its own small buffer (`v.<node>`);
//! the large branch intermediates are per-stage scratch (`s<stage>.<role>`) reused by every
//! block of the stage, since a block's forward, log-det and inverse finish before the next
//! block starts (liveness by construction).

use std::collections::HashMap;

use iresnetc_runtime::{BufferInit, Step};
use petgraph::stable_graph::NodeIndex;

use super::builder::PlanBuilder;
use super::kernels::{
    self, ActNormInverse, ActOut, Conv, Epilogue, Generated, LatentTaps, LogDetBindings, Mask,
    NextActNorm, TermCounter, Tiling,
};
use super::wgsl::{act_suffix, float, Binding};
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::{actnorm::spatial, param_name, Op};
use crate::passes::fusion::{ActRef, FusedBlock, Fusion};
use crate::passes::LipschitzReport;
use crate::spec::SqueezeOrder;

/// Names of the plan's fixed buffers (the I/O contract with the callers).
mod block;
mod head;
mod inverse;
mod logdet;

pub mod names {
    pub const X: &str = "x";
    pub const PROBES: &str = "probes";
    pub const COEF: &str = "coef";
    pub const Z: &str = "z";
    pub const LOGDET: &str = "logdet";
    pub const Z_IN: &str = "z_in";
    pub const X_OUT: &str = "x_out";
    pub const LOGITS: &str = "logits";
    /// The log-det's per-sample accumulator, shared by every block, with its term counter
    /// in the last slot of each sample.
    pub const ACC: &str = "ld.acc";
}

/// Extra roulette terms a plan has room for beyond `logdet.terms` (the roulette entry point
/// runs `terms + ROULETTE_EXTRA_TERMS` terms; draws beyond that are refused on the CPU).
pub const ROULETTE_EXTRA_TERMS: usize = 20;

pub use iresnetc_runtime::logdet::LogDetLayout;

pub struct Lowering<'a> {
    g: &'a Graph,
    fusion: &'a Fusion,
    lip: &'a LipschitzReport,
    tiling: Tiling,
    pub b: PlanBuilder,
    pub layout: LogDetLayout,
    block_of_residual: HashMap<NodeIndex, usize>,
    /// Fused forward: the parts of z a block's residual epilogue writes itself.
    z_taps: HashMap<usize, LatentTaps>,
}

/// A value's location: a buffer, an offset inside each sample and the buffer's per-sample size.
#[derive(Clone, Debug)]
struct Loc {
    buffer: String,
    offset: usize,
    stride: usize,
}

impl<'a> Lowering<'a> {
    pub fn new(g: &'a Graph, fusion: &'a Fusion, lip: &'a LipschitzReport, tiling: Tiling) -> Self {
        let layout = LogDetLayout {
            block_dims: g
                .blocks
                .iter()
                .map(|b| g.node(b.actnorm).shape.iter().product())
                .collect(),
            probes: g.spec.logdet.probes.max(1),
            coef_stride: g.spec.logdet.terms + ROULETTE_EXTRA_TERMS,
            terms: g.spec.logdet.terms,
        };
        Lowering {
            g,
            fusion,
            lip,
            tiling,
            b: PlanBuilder::default(),
            layout,
            block_of_residual: g.block_of_residual(),
            z_taps: HashMap::new(),
        }
    }

    fn elems(&self, ix: NodeIndex) -> usize {
        self.g.node(ix).shape.iter().product()
    }

    /// The buffer holding node `ix`'s value (declared on first use).
    fn val(&mut self, ix: NodeIndex) -> Result<String> {
        let n = self.g.node(ix);
        let elems = self.elems(ix);
        match &n.op {
            Op::Input => self.b.buffer(names::X, elems, true, BufferInit::Input),
            _ if Some(ix) == self.g.logits => {
                self.b
                    .buffer(names::LOGITS, elems, true, BufferInit::Output)
            }
            _ => self.b.scratch(&format!("v.{}", n.name), elems),
        }
    }

    fn loc(&mut self, ix: NodeIndex) -> Result<Loc> {
        Ok(Loc {
            buffer: self.val(ix)?,
            offset: 0,
            stride: self.elems(ix),
        })
    }

    fn weight(&mut self, tensor: &str) -> Result<String> {
        let elems = self
            .g
            .params
            .get(tensor)
            .map(|t| t.data.len())
            .ok_or_else(|| Error::Codegen {
                context: format!("tensor `{tensor}`"),
                message: "the graph has no such parameter".into(),
            })?;
        self.b.weight(tensor, elems)
    }

    /// Declares the weight buffers a generated kernel binds (LipSwish betas, ActNorm params).
    fn declare_weights(&mut self, k: &Generated) -> Result<()> {
        for bind in &k.bindings {
            if let Some(t) = self.g.params.get(&bind.buffer) {
                if bind.param.is_some_and(|n| n != t.data.len()) {
                    return Err(Error::Codegen {
                        context: format!("tensor `{}`", bind.buffer),
                        message: format!(
                            "packed as {:?} values but holds {}",
                            bind.param,
                            t.data.len()
                        ),
                    });
                }
                self.weight(&bind.buffer)?;
            }
        }
        Ok(())
    }

    fn emit(&mut self, name: &str, k: Generated) -> Result<Step> {
        self.declare_weights(&k)?;
        self.b.kernel(
            name,
            k.source,
            &k.bindings,
            k.workgroup_size,
            k.workgroups,
            super::builder::KernelCost {
                flops_per_sample: k.flops_per_sample,
                chain: k.chain,
                bytes_per_sample: k.bytes_per_sample,
                bytes_shared: k.bytes_shared,
                kind: k.kind,
            },
        )
    }

    fn conv(&mut self, name: &str, mut c: Conv) -> Result<Step> {
        self.weight(&c.weight)?;
        // The GPU tiling stages weights along the reduction: a transposed convolution reads
        // the adjoint arrangement, contiguous like a forward one.
        if c.transposed && matches!(self.tiling, Tiling::SplitK { .. }) && !c.adjoint_weight {
            let elems = self.g.params.get(&c.weight).map_or(0, |t| t.data.len());
            c.weight = self
                .b
                .weight_adjoint(&c.weight, elems, c.geom.cout, c.geom.k)?;
            c.adjoint_weight = true;
        }
        if let Some(bias) = &c.bias {
            self.weight(bias)?;
        }
        let k = kernels::conv(&c, self.tiling)?;
        let mut step = self.emit(name, k)?;
        if let Some(folded) = super::gemm::conv(&c, self.tiling)? {
            let gemm_name = format!("{name}.gemm");
            self.emit(&gemm_name, folded.generated)?;
            if let Step::Dispatch { large_batch, .. } = &mut step {
                *large_batch = Some(iresnetc_runtime::Folded {
                    min_batch: folded.min_batch,
                    kernel: gemm_name,
                    rows: folded.rows,
                    rows_per_group: folded.rows_per_group,
                    groups_y: folded.groups_y,
                });
            }
        }
        Ok(step)
    }

    fn eltwise(
        &mut self,
        name: &str,
        n: usize,
        bindings: Vec<Binding>,
        act: Option<&ActRef>,
        body: &str,
    ) -> Result<Step> {
        let k = kernels::eltwise(n, bindings, act, body)?;
        self.emit(name, k)
    }

    /// `dst = act(src)` elementwise.
    fn act_kernel(
        &mut self,
        name: &str,
        n: usize,
        src: &str,
        dst: &str,
        a: &ActRef,
    ) -> Result<Step> {
        let body = format!(
            "    let o = sample * {n}u + i;\n    dst[o] = act_{}(src[o], beta);",
            act_suffix(a.act)
        );
        self.eltwise(
            name,
            n,
            vec![Binding::read("src", src), Binding::write("dst", dst)],
            Some(a),
            &body,
        )
    }

    /// Copies `n` elements per sample, `dst[map_dst(i)] = src[map_src(i)]`; the maps are WGSL
    /// expressions in `i` (per-sample indices, offsets added here).
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &mut self,
        name: &str,
        n: usize,
        src: &Loc,
        src_index: &str,
        dst: &Loc,
        dst_index: &str,
        prelude: &str,
    ) -> Result<Step> {
        let body = format!(
            "{prelude}    dst[sample * {}u + {}u + {dst_index}] = src[sample * {}u + {}u + {src_index}];",
            dst.stride, dst.offset, src.stride, src.offset
        );
        self.eltwise(
            name,
            n,
            vec![
                Binding::read("src", src.buffer.clone()),
                Binding::write("dst", dst.buffer.clone()),
            ],
            None,
            &body,
        )
    }

    /// Squeeze index prelude for an unsqueezed shape `s` and squeezed index `i`: defines `u`,
    /// the matching unsqueezed index, for the model's channel `order` (see `ops::layout`).
    fn squeeze_prelude(s: &[usize], order: SqueezeOrder) -> String {
        let (c, h, w) = (s[0], s[1], s[2]);
        let (ho, wo) = (h / 2, w / 2);
        // Input channel `c`, row offset `dy` and column offset `dx` of squeezed channel `co`.
        let (ci, dy, dx) = match order {
            SqueezeOrder::SpaceToDepth => (
                format!("co % {c}u"),
                format!("co / {}u", 2 * c),
                format!("(co / {c}u) % 2u"),
            ),
            SqueezeOrder::PixelUnshuffle => (
                "co / 4u".to_string(),
                "(co % 4u) / 2u".to_string(),
                "co % 2u".to_string(),
            ),
        };
        format!(
            "    let co = i / {hw}u;\n    let r = i % {hw}u;\n    let u = (({ci}) * {h}u + 2u * (r / {wo}u) + {dy}) * {w}u + 2u * (r % {wo}u) + {dx};\n",
            hw = ho * wo
        )
    }

    /// The forward pass: flows write `z` (and, with `terms`, the log-det with that many series
    /// terms per probe); classifiers write `logits`.
    pub fn forward(&mut self, terms: Option<usize>) -> Result<Vec<Step>> {
        let g = self.g;
        let mut steps = Vec::new();
        let latent_off = self.latent_offsets();
        // The vjp kernels know their entry point's term count (they derive term and probe from
        // one counter), so the roulette's longer series gets kernels of its own.
        let tag = match terms {
            Some(t) if t == self.layout.terms => "ld".to_string(),
            Some(_) => "rl".to_string(),
            None => "fwd".to_string(),
        };
        let mut folded = self.folded_layout(&latent_off)?;
        let (taps, tapped) = self.latent_taps(&latent_off)?;
        self.z_taps = taps;
        // A tapped slice needs no kernel of its own (a tapped block output still runs its block).
        folded.extend(
            tapped
                .iter()
                .copied()
                .filter(|&l| matches!(g.node(l).op, Op::SliceChannels { .. })),
        );
        for ix in g.topo_order()? {
            let n = g.node(ix);
            if n.block.is_some() || folded.contains(&ix) {
                continue;
            }
            let name = format!("fwd.{}", n.name);
            let ins = g.inputs(ix);
            let in_shape = g.input_shape(ix);
            match &n.op {
                Op::Input => {
                    self.val(ix)?;
                }
                Op::Squeeze { order } => {
                    let (src, dst) = (self.loc(ins[0])?, self.loc(ix)?);
                    let prelude = Self::squeeze_prelude(&in_shape, *order);
                    steps.push(self.gather(&name, dst.stride, &src, "u", &dst, "i", &prelude)?);
                }
                Op::PadChannels { .. } => {
                    let (src, dst) = (self.loc(ins[0])?, self.loc(ix)?);
                    let body = format!(
                        "    dst[sample * {d}u + i] = select(0.0, src[sample * {s}u + min(i, {last}u)], i < {s}u);",
                        d = dst.stride,
                        s = src.stride,
                        last = src.stride - 1
                    );
                    steps.push(self.eltwise(
                        &name,
                        dst.stride,
                        vec![
                            Binding::read("src", src.buffer),
                            Binding::write("dst", dst.buffer),
                        ],
                        None,
                        &body,
                    )?);
                }
                Op::SliceChannels { start, len } => {
                    let per = spatial(&in_shape);
                    let src = self.loc(ins[0])?;
                    let dst = match latent_off.get(&ix) {
                        Some(&off) => self.z_loc(names::Z, off, BufferInit::Output)?,
                        None => self.loc(ix)?,
                    };
                    let src = Loc {
                        offset: start * per,
                        ..src
                    };
                    steps.push(self.gather(&name, len * per, &src, "i", &dst, "i", "")?);
                }
                Op::ActNorm => {
                    if self.fusion.actnorm_producer(&n.name).is_none() {
                        steps.extend(self.actnorm_forward(ix, &folded)?);
                    }
                }
                Op::Residual => {
                    let b = self.block_of_residual[&ix];
                    steps.extend(self.block_forward(b)?);
                    if let Some(t) = terms {
                        steps.extend(self.block_logdet(b, t, &tag)?);
                    }
                }
                Op::BatchNorm { eps } => {
                    let fused = self
                        .fusion
                        .head_pool
                        .as_ref()
                        .is_some_and(|c| c.contains(&n.name));
                    if !fused {
                        steps.push(self.batchnorm(&name, ix, ins[0], *eps)?);
                    }
                }
                Op::Act { act } => {
                    let fused = self
                        .fusion
                        .head_pool
                        .as_ref()
                        .is_some_and(|c| c.contains(&n.name));
                    if !fused {
                        let a = ActRef {
                            act: *act,
                            beta: (*act == crate::spec::Activation::LipSwish)
                                .then(|| param_name(&n.name, "beta")),
                            node: n.name.clone(),
                        };
                        let (src, dst) = (self.val(ins[0])?, self.val(ix)?);
                        let k = self.elems(ix);
                        steps.push(self.act_kernel(&name, k, &src, &dst, &a)?);
                    }
                }
                Op::GlobalAvgPool => steps.push(self.pool(&name, ix, ins[0])?),
                Op::Conv2d { .. } | Op::Dense { .. } => {
                    let geom = crate::passes::fusion::linear_geom(&n.op).ok_or_else(|| {
                        Error::Codegen {
                            context: n.name.clone(),
                            message: "not a linear op".into(),
                        }
                    })?;
                    let (src, dst) = (self.val(ins[0])?, self.val(ix)?);
                    steps.push(self.conv(
                        &name,
                        Conv {
                            geom,
                            transposed: false,
                            src,
                            weight: param_name(&n.name, "weight"),
                            bias: Some(param_name(&n.name, "bias")),
                            epilogue: Epilogue::Store { dst },
                            bump: None,
                            src_view: None,
                            adjoint_weight: false,
                        },
                    )?);
                }
            }
        }
        if terms.is_some() {
            steps.push(self.logdet_sum(&tag)?);
        }
        // Latent parts not written into z by their slice kernel (the final part).
        for (&l, &off) in &latent_off {
            if !matches!(g.node(l).op, Op::SliceChannels { .. }) && !tapped.contains(&l) {
                let src = self.loc(l)?;
                let dst = self.z_loc(names::Z, off, BufferInit::Output)?;
                let name = format!("fwd.latent.{}", g.node(l).name);
                steps.push(self.gather(&name, src.stride, &src, "i", &dst, "i", "")?);
            }
        }
        Ok(steps)
    }

    /// Offset of each latent part inside z.
    fn latent_offsets(&self) -> HashMap<NodeIndex, usize> {
        let mut off = 0;
        let mut map = HashMap::new();
        for &l in &self.g.latents {
            map.insert(l, off);
            off += self.elems(l);
        }
        map
    }

    fn z_loc(&mut self, name: &str, offset: usize, init: BufferInit) -> Result<Loc> {
        let d = self.g.latent_dim();
        Ok(Loc {
            buffer: self.b.buffer(name, d, true, init)?,
            offset,
            stride: d,
        })
    }

    /// Scratch buffer `s<stage>.<role>` of `elems` per sample.
    fn stage_buf(&mut self, stage: usize, role: &str, elems: usize) -> Result<String> {
        self.b.scratch(&format!("s{stage}.{role}"), elems)
    }

    fn block_of_actnorm(&self, ix: NodeIndex) -> Option<usize> {
        self.g.blocks.iter().position(|b| b.actnorm == ix)
    }

    /// Layout nodes of the forward that fused plans never materialize: a squeeze read only by
    /// a standalone ActNorm (which loads through the squeeze's index map instead), and a
    /// factor-out's kept slice read only by such a squeeze (a view at an offset).
    fn folded_layout(
        &self,
        latent_off: &HashMap<NodeIndex, usize>,
    ) -> Result<std::collections::HashSet<NodeIndex>> {
        let g = self.g;
        let mut folded = std::collections::HashSet::new();
        if !self.fusion.enabled {
            return Ok(folded);
        }
        let consumers = |ix: NodeIndex| {
            g.dag
                .edges_directed(ix, petgraph::Direction::Outgoing)
                .count()
        };
        for ix in g.topo_order()? {
            let n = g.node(ix);
            if !matches!(n.op, Op::ActNorm) || self.fusion.actnorm_producer(&n.name).is_some() {
                continue;
            }
            let sq = g.inputs(ix)[0];
            if !matches!(g.node(sq).op, Op::Squeeze { .. }) || consumers(sq) != 1 {
                continue;
            }
            folded.insert(sq);
            let sl = g.inputs(sq)[0];
            if matches!(g.node(sl).op, Op::SliceChannels { .. })
                && consumers(sl) == 1
                && !latent_off.contains_key(&sl)
            {
                folded.insert(sl);
            }
        }
        Ok(folded)
    }

    /// Fused forward: the latent parts that the residual epilogue of the block producing them
    /// writes into z itself (a factor-out's half, or the final output), by block, and the
    /// latent nodes so written (their copy kernels are not emitted).
    #[allow(clippy::type_complexity)]
    fn latent_taps(
        &mut self,
        latent_off: &HashMap<NodeIndex, usize>,
    ) -> Result<(
        HashMap<usize, LatentTaps>,
        std::collections::HashSet<NodeIndex>,
    )> {
        let g = self.g;
        let mut taps: HashMap<usize, LatentTaps> = HashMap::new();
        let mut tapped = std::collections::HashSet::new();
        if !self.fusion.enabled {
            return Ok((taps, tapped));
        }
        let mut parts: Vec<(NodeIndex, usize)> = latent_off.iter().map(|(&l, &o)| (l, o)).collect();
        parts.sort_by_key(|&(_, o)| o);
        for (l, off) in parts {
            let (residual, lo, hi) = match &g.node(l).op {
                Op::SliceChannels { start, len } => {
                    let per = spatial(&g.input_shape(l));
                    (g.inputs(l)[0], start * per, (start + len) * per)
                }
                Op::Residual => (l, 0, self.elems(l)),
                _ => continue,
            };
            let Some(&b) = self.block_of_residual.get(&residual) else {
                continue;
            };
            // Only an epilogue that stores the block's output itself (no next ActNorm).
            if self.fusion.blocks[b].next_actnorm.is_some() {
                continue;
            }
            let z = self.z_loc(names::Z, off, BufferInit::Output)?;
            let entry = taps.entry(b).or_insert_with(|| LatentTaps {
                z: z.buffer.clone(),
                stride: z.stride,
                parts: Vec::new(),
            });
            entry.parts.push((lo, hi, z.offset));
            tapped.insert(l);
        }
        Ok((taps, tapped))
    }

    /// Where a node's value can be read: its own buffer, or for a folded slice, a view into
    /// its source.
    fn view(
        &mut self,
        ix: NodeIndex,
        folded: &std::collections::HashSet<NodeIndex>,
    ) -> Result<Loc> {
        let g = self.g;
        if let (true, Op::SliceChannels { start, .. }) = (folded.contains(&ix), &g.node(ix).op) {
            let per = spatial(&g.input_shape(ix));
            let src = self.view(g.inputs(ix)[0], folded)?;
            return Ok(Loc {
                offset: src.offset + start * per,
                ..src
            });
        }
        self.loc(ix)
    }

    /// ActNorm as its own kernel, with the branch's leading activation as a second output
    /// when fused (a separate activation kernel when not). A folded squeeze before it is
    /// applied by its loads.
    fn actnorm_forward(
        &mut self,
        ix: NodeIndex,
        folded: &std::collections::HashSet<NodeIndex>,
    ) -> Result<Vec<Step>> {
        let g = self.g;
        let n = g.node(ix);
        let ins = g.inputs(ix);
        let (prelude, load, src) = match &g.node(ins[0]).op {
            Op::Squeeze { order } if folded.contains(&ins[0]) => {
                let from = self.view(g.inputs(ins[0])[0], folded)?;
                let prelude = Self::squeeze_prelude(&g.input_shape(ins[0]), *order);
                let load = format!("src[sample * {}u + {}u + u]", from.stride, from.offset);
                (prelude, load, from.buffer)
            }
            _ => (String::new(), "src[o]".to_string(), self.val(ins[0])?),
        };
        let dst = self.val(ix)?;
        let d = self.elems(ix);
        let hw = spatial(&n.shape);
        let lead = self
            .block_of_actnorm(ix)
            .and_then(|b| self.fusion.blocks[b].lead_act.clone().map(|a| (b, a)));
        let mut bindings = vec![
            Binding::read("src", src),
            Binding::write("dst", dst.clone()),
            Binding::param("an_scale", param_name(&n.name, "log_scale"), d / hw),
            Binding::param("an_bias", param_name(&n.name, "bias"), d / hw),
        ];
        let mut body = format!(
            "{prelude}    let o = sample * {d}u + i;\n    let c = i / {hw}u;\n    let a = {load} * exp(an_scale(c)) + an_bias(c);\n    dst[o] = a;\n"
        );
        let mut steps = Vec::new();
        let name = format!("fwd.{}", n.name);
        match (&lead, self.fusion.enabled) {
            (Some((b, a)), true) => {
                let lead_buf = self.stage_buf(self.fusion.blocks[*b].stage, "lead", d)?;
                bindings.push(Binding::write("lead", lead_buf));
                body.push_str(&format!(
                    "    lead[o] = act_{}(a, beta);\n",
                    act_suffix(a.act)
                ));
                steps.push(self.eltwise(&name, d, bindings, Some(a), &body)?);
            }
            (Some((b, a)), false) => {
                steps.push(self.eltwise(&name, d, bindings, None, &body)?);
                let lead_buf = self.stage_buf(self.fusion.blocks[*b].stage, "lead", d)?;
                steps.push(self.act_kernel(&format!("{name}.lead_act"), d, &dst, &lead_buf, a)?);
            }
            (None, _) => steps.push(self.eltwise(&name, d, bindings, None, &body)?),
        }
        Ok(steps)
    }
}
