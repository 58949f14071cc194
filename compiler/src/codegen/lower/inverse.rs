//! Lowering of the inverse: every block's fixed point unrolled into one submission, then the
//! inverse of the layout ops, walking the graph backwards.

use super::*;

impl Lowering<'_> {
    /// Fixed-point iterations of block `b` (the certificate's count, capped by the spec).
    pub fn inverse_iters(&self, b: usize) -> usize {
        let cert = self.lip.blocks.get(b).map_or(1, |r| r.inverse_iters);
        cert.clamp(1, self.g.spec.inverse.max_iters.max(1))
    }

    /// The inverse of a flow: `z_in` -> `x_out`, every block's fixed point unrolled into the
    /// one submission.
    pub fn inverse(&mut self) -> Result<Vec<Step>> {
        let g = self.g;
        let d_in = g.input_dim();
        let x_out = self
            .b
            .buffer(names::X_OUT, d_in, true, BufferInit::Output)?;
        let mut steps = Vec::new();
        let latent_off = self.latent_offsets();
        // The value of each node while walking backwards.
        let mut val: HashMap<NodeIndex, Loc> = HashMap::new();
        // Blocks whose fixed-point start the kernel producing their output also wrote, and
        // ActNorms applied inside their block's last iteration.
        let mut started = std::collections::HashSet::new();
        let mut applied = std::collections::HashSet::new();
        let inv_val = |s: &mut Self, ix: NodeIndex| -> Result<Loc> {
            if ix == g.input {
                Ok(Loc {
                    buffer: x_out.clone(),
                    offset: 0,
                    stride: d_in,
                })
            } else {
                s.loc(ix)
            }
        };
        for (&l, &off) in &latent_off {
            let z = self.z_loc(names::Z_IN, off, BufferInit::Input)?;
            if matches!(g.node(l).op, Op::SliceChannels { .. }) {
                val.insert(
                    l,
                    Loc {
                        stride: z.stride,
                        ..z
                    },
                );
            } else {
                let dst = inv_val(self, l)?;
                let name = format!("inv.latent.{}", g.node(l).name);
                let copy = Gather::plain(&z, &dst, dst.stride);
                steps.push(self.gather_into(&name, copy, l, &mut started)?);
                val.insert(l, dst);
            }
        }
        for ix in g.inverse_order()? {
            let n = g.node(ix);
            let name = format!("inv.{}", n.name);
            let ins = g.inputs(ix);
            let in_shape = g.input_shape(ix);
            let y = match val.get(&ix) {
                Some(l) => l.clone(),
                None => inv_val(self, ix)?,
            };
            match &n.op {
                Op::Residual => {
                    let b = self.block_of_residual[&ix];
                    // Fused: the last iteration also inverts the block's ActNorm into the
                    // block's input and, when that is the previous block's output, starts
                    // the previous block's fixed point.
                    let finish = if self.fusion.enabled {
                        let an = g.blocks[b].actnorm;
                        let an_in = g.inputs(an)[0];
                        let dst = inv_val(self, an_in)?.buffer;
                        let prev = self.block_of_residual.get(&an_in).copied();
                        applied.insert(an);
                        started.extend(prev);
                        Some((dst, prev))
                    } else {
                        None
                    };
                    steps.extend(self.block_inverse(
                        b,
                        &y.buffer,
                        !started.contains(&b),
                        finish,
                    )?);
                }
                // Applied by its block's last fixed-point iteration when fused.
                Op::ActNorm if applied.contains(&ix) => {}
                Op::ActNorm => {
                    let dst = inv_val(self, ins[0])?;
                    let d = self.elems(ix);
                    let hw = spatial(&n.shape);
                    let body = format!(
                        "    let o = sample * {d}u + i;\n    let c = i / {hw}u;\n    dst[o] = (src[o] - an_bias(c)) * exp(-an_scale(c));"
                    );
                    steps.push(self.eltwise(
                        &name,
                        d,
                        vec![
                            Binding::read("src", y.buffer.clone()),
                            Binding::write("dst", dst.buffer),
                            Binding::param("an_scale", param_name(&n.name, "log_scale"), d / hw),
                            Binding::param("an_bias", param_name(&n.name, "bias"), d / hw),
                        ],
                        None,
                        &body,
                    )?);
                }
                Op::Squeeze { order } => {
                    let dst = inv_val(self, ins[0])?;
                    let copy = Gather {
                        dst_index: "u",
                        prelude: Self::squeeze_prelude(&in_shape, *order),
                        ..Gather::plain(&y, &dst, y.stride)
                    };
                    steps.push(self.gather_into(&name, copy, ins[0], &mut started)?);
                }
                Op::PadChannels { .. } => {
                    let dst = inv_val(self, ins[0])?;
                    let copy = Gather::plain(&y, &dst, dst.stride);
                    steps.push(self.gather_into(&name, copy, ins[0], &mut started)?);
                }
                Op::SliceChannels { start, len } => {
                    let per = spatial(&in_shape);
                    let dst = inv_val(self, ins[0])?;
                    let dst = Loc {
                        offset: start * per,
                        ..dst
                    };
                    let copy = Gather::plain(&y, &dst, len * per);
                    steps.push(self.gather_into(&name, copy, ins[0], &mut started)?);
                }
                other => {
                    return Err(Error::Unsupported {
                        what: n.name.clone(),
                        reason: format!("op {} has no inverse", other.kind()),
                    })
                }
            }
        }
        Ok(steps)
    }

    /// `dst[map] = src[map]` over `n` elements per sample (see [`Gather`]). When fused and
    /// `dst_node` is a block's output, the values written are also that block's first
    /// iterate and, with a leading activation, its activation, at the same places: the block
    /// is then started (every kernel writing a block's output before its inverse comes
    /// through here or through the fused ActNorm inverse).
    fn gather_into(
        &mut self,
        name: &str,
        copy: Gather,
        dst_node: NodeIndex,
        started: &mut std::collections::HashSet<usize>,
    ) -> Result<Step> {
        let Gather {
            src,
            src_index,
            dst,
            dst_index,
            n,
            prelude,
        } = copy;
        let block = self.block_of_residual.get(&dst_node).copied();
        let Some(b) = block.filter(|_| self.fusion.enabled) else {
            return self.gather(name, n, &src, src_index, &dst, dst_index, &prelude);
        };
        let (x0, lead) = self.inverse_start(b)?;
        let mut body = format!(
            "{prelude}    let at = sample * {}u + {}u + {dst_index};\n    let v = src[sample * {}u + {}u + {src_index}];\n    dst[at] = v;\n    x0[at] = v;\n",
            dst.stride, dst.offset, src.stride, src.offset
        );
        let mut bindings = vec![
            Binding::read("src", src.buffer),
            Binding::write("dst", dst.buffer),
            Binding::write("x0", x0),
        ];
        let act = lead.map(|(buffer, act)| {
            bindings.push(Binding::write("lead", buffer));
            body.push_str(&format!(
                "    lead[at] = act_{}(v, beta);\n",
                act_suffix(act.act)
            ));
            act
        });
        started.insert(b);
        self.eltwise(name, n, bindings, act.as_ref(), &body)
    }

    /// Where block `b`'s fixed point starts: its iterate (the ActNorm buffer) and, with a
    /// leading activation, the buffer of `act(x)` its first layer reads.
    fn inverse_start(&mut self, b: usize) -> Result<(String, Option<(String, ActRef)>)> {
        let fb = &self.fusion.blocks[b];
        let (s, d, lead_act) = (fb.stage, fb.shape.iter().product(), fb.lead_act.clone());
        let x = self.val(self.g.blocks[b].actnorm)?;
        let lead = match lead_act {
            Some(act) => Some((self.stage_buf(s, "lead", d)?, act)),
            None => None,
        };
        Ok((x, lead))
    }

    /// `a = y - g(a)` iterated from `a = y`; `a` is the block's ActNorm buffer. With
    /// `init`, this writes the start itself; otherwise the kernel that produced `y` did.
    /// With `finish = (dst, prev)`, the last iteration writes the inverse ActNorm of its
    /// result to `dst` instead of `a`, and the start of block `prev`'s fixed point.
    pub(super) fn block_inverse(
        &mut self,
        b: usize,
        y: &str,
        init: bool,
        finish: Option<(String, Option<usize>)>,
    ) -> Result<Vec<Step>> {
        let fb: FusedBlock = self.fusion.blocks[b].clone();
        let d: usize = fb.shape.iter().product();
        let prefix = format!("inv.{}", fb.name);
        let (x, lead) = self.inverse_start(b)?;
        let lead_buf = lead.as_ref().map(|(buffer, _)| buffer.clone());
        let mut steps = Vec::new();
        // x_0 = y (and act(y) for the first layer).
        match &lead {
            _ if !init => {}
            Some((lead, act)) => {
                let body = format!(
                    "    let o = sample * {d}u + i;\n    let y = src[o];\n    dst[o] = y;\n    lead[o] = act_{}(y, beta);",
                    act_suffix(act.act)
                );
                steps.push(self.eltwise(
                    &format!("{prefix}.init"),
                    d,
                    vec![
                        Binding::read("src", y),
                        Binding::write("dst", x.clone()),
                        Binding::write("lead", lead.clone()),
                    ],
                    Some(act),
                    &body,
                )?);
            }
            None => steps.push(Step::Copy {
                src: y.to_string(),
                dst: x.clone(),
            }),
        }
        let iters = self.inverse_iters(b) as u32;
        let Some((dst, prev)) = finish else {
            let iteration = self.inverse_iteration(b, y, &x, &lead_buf, None)?;
            steps.push(Step::Repeat {
                times: iters,
                steps: iteration,
            });
            return Ok(steps);
        };
        if iters > 1 {
            let iteration = self.inverse_iteration(b, y, &x, &lead_buf, None)?;
            steps.push(Step::Repeat {
                times: iters - 1,
                steps: iteration,
            });
        }
        let g = self.g;
        let an = &g.node(g.blocks[b].actnorm).name;
        let (copy, lead) = match prev {
            Some(p) => {
                let (x0, lead) = self.inverse_start(p)?;
                let lead = lead.map(|(buffer, act)| ActOut { buffer, act });
                (Some(x0), lead)
            }
            None => (None, None),
        };
        let last = FinalStep {
            dst,
            lead,
            actnorm: ActNormInverse {
                log_scale: param_name(an, "log_scale"),
                bias: param_name(an, "bias"),
                copy,
            },
        };
        steps.extend(self.inverse_iteration(b, y, &x, &lead_buf, Some(last))?);
        Ok(steps)
    }

    /// The kernels of one fixed-point iteration of block `b`: `x = y - g(x)` (and the
    /// leading activation of `x` into `lead_buf`), or with `last`, the fused end of the
    /// block's inverse.
    fn inverse_iteration(
        &mut self,
        b: usize,
        y: &str,
        x: &str,
        lead_buf: &Option<String>,
        last_step: Option<FinalStep>,
    ) -> Result<Vec<Step>> {
        let fb: FusedBlock = self.fusion.blocks[b].clone();
        let s = fb.stage;
        let d: usize = fb.shape.iter().product();
        let prefix = format!("inv.{}", fb.name);
        let x = x.to_string();
        let last = fb.layers.len() - 1;
        let mut iteration = Vec::new();
        for (i, layer) in fb.layers.iter().enumerate() {
            let name = format!("inv.{}", layer.node);
            let src = match (i, lead_buf) {
                (0, Some(l)) => l.clone(),
                (0, None) => x.clone(),
                _ => self.stage_buf(s, &format!("post{i}"), layer.geom.in_len())?,
            };
            let out_n = layer.geom.out_len();
            if i < last {
                let act = layer.act_after.clone().ok_or_else(|| Error::Codegen {
                    context: layer.node.clone(),
                    message: "inner layer without activation".into(),
                })?;
                let post = self.stage_buf(s, &format!("post{}", i + 1), out_n)?;
                if self.fusion.enabled {
                    iteration.push(self.layer(
                        &name,
                        layer,
                        src,
                        Epilogue::StoreAct {
                            pre: None,
                            dst: post,
                            act,
                        },
                    )?);
                } else {
                    let pre = self.stage_buf(s, &format!("pre{}", i + 1), out_n)?;
                    iteration
                        .extend(self.layer_then_act(&name, layer, src, out_n, &pre, &post, &act)?);
                }
                continue;
            }
            if self.fusion.enabled {
                let lead = match (&fb.lead_act, &lead_buf) {
                    (Some(act), Some(buf)) => Some(ActOut {
                        buffer: buf.clone(),
                        act: act.clone(),
                    }),
                    _ => None,
                };
                let epilogue = match last_step.clone() {
                    None => Epilogue::FixedPoint {
                        target: y.to_string(),
                        dst: x.clone(),
                        lead,
                        actnorm: None,
                    },
                    Some(f) => Epilogue::FixedPoint {
                        target: y.to_string(),
                        dst: f.dst,
                        lead: f.lead,
                        actnorm: Some(f.actnorm),
                    },
                };
                let name = match last_step {
                    None => name,
                    Some(_) => format!("{name}.last"),
                };
                iteration.push(self.layer(&name, layer, src, epilogue)?);
            } else {
                let gout = self.stage_buf(s, "gout", out_n)?;
                iteration.push(self.layer(
                    &name,
                    layer,
                    src,
                    Epilogue::Store { dst: gout.clone() },
                )?);
                let body = format!("    let o = sample * {d}u + i;\n    dst[o] = yt[o] - gout[o];");
                iteration.push(self.eltwise(
                    &format!("{prefix}.step"),
                    d,
                    vec![
                        Binding::read("yt", y),
                        Binding::read("gout", gout),
                        Binding::write("dst", x.clone()),
                    ],
                    None,
                    &body,
                )?);
                if let (Some(act), Some(lead)) = (&fb.lead_act, &lead_buf) {
                    iteration.push(self.act_kernel(
                        &format!("{prefix}.lead_act"),
                        d,
                        &x,
                        lead,
                        act,
                    )?);
                }
            }
        }
        Ok(iteration)
    }
}

/// The fused end of a block's inverse (see [`Lowering::block_inverse`]).
#[derive(Clone)]
struct FinalStep {
    dst: String,
    lead: Option<ActOut>,
    actnorm: ActNormInverse,
}

/// A copy `dst[dst_index] = src[src_index]` of `n` elements per sample, the indices WGSL
/// expressions in `i` (after `prelude`), offsets and strides from the locations.
struct Gather {
    src: Loc,
    src_index: &'static str,
    dst: Loc,
    dst_index: &'static str,
    n: usize,
    prelude: String,
}

impl Gather {
    fn plain(src: &Loc, dst: &Loc, n: usize) -> Self {
        Gather {
            src: src.clone(),
            src_index: "i",
            dst: dst.clone(),
            dst_index: "i",
            n,
            prelude: String::new(),
        }
    }
}
