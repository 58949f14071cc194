//! IR -> ONNX nodes: the forward pass, the log-det series with the probe as
//! an input, and the unrolled fixed-point inverse.
//!
//! Conventions (the README documents them for users of the files):
//! - tensors are NCHW (images) or `[batch, d]` (vectors), f32, batch symbolic;
//! - a node named after an IR node computes that node's value; helper nodes
//!   are `{ir name}.{what}`; unrolled inverse copies of a branch are
//!   `{block}.inv{k}.{layer}`, vjp copies `{block}.vjp{k}.p{probe}.{layer}`;
//! - parameters are initializers named `{ir name}.{weight|bias|scale|...}`,
//!   already spectrally normalized; derived ones (ActNorm `scale = exp(log_scale)`,
//!   LipSwish `slope = softplus(beta)`, `weight_adjoint` = the flipped,
//!   transposed kernel of the vjp) are computed in f64 and rounded once.

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;

use super::proto::{attr_int, attr_ints, attr_str, OnnxGraph};
use super::LogDetExport;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::activation::{lipswish_beta, LIPSWISH_DIV};
use crate::ops::head::batchnorm_affine;
use crate::ops::{actnorm, param_name, Op};
use crate::spec::{Activation, ModelKind, SqueezeOrder};
use crate::tensor::Tensor;

/// How convolutions are written (the formulation changes tract's speed, not
/// the math; every style is standard ONNX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConvStyle {
    /// Every convolution as an ONNX `Conv`.
    Conv,
    /// 1x1 convolutions as `MatMul(W[cout, cin], x[B, cin, H*W])`, others as `Conv`.
    PointwiseMatMul,
    /// As `PointwiseMatMul`, and k x k convolutions with fewer output than input
    /// channels as one `MatMul` over all taps plus a sum of shifted windows.
    #[default]
    TapSum,
}

/// Geometry of one convolution as emitted (the vjp's adjoint conv has its own).
struct ConvSpec {
    cin: usize,
    cout: usize,
    k: usize,
    pad: usize,
    stride: usize,
    h: usize,
    w: usize,
}

/// Pieces of a node's output recovered from its channel slices: (start, len, tensor).
pub(crate) type Pieces = HashMap<NodeIndex, Vec<(usize, usize, String)>>;

/// The log-det terms a forward walk emitted: one `[B]` tensor per block, and the
/// ActNorm constant `H*W*sum(log_scale)` summed over the walked ActNorms.
#[derive(Default)]
pub(crate) struct WalkLogdet {
    pub blocks: Vec<String>,
    pub actnorm: f64,
}

pub(crate) struct Emitter<'g> {
    pub g: &'g Graph,
    pub og: OnnxGraph,
    pub style: ConvStyle,
}

/// `[C, 1, 1]` for an image shape `[C, H, W]`, `[C]` for a vector: the shape
/// that broadcasts a per-channel parameter over a batch.
fn per_channel(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    if let Some(c) = shape.first() {
        s[0] = *c;
    }
    s
}

impl<'g> Emitter<'g> {
    pub fn new(g: &'g Graph, style: ConvStyle) -> Self {
        Self {
            g,
            og: OnnxGraph::default(),
            style,
        }
    }

    fn param(&self, node: &str, suffix: &str) -> Result<&'g Tensor> {
        let name = param_name(node, suffix);
        self.g.params.get(&name).ok_or(Error::Graph {
            node: name,
            reason: "missing parameter (ONNX export)".into(),
        })
    }

    /// The initializer of an IR parameter as stored (already normalized).
    fn init_param(&mut self, node: &str, suffix: &str) -> Result<String> {
        let t = self.param(node, suffix)?;
        Ok(self
            .og
            .init_f32(&param_name(node, suffix), &t.shape, t.data.iter().copied()))
    }

    fn slice_axis1(&mut self, name: &str, x: &str, start: usize, end: usize) -> String {
        let s = self.og.init_i64(&format!("{name}.starts"), &[start as i64]);
        let e = self.og.init_i64(&format!("{name}.ends"), &[end as i64]);
        let a = self.og.init_i64("axes[1]", &[1]);
        self.og.node("Slice", name, &[x, &s, &e, &a], vec![])
    }

    /// One IR op applied to `inputs`; the result is named `name` (an IR node
    /// name, or a renamed copy for unrolled branches). Parameters always come
    /// from the IR node `ix`, so unrolled copies share their initializers.
    pub fn op(&mut self, ix: NodeIndex, inputs: &[String], name: &str) -> Result<String> {
        let g = self.g;
        let n = g.node(ix);
        let in_shape = g.input_shape(ix);
        let x = inputs.first().map(String::as_str).unwrap_or_default();
        let out = match &n.op {
            Op::Input => x.to_string(),
            Op::Squeeze { order } => {
                let (c, h, w) = image(&n.name, &in_shape)?;
                match order {
                    // The standard op: output channel (2*dy + dx)*C + c.
                    SqueezeOrder::SpaceToDepth => {
                        let x4 = self
                            .og
                            .reshape_batched(&format!("{name}.nchw"), x, &in_shape);
                        let y = self.og.node(
                            "SpaceToDepth",
                            &format!("{name}.s2d"),
                            &[&x4],
                            vec![attr_int("blocksize", 2)],
                        );
                        self.og.reshape_batched(name, &y, &n.shape)
                    }
                    // ONNX has no op for this order (SpaceToDepth has no mode attribute):
                    // [B, C, H/2, dy, W/2, dx] -> [B, C, dy, dx, H/2, W/2], channel c*4 + dy*2 + dx.
                    SqueezeOrder::PixelUnshuffle => {
                        let split =
                            self.og
                                .shape_const(&[-1, c as i64, h as i64 / 2, 2, w as i64 / 2, 2]);
                        let a =
                            self.og
                                .node("Reshape", &format!("{name}.split"), &[x, &split], vec![]);
                        let t = self.og.node(
                            "Transpose",
                            &format!("{name}.transpose"),
                            &[&a],
                            vec![attr_ints("perm", &[0, 1, 3, 5, 2, 4])],
                        );
                        self.og.reshape_batched(name, &t, &n.shape)
                    }
                }
            }
            Op::PadChannels { channels } => {
                let extra = (*channels - in_shape[0]) as i64;
                let rank = in_shape.len() + 1;
                let mut pads = vec![0i64; 2 * rank];
                pads[rank + 1] = extra;
                let p = self.og.init_i64(&format!("{}.pads", n.name), &pads);
                self.og.node("Pad", name, &[x, &p], vec![])
            }
            Op::ActNorm => {
                let ls = self.param(&n.name, "log_scale")?;
                let b = self.param(&n.name, "bias")?;
                let shape = per_channel(&in_shape);
                let s = self.og.init_f32(
                    &format!("{}.scale", n.name),
                    &shape,
                    ls.data.iter().map(|v| v.exp()),
                );
                let bias =
                    self.og
                        .init_f32(&format!("{}.bias", n.name), &shape, b.data.iter().copied());
                let m = self
                    .og
                    .node("Mul", &format!("{name}.mul"), &[x, &s], vec![]);
                self.og.node("Add", name, &[&m, &bias], vec![])
            }
            Op::Conv2d { geom } => {
                let w = self.param(&n.name, "weight")?;
                let b = self.param(&n.name, "bias")?;
                let spec = ConvSpec {
                    cin: geom.cin,
                    cout: geom.cout,
                    k: geom.k,
                    pad: geom.pad,
                    stride: geom.stride,
                    h: geom.h,
                    w: geom.w,
                };
                let wname = param_name(&n.name, "weight");
                let bname = param_name(&n.name, "bias");
                self.conv(name, x, &spec, (&wname, &w.data), Some((&bname, &b.data)))
            }
            Op::Dense { .. } => {
                let w = self.init_param(&n.name, "weight")?;
                let b = self.init_param(&n.name, "bias")?;
                self.og
                    .node("Gemm", name, &[x, &w, &b], vec![attr_int("transB", 1)])
            }
            Op::Act { act } => match act {
                // elu(x) = max(x, exp(min(x, 0)) - 1) (e^x - 1 >= x, equality at 0).
                // tract expands ONNX Elu into five passes with a boolean select; this
                // form is four cheap passes (~15% of a CIFAR block's time saved), and
                // its exp(min(x, 0)) is elu'(x), which the log-det graph reuses.
                Activation::Elu => {
                    let e = self.elu_exp(x, name);
                    let one = self.og.scalar(1.0);
                    let em1 = self
                        .og
                        .node("Sub", &format!("{name}.expm1"), &[&e, &one], vec![]);
                    self.og.node("Max", name, &[x, &em1], vec![])
                }
                Activation::Relu => self.og.node("Relu", name, &[x], vec![]),
                Activation::LipSwish => {
                    let slope = self.lipswish_slope(&n.name);
                    let bx = self
                        .og
                        .node("Mul", &format!("{name}.scaled"), &[x, &slope], vec![]);
                    let s = self
                        .og
                        .node("Sigmoid", &format!("{name}.sigmoid"), &[&bx], vec![]);
                    let gate = self
                        .og
                        .node("Mul", &format!("{name}.gate"), &[x, &s], vec![]);
                    let div = self.og.scalar(LIPSWISH_DIV);
                    self.og.node("Div", name, &[&gate, &div], vec![])
                }
            },
            Op::Residual => {
                let y = inputs.get(1).map(String::as_str).unwrap_or_default();
                self.og.node("Add", name, &[x, y], vec![])
            }
            Op::SliceChannels { start, len } => self.slice_axis1(name, x, *start, start + len),
            Op::BatchNorm { eps } => {
                let (scale, shift) = batchnorm_affine(&n.name, &g.params, *eps);
                let shape = per_channel(&in_shape);
                let s = self
                    .og
                    .init_f32(&format!("{}.scale", n.name), &shape, scale);
                let b = self
                    .og
                    .init_f32(&format!("{}.shift", n.name), &shape, shift);
                let m = self
                    .og
                    .node("Mul", &format!("{name}.mul"), &[x, &s], vec![]);
                self.og.node("Add", name, &[&m, &b], vec![])
            }
            Op::GlobalAvgPool => {
                let p = self
                    .og
                    .node("GlobalAveragePool", &format!("{name}.nchw"), &[x], vec![]);
                self.og
                    .node("Flatten", name, &[&p], vec![attr_int("axis", 1)])
            }
        };
        Ok(out)
    }

    /// `exp(min(x, 0))` for the ELU node `name` (emitted once per name).
    fn elu_exp(&mut self, x: &str, name: &str) -> String {
        let exp = format!("{name}.exp");
        if self.og.has(&exp) {
            return exp;
        }
        let zero = self.og.scalar(0.0);
        let m = self
            .og
            .node("Min", &format!("{name}.min"), &[x, &zero], vec![]);
        self.og.node("Exp", &exp, &[&m], vec![])
    }

    /// `softplus(beta)`, the effective LipSwish slope, as a scalar initializer.
    fn lipswish_slope(&mut self, node: &str) -> String {
        let beta = lipswish_beta(node, &self.g.params);
        self.og.init_f32(&format!("{node}.slope"), &[], [beta])
    }

    /// `g(x)` of block `b`; node names come from `rename(ir name)`. Returns
    /// the output and the input tensor of every body node (for the vjp).
    pub fn branch(
        &mut self,
        b: usize,
        x: &str,
        rename: &dyn Fn(&str) -> String,
    ) -> Result<(String, Vec<String>)> {
        let body = self.g.blocks[b].body.clone();
        let mut h = x.to_string();
        let mut inputs = Vec::with_capacity(body.len());
        for ix in body {
            let name = rename(&self.g.node(ix).name);
            let out = self.op(ix, std::slice::from_ref(&h), &name)?;
            inputs.push(std::mem::replace(&mut h, out));
        }
        Ok((h, inputs))
    }

    /// `act'(x)` for an activation node at pre-activation `x`.
    fn act_derivative(&mut self, ix: NodeIndex, act: Activation, x: &str) -> String {
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
    fn branch_derivatives(&mut self, b: usize, inputs: &[String]) -> Vec<Option<String>> {
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
    fn branch_vjp(
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
                    let wa = self.adjoint_kernel(&n.name, geom.cout, geom.cin, geom.k)?;
                    let spec = ConvSpec {
                        cin: geom.cout,
                        cout: geom.cin,
                        k: geom.k,
                        pad: geom.k - 1 - geom.pad,
                        stride: 1,
                        h: geom.out_h(),
                        w: geom.out_w(),
                    };
                    let wname = format!("{}.weight_adjoint", n.name);
                    self.conv(&name, &dy, &spec, (&wname, &wa), None)
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

    /// `W'[ci, co, ky, kx] = W[co, ci, k-1-ky, k-1-kx]`.
    fn adjoint_kernel(&self, node: &str, cout: usize, cin: usize, k: usize) -> Result<Vec<f64>> {
        let w = &self.param(node, "weight")?.data;
        let mut wa = vec![0.0; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        wa[((ci * cout + co) * k + ky) * k + kx] =
                            w[((co * cin + ci) * k + (k - 1 - ky)) * k + (k - 1 - kx)];
                    }
                }
            }
        }
        Ok(wa)
    }

    /// A convolution `[B, cin, h, w] -> [B, cout, oh, ow]` with weight `[cout, cin, k, k]`,
    /// written the way [`ConvStyle`] asks. Initializers derive their names from
    /// `weight.0` / `bias.0`, and are stored once however often the conv is unrolled.
    fn conv(
        &mut self,
        name: &str,
        x: &str,
        c: &ConvSpec,
        weight: (&str, &[f64]),
        bias: Option<(&str, &[f64])>,
    ) -> String {
        let (wname, w) = weight;
        let tuned = self.style != ConvStyle::Conv && c.stride == 1;
        let (oh, ow) = (c.h + 2 * c.pad + 1 - c.k, c.w + 2 * c.pad + 1 - c.k);
        if tuned && c.k == 1 && c.pad == 0 {
            // A 1x1 conv is W[cout, cin] @ x[B, cin, h*w]: one batched matrix product.
            let wm = self.og.init_f32(
                &format!("{wname}_matrix"),
                &[c.cout, c.cin],
                w.iter().copied(),
            );
            let flat = self.og.shape_const(&[-1, c.cin as i64, (c.h * c.w) as i64]);
            let xf = self
                .og
                .node("Reshape", &format!("{name}.flat"), &[x, &flat], vec![]);
            let mut y = self
                .og
                .node("MatMul", &format!("{name}.matmul"), &[&wm, &xf], vec![]);
            if let Some((bname, b)) = bias {
                let bc = self
                    .og
                    .init_f32(&format!("{bname}_col"), &[c.cout, 1], b.iter().copied());
                y = self
                    .og
                    .node("Add", &format!("{name}.add"), &[&y, &bc], vec![]);
            }
            return self.og.reshape_batched(name, &y, &[c.cout, oh, ow]);
        }
        if self.style == ConvStyle::TapSum && c.stride == 1 && c.k > 1 && c.cout < c.cin {
            // Few output channels (the last conv of a branch, 512 -> 12): tract's
            // im2col + GEMM has M = cout rows and runs at a few GFLOP/s. Instead one
            // GEMM computes every tap's 1x1 contribution, Z[t*cout + co] = W[co, :, t] x,
            // and the k*k shifted windows of the zero-padded Z are summed.
            let taps = c.k * c.k;
            let mut wt = vec![0.0; taps * c.cout * c.cin];
            for t in 0..taps {
                for co in 0..c.cout {
                    for ci in 0..c.cin {
                        wt[(t * c.cout + co) * c.cin + ci] = w[(co * c.cin + ci) * taps + t];
                    }
                }
            }
            let wm = self
                .og
                .init_f32(&format!("{wname}_taps"), &[taps * c.cout, c.cin], wt);
            let flat = self.og.shape_const(&[-1, c.cin as i64, (c.h * c.w) as i64]);
            let xf = self
                .og
                .node("Reshape", &format!("{name}.flat"), &[x, &flat], vec![]);
            let z = self
                .og
                .node("MatMul", &format!("{name}.taps"), &[&wm, &xf], vec![]);
            let z = self.og.reshape_batched(
                &format!("{name}.taps_image"),
                &z,
                &[taps * c.cout, c.h, c.w],
            );
            let p = c.pad as i64;
            let pads = self
                .og
                .init_i64(&format!("pads[{p}]"), &[0, 0, p, p, 0, 0, p, p]);
            let zp = self
                .og
                .node("Pad", &format!("{name}.taps_padded"), &[&z, &pads], vec![]);
            let axes = self.og.init_i64("axes[1,2,3]", &[1, 2, 3]);
            let mut acc: Option<String> = None;
            for t in 0..taps {
                let (ky, kx) = ((t / c.k) as i64, (t % c.k) as i64);
                let co = (t * c.cout) as i64;
                let st = self
                    .og
                    .init_i64(&format!("{name}.tap{t}.starts"), &[co, ky, kx]);
                let en = self.og.init_i64(
                    &format!("{name}.tap{t}.ends"),
                    &[co + c.cout as i64, ky + oh as i64, kx + ow as i64],
                );
                let sl = self.og.node(
                    "Slice",
                    &format!("{name}.tap{t}"),
                    &[&zp, &st, &en, &axes],
                    vec![],
                );
                acc = Some(match acc {
                    None => sl,
                    Some(a) => self
                        .og
                        .node("Add", &format!("{name}.sum{t}"), &[&a, &sl], vec![]),
                });
            }
            let acc = acc.unwrap_or_default();
            return match bias {
                Some((bname, b)) => {
                    let bc = self.og.init_f32(
                        &format!("{bname}_chw"),
                        &[c.cout, 1, 1],
                        b.iter().copied(),
                    );
                    self.og.node("Add", name, &[&acc, &bc], vec![])
                }
                None => self.og.node("Identity", name, &[&acc], vec![]),
            };
        }
        let wi = self
            .og
            .init_f32(wname, &[c.cout, c.cin, c.k, c.k], w.iter().copied());
        let mut inputs = vec![x.to_string(), wi];
        if let Some((bname, b)) = bias {
            inputs.push(self.og.init_f32(bname, &[c.cout], b.iter().copied()));
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let p = c.pad as i64;
        self.og.node(
            "Conv",
            name,
            &refs,
            vec![
                attr_ints("kernel_shape", &[c.k as i64, c.k as i64]),
                attr_ints("pads", &[p, p, p, p]),
                attr_ints("strides", &[c.stride as i64, c.stride as i64]),
            ],
        )
    }

    /// Per-sample `[B]` log-det of block `b`'s branch; `inputs` are the branch's
    /// node inputs from [`Self::branch`] (the first is the block input). `probes`
    /// holds the probe layout's columns from `probes.1` on (0 for the whole layout,
    /// the block's offset for a segment graph that takes only its own block's probes).
    fn block_logdet(
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
        let mut order = g.topo_order()?;
        order.reverse();
        self.inverse_walk(&order, &mut vals, &mut pieces, steps)?;
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
    fn assemble(
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

fn image(node: &str, s: &[usize]) -> Result<(usize, usize, usize)> {
    match s {
        [c, h, w] if h % 2 == 0 && w % 2 == 0 => Ok((*c, *h, *w)),
        _ => Err(Error::Unsupported {
            what: format!("ONNX export of op squeeze `{node}`"),
            reason: format!("needs an image [C, H, W] with even H and W, got {s:?}"),
        }),
    }
}
