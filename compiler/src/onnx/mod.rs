//! ONNX export of a certified graph: standard ONNX (ir_version 8, opset 13,
//! no extensions), f32 weights as initializers (already spectrally normalized),
//! symbolic batch `batch`, node names from the IR.
//!
//! Three graphs per model:
//! - forward: `input [batch, ...] -> z [batch, D]` (flows) or `logits` (classifiers);
//! - forward + log-det (flows): `input, probes [batch, P] -> z, logdet [batch]`,
//!   the truncated series `sum_k (-1)^(k+1) <v, J_g^k v> / k` per block with
//!   the vjp of g written out (convs with the adjoint kernel, MatMul, a product
//!   with the activation derivative), plus ActNorm's constant `H*W*sum(log_scale)`;
//!   the probe layout is [`iresnetc_runtime::tract::ProbeLayout`];
//! - inverse (flows): `z -> x`, each block's fixed point `x <- y - g(x)` from
//!   `x = y` unrolled a fixed number of times (ONNX `Loop` is not run by tract).

mod build;
mod proto;

pub use build::ConvStyle;
pub use proto::{BATCH, IR_VERSION, OPSET};

use prost::Message;
use tract_onnx::pb::ModelProto;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::pipeline::Model;
use crate::spec::{Estimator, LogDetSpec, ModelKind, ProbeKind};
use build::Emitter;
use iresnetc_runtime::tract::{
    GraphEntry, Manifest, ProbeBlock, ProbeLayout, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use proto::{batched, Dim};

/// Which log-det estimator the forward + log-det graph computes.
#[derive(Clone, Debug, PartialEq)]
pub enum LogDetExport {
    /// Hutchinson's truncated series with `probes` probes per block (an input).
    Series {
        terms: usize,
        probes: usize,
        rademacher: bool,
    },
    /// `ln|det(I + J_g)|` in closed form; every block must be 2-D (toy flows).
    Exact2d,
}

impl LogDetExport {
    /// The export of a model's log-det settings, or why it has none.
    pub fn from_spec(g: &Graph, s: &LogDetSpec) -> Result<LogDetExport> {
        match s.estimator {
            Estimator::Series => Ok(LogDetExport::Series {
                terms: s.terms,
                probes: s.probes,
                rademacher: s.probe == ProbeKind::Rademacher,
            }),
            Estimator::Exact => {
                if let Some(b) = g.blocks.iter().find(|b| g.node(b.actnorm).shape != [2]) {
                    return Err(Error::Unsupported {
                        what: format!("ONNX export of logdet.estimator = \"exact\" (block `{}`)", b.name),
                        reason: "the exact log-det is exported for 2-D blocks only; use \"series\"".into(),
                    });
                }
                Ok(LogDetExport::Exact2d)
            }
            Estimator::Roulette => Err(Error::Unsupported {
                what: "ONNX export of logdet.estimator = \"roulette\"".into(),
                reason: "its random number of terms cannot be a fixed graph; use \"series\" (--estimator series)".into(),
            }),
        }
    }

    /// Where each block's probes sit in the `probes` input (None for Exact2d).
    pub fn probe_layout(&self, g: &Graph) -> ProbeLayout {
        let (count, rademacher) = match *self {
            LogDetExport::Series {
                probes, rademacher, ..
            } => (probes, rademacher),
            LogDetExport::Exact2d => (0, false),
        };
        let mut offset = 0;
        let blocks = g
            .blocks
            .iter()
            .map(|b| {
                let dim: usize = g.node(b.actnorm).shape.iter().product();
                let pb = ProbeBlock {
                    name: b.name.clone(),
                    dim,
                    offset,
                    count,
                };
                offset += dim * count;
                pb
            })
            .collect();
        ProbeLayout {
            total: offset,
            rademacher,
            blocks,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            LogDetExport::Series { .. } => "series",
            LogDetExport::Exact2d => "exact2d",
        }
    }
}

fn output_name(g: &Graph) -> &'static str {
    match g.spec.kind {
        ModelKind::Flow => "z",
        ModelKind::Classifier => "logits",
    }
}

fn output_dim(g: &Graph) -> usize {
    match g.spec.kind {
        ModelKind::Flow => g.latent_dim(),
        ModelKind::Classifier => g
            .logits
            .map(|l| g.node(l).shape.iter().product())
            .unwrap_or(0),
    }
}

/// The forward graph.
pub fn forward(g: &Graph, style: ConvStyle) -> Result<ModelProto> {
    let mut e = Emitter::new(g, style);
    e.og.declare_input("input", &batched(&g.spec.input));
    let (out, _) = e.forward("input", None)?;
    let name = output_name(g);
    e.og.declare_output(name, &out, &batched(&[output_dim(g)]));
    Ok(e.og.into_model(&format!("{}.forward", g.spec.name), "iresnetc forward pass"))
}

/// The forward + log-det graph of a flow.
pub fn forward_logdet(g: &Graph, ld: &LogDetExport, style: ConvStyle) -> Result<ModelProto> {
    if g.spec.kind != ModelKind::Flow {
        return Err(Error::Unsupported {
            what: format!("ONNX log-det export of model `{}`", g.spec.name),
            reason: "a classifier has no log-determinant".into(),
        });
    }
    let mut e = Emitter::new(g, style);
    e.og.declare_input("input", &batched(&g.spec.input));
    let layout = ld.probe_layout(g);
    if layout.total > 0 {
        e.og.declare_input("probes", &batched(&[layout.total]));
    }
    let (out, logdet) = e.forward("input", Some((ld, "probes")))?;
    e.og.declare_output("z", &out, &batched(&[g.latent_dim()]));
    if let Some(l) = logdet {
        e.og.declare_output("logdet", &l, &[Dim::Batch]);
    }
    Ok(e.og.into_model(
        &format!("{}.forward_logdet", g.spec.name),
        "iresnetc forward pass and log-det estimate",
    ))
}

/// The inverse graph of a flow, block b's fixed point unrolled `steps[b]` times.
pub fn inverse(g: &Graph, steps: &[usize], style: ConvStyle) -> Result<ModelProto> {
    let mut e = Emitter::new(g, style);
    e.og.declare_input("z", &batched(&[g.latent_dim()]));
    let x = e.inverse("z", steps)?;
    e.og.declare_output("x", &x, &batched(&g.spec.input));
    Ok(e.og.into_model(
        &format!("{}.inverse", g.spec.name),
        "iresnetc inverse, fixed point unrolled",
    ))
}

/// One fixed-point step of block `b`: `y, x -> y - g(x)` (`[batch, block shape]`).
///
/// tract's optimizer takes time quadratic in the node count (measured: 6.8k
/// nodes 6 s, 13k nodes 43 s), so a fully unrolled inverse of a big model
/// (CIFAR: ~1700 branch copies) cannot be loaded there; the tract backend
/// instead runs this small graph `steps[b]` times per block.
pub fn inverse_step(g: &Graph, b: usize, style: ConvStyle) -> Result<ModelProto> {
    let block = g.blocks.get(b).ok_or_else(|| Error::Graph {
        node: format!("block {b}"),
        reason: "no such block (ONNX inverse step)".into(),
    })?;
    let shape = g.node(block.actnorm).shape.clone();
    let mut e = Emitter::new(g, style);
    e.og.declare_input("y", &batched(&shape));
    e.og.declare_input("x", &batched(&shape));
    let (gx, _) = e.branch(b, "x", &|s| s.to_string())?;
    let next =
        e.og.node("Sub", &format!("{}.step", block.name), &["y", &gx], vec![]);
    e.og.declare_output("x_next", &next, &batched(&shape));
    Ok(e.og.into_model(
        &format!("{}.inverse_step", block.name),
        "iresnetc fixed-point step y - g(x)",
    ))
}

/// Per-block fixed-point steps the certificate asks for, capped by `inverse.max_iters`.
pub fn certified_steps(model: &Model) -> Vec<usize> {
    let cap = model.graph.spec.inverse.max_iters;
    model
        .lipschitz
        .blocks
        .iter()
        .map(|b| b.inverse_iters.min(cap))
        .collect()
}

pub fn encode(m: &ModelProto) -> Vec<u8> {
    m.encode_to_vec()
}

/// File names inside a bundle.
pub const FORWARD_FILE: &str = "forward.onnx";
pub const FORWARD_LOGDET_FILE: &str = "forward_logdet.onnx";
pub const INVERSE_FILE: &str = "inverse.onnx";

/// The manifest of the graphs [`write_bundle_graphs`] writes.
pub fn manifest(g: &Graph, ld: Option<&LogDetExport>, steps: &[usize]) -> Manifest {
    let flow = g.spec.kind == ModelKind::Flow;
    let probes = ld.map(|l| l.probe_layout(g)).filter(|p| p.total > 0);
    let entry = |file: &str, inputs: &[&str], outputs: &[&str]| GraphEntry {
        file: file.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
    };
    Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        model: g.spec.name.clone(),
        kind: if flow { "flow" } else { "classifier" }.into(),
        input_shape: g.spec.input.clone(),
        output_dim: output_dim(g),
        forward: entry(FORWARD_FILE, &["input"], &[output_name(g)]),
        forward_logdet: ld.map(|_| {
            if probes.is_some() {
                entry(FORWARD_LOGDET_FILE, &["input", "probes"], &["z", "logdet"])
            } else {
                entry(FORWARD_LOGDET_FILE, &["input"], &["z", "logdet"])
            }
        }),
        inverse: flow.then(|| entry(INVERSE_FILE, &["z"], &["x"])),
        inverse_steps: if flow { steps.to_vec() } else { vec![] },
        probes,
        logdet_estimator: ld.map(|l| l.name()).unwrap_or("none").into(),
        logdet_terms: match ld {
            Some(LogDetExport::Series { terms, .. }) => *terms,
            _ => 0,
        },
        default_probe_seed: g.spec.logdet.seed,
    }
}

/// The graphs a bundle carries for tract, in memory: `forward.onnx`, for flows
/// `forward_logdet.onnx` (the model's log-det settings; left out when they cannot be exported,
/// e.g. roulette) and `inverse.onnx` (certified step counts), with their manifest.
pub fn bundle_graphs(
    model: &crate::pipeline::Model,
) -> crate::Result<(Manifest, std::collections::BTreeMap<String, Vec<u8>>)> {
    let g = &model.graph;
    let style = ConvStyle::default();
    let mut files = std::collections::BTreeMap::new();
    files.insert(FORWARD_FILE.to_string(), encode(&forward(g, style)?));
    let mut ld = None;
    let mut steps = vec![];
    if g.spec.kind == ModelKind::Flow {
        // A bundle of a roulette model still gets its forward and inverse graphs.
        if let Ok(l) = LogDetExport::from_spec(g, &g.spec.logdet) {
            files.insert(
                FORWARD_LOGDET_FILE.to_string(),
                encode(&forward_logdet(g, &l, style)?),
            );
            ld = Some(l);
        }
        steps = certified_steps(model);
        files.insert(
            INVERSE_FILE.to_string(),
            encode(&inverse(g, &steps, style)?),
        );
    }
    Ok((manifest(g, ld.as_ref(), &steps), files))
}

/// Writes [`bundle_graphs`] and `onnx.json` into `dir`.
pub fn write_bundle_graphs(
    model: &crate::pipeline::Model,
    dir: &std::path::Path,
) -> crate::Result<()> {
    let (m, files) = bundle_graphs(model)?;
    for (name, bytes) in &files {
        crate::fsutil::write_atomic(&dir.join(name), bytes)?;
    }
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::Unsupported {
        what: MANIFEST_FILE.into(),
        reason: e.to_string(),
    })?;
    crate::fsutil::write_atomic(&dir.join(MANIFEST_FILE), json.as_bytes())
}
