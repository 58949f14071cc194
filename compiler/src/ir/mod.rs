//! The intermediate representation: a petgraph DAG of typed ops.
//!
//! Every node carries its op, its per-sample output shape and a stable,
//! human-readable name (the prefix of its parameters' names). A block's
//! residual branch `g` is an explicit region ([`Block::body`]), because
//! fusion, inversion and the log-det estimator all work on that unit.

mod builder;
mod dot;

pub use builder::build;
pub use dot::to_dot;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::error::{Error, Result};
use crate::ops::{param_name, Op};
use crate::spec::ModelSpec;
use crate::tensor::Params;

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    /// Per-sample output shape (batch is implicit everywhere).
    pub shape: Vec<usize>,
    /// Index into [`Graph::blocks`] when the node belongs to a residual branch.
    pub block: Option<usize>,
}

/// One invertible block: `x -> a = ActNorm(x) -> y = a + g(a)`.
#[derive(Clone, Debug)]
pub struct Block {
    /// `stage{s}.block{b}`.
    pub name: String,
    pub stage: usize,
    pub actnorm: NodeIndex,
    /// The nodes of `g` in evaluation order; a chain whose first node reads
    /// the ActNorm output and whose last node feeds the residual add.
    pub body: Vec<NodeIndex>,
    pub residual: NodeIndex,
}

/// Input slot of an edge (0 for the first operand).
pub type Slot = usize;

#[derive(Clone, Debug)]
pub struct Graph {
    pub spec: ModelSpec,
    pub dag: StableDiGraph<Node, Slot>,
    pub input: NodeIndex,
    pub blocks: Vec<Block>,
    /// Flows: the latent parts in the order they are concatenated into `z`
    /// (factored-out parts first, the final part last).
    pub latents: Vec<NodeIndex>,
    /// Classifiers: the logits node.
    pub logits: Option<NodeIndex>,
    pub params: Params,
}

impl Graph {
    pub fn node(&self, ix: NodeIndex) -> &Node {
        &self.dag[ix]
    }

    /// Operands of a node, ordered by input slot.
    pub fn inputs(&self, ix: NodeIndex) -> Vec<NodeIndex> {
        let mut v: Vec<(Slot, NodeIndex)> = self
            .dag
            .edges_directed(ix, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Per-sample shape of a node's (first) input.
    pub fn input_shape(&self, ix: NodeIndex) -> Vec<usize> {
        self.inputs(ix)
            .first()
            .map(|&i| self.dag[i].shape.clone())
            .unwrap_or_else(|| self.dag[ix].shape.clone())
    }

    /// Nodes in a deterministic topological order.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>> {
        petgraph::algo::toposort(&self.dag, None).map_err(|c| Error::Graph {
            node: self.dag[c.node_id()].name.clone(),
            reason: "the graph has a cycle".into(),
        })
    }

    /// The nodes an inverse visits, in visiting order: the graph backwards (reverse topological
    /// order), without the input and without the nodes inside residual branches (a block is
    /// inverted as a whole at its residual add). Every consumer that inverts the model (the
    /// reference, the WGSL lowering, the ONNX export, the trainer's sampler) walks this.
    pub fn inverse_order(&self) -> Result<Vec<NodeIndex>> {
        let mut order = self.topo_order()?;
        order.reverse();
        order.retain(|&ix| {
            let n = &self.dag[ix];
            n.block.is_none() && n.op != crate::ops::Op::Input
        });
        Ok(order)
    }

    /// Which block each residual-add node closes (executors walk the graph and
    /// need to know when a node starts a fixed point or a log-det).
    pub fn block_of_residual(&self) -> std::collections::HashMap<NodeIndex, usize> {
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (b.residual, i))
            .collect()
    }

    /// Total latent dimension (flows) per sample.
    pub fn latent_dim(&self) -> usize {
        self.latents
            .iter()
            .map(|&l| self.dag[l].shape.iter().product::<usize>())
            .sum()
    }

    pub fn input_dim(&self) -> usize {
        self.spec.input.iter().product()
    }

    pub fn param_count(&self) -> usize {
        self.params.values().map(|t| t.data.len()).sum()
    }

    /// Multiply-accumulates of one forward pass per sample.
    pub fn forward_macs(&self) -> u64 {
        self.dag
            .node_indices()
            .map(|i| self.dag[i].op.macs(&self.dag[i].shape))
            .sum()
    }

    /// Multiply-accumulates of one evaluation of a block's branch g.
    pub fn block_macs(&self, b: usize) -> u64 {
        self.blocks[b]
            .body
            .iter()
            .map(|&i| self.dag[i].op.macs(&self.dag[i].shape))
            .sum()
    }

    /// Every parameter an op needs, with its expected shape.
    pub fn expected_params(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        for ix in self.dag.node_indices() {
            let n = &self.dag[ix];
            for (suffix, shape) in n.op.params(&self.input_shape(ix)) {
                v.push((param_name(&n.name, suffix), shape));
            }
        }
        if !self.latents.is_empty() {
            let d = self.latent_dim();
            v.push(("prior.mean".into(), vec![d]));
            v.push(("prior.log_std".into(), vec![d]));
        }
        v.sort();
        v
    }

    /// Structural checks: acyclic, shapes consistent with the ops, blocks
    /// well-formed, every parameter present with its shape.
    pub fn verify(&self) -> Result<()> {
        let order = self.topo_order()?;
        for &ix in &order {
            let n = &self.dag[ix];
            if n.op == Op::Input {
                continue;
            }
            let ins = self.inputs(ix);
            let shapes: Vec<&[usize]> = ins.iter().map(|&i| self.dag[i].shape.as_slice()).collect();
            let inferred = n.op.infer_shape(&shapes).map_err(|reason| Error::Graph {
                node: n.name.clone(),
                reason,
            })?;
            if inferred != n.shape {
                return Err(Error::Graph {
                    node: n.name.clone(),
                    reason: format!("recorded shape {:?} but inferred {inferred:?}", n.shape),
                });
            }
        }
        for (bi, b) in self.blocks.iter().enumerate() {
            let bad = |reason: String| Error::Graph {
                node: b.name.clone(),
                reason,
            };
            let (first, last) = match (b.body.first(), b.body.last()) {
                (Some(f), Some(l)) => (*f, *l),
                _ => return Err(bad("empty residual branch".into())),
            };
            if self.inputs(first) != vec![b.actnorm] {
                return Err(bad("branch does not start at the block's ActNorm".into()));
            }
            if self.inputs(b.residual) != vec![b.actnorm, last] {
                return Err(bad("residual add does not read [actnorm, branch]".into()));
            }
            for w in b.body.windows(2) {
                if self.inputs(w[1]) != vec![w[0]] {
                    return Err(bad("branch is not a chain".into()));
                }
            }
            for &ix in &b.body {
                if self.dag[ix].block != Some(bi) || self.dag[ix].op.vjp_supported().is_none() {
                    return Err(bad(format!(
                        "node `{}` cannot be part of a residual branch",
                        self.dag[ix].name
                    )));
                }
            }
        }
        for (name, shape) in self.expected_params() {
            match self.params.get(&name) {
                None => {
                    return Err(Error::Graph {
                        node: name,
                        reason: "missing parameter".into(),
                    })
                }
                Some(t) if t.shape != shape => {
                    return Err(Error::Graph {
                        node: name,
                        reason: format!("parameter shape {:?}, expected {shape:?}", t.shape),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Op {
    /// `Some(())` for ops with a vjp (the ones allowed inside a branch).
    fn vjp_supported(&self) -> Option<()> {
        matches!(self, Op::Conv2d { .. } | Op::Dense { .. } | Op::Act { .. }).then_some(())
    }
}

/// Builds the graph of a spec with the given parameters (checked) and verifies it.
pub fn build_with_params(spec: &ModelSpec, params: Params) -> Result<Graph> {
    let mut g = build(spec)?;
    g.params = params;
    g.verify()?;
    Ok(g)
}
