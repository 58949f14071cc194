//! Walking the IR in ONNX: the forward and inverse passes over a node range with boundary
//! values (the whole model, or one segment), and the log-det total.

use super::*;

impl Emitter<'_> {
    /// The forward pass from tensor `x`. Returns the output (`[B, D]` z for
    /// flows, logits for classifiers) and, with `ld`, the `[B]` log-det.
    pub fn forward(
        &mut self,
        x: &str,
        ld: Option<(&LogDetExport, &str)>,
    ) -> Result<(String, Option<String>)> {
        let g = self.g;
        let mut vals: HashMap<NodeIndex, String> = HashMap::new();
        vals.insert(g.input, x.to_string());
        let order = g.topo_order()?;
        let walk = self.forward_walk(&order, &mut vals, ld.map(|(l, p)| (l, p, 0)))?;
        let out = match g.spec.kind {
            ModelKind::Flow => {
                let mut parts = vec![];
                for &l in &g.latents {
                    let n = g.node(l);
                    let d: usize = n.shape.iter().product();
                    let v = vals.get(&l).cloned().ok_or_else(|| Error::Graph {
                        node: n.name.clone(),
                        reason: "latent part not computed (ONNX export)".into(),
                    })?;
                    parts.push(if n.shape.len() == 1 {
                        v
                    } else {
                        self.og
                            .reshape_batched(&format!("{}.flat", n.name), &v, &[d])
                    });
                }
                if parts.len() == 1 {
                    parts.remove(0)
                } else {
                    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                    self.og
                        .node("Concat", "latent.concat", &refs, vec![attr_int("axis", 1)])
                }
            }
            ModelKind::Classifier => {
                let l = g.logits.ok_or_else(|| Error::Graph {
                    node: "head".into(),
                    reason: "classifier without a logits node".into(),
                })?;
                vals.get(&l).cloned().ok_or_else(|| Error::Graph {
                    node: g.node(l).name.clone(),
                    reason: "logits not computed (ONNX export)".into(),
                })?
            }
        };
        let ld_out = match ld {
            None => None,
            Some(_) => Some(self.logdet_total(walk)?),
        };
        Ok((out, ld_out))
    }

    /// Emits the forward ops of `nodes` (a topologically ordered range of the
    /// graph; inputs and branch nodes are skipped, a residual add emits its whole
    /// block) from the boundary values already in `vals`, recording each node's
    /// tensor there. With `ld` = (estimator, probe tensor, its first column in the
    /// probe layout) each block's log-det is emitted too.
    pub fn forward_walk(
        &mut self,
        nodes: &[NodeIndex],
        vals: &mut HashMap<NodeIndex, String>,
        ld: Option<(&LogDetExport, &str, usize)>,
    ) -> Result<WalkLogdet> {
        let g = self.g;
        let block_of_residual = g.block_of_residual();
        let mut walk = WalkLogdet::default();
        for &ix in nodes {
            let n = g.node(ix);
            if n.op == Op::Input || n.block.is_some() {
                continue;
            }
            let residual_of = block_of_residual.get(&ix).copied();
            // A residual add reads [a, g(a)]; g(a) is emitted here from a.
            let ins: Vec<String> = g
                .inputs(ix)
                .iter()
                .take(if residual_of.is_some() { 1 } else { usize::MAX })
                .map(|i| {
                    vals.get(i).cloned().ok_or_else(|| Error::Graph {
                        node: n.name.clone(),
                        reason: "ONNX export reached a node before its input".into(),
                    })
                })
                .collect::<Result<_>>()?;
            let out = if let Some(b) = residual_of {
                let (gx, inputs) = self.branch(b, &ins[0], &|s| s.to_string())?;
                if let Some((ld, probes, base)) = ld {
                    walk.blocks
                        .push(self.block_logdet(b, &inputs, ld, (probes, base))?);
                }
                self.op(ix, &[ins[0].clone(), gx], &n.name)?
            } else {
                if n.op == Op::ActNorm {
                    walk.actnorm += actnorm::logdet(&n.name, &g.params, &g.input_shape(ix));
                }
                self.op(ix, &ins, &n.name)?
            };
            vals.insert(ix, out);
        }
        Ok(walk)
    }

    /// The `[B]` log-det of a walk: its blocks' estimates plus ActNorm's constant.
    pub fn logdet_total(&mut self, walk: WalkLogdet) -> Result<String> {
        let mut total: Option<String> = None;
        for (i, l) in walk.blocks.into_iter().enumerate() {
            total = Some(match total {
                None => l,
                Some(t) => self
                    .og
                    .node("Add", &format!("logdet.sum{i}"), &[&t, &l], vec![]),
            });
        }
        let c = self.og.init_f32("actnorm.logdet", &[1], [walk.actnorm]);
        match total {
            Some(t) => Ok(self.og.node("Add", "logdet.total", &[&t, &c], vec![])),
            None => Err(Error::Unsupported {
                what: format!("ONNX log-det export of model `{}`", self.g.spec.name),
                reason: "the model has no residual blocks".into(),
            }),
        }
    }

    /// The inverse from `z` `[B, D]`, each block's fixed point unrolled
    /// `steps[b]` times from `x_0 = y`. Returns `x` `[B, input...]`.
    pub fn inverse(&mut self, z: &str, steps: &[usize]) -> Result<String> {
        let g = self.g;
        if g.spec.kind != ModelKind::Flow {
            return Err(Error::Unsupported {
                what: format!("ONNX inverse export of model `{}`", g.spec.name),
                reason: "only flows are invertible end to end (a classifier's head is not)".into(),
            });
        }
        let mut vals: HashMap<NodeIndex, String> = HashMap::new();
        let mut pieces = Pieces::new();
        let mut off = 0;
        for &l in &g.latents {
            let n = g.node(l);
            let d: usize = n.shape.iter().product();
            let flat = self.slice_axis1(&format!("{}.inv.flat", n.name), z, off, off + d);
            let v = self
                .og
                .reshape_batched(&format!("{}.inv", n.name), &flat, &n.shape);
            vals.insert(l, v);
            off += d;
        }
        self.inverse_walk(&g.inverse_order()?, &mut vals, &mut pieces, steps)?;
        self.resolve(g.input, &mut vals, &mut pieces)
    }

    /// Emits the inverse of `nodes` (a range of the graph in reverse topological
    /// order; inputs and branch nodes are skipped) from the values in `vals`,
    /// recording the recovered input of each node there, or, for channel slices,
    /// in `pieces` until [`Self::resolve`] joins them. A residual add unrolls its
    /// block's fixed point `steps[b]` times from `x_0 = y`.
    pub fn inverse_walk(
        &mut self,
        nodes: &[NodeIndex],
        vals: &mut HashMap<NodeIndex, String>,
        pieces: &mut Pieces,
        steps: &[usize],
    ) -> Result<()> {
        let g = self.g;
        let block_of_residual = g.block_of_residual();
        for &ix in nodes {
            let n = g.node(ix);
            if n.block.is_some() || n.op == Op::Input {
                continue;
            }
            let y = match vals.get(&ix) {
                Some(v) => v.clone(),
                None => self.assemble(ix, pieces.remove(&ix))?,
            };
            let ins = g.inputs(ix);
            let in_shape = g.input_shape(ix);
            let rec = format!("{}.inv", n.name);
            let x = match &n.op {
                Op::Residual => {
                    let b = block_of_residual[&ix];
                    let block_name = g.blocks[b].name.clone();
                    let k_steps = steps.get(b).copied().unwrap_or(0);
                    let mut x = y.clone();
                    for k in 0..k_steps {
                        let prefix = format!("{block_name}.");
                        let tag = format!("{block_name}.inv{k}.");
                        let (gx, _) = self.branch(b, &x, &|s| match s.strip_prefix(&prefix) {
                            Some(local) => format!("{tag}{local}"),
                            None => format!("{tag}{s}"),
                        })?;
                        x = self.og.node(
                            "Sub",
                            &format!("{block_name}.inv{k}.step"),
                            &[&y, &gx],
                            vec![],
                        );
                    }
                    x
                }
                Op::ActNorm => {
                    let ls = self.param(&n.name, "log_scale")?;
                    let shape = per_channel(&in_shape);
                    let s = self.og.init_f32(
                        &format!("{}.inv_scale", n.name),
                        &shape,
                        ls.data.iter().map(|v| (-v).exp()),
                    );
                    let b = self.param(&n.name, "bias")?;
                    let bias = self.og.init_f32(
                        &format!("{}.bias", n.name),
                        &shape,
                        b.data.iter().copied(),
                    );
                    let c = self
                        .og
                        .node("Sub", &format!("{rec}.center"), &[&y, &bias], vec![]);
                    self.og.node("Mul", &rec, &[&c, &s], vec![])
                }
                Op::Squeeze { order } => {
                    image(&n.name, &in_shape)?;
                    // DepthToSpace undoes either order: mode DCR reads the squeezed channel as
                    // (dy, dx, c), the SpaceToDepth order; CRD as (c, dy, dx), pixel_unshuffle's.
                    let mode = match order {
                        SqueezeOrder::SpaceToDepth => "DCR",
                        SqueezeOrder::PixelUnshuffle => "CRD",
                    };
                    let y4 = self
                        .og
                        .reshape_batched(&format!("{rec}.nchw"), &y, &n.shape);
                    let x = self.og.node(
                        "DepthToSpace",
                        &format!("{rec}.d2s"),
                        &[&y4],
                        vec![attr_int("blocksize", 2), attr_str("mode", mode)],
                    );
                    self.og.reshape_batched(&rec, &x, &in_shape)
                }
                Op::PadChannels { .. } => self.slice_axis1(&rec, &y, 0, in_shape[0]),
                Op::SliceChannels { start, len } => {
                    pieces.entry(ins[0]).or_default().push((*start, *len, y));
                    continue;
                }
                other => {
                    return Err(Error::Unsupported {
                        what: format!("ONNX inverse export of op {} `{}`", other.kind(), n.name),
                        reason: "the op has no inverse".into(),
                    })
                }
            };
            vals.insert(ins[0], x);
        }
        Ok(())
    }

    /// The tensor of node `ix` after an inverse walk: recovered whole, or joined
    /// from the channel slices its consumers recovered.
    pub fn resolve(
        &mut self,
        ix: NodeIndex,
        vals: &mut HashMap<NodeIndex, String>,
        pieces: &mut Pieces,
    ) -> Result<String> {
        match vals.get(&ix) {
            Some(v) => Ok(v.clone()),
            None => {
                let v = self.assemble(ix, pieces.remove(&ix))?;
                vals.insert(ix, v.clone());
                Ok(v)
            }
        }
    }

    /// A node's output from the channel slices its consumers recovered.
    pub(super) fn assemble(
        &mut self,
        ix: NodeIndex,
        pieces: Option<Vec<(usize, usize, String)>>,
    ) -> Result<String> {
        let n = self.g.node(ix);
        let unknown = || Error::Graph {
            node: n.name.clone(),
            reason: "ONNX inverse export reached a node whose output is unknown".into(),
        };
        let mut pieces = pieces.ok_or_else(unknown)?;
        pieces.sort_by_key(|p| p.0);
        let mut next = 0;
        for p in &pieces {
            if p.0 != next {
                return Err(unknown());
            }
            next += p.1;
        }
        if Some(&next) != n.shape.first() {
            return Err(unknown());
        }
        if pieces.len() == 1 {
            return Ok(pieces.remove(0).2);
        }
        let refs: Vec<&str> = pieces.iter().map(|p| p.2.as_str()).collect();
        Ok(self.og.node(
            "Concat",
            &format!("{}.inv", n.name),
            &refs,
            vec![attr_int("axis", 1)],
        ))
    }
}
