//! Fusion analysis on the IR: which ops the WGSL codegen runs as one kernel.
//!
//! The patterns are few and fixed (docs/design.md#fusion-patterns), so this is a hand-written matcher over the
//! petgraph graph; it does not rewrite the graph (the reference executor keeps interpreting
//! the original) but returns, per block, the residual branch as a chain of linear layers
//! with the activation each one feeds, plus the cross-block fusions:
//!
//! - conv/dense + bias + activation: [`Layer::act_after`] is applied in the linear kernel's
//!   epilogue (which also stores the pre-activation the log-det's derivative mask needs);
//! - last conv + residual add: always, in the last layer's epilogue;
//! - ActNorm of the *next* block as an epilogue of this block's residual kernel
//!   ([`FusedBlock::next_actnorm`]). Folding ActNorm into the first conv's weights alone would
//!   not be exact: the ActNorm output also feeds the residual add. As an epilogue it is exact;
//! - the branch's leading activation (`act(a)`, a = ActNorm output) as a second output of
//!   whatever kernel produces `a`, so the first conv reads activated values without
//!   recomputing them per tap;
//! - classifier head batch norm + ReLU + global average pool ([`Fusion::head_pool`]).
//!
//! The inverse step `x <- y - g(x)` and the log-det's derivative mask + `<w_k, v>` products
//! are epilogues of the same layer kernels; the codegen chooses them per entry point.

use petgraph::stable_graph::NodeIndex;
use petgraph::Direction;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::kernels::ConvGeom;
use crate::ops::{param_name, Op};
use crate::spec::Activation;

/// An activation as a kernel needs it: the function and, for LipSwish, the `beta` tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActRef {
    pub act: Activation,
    /// Parameter tensor holding LipSwish's raw `beta` (the kernel applies softplus).
    pub beta: Option<String>,
    /// The IR node (for names in reports).
    pub node: String,
}

/// One linear map of a residual branch, as a convolution (dense = 1x1 conv on a 1x1 image).
#[derive(Clone, Debug, Serialize)]
pub struct Layer {
    pub node: String,
    pub geom: ConvGeom,
    pub weight: String,
    pub bias: String,
    /// The activation that follows this layer inside the branch (None for the last layer).
    pub act_after: Option<ActRef>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FusedBlock {
    pub name: String,
    pub stage: usize,
    /// Per-sample shape of the block (= ActNorm output).
    pub shape: Vec<usize>,
    /// Activation applied to the ActNorm output before the first layer (absent in the very
    /// first block of a model).
    pub lead_act: Option<ActRef>,
    pub layers: Vec<Layer>,
    /// The ActNorm that reads this block's output and nothing else does: it runs as the
    /// epilogue of this block's residual kernel.
    pub next_actnorm: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Fusion {
    /// Whether fusions are applied (false: `--no-fuse`, one kernel per op).
    pub enabled: bool,
    pub blocks: Vec<FusedBlock>,
    /// Classifier head `batchnorm? -> relu -> global_avg_pool` as one kernel: the node names.
    pub head_pool: Option<Vec<String>>,
}

impl Fusion {
    /// The block whose residual kernel computes ActNorm node `name`, if any.
    pub fn actnorm_producer(&self, name: &str) -> Option<usize> {
        self.blocks
            .iter()
            .position(|b| b.next_actnorm.as_deref() == Some(name))
    }
}

fn act_ref(g: &Graph, ix: NodeIndex) -> Option<ActRef> {
    let n = g.node(ix);
    match &n.op {
        Op::Act { act } => Some(ActRef {
            act: *act,
            beta: (*act == Activation::LipSwish).then(|| param_name(&n.name, "beta")),
            node: n.name.clone(),
        }),
        _ => None,
    }
}

pub fn linear_geom(op: &Op) -> Option<ConvGeom> {
    match op {
        Op::Conv2d { geom } => Some(*geom),
        Op::Dense { fin, fout } => Some(ConvGeom {
            cin: *fin,
            cout: *fout,
            h: 1,
            w: 1,
            k: 1,
            stride: 1,
            pad: 0,
        }),
        _ => None,
    }
}

/// Matches every block's branch against `act? (linear act)* linear`; `fuse = false` still
/// returns the chains (the unfused codegen needs them too) but no cross-op fusion.
pub fn analyze(g: &Graph, fuse: bool) -> Result<Fusion> {
    let mut blocks = Vec::with_capacity(g.blocks.len());
    let latents: Vec<NodeIndex> = g.latents.clone();
    for b in &g.blocks {
        let unsupported = |reason: String| Error::Unsupported {
            what: format!("block `{}` (WGSL codegen)", b.name),
            reason,
        };
        let mut body = b.body.iter().copied().peekable();
        let lead_act = match body.peek() {
            Some(&ix) => act_ref(g, ix),
            None => None,
        };
        if lead_act.is_some() {
            body.next();
        }
        let mut layers: Vec<Layer> = Vec::new();
        while let Some(ix) = body.next() {
            let n = g.node(ix);
            let geom = linear_geom(&n.op).ok_or_else(|| {
                unsupported(format!(
                    "expected a conv or dense layer at `{}`, found {}",
                    n.name,
                    n.op.kind()
                ))
            })?;
            if geom.stride != 1 || geom.out_h() != geom.h || geom.out_w() != geom.w {
                return Err(unsupported(format!(
                    "`{}`: only stride-1 'same' convolutions have a transposed kernel here",
                    n.name
                )));
            }
            let act_after = match body.peek() {
                Some(&next) => {
                    let a = act_ref(g, next).ok_or_else(|| {
                        unsupported(format!(
                            "two linear layers in a row at `{}`",
                            g.node(next).name
                        ))
                    })?;
                    body.next();
                    Some(a)
                }
                None => None,
            };
            layers.push(Layer {
                node: n.name.clone(),
                geom,
                weight: param_name(&n.name, "weight"),
                bias: param_name(&n.name, "bias"),
                act_after,
            });
        }
        match layers.last() {
            None => return Err(unsupported("the branch has no linear layer".into())),
            Some(l) if l.act_after.is_some() => {
                return Err(unsupported("the branch ends with an activation".into()))
            }
            _ => {}
        }
        if layers.len() < 2 {
            // The fixed-point and vjp kernels of a one-layer branch would read and write the
            // same buffer in one dispatch.
            return Err(unsupported(
                "a branch with a single linear layer is not supported by the WGSL codegen".into(),
            ));
        }
        let consumers: Vec<NodeIndex> = g
            .dag
            .neighbors_directed(b.residual, Direction::Outgoing)
            .collect();
        let next_actnorm = match consumers.as_slice() {
            [only] if fuse && g.node(*only).op == Op::ActNorm && !latents.contains(&b.residual) => {
                Some(g.node(*only).name.clone())
            }
            _ => None,
        };
        blocks.push(FusedBlock {
            name: b.name.clone(),
            stage: b.stage,
            shape: g.node(b.actnorm).shape.clone(),
            lead_act,
            layers,
            next_actnorm,
        });
    }
    let head_pool = if fuse { match_head(g) } else { None };
    Ok(Fusion {
        enabled: fuse,
        blocks,
        head_pool,
    })
}

/// `[batchnorm ->] relu -> global_avg_pool`, each node read only by the next.
fn match_head(g: &Graph) -> Option<Vec<String>> {
    let pool = g
        .dag
        .node_indices()
        .find(|&ix| g.node(ix).op == Op::GlobalAvgPool)?;
    let mut chain = vec![pool];
    let mut cur = pool;
    loop {
        let ins = g.inputs(cur);
        let &[prev] = ins.as_slice() else { break };
        let single_consumer = g.dag.neighbors_directed(prev, Direction::Outgoing).count() == 1;
        let fits = matches!(
            (&g.node(prev).op, chain.len()),
            (
                Op::Act {
                    act: Activation::Relu
                },
                1
            ) | (Op::BatchNorm { .. }, 2)
        );
        if !fits || !single_consumer {
            break;
        }
        chain.push(prev);
        cur = prev;
    }
    if chain.len() < 2 {
        return None;
    }
    chain.reverse();
    Some(chain.iter().map(|&ix| g.node(ix).name.clone()).collect())
}
