//! The typed ops of the IR, one file per family. Each family provides shape
//! inference, its parameters, an f64 evaluation (used by the reference
//! executor) and, for the ops that can appear inside a residual branch, its
//! vector-Jacobian product — the log-det needs it now, training will later.

pub mod activation;
pub mod actnorm;
pub mod head;
pub mod layout;
pub mod linear;

use serde::{Deserialize, Serialize};

use crate::kernels::ConvGeom;
use crate::spec::{Activation, SqueezeOrder};
use crate::tensor::Params;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The model input (per-sample shape on the node).
    Input,
    /// Space-to-depth 2x2: `[C, H, W] -> [4C, H/2, W/2]`, channels in `order`.
    Squeeze {
        /// Default for graphs serialized without it (bundles written before the
        /// option, which used `pixel_unshuffle`, are refused by the bundle version).
        #[serde(default)]
        order: SqueezeOrder,
    },
    /// Injective zero-padding of the channel axis up to `channels`.
    PadChannels { channels: usize },
    /// Per-channel affine `y = x * exp(log_scale) + bias`.
    ActNorm,
    /// Zero-padded convolution with bias.
    Conv2d { geom: ConvGeom },
    /// `y = W x + b`, W is `[fout, fin]`.
    Dense { fin: usize, fout: usize },
    /// Elementwise activation with Lipschitz constant <= 1.
    Act { act: Activation },
    /// `y = x + g(x)`: inputs are `[x, g(x)]`.
    Residual,
    /// Channels `start..start+len` (a factor-out is two of them: the half sent
    /// to z and the half that continues, per the model's `factor_out_half`).
    SliceChannels { start: usize, len: usize },
    /// Eval-form batch norm (running statistics), an affine map per channel.
    BatchNorm { eps: f64 },
    /// Mean over the spatial axes: `[C, H, W] -> [C]`.
    GlobalAvgPool,
}

impl Op {
    /// Short kind name used in node labels, ONNX names and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Squeeze { .. } => "squeeze",
            Op::PadChannels { .. } => "pad_channels",
            Op::ActNorm => "actnorm",
            Op::Conv2d { .. } => "conv2d",
            Op::Dense { .. } => "dense",
            Op::Act { .. } => "act",
            Op::Residual => "residual",
            Op::SliceChannels { .. } => "slice_channels",
            Op::BatchNorm { .. } => "batchnorm",
            Op::GlobalAvgPool => "global_avg_pool",
        }
    }

    /// Output shape from the input shapes, or a reason why the op cannot apply.
    pub fn infer_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>, String> {
        let one = |n: usize| -> Result<(), String> {
            if inputs.len() == n {
                Ok(())
            } else {
                Err(format!("expects {n} input(s), has {}", inputs.len()))
            }
        };
        match self {
            Op::Input => Err("the input node has no inputs to infer from".into()),
            Op::Residual => {
                one(2)?;
                if inputs[0] != inputs[1] {
                    return Err(format!(
                        "residual branch output {:?} differs from its input {:?}",
                        inputs[1], inputs[0]
                    ));
                }
                Ok(inputs[0].to_vec())
            }
            _ => {
                one(1)?;
                let s = inputs[0];
                match self {
                    Op::Squeeze { .. } => layout::squeeze_shape(s),
                    Op::PadChannels { channels } => layout::pad_shape(s, *channels),
                    Op::SliceChannels { start, len } => layout::slice_shape(s, *start, *len),
                    Op::ActNorm | Op::Act { .. } | Op::BatchNorm { .. } => Ok(s.to_vec()),
                    Op::Conv2d { geom } => linear::conv_shape(geom, s),
                    Op::Dense { fin, fout } => linear::dense_shape(*fin, *fout, s),
                    Op::GlobalAvgPool => head::pool_shape(s),
                    Op::Input | Op::Residual => unreachable!("handled above"),
                }
            }
        }
    }

    /// The parameters this op reads: (suffix, shape). Full name is `{node}.{suffix}`.
    pub fn params(&self, shape_in: &[usize]) -> Vec<(&'static str, Vec<usize>)> {
        let channels = shape_in.first().copied().unwrap_or(0);
        match self {
            Op::ActNorm => vec![("log_scale", vec![channels]), ("bias", vec![channels])],
            Op::Conv2d { geom } => vec![
                ("weight", vec![geom.cout, geom.cin, geom.k, geom.k]),
                ("bias", vec![geom.cout]),
            ],
            Op::Dense { fin, fout } => vec![("weight", vec![*fout, *fin]), ("bias", vec![*fout])],
            Op::Act {
                act: Activation::LipSwish,
            } => vec![("beta", vec![1])],
            Op::BatchNorm { .. } => vec![
                ("weight", vec![channels]),
                ("bias", vec![channels]),
                ("running_mean", vec![channels]),
                ("running_var", vec![channels]),
            ],
            _ => vec![],
        }
    }

    /// Multiply-accumulates per sample (for FLOP reports: 2 FLOPs each).
    pub fn macs(&self, out_shape: &[usize]) -> u64 {
        match self {
            Op::Conv2d { geom } => {
                (geom.cout * geom.out_h() * geom.out_w() * geom.cin * geom.k * geom.k) as u64
            }
            Op::Dense { fin, fout } => (*fin * *fout) as u64,
            _ => out_shape.iter().product::<usize>() as u64,
        }
    }

    /// f64 evaluation on one sample. `name` is the node name (for parameters).
    pub fn eval(
        &self,
        name: &str,
        params: &Params,
        inputs: &[&[f64]],
        in_shape: &[usize],
    ) -> Vec<f64> {
        match self {
            Op::Input => inputs[0].to_vec(),
            Op::Residual => inputs[0]
                .iter()
                .zip(inputs[1])
                .map(|(a, b)| a + b)
                .collect(),
            Op::Squeeze { order } => layout::squeeze(inputs[0], in_shape, *order),
            Op::PadChannels { channels } => layout::pad_channels(inputs[0], in_shape, *channels),
            Op::SliceChannels { start, len } => {
                layout::slice_channels(inputs[0], in_shape, *start, *len)
            }
            Op::ActNorm => actnorm::forward(name, params, inputs[0], in_shape),
            Op::Conv2d { geom } => linear::conv_forward(name, params, geom, inputs[0]),
            Op::Dense { fin, fout } => linear::dense_forward(name, params, *fin, *fout, inputs[0]),
            Op::Act { act } => activation::forward(*act, name, params, inputs[0]),
            Op::BatchNorm { eps } => head::batchnorm(name, params, *eps, inputs[0], in_shape),
            Op::GlobalAvgPool => head::global_avg_pool(inputs[0], in_shape),
        }
    }

    /// Vector-Jacobian product `dy^T J` at input `x`, for the ops a residual
    /// branch is made of (linear maps and activations).
    pub fn vjp(&self, name: &str, params: &Params, x: &[f64], dy: &[f64]) -> Option<Vec<f64>> {
        match self {
            Op::Conv2d { geom } => Some(linear::conv_vjp(name, params, geom, dy)),
            Op::Dense { fin, fout } => Some(linear::dense_vjp(name, params, *fin, *fout, dy)),
            Op::Act { act } => Some(activation::vjp(*act, name, params, x, dy)),
            _ => None,
        }
    }

    /// True for the linear maps the Lipschitz pass normalizes.
    pub fn is_linear(&self) -> bool {
        matches!(self, Op::Conv2d { .. } | Op::Dense { .. })
    }
}

/// Name of a node's parameter.
pub fn param_name(node: &str, suffix: &str) -> String {
    format!("{node}.{suffix}")
}

/// Shorthand used by the op families: the data of a parameter that the
/// verifier has already checked to exist with the right shape.
pub(crate) fn p<'a>(params: &'a Params, node: &str, suffix: &str) -> &'a [f64] {
    params
        .get(&param_name(node, suffix))
        .map(|t| t.data.as_slice())
        .unwrap_or(&[])
}
