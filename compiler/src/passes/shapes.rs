//! Shape inference: recomputes every node's per-sample shape from its inputs
//! in topological order, then runs the verifier.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::Op;

#[derive(Clone, Debug, Serialize)]
pub struct ShapeReport {
    pub nodes: usize,
    /// Shape entering each stage (after its optional squeeze).
    pub stage_shapes: Vec<Vec<usize>>,
    pub latent_dim: usize,
}

pub fn infer_shapes(g: &mut Graph) -> Result<ShapeReport> {
    for ix in g.topo_order()? {
        if g.dag[ix].op == Op::Input {
            continue;
        }
        let ins = g.inputs(ix);
        let shapes: Vec<Vec<usize>> = ins.iter().map(|&i| g.dag[i].shape.clone()).collect();
        let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        let node = &mut g.dag[ix];
        node.shape = node.op.infer_shape(&refs).map_err(|reason| Error::Graph {
            node: node.name.clone(),
            reason,
        })?;
    }
    g.verify()?;
    let mut stage_shapes = vec![];
    for b in &g.blocks {
        if stage_shapes.len() == b.stage {
            stage_shapes.push(g.dag[b.actnorm].shape.clone());
        }
    }
    Ok(ShapeReport {
        nodes: g.dag.node_count(),
        stage_shapes,
        latent_dim: g.latent_dim(),
    })
}
