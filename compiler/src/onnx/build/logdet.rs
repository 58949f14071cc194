//! The log-det in ONNX: each branch's vjp written with standard ops (transposed
//! convolutions, MatMul, the activation-derivative masks) and the series over probes.

use super::*;

impl Emitter<'_> {
    /// `act'(x)` for an activation node at pre-activation `x`.
    pub(super) fn act_derivative(&mut self, ix: NodeIndex, act: Activation, x: &str) -> String {
        let name = format!("{}.deriv", self.g.node(ix).name);
        match act {
            // elu'(x) = 1 for x > 0, exp(x) otherwise = exp(min(x, 0)): the
            // forward pass already computed it.
            Activation::Elu => {
                let node = self.g.node(ix).name.clone();
                self.elu_exp(x, &node)
            }
            // relu'(x) = 1 for x > 0, else 0 = sign(relu(x)).
            Activation::Relu => {
                let r = self.og.node("Relu", &format!("{name}.relu"), &[x], vec![]);
                self.og.node("Sign", &name, &[&r], vec![])
            }
            // (s + b x s (1 - s)) / 1.1 with s = sigmoid(b x).
            Activation::LipSwish => {
                let slope = self.lipswish_slope(&self.g.node(ix).name);
                let bx = self
                    .og
                    .node("Mul", &format!("{name}.scaled"), &[x, &slope], vec![]);
                let s = self
                    .og
                    .node("Sigmoid", &format!("{name}.sigmoid"), &[&bx], vec![]);
                let one = self.og.scalar(1.0);
                let oms = self
                    .og
                    .node("Sub", &format!("{name}.one_minus"), &[&one, &s], vec![]);
                let ss = self
                    .og
                    .node("Mul", &format!("{name}.s_one_minus"), &[&s, &oms], vec![]);
                let t = self
                    .og
                    .node("Mul", &format!("{name}.chain"), &[&bx, &ss], vec![]);
                let sum = self
                    .og
                    .node("Add", &format!("{name}.sum"), &[&s, &t], vec![]);
                let div = self.og.scalar(LIPSWISH_DIV);
                self.og.node("Div", &name, &[&sum, &div], vec![])
            }
        }
    }

    /// Derivatives of every activation of block `b` at the saved branch inputs
    /// (computed once, shared by all terms and probes).
    pub(super) fn branch_derivatives(
        &mut self,
        b: usize,
        inputs: &[String],
    ) -> Vec<Option<String>> {
        let body = self.g.blocks[b].body.clone();
        body.iter()
            .zip(inputs)
            .map(|(&ix, x)| match self.g.node(ix).op {
                Op::Act { act } => Some(self.act_derivative(ix, act, x)),
                _ => None,
            })
            .collect()
    }

    /// `w^T J_g`: the body backwards; convs as convs with the adjoint kernel,
    /// dense layers as `MatMul(w, W)`, activations as a product with `act'`.
    pub(super) fn branch_vjp(
        &mut self,
        b: usize,
        derivs: &[Option<String>],
        w: &str,
        tag: &str,
    ) -> Result<String> {
        let g = self.g;
        let block_name = g.blocks[b].name.clone();
        let body = g.blocks[b].body.clone();
        let mut dy = w.to_string();
        for (i, &ix) in body.iter().enumerate().rev() {
            let n = g.node(ix);
            let local = n
                .name
                .strip_prefix(&format!("{block_name}."))
                .unwrap_or(&n.name);
            let name = format!("{block_name}.{tag}.{local}");
            dy = match &n.op {
                Op::Conv2d { geom } => {
                    if geom.stride != 1 || geom.pad >= geom.k {
                        return Err(Error::Unsupported {
                            what: format!("ONNX log-det export of op conv2d `{}`", n.name),
                            reason: format!(
                                "its vjp is written for stride 1 and padding < kernel (has stride {}, padding {}, kernel {})",
                                geom.stride, geom.pad, geom.k
                            ),
                        });
                    }
                    // The adjoint of a stride-1 conv with padding p is the conv with the
                    // flipped, transposed kernel and padding k-1-p (same spatial size).
                    let wa = self.adjoint_kernel(&n.name)?;
                    let spec = ConvSpec {
                        cin: geom.cout,
                        cout: geom.cin,
                        k: geom.k,
                        pad: geom.k - 1 - geom.pad,
                        stride: 1,
                        h: geom.out_h(),
                        w: geom.out_w(),
                    };
                    self.conv(&name, &dy, &spec, &wa, None)
                }
                Op::Dense { .. } => {
                    let wt = self.init_param(&n.name, "weight")?;
                    self.og.node("MatMul", &name, &[&dy, &wt], vec![])
                }
                Op::Act { .. } => {
                    let d = derivs[i].clone().ok_or_else(|| Error::Graph {
                        node: n.name.clone(),
                        reason: "activation derivative missing (ONNX export)".into(),
                    })?;
                    self.og.node("Mul", &name, &[&dy, &d], vec![])
                }
                other => {
                    return Err(Error::Unsupported {
                        what: format!("ONNX log-det export of op {} `{}`", other.kind(), n.name),
                        reason: "the op has no vjp".into(),
                    })
                }
            };
        }
        Ok(dy)
    }

    /// `W'[ci, co, ky, kx] = W[co, ci, k-1-ky, k-1-kx]`, derived in the graph from the stored
    /// weight (transposed, then both kernel axes read backwards), so the file keeps one copy.
    pub(super) fn adjoint_kernel(&mut self, node: &str) -> Result<String> {
        let w = self.init_param(node, "weight")?;
        let t = self.derived(
            "Transpose",
            &format!("{w}_io"),
            &[&w],
            vec![attr_ints("perm", &[1, 0, 2, 3])],
        );
        // A negative step from the last index; an end below -dim clamps to "past index 0".
        let starts = self.og.init_i64("flip.starts", &[-1, -1]);
        let ends = self.og.init_i64("flip.ends", &[i64::MIN, i64::MIN]);
        let axes = self.og.init_i64("flip.axes", &[2, 3]);
        let steps = self.og.init_i64("flip.steps", &[-1, -1]);
        Ok(self.derived(
            "Slice",
            &format!("{w}_adjoint"),
            &[&t, &starts, &ends, &axes, &steps],
            vec![],
        ))
    }

    /// Per-sample `[B]` log-det of block `b`'s branch; `inputs` are the branch's
    /// node inputs from [`Self::branch`] (the first is the block input). `probes`
    /// holds the probe layout's columns from `probes.1` on (0 for the whole layout,
    /// the block's offset for a segment graph that takes only its own block's probes).
    pub(super) fn block_logdet(
        &mut self,
        b: usize,
        inputs: &[String],
        ld: &LogDetExport,
        probes: (&str, usize),
    ) -> Result<String> {
        let (probes, base) = probes;
        let g = self.g;
        let block = &g.blocks[b];
        let name = block.name.clone();
        let shape = g.node(block.actnorm).shape.clone();
        let dim: usize = shape.iter().product();
        let derivs = self.branch_derivatives(b, inputs);
        match ld {
            LogDetExport::Series {
                terms,
                probes: count,
                ..
            } => {
                let layout = ld.probe_layout(g);
                let offset =
                    layout.blocks[b]
                        .offset
                        .checked_sub(base)
                        .ok_or_else(|| Error::Graph {
                            node: name.clone(),
                            reason: "probe input starts after the block's probes (ONNX export)"
                                .into(),
                        })?;
                let mut total: Option<String> = None;
                for p in 0..*count {
                    let off = offset + p * dim;
                    let flat =
                        self.slice_axis1(&format!("{name}.probe{p}.flat"), probes, off, off + dim);
                    let v = self
                        .og
                        .reshape_batched(&format!("{name}.probe{p}"), &flat, &shape);
                    let mut w = v.clone();
                    let mut acc: Option<String> = None;
                    for k in 1..=*terms {
                        w = self.branch_vjp(b, &derivs, &w, &format!("vjp{k}.p{p}"))?;
                        let c = if k % 2 == 1 { 1.0 } else { -1.0 } / k as f64;
                        acc = Some(match acc {
                            None => w.clone(),
                            Some(acc) => {
                                let cs = self.og.scalar(c);
                                let t = self.og.node(
                                    "Mul",
                                    &format!("{name}.term{k}.p{p}"),
                                    &[&w, &cs],
                                    vec![],
                                );
                                self.og.node(
                                    "Add",
                                    &format!("{name}.series{k}.p{p}"),
                                    &[&acc, &t],
                                    vec![],
                                )
                            }
                        });
                    }
                    let Some(acc) = acc else {
                        return Err(Error::Unsupported {
                            what: "ONNX log-det export with logdet.terms = 0".into(),
                            reason: "the series needs at least one term".into(),
                        });
                    };
                    // sum_k c_k <w_k, v> = <sum_k c_k w_k, v>: one reduction per probe.
                    let prod =
                        self.og
                            .node("Mul", &format!("{name}.dot{p}.mul"), &[&acc, &v], vec![]);
                    let flat =
                        self.og
                            .reshape_batched(&format!("{name}.dot{p}.flat"), &prod, &[dim]);
                    let axes = self.og.init_i64("axes[1]", &[1]);
                    let dot = self.og.node(
                        "ReduceSum",
                        &format!("{name}.logdet.p{p}"),
                        &[&flat, &axes],
                        vec![attr_int("keepdims", 0)],
                    );
                    total = Some(match total {
                        None => dot,
                        Some(t) => self.og.node(
                            "Add",
                            &format!("{name}.logdet.sum{p}"),
                            &[&t, &dot],
                            vec![],
                        ),
                    });
                }
                let total = total.ok_or_else(|| Error::Unsupported {
                    what: "ONNX log-det export with logdet.probes = 0".into(),
                    reason: "the estimator needs at least one probe".into(),
                })?;
                if *count == 1 {
                    return Ok(total);
                }
                let inv = self.og.scalar(1.0 / *count as f64);
                Ok(self
                    .og
                    .node("Mul", &format!("{name}.logdet"), &[&total, &inv], vec![]))
            }
            LogDetExport::Exact2d => {
                // Rows of J by two vjps with the unit vectors, then ln|det(I + J)|.
                let e0 = self.og.init_f32("unit0", &[1, 2], [1.0, 0.0]);
                let e1 = self.og.init_f32("unit1", &[1, 2], [0.0, 1.0]);
                let r0 = self.branch_vjp(b, &derivs, &e0, "row0")?;
                let r1 = self.branch_vjp(b, &derivs, &e1, "row1")?;
                let i0 = self.og.init_i64_scalar("index0", 0);
                let i1 = self.og.init_i64_scalar("index1", 1);
                let mut entry = |r: &str, idx: &str, tag: &str| {
                    self.og.node(
                        "Gather",
                        &format!("{name}.{tag}"),
                        &[r, idx],
                        vec![attr_int("axis", 1)],
                    )
                };
                let j00 = entry(&r0, &i0, "j00");
                let j01 = entry(&r0, &i1, "j01");
                let j10 = entry(&r1, &i0, "j10");
                let j11 = entry(&r1, &i1, "j11");
                let one = self.og.scalar(1.0);
                let d0 = self
                    .og
                    .node("Add", &format!("{name}.diag0"), &[&j00, &one], vec![]);
                let d1 = self
                    .og
                    .node("Add", &format!("{name}.diag1"), &[&j11, &one], vec![]);
                let p = self
                    .og
                    .node("Mul", &format!("{name}.diag_prod"), &[&d0, &d1], vec![]);
                let q = self
                    .og
                    .node("Mul", &format!("{name}.off_prod"), &[&j01, &j10], vec![]);
                let det = self
                    .og
                    .node("Sub", &format!("{name}.det"), &[&p, &q], vec![]);
                let abs = self
                    .og
                    .node("Abs", &format!("{name}.det_abs"), &[&det], vec![]);
                Ok(self
                    .og
                    .node("Log", &format!("{name}.logdet"), &[&abs], vec![]))
            }
        }
    }
}
