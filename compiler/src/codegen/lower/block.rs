//! Lowering of one residual block's forward pass: its branch layers (each with the activation
//! fused into the layer's epilogue where the fusion pass allows) and the residual add.

use super::*;

impl Lowering<'_> {
    /// The block's branch and residual add (plus the next ActNorm when fused).
    pub(super) fn block_forward(&mut self, b: usize) -> Result<Vec<Step>> {
        let g = self.g;
        let fb: FusedBlock = self.fusion.blocks[b].clone();
        let blk = &g.blocks[b];
        let s = fb.stage;
        let d: usize = fb.shape.iter().product();
        let a = self.val(blk.actnorm)?;
        let first_src = match &fb.lead_act {
            Some(_) => self.stage_buf(s, "lead", d)?,
            None => a.clone(),
        };
        let last = fb.layers.len() - 1;
        let mut steps = Vec::new();
        for (i, layer) in fb.layers.iter().enumerate() {
            let name = format!("fwd.{}", layer.node);
            let src = if i == 0 {
                first_src.clone()
            } else {
                self.stage_buf(s, &format!("post{i}"), layer.geom.in_len())?
            };
            let out_n = layer.geom.out_len();
            if i < last {
                let act = layer.act_after.clone().ok_or_else(|| Error::Codegen {
                    context: layer.node.clone(),
                    message: "inner layer without activation".into(),
                })?;
                let post = self.stage_buf(s, &format!("post{}", i + 1), out_n)?;
                if self.fusion.enabled {
                    // The log-det's vjp takes ELU's and ReLU's derivative from `post`.
                    let pre = if kernels::derivative_from_output(&act) {
                        None
                    } else {
                        Some(self.stage_buf(s, &format!("pre{}", i + 1), out_n)?)
                    };
                    steps.push(self.layer(
                        &name,
                        layer,
                        src,
                        Epilogue::StoreAct {
                            pre,
                            dst: post,
                            act,
                        },
                    )?);
                } else {
                    let pre = self.stage_buf(s, &format!("pre{}", i + 1), out_n)?;
                    steps.extend(self.layer_then_act(&name, layer, src, out_n, &pre, &post, &act)?);
                }
                continue;
            }
            // Last layer: the residual add (and the next ActNorm).
            let next = match &fb.next_actnorm {
                Some(an) if self.fusion.enabled => {
                    let next_ix = g.blocks[b + 1].actnorm;
                    debug_assert_eq!(&g.node(next_ix).name, an);
                    let lead = match self.fusion.blocks[b + 1].lead_act.clone() {
                        Some(act) => Some(ActOut {
                            buffer: self.stage_buf(self.fusion.blocks[b + 1].stage, "lead", d)?,
                            act,
                        }),
                        None => None,
                    };
                    self.weight(&param_name(an, "log_scale"))?;
                    self.weight(&param_name(an, "bias"))?;
                    Some((
                        next_ix,
                        NextActNorm {
                            log_scale: param_name(an, "log_scale"),
                            bias: param_name(an, "bias"),
                            lead,
                        },
                    ))
                }
                _ => None,
            };
            if self.fusion.enabled {
                let (dst, next) = match next {
                    Some((next_ix, n)) => (self.val(next_ix)?, Some(n)),
                    None => (self.val(blk.residual)?, None),
                };
                let latent = match next {
                    None => self.z_taps.get(&b).cloned(),
                    Some(_) => None,
                };
                steps.push(self.layer(
                    &name,
                    layer,
                    src,
                    Epilogue::Residual {
                        res: a.clone(),
                        dst,
                        next,
                        latent,
                    },
                )?);
            } else {
                let gout = self.stage_buf(s, "gout", out_n)?;
                steps.push(self.layer(&name, layer, src, Epilogue::Store { dst: gout.clone() })?);
                let y = self.val(blk.residual)?;
                let body =
                    format!("    let o = sample * {out_n}u + i;\n    dst[o] = res[o] + gout[o];");
                steps.push(self.eltwise(
                    &format!("fwd.{}.residual", fb.name),
                    out_n,
                    vec![
                        Binding::read("res", a.clone()),
                        Binding::read("gout", gout),
                        Binding::write("dst", y),
                    ],
                    None,
                    &body,
                )?);
            }
        }
        Ok(steps)
    }

    /// Unfused form of a hidden layer: the linear map stores its
    /// pre-activation, then a separate kernel applies the activation.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_then_act(
        &mut self,
        name: &str,
        layer: &crate::passes::fusion::Layer,
        src: String,
        out_n: usize,
        pre: &str,
        post: &str,
        act: &ActRef,
    ) -> Result<[Step; 2]> {
        let linear = self.layer(
            name,
            layer,
            src,
            Epilogue::Store {
                dst: pre.to_string(),
            },
        )?;
        let activation = self.act_kernel(&format!("{name}.act"), out_n, pre, post, act)?;
        Ok([linear, activation])
    }

    pub(super) fn layer(
        &mut self,
        name: &str,
        layer: &crate::passes::fusion::Layer,
        src: String,
        epilogue: Epilogue,
    ) -> Result<Step> {
        self.conv(
            name,
            Conv {
                geom: layer.geom,
                transposed: false,
                src,
                weight: layer.weight.clone(),
                bias: Some(layer.bias.clone()),
                epilogue,
                bump: None,
                src_view: None,
                adjoint_weight: false,
            },
        )
    }
}
