//! IR -> ONNX nodes: the forward pass, the log-det series with the probe as
//! an input, and the unrolled fixed-point inverse.
//!
//! Conventions (docs/onnx.md and docs/model-files.md document them for users of the files):
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
use tract_onnx::pb::AttributeProto;

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

mod logdet;
mod walk;

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
                let w = self.init_param(&n.name, "weight")?;
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
                let bname = param_name(&n.name, "bias");
                self.conv(name, x, &spec, &w, Some((&bname, &b.data)))
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

    /// A value computed from constants only (a weight in another layout), made once per
    /// graph under `name` however often the conv using it is unrolled. Runtimes fold it when
    /// they load the graph, so the file stores only the weight it comes from.
    pub(super) fn derived(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        if self.og.has(name) {
            return name.to_string();
        }
        self.og.node(op, name, inputs, attribute)
    }

    /// A convolution `[B, cin, h, w] -> [B, cout, oh, ow]` with the kernel `weight`, a value
    /// `[cout, cin, k, k]` of the graph (a stored initializer or one derived from it), written
    /// the way [`ConvStyle`] asks: other layouts of the kernel are derived in the graph, so
    /// every layout shares the one stored weight. The bias initializers derive their names
    /// from `bias.0` and are stored once however often the conv is unrolled.
    fn conv(
        &mut self,
        name: &str,
        x: &str,
        c: &ConvSpec,
        weight: &str,
        bias: Option<(&str, &[f64])>,
    ) -> String {
        let tuned = self.style != ConvStyle::Conv && c.stride == 1;
        let (oh, ow) = (c.h + 2 * c.pad + 1 - c.k, c.w + 2 * c.pad + 1 - c.k);
        // On a 1x1 image with "same" padding only the kernel's centre tap meets the pixel (all
        // others read padding): the conv is the 1x1 conv of that tap. Written that way in every
        // style, since tract 0.23 miscomputes such a Conv followed by a Sub at batch 1 (the
        // inverse step `y - g(x)` of a 1x1 scale; tests/backends.rs decodes single samples).
        let centre_only = c.stride == 1 && c.h == 1 && c.w == 1 && 2 * c.pad + 1 == c.k;
        if centre_only || (tuned && c.k == 1 && c.pad == 0) {
            let kernel = if c.k == 1 {
                weight.to_string()
            } else {
                let p = c.pad as i64;
                let starts = self.og.init_i64(&format!("centre[{p}].starts"), &[p, p]);
                let ends = self
                    .og
                    .init_i64(&format!("centre[{p}].ends"), &[p + 1, p + 1]);
                let axes = self.og.init_i64("axes[2,3]", &[2, 3]);
                self.derived(
                    "Slice",
                    &format!("{weight}_centre"),
                    &[weight, &starts, &ends, &axes],
                    vec![],
                )
            };
            // A 1x1 conv is W[cout, cin] @ x[B, cin, h*w]: one batched matrix product.
            let shape = self.og.shape_const(&[c.cout as i64, c.cin as i64]);
            let wm = self.derived(
                "Reshape",
                &format!("{kernel}_matrix"),
                &[&kernel, &shape],
                vec![],
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
            // Row t * cout + co of the tap matrix is W[co, :, ky, kx] (t = ky * k + kx):
            // the kernel transposed to [ky, kx, cout, cin] and flattened.
            let taps = c.k * c.k;
            let kkoi = self.derived(
                "Transpose",
                &format!("{weight}_kkoi"),
                &[weight],
                vec![attr_ints("perm", &[2, 3, 0, 1])],
            );
            let shape = self.og.shape_const(&[(taps * c.cout) as i64, c.cin as i64]);
            let wm = self.derived(
                "Reshape",
                &format!("{weight}_taps"),
                &[&kkoi, &shape],
                vec![],
            );
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
        let mut inputs = vec![x.to_string(), weight.to_string()];
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
