//! Graphviz export (`iresnetc graph MODEL.toml --dot`): one cluster per block.

use std::fmt::Write;

use petgraph::visit::{EdgeRef, IntoEdgeReferences};

use super::Graph;

pub fn to_dot(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "digraph \"{}\" {{\n  rankdir=TB;\n  node [shape=box, fontname=monospace, fontsize=10];",
        g.spec.name
    );
    let label = |ix: petgraph::stable_graph::NodeIndex| {
        let n = &g.dag[ix];
        format!("{}\\n{} {:?}", n.name, n.op.kind(), n.shape)
    };
    for ix in g.dag.node_indices() {
        if g.dag[ix].block.is_none() {
            let _ = writeln!(s, "  n{} [label=\"{}\"];", ix.index(), label(ix));
        }
    }
    for (bi, b) in g.blocks.iter().enumerate() {
        let _ = writeln!(
            s,
            "  subgraph cluster_{bi} {{\n    label=\"{} g\"; style=dashed;",
            b.name
        );
        for &ix in &b.body {
            let _ = writeln!(s, "    n{} [label=\"{}\"];", ix.index(), label(ix));
        }
        let _ = writeln!(s, "  }}");
    }
    for e in g.dag.edge_references() {
        let _ = writeln!(s, "  n{} -> n{};", e.source().index(), e.target().index());
    }
    s.push_str("}\n");
    s
}
