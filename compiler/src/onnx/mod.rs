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
//!
//! A bundle carries the whole forward graph (for other runtimes) and the model cut into
//! per-block segments ([`segment`]), which tract loads in time linear in the model's size.

mod build;
mod external;
mod proto;
pub mod segment;

pub use build::ConvStyle;
pub use proto::{BATCH, IR_VERSION, OPSET};

use prost::Message;
use tract_onnx::pb::ModelProto;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::pipeline::Model;
use crate::spec::{Estimator, LogDetSpec, ModelKind, ProbeKind};
use build::Emitter;
use iresnetc_runtime::onnx_data::ONNX_DATA_FILE;
use iresnetc_runtime::plan::WEIGHTS_FILE;
use iresnetc_runtime::tract::{
    GraphEntry, LatentPart, Manifest, Port, ProbeBlock, ProbeLayout, Value, MANIFEST_FILE,
    MANIFEST_FORMAT, MANIFEST_VERSION,
};
use proto::{batched, Dim};
use segment::NamedGraphs;

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

/// z's parts in concatenation order.
fn latent_parts(g: &Graph) -> Vec<LatentPart> {
    let mut offset = 0;
    g.latents
        .iter()
        .map(|&l| {
            let n = g.node(l);
            let part = LatentPart {
                name: n.name.clone(),
                offset,
                shape: n.shape.clone(),
            };
            offset += n.shape.iter().product::<usize>();
            part
        })
        .collect()
}

/// The manifest of the whole-model graphs: `forward.onnx`, and `forward_logdet.onnx` with
/// `ld`, `inverse.onnx` with non-empty `steps` (flows); no segments.
pub fn manifest(g: &Graph, ld: Option<&LogDetExport>, steps: &[usize]) -> Manifest {
    let flow = g.spec.kind == ModelKind::Flow;
    let probes = ld.map(|l| l.probe_layout(g)).filter(|p| p.total > 0);
    let port = |name: &str, value: Value, shape: &[usize]| Port {
        name: name.into(),
        value,
        shape: shape.to_vec(),
    };
    let input = port("input", Value::Input, &g.spec.input);
    let out = if flow {
        port("z", Value::Z, &[output_dim(g)])
    } else {
        port("logits", Value::Logits, &[output_dim(g)])
    };
    let entry = |file: &str, inputs: Vec<Port>, outputs: Vec<Port>| GraphEntry {
        file: file.into(),
        inputs,
        outputs,
    };
    let forward_logdet = ld.filter(|_| flow).map(|_| {
        let mut inputs = vec![input.clone()];
        if let Some(p) = &probes {
            inputs.push(port("probes", Value::Probes, &[p.total]));
        }
        entry(
            FORWARD_LOGDET_FILE,
            inputs,
            vec![out.clone(), port("logdet", Value::Logdet, &[])],
        )
    });
    Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        model: g.spec.name.clone(),
        kind: if flow { "flow" } else { "classifier" }.into(),
        input_shape: g.spec.input.clone(),
        output_dim: output_dim(g),
        forward: entry(FORWARD_FILE, vec![input.clone()], vec![out.clone()]),
        forward_logdet,
        inverse: (flow && !steps.is_empty()).then(|| {
            entry(
                INVERSE_FILE,
                vec![out.clone()],
                vec![port("x", Value::Input, &g.spec.input)],
            )
        }),
        inverse_steps: if flow { steps.to_vec() } else { vec![] },
        probes,
        logdet_estimator: ld.map(|l| l.name()).unwrap_or("none").into(),
        logdet_terms: match ld {
            Some(LogDetExport::Series { terms, .. }) => *terms,
            _ => 0,
        },
        default_probe_seed: g.spec.logdet.seed,
        latents: if flow { latent_parts(g) } else { vec![] },
        segments: vec![],
    }
}

/// The graphs a bundle carries for tract, in memory: the whole `forward.onnx` (for other
/// runtimes), and the model cut into per-block segments under `segments/` (forward; for
/// flows forward + log-det with the model's estimator, left out when it cannot be exported,
/// e.g. roulette; and the inverse with the certified step counts), with their manifest. Their
/// large initializers are references into `weights.safetensors` or `onnx.bin` ([`external`]).
pub fn bundle_graphs(
    model: &crate::pipeline::Model,
) -> crate::Result<(Manifest, std::collections::BTreeMap<String, Vec<u8>>)> {
    let g = &model.graph;
    let style = ConvStyle::default();
    let mut graphs: NamedGraphs = vec![(FORWARD_FILE.to_string(), forward(g, style)?)];
    let flow = g.spec.kind == ModelKind::Flow;
    // A bundle of a roulette model still gets its forward and inverse graphs.
    let ld = if flow {
        LogDetExport::from_spec(g, &g.spec.logdet).ok()
    } else {
        None
    };
    let steps = if flow { certified_steps(model) } else { vec![] };
    let (segments, models) = segment::bundle_segments(g, ld.as_ref(), &steps, style)?;
    graphs.extend(models);
    // The weights file exactly as the bundle stores it, so the graphs can point into it.
    let weights = crate::weights::to_safetensors(&g.params)?;
    let data = external::externalize(graphs.iter_mut().map(|(_, m)| m), &weights)?;
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = graphs
        .iter()
        .map(|(name, m)| (name.clone(), encode(m)))
        .collect();
    // Every initializer a layout change derives from a stored weight is computed in the
    // graph, so this file is usually empty, and then not written.
    if !data.is_empty() {
        files.insert(ONNX_DATA_FILE.to_string(), data);
    }
    files.insert(WEIGHTS_FILE.to_string(), weights);
    let mut m = manifest(g, ld.as_ref(), &[]);
    m.forward_logdet = None;
    m.inverse_steps = steps;
    m.segments = segments;
    Ok((m, files))
}

/// Writes [`bundle_graphs`] and `onnx.json` into `dir`.
pub fn write_bundle_graphs(
    model: &crate::pipeline::Model,
    dir: &std::path::Path,
) -> crate::Result<()> {
    let (m, files) = bundle_graphs(model)?;
    let seg_dir = dir.join(segment::SEGMENT_DIR);
    std::fs::create_dir_all(&seg_dir).map_err(|e| Error::Io {
        path: seg_dir.clone(),
        source: e,
    })?;
    for (name, bytes) in &files {
        // The bundle writes its weights itself (the same bytes: `to_safetensors` of the
        // same parameters).
        if name != WEIGHTS_FILE {
            crate::fsutil::write_atomic(&dir.join(name), bytes)?;
        }
    }
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::Unsupported {
        what: MANIFEST_FILE.into(),
        reason: e.to_string(),
    })?;
    crate::fsutil::write_atomic(&dir.join(MANIFEST_FILE), json.as_bytes())
}
