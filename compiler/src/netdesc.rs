//! IR -> the network description the native CPU engine runs (`net.json` in a bundle; built in
//! memory by `iresnetc run --backend cpu` for model files).
//!
//! The description is read off the graph, not the spec, so that what the engine runs is what
//! the reference executor runs: blocks from `Graph::blocks`, the factor-out half from the
//! kept slice's position.

use std::collections::BTreeMap;

use iresnetc_runtime::bundle::WeightTensor;
use iresnetc_runtime::cpu::net::{
    ActKind, BatchNormDesc, BlockDesc, BranchLayer, EstimatorKind, FactorOutHalf, HeadDesc,
    InverseSettings, Layer, LogDetSettings, NetDesc, NetKind, PriorDesc, ProbeKind, RouletteKind,
    SqueezeOrder, NET_FORMAT, NET_VERSION,
};

use crate::error::{Error, Result};
use crate::ops::{param_name, Op};
use crate::pipeline::Model;
use crate::spec::{Activation, Estimator, LogDetSpec, ModelKind, RouletteDist};
use crate::tensor::Params;

fn unsupported(what: &str, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        what: what.into(),
        reason: reason.into(),
    }
}

/// The description of a certified model.
pub fn describe(model: &Model) -> Result<NetDesc> {
    let g = &model.graph;
    let block_of_residual = g.block_of_residual();
    let latents: std::collections::HashSet<_> = g.latents.iter().copied().collect();
    let mut layers = Vec::new();
    let mut half: Option<FactorOutHalf> = None;
    let mut squeeze: Option<SqueezeOrder> = None;
    let mut head = HeadDesc {
        batchnorm: None,
        relu_pool: false,
        classes: 0,
        weight: String::new(),
        bias: String::new(),
    };
    for ix in g.topo_order()? {
        let n = g.node(ix);
        if n.block.is_some() {
            continue;
        }
        match &n.op {
            Op::Input | Op::ActNorm => {}
            Op::Squeeze { order } => {
                let this = match order {
                    crate::spec::SqueezeOrder::SpaceToDepth => SqueezeOrder::SpaceToDepth,
                    crate::spec::SqueezeOrder::PixelUnshuffle => SqueezeOrder::PixelUnshuffle,
                };
                if squeeze.is_some_and(|o| o != this) {
                    return Err(unsupported(&n.name, "squeezes of both orders"));
                }
                squeeze = Some(this);
                layers.push(Layer::Squeeze);
            }
            Op::PadChannels { channels } => layers.push(Layer::PadChannels {
                channels: *channels,
            }),
            Op::Residual => {
                let b = block_of_residual[&ix];
                layers.push(Layer::Block(block(model, b)?));
            }
            Op::SliceChannels { start, .. } => {
                // A factor-out is a pair of slices. The kept one comes first in any topological
                // order of what follows (the latent one may come late), so it marks the place;
                // its position says which half goes to z.
                if latents.contains(&ix) {
                    continue;
                }
                let c = g.input_shape(ix)[0];
                let this = if *start == 0 {
                    FactorOutHalf::Second
                } else if *start == c / 2 {
                    FactorOutHalf::First
                } else {
                    return Err(unsupported(&n.name, "a factor-out that is not half/half"));
                };
                if half.is_some_and(|h| h != this) {
                    return Err(unsupported(&n.name, "factor-outs of both halves"));
                }
                half = Some(this);
                layers.push(Layer::FactorOut);
            }
            Op::BatchNorm { eps } => {
                head.batchnorm = Some(BatchNormDesc {
                    weight: param_name(&n.name, "weight"),
                    bias: param_name(&n.name, "bias"),
                    running_mean: param_name(&n.name, "running_mean"),
                    running_var: param_name(&n.name, "running_var"),
                    eps: *eps,
                });
            }
            Op::Act {
                act: Activation::Relu,
            } if g.spec.kind == ModelKind::Classifier => {}
            Op::GlobalAvgPool => head.relu_pool = true,
            Op::Dense { fout, .. } if Some(ix) == g.logits => {
                head.classes = *fout;
                head.weight = param_name(&n.name, "weight");
                head.bias = param_name(&n.name, "bias");
            }
            other => {
                return Err(unsupported(
                    &n.name,
                    format!("the CPU engine has no {} outside a block", other.kind()),
                ))
            }
        }
    }
    let flow = g.spec.kind == ModelKind::Flow;
    Ok(NetDesc {
        format: NET_FORMAT.into(),
        version: NET_VERSION,
        name: g.spec.name.clone(),
        kind: if flow {
            NetKind::Flow
        } else {
            NetKind::Classifier
        },
        input: g.spec.input.clone(),
        // What the IR's own squeeze and factor-out ops do (unused when the model has none).
        squeeze_order: squeeze.unwrap_or(SqueezeOrder::SpaceToDepth),
        factor_out_half: half.unwrap_or(FactorOutHalf::First),
        layers,
        prior: flow.then(|| PriorDesc {
            mean: "prior.mean".into(),
            log_std: "prior.log_std".into(),
        }),
        head: (!flow).then_some(head),
        dequantize: g.spec.data.dequantize,
        logdet: logdet_settings(&g.spec.logdet),
        inverse: InverseSettings {
            tol: g.spec.inverse.tol,
            max_iters: g.spec.inverse.max_iters,
        },
    })
}

/// A model file's (or a run's) log-det settings in the engine's terms.
pub fn logdet_settings(s: &LogDetSpec) -> LogDetSettings {
    LogDetSettings {
        estimator: match s.estimator {
            Estimator::Exact => EstimatorKind::Exact,
            Estimator::Series => EstimatorKind::Series,
            Estimator::Roulette => EstimatorKind::Roulette,
        },
        terms: s.terms,
        probes: s.probes,
        probe: match s.probe {
            crate::spec::ProbeKind::Gaussian => ProbeKind::Gaussian,
            crate::spec::ProbeKind::Rademacher => ProbeKind::Rademacher,
        },
        seed: s.seed,
        roulette: match s.roulette {
            RouletteDist::Geometric => RouletteKind::Geometric,
            RouletteDist::Poisson => RouletteKind::Poisson,
        },
        roulette_param: s.roulette_param,
    }
}

fn block(model: &Model, b: usize) -> Result<BlockDesc> {
    let g = &model.graph;
    let blk = &g.blocks[b];
    let an = &g.node(blk.actnorm).name;
    let mut branch = Vec::new();
    for &ix in &blk.body {
        let n = g.node(ix);
        let weight = param_name(&n.name, "weight");
        let bias = param_name(&n.name, "bias");
        branch.push(match &n.op {
            Op::Conv2d { geom } => {
                if geom.stride != 1 || geom.pad != geom.k / 2 || geom.k % 2 == 0 {
                    return Err(unsupported(
                        &n.name,
                        "the CPU engine runs odd kernels with stride 1 and padding k/2",
                    ));
                }
                BranchLayer::Conv {
                    cin: geom.cin,
                    cout: geom.cout,
                    k: geom.k,
                    weight,
                    bias,
                }
            }
            Op::Dense { fin, fout } => BranchLayer::Dense {
                fin: *fin,
                fout: *fout,
                weight,
                bias,
            },
            Op::Act { act } => BranchLayer::Act {
                act: match act {
                    Activation::Elu => ActKind::Elu,
                    Activation::Relu => ActKind::Relu,
                    Activation::LipSwish => ActKind::LipSwish,
                },
                beta: (*act == Activation::LipSwish).then(|| param_name(&n.name, "beta")),
            },
            other => {
                return Err(unsupported(
                    &n.name,
                    format!("op {} inside a residual branch", other.kind()),
                ))
            }
        });
    }
    let cert = model.lipschitz.blocks.get(b);
    Ok(BlockDesc {
        name: blk.name.clone(),
        actnorm_log_scale: param_name(an, "log_scale"),
        actnorm_bias: param_name(an, "bias"),
        branch,
        lipschitz_bound: cert.map_or(f64::NAN, |c| c.lipschitz_bound),
        max_iters: cert
            .map_or(g.spec.inverse.max_iters, |c| c.inverse_iters)
            .min(g.spec.inverse.max_iters)
            .max(1),
    })
}

/// The model's parameters as the f32 tensors a bundle stores (the same rounding as
/// `weights.safetensors`, so a model file and its bundle give the same numbers).
pub fn weights_f32(params: &Params) -> BTreeMap<String, WeightTensor> {
    params
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                WeightTensor {
                    shape: t.shape.clone(),
                    data: t.data.iter().map(|&v| v as f32).collect(),
                },
            )
        })
        .collect()
}
