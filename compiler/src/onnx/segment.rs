//! The model cut at block boundaries into small ONNX graphs (the bundle's `segments/`).
//!
//! tract's optimizer takes time superlinear in a graph's node count: a CIFAR flow's whole
//! forward + log-det graph (about 7k nodes) takes it a minute, its unrolled inverse far
//! longer. Segment s holds block s and the layout ops before it (squeeze, channel padding,
//! factor-out slices, ActNorm); the last segment also the ops after the last block (a
//! classifier's head). Each segment is written as its forward graph, its forward + log-det
//! graph (the block's probes as an input: its columns of the whole probe layout), and its
//! inverse as a one-step graph `y, x -> y - g(x)` the runtime iterates plus the inverse of
//! the layout ops. The graphs come from the same emitter walks as the whole-model graphs,
//! run over the segment's node range with the boundary values as graph inputs.

use std::collections::{HashMap, HashSet};

use petgraph::stable_graph::NodeIndex;
use tract_onnx::pb::ModelProto;

use super::build::{ConvStyle, Emitter, Pieces};
use super::proto::{batched, Dim};
use super::LogDetExport;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::Op;
use crate::spec::ModelKind;
use iresnetc_runtime::tract::{
    BlockOutputSource, GraphEntry, Port, ProbeLayout, Segment, SegmentInverse, Value,
};

/// Folder of the segment graphs inside a bundle.
pub const SEGMENT_DIR: &str = "segments";

/// Which nodes a segment holds and what crosses its boundary.
#[derive(Clone, Debug)]
pub struct SegmentPlan {
    /// The segment's block (None: a model without blocks, one segment).
    pub block: Option<usize>,
    /// Its nodes outside residual branches, in topological order (the input node excluded).
    pub nodes: Vec<NodeIndex>,
    /// The value it reads: the model input, or the previous block's output.
    pub carry_in: NodeIndex,
    /// The value the next segment reads (None for the last segment).
    pub carry_out: Option<NodeIndex>,
    /// The latent parts it outputs: (index in `Graph::latents`, node).
    pub latents: Vec<(usize, NodeIndex)>,
}

/// Cuts `g` after every block's residual add; the ops after the last block join the last
/// segment. Refuses a graph where a segment would read anything but its one carried value.
pub fn plan(g: &Graph) -> Result<Vec<SegmentPlan>> {
    let order = g.topo_order()?;
    let residuals: HashSet<NodeIndex> = g.blocks.iter().map(|b| b.residual).collect();
    // Residual adds strictly upstream of each node: block k's ActNorm and residual add have k.
    let mut depth: HashMap<NodeIndex, usize> = HashMap::new();
    for &ix in &order {
        let d = g
            .inputs(ix)
            .iter()
            .map(|i| depth.get(i).copied().unwrap_or(0) + usize::from(residuals.contains(i)))
            .max()
            .unwrap_or(0);
        depth.insert(ix, d);
    }
    let count = g.blocks.len().max(1);
    let seg_of = |ix: NodeIndex| depth.get(&ix).copied().unwrap_or(0).min(count - 1);
    let mut plans: Vec<SegmentPlan> = (0..count)
        .map(|s| SegmentPlan {
            block: (s < g.blocks.len()).then_some(s),
            nodes: vec![],
            carry_in: if s == 0 {
                g.input
            } else {
                g.blocks[s - 1].residual
            },
            carry_out: (s + 1 < count).then(|| g.blocks[s].residual),
            latents: vec![],
        })
        .collect();
    for &ix in &order {
        let n = g.node(ix);
        if n.op != Op::Input && n.block.is_none() {
            plans[seg_of(ix)].nodes.push(ix);
        }
    }
    for (i, &l) in g.latents.iter().enumerate() {
        plans[seg_of(l)].latents.push((i, l));
    }
    for (s, p) in plans.iter().enumerate() {
        let bad = |ix: NodeIndex, reason: &str| Error::Graph {
            node: g.node(ix).name.clone(),
            reason: format!("{reason} (segment {s} of the ONNX export)"),
        };
        if let Some(b) = p.block {
            let blk = &g.blocks[b];
            if seg_of(blk.actnorm) != s || seg_of(blk.residual) != s {
                return Err(bad(blk.actnorm, "block does not sit in its own segment"));
            }
        }
        let own: HashSet<NodeIndex> = p.nodes.iter().copied().collect();
        let body: HashSet<NodeIndex> = p
            .block
            .map(|b| g.blocks[b].body.iter().copied().collect())
            .unwrap_or_default();
        for &ix in &p.nodes {
            for i in g.inputs(ix) {
                if i != p.carry_in && !own.contains(&i) && !body.contains(&i) {
                    return Err(bad(ix, "reads a value from outside its segment"));
                }
            }
        }
        if let Some(c) = p.carry_out {
            if p.latents.iter().any(|&(_, l)| l == c) {
                return Err(bad(
                    c,
                    "a block output that is both latent and read further",
                ));
            }
        }
    }
    Ok(plans)
}

fn port(name: &str, value: Value, shape: &[usize]) -> Port {
    Port {
        name: name.into(),
        value,
        shape: shape.to_vec(),
    }
}

/// A graph under construction and the ports it declares.
struct Build<'g> {
    e: Emitter<'g>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

impl<'g> Build<'g> {
    fn new(g: &'g Graph, style: ConvStyle) -> Self {
        Build {
            e: Emitter::new(g, style),
            inputs: vec![],
            outputs: vec![],
        }
    }

    fn input(&mut self, name: &str, value: Value, shape: &[usize]) -> String {
        self.e.og.declare_input(name, &batched(shape));
        self.inputs.push(port(name, value, shape));
        name.to_string()
    }

    fn output(&mut self, name: &str, tensor: &str, value: Value, shape: &[usize]) {
        let dims = if shape.is_empty() {
            vec![Dim::Batch]
        } else {
            batched(shape)
        };
        self.e.og.declare_output(name, tensor, &dims);
        self.outputs.push(port(name, value, shape));
    }

    fn finish(self, file: &str, name: &str, doc: &str) -> (ModelProto, GraphEntry) {
        let model = self.e.og.into_model(name, doc);
        (
            model,
            GraphEntry {
                file: file.into(),
                inputs: self.inputs,
                outputs: self.outputs,
            },
        )
    }
}

fn latent_name(i: usize) -> String {
    format!("latent{i}")
}

/// Segment `p`'s forward graph (with `ld`, its forward + log-det graph).
pub fn forward(
    g: &Graph,
    p: &SegmentPlan,
    ld: Option<(&LogDetExport, &ProbeLayout)>,
    style: ConvStyle,
    file: &str,
) -> Result<(ModelProto, GraphEntry)> {
    let mut b = Build::new(g, style);
    let carry = b.input("carry", Value::Carry, &g.node(p.carry_in).shape);
    let mut walk_ld = None;
    if let Some((export, layout)) = ld {
        let blk = p.block.and_then(|i| layout.blocks.get(i));
        let (base, width) = blk.map_or((0, 0), |pb| (pb.offset, pb.count * pb.dim));
        if width > 0 {
            b.input("probes", Value::Probes, &[width]);
        }
        walk_ld = Some((export, "probes", base));
    }
    let mut vals = HashMap::from([(p.carry_in, carry)]);
    let walk = b.e.forward_walk(&p.nodes, &mut vals, walk_ld)?;
    let value = |ix: NodeIndex| {
        vals.get(&ix).cloned().ok_or_else(|| Error::Graph {
            node: g.node(ix).name.clone(),
            reason: "not computed by its segment (ONNX export)".into(),
        })
    };
    if let Some(c) = p.carry_out {
        b.output("carry_out", &value(c)?, Value::Carry, &g.node(c).shape);
    }
    for &(i, l) in &p.latents {
        let t = value(l)?;
        b.output(
            &latent_name(i),
            &t,
            Value::Latent { index: i },
            &g.node(l).shape,
        );
    }
    if g.spec.kind == ModelKind::Classifier && p.carry_out.is_none() {
        let l = g.logits.ok_or_else(|| Error::Graph {
            node: "head".into(),
            reason: "classifier without a logits node".into(),
        })?;
        let t = value(l)?;
        b.output("logits", &t, Value::Logits, &g.node(l).shape);
    }
    if ld.is_some() {
        let t = b.e.logdet_total(walk)?;
        b.output("logdet", &t, Value::Logdet, &[]);
    }
    let what = if ld.is_some() {
        "forward_logdet"
    } else {
        "forward"
    };
    Ok(b.finish(
        file,
        &format!("{}.segment{}.{what}", g.spec.name, p.block.unwrap_or(0)),
        "iresnetc segment: one block and the layout ops before it",
    ))
}

/// The inverse of the ops `nodes` (topological order) from the known `vals` and the
/// latent inputs among them, recovering `target`.
fn layout_inverse(
    b: &mut Build<'_>,
    p: &SegmentPlan,
    nodes: &[NodeIndex],
    mut vals: HashMap<NodeIndex, String>,
    target: NodeIndex,
) -> Result<String> {
    let g = b.e.g;
    for &(i, l) in &p.latents {
        if nodes.contains(&l) {
            let t = b.input(
                &latent_name(i),
                Value::Latent { index: i },
                &g.node(l).shape,
            );
            vals.insert(l, t);
        }
    }
    let mut pieces = Pieces::new();
    let rev: Vec<NodeIndex> = nodes.iter().rev().copied().collect();
    b.e.inverse_walk(&rev, &mut vals, &mut pieces, &[])?;
    b.e.resolve(target, &mut vals, &mut pieces)
}

/// Segment `p`'s inverse graphs (flows): where its block's output comes from, the one-step
/// graph and the inverse of the layout ops. `files(part)` names each file.
pub fn inverse(
    g: &Graph,
    p: &SegmentPlan,
    steps: usize,
    style: ConvStyle,
    files: &dyn Fn(&str) -> String,
) -> Result<(SegmentInverse, NamedGraphs)> {
    let bi = p.block.ok_or_else(|| Error::Unsupported {
        what: format!("ONNX inverse export of model `{}`", g.spec.name),
        reason: "the model has no residual blocks".into(),
    })?;
    let blk = &g.blocks[bi];
    let mut models = vec![];
    // Nodes downstream of the residual add (the last segment's trailing ops) are undone
    // before the fixed point; the others after it.
    let mut after: HashSet<NodeIndex> = HashSet::from([blk.residual]);
    for &ix in &p.nodes {
        if g.inputs(ix).iter().any(|i| after.contains(i)) {
            after.insert(ix);
        }
    }
    let (after_nodes, before_nodes): (Vec<NodeIndex>, Vec<NodeIndex>) = p
        .nodes
        .iter()
        .filter(|&&ix| ix != blk.residual)
        .partition(|ix| after.contains(ix));

    let block_output = if p.carry_out == Some(blk.residual) {
        BlockOutputSource::Carry
    } else if let Some(&(index, _)) = p.latents.iter().find(|&&(_, l)| l == blk.residual) {
        BlockOutputSource::Latent { index }
    } else {
        let mut b = Build::new(g, style);
        let y = layout_inverse(&mut b, p, &after_nodes, HashMap::new(), blk.residual)?;
        b.output("y", &y, Value::BlockOutput, &g.node(blk.residual).shape);
        let file = files("block_output");
        let (m, e) = b.finish(
            &file,
            &format!("{}.block_output", blk.name),
            "iresnetc segment: the block's output from the ops after it",
        );
        models.push((file, m));
        BlockOutputSource::Graph(e)
    };

    let shape = g.node(blk.actnorm).shape.clone();
    let step_file = files("step");
    models.push((step_file.clone(), super::inverse_step(g, bi, style)?));
    let step = GraphEntry {
        file: step_file,
        inputs: vec![
            port("y", Value::BlockOutput, &shape),
            port("x", Value::BlockInput, &shape),
        ],
        outputs: vec![port("x_next", Value::BlockInput, &shape)],
    };

    let mut b = Build::new(g, style);
    let x = b.input("x", Value::BlockInput, &shape);
    let carry = layout_inverse(
        &mut b,
        p,
        &before_nodes,
        HashMap::from([(blk.actnorm, x)]),
        p.carry_in,
    )?;
    b.output("carry", &carry, Value::Carry, &g.node(p.carry_in).shape);
    let file = files("layout_inverse");
    let (m, layout) = b.finish(
        &file,
        &format!("{}.layout_inverse", blk.name),
        "iresnetc segment: the inverse of the ops before the block",
    );
    models.push((file, m));
    Ok((
        SegmentInverse {
            steps,
            block_output,
            step,
            layout,
        },
        models,
    ))
}

/// ONNX graphs with the file names they are written under.
pub type NamedGraphs = Vec<(String, ModelProto)>;

/// Every segment's graphs, named `segments/{index}.{part}.onnx`, and their manifest entries.
/// `ld`: the log-det estimator the log-det graphs compute (None: no log-det graphs);
/// `steps`: certified fixed-point steps per block (flows).
pub fn bundle_segments(
    g: &Graph,
    ld: Option<&LogDetExport>,
    steps: &[usize],
    style: ConvStyle,
) -> Result<(Vec<Segment>, NamedGraphs)> {
    let layout = ld.map(|l| l.probe_layout(g));
    let flow = g.spec.kind == ModelKind::Flow;
    let mut segments = vec![];
    let mut models = vec![];
    for (s, p) in plan(g)?.iter().enumerate() {
        let name = |part: &str| format!("{SEGMENT_DIR}/{s:03}.{part}.onnx");
        let (m, forward_entry) = forward(g, p, None, style, &name("forward"))?;
        models.push((forward_entry.file.clone(), m));
        let mut forward_logdet = None;
        if let (Some(l), Some(layout), Some(_)) = (ld, &layout, p.block) {
            let (m, e) = forward(g, p, Some((l, layout)), style, &name("forward_logdet"))?;
            models.push((e.file.clone(), m));
            forward_logdet = Some(e);
        }
        let mut inverse_entry = None;
        if flow {
            if let Some(b) = p.block {
                let k = steps.get(b).copied().unwrap_or(1);
                let (inv, ms) = inverse(g, p, k, style, &name)?;
                models.extend(ms);
                inverse_entry = Some(inv);
            }
        }
        segments.push(Segment {
            block: p.block,
            forward: forward_entry,
            forward_logdet,
            inverse: inverse_entry,
        });
    }
    Ok((segments, models))
}
