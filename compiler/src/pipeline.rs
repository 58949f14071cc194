//! The front half of the compiler as one call: model file -> verified,
//! spectrally normalized and certified graph.

use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::ir::{self, Graph};
use crate::passes::{self, shapes::ShapeReport, LipschitzReport};
use crate::spec::ModelSpec;
use crate::weights;

#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Graph,
    pub shapes: ShapeReport,
    pub lipschitz: LipschitzReport,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions<'a> {
    /// safetensors file; None = deterministic init.
    pub weights: Option<&'a Path>,
    /// Init seed (overrides the spec's `seed`).
    pub seed: Option<u64>,
}

/// Parses, builds, loads or initializes weights, infers shapes, normalizes
/// and certifies. `progress(done, total)` reports the Lipschitz pass.
pub fn load_model(
    path: &Path,
    opts: &LoadOptions<'_>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Model> {
    let spec = ModelSpec::from_file(path)?;
    load_spec(spec, opts, progress)
}

pub fn load_spec(
    spec: ModelSpec,
    opts: &LoadOptions<'_>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Model> {
    let mut graph = ir::build(&spec)?;
    graph.params = match opts.weights {
        Some(w) => weights::load(&graph, w)?,
        None => weights::init(&graph, opts.seed.unwrap_or(spec.seed)),
    };
    let shapes = passes::infer_shapes(&mut graph)?;
    let lipschitz = passes::lipschitz::certify_with_progress(&mut graph, progress)?;
    Ok(Model {
        graph,
        shapes,
        lipschitz,
    })
}

/// Loads a compiled bundle's model: its `model.toml`, its (already normalized) weights and
/// the certificate of `report.json`, checked against the weights themselves and every other
/// file of the bundle ([`crate::bundle_check`]); the estimating half of the Lipschitz pass is
/// not run again.
pub fn load_bundle(dir: &Path, _progress: &(dyn Fn(usize, usize) + Sync)) -> Result<Model> {
    crate::bundle::load_verified(dir)
}

/// Cost and certificate summary (what `iresnetc inspect --json` prints and
/// what a bundle's report.json holds).
#[derive(Clone, Debug, Serialize)]
pub struct Summary<'a> {
    pub model: &'a str,
    pub kind: crate::spec::ModelKind,
    pub input: &'a [usize],
    pub parameters: usize,
    pub forward_flops_per_sample: u64,
    pub stage_shapes: &'a [Vec<usize>],
    pub latent_dim: usize,
    pub lipschitz: &'a LipschitzReport,
}

impl Model {
    pub fn summary(&self) -> Summary<'_> {
        Summary {
            model: &self.graph.spec.name,
            kind: self.graph.spec.kind,
            input: &self.graph.spec.input,
            parameters: self.graph.param_count(),
            forward_flops_per_sample: 2 * self.graph.forward_macs(),
            stage_shapes: &self.shapes.stage_shapes,
            latent_dim: self.graph.latent_dim(),
            lipschitz: &self.lipschitz,
        }
    }
}

impl Model {
    /// What every backend needs to know of this model (written into bundles as `plan.json`'s
    /// `info`).
    pub fn info(&self) -> iresnetc_runtime::ModelInfo {
        let g = &self.graph;
        let kind = match g.spec.kind {
            crate::spec::ModelKind::Flow => iresnetc_runtime::ModelKind::Flow,
            crate::spec::ModelKind::Classifier => iresnetc_runtime::ModelKind::Classifier,
        };
        let output_dim = match g.logits {
            Some(l) => g.node(l).shape.iter().product(),
            None => g.latent_dim(),
        };
        let cap = g.spec.inverse.max_iters.max(1);
        iresnetc_runtime::ModelInfo {
            name: g.spec.name.clone(),
            kind,
            input_shape: g.spec.input.clone(),
            output_dim,
            dequantize: g.spec.data.dequantize,
            logdet: g.spec.logdet.clone(),
            blocks: g.blocks.iter().map(|b| b.name.clone()).collect(),
            // The certificate's count for the tolerance, within the model file's cap.
            inverse_iters: (0..g.blocks.len())
                .map(|b| {
                    self.lipschitz
                        .blocks
                        .get(b)
                        .map_or(1, |r| r.inverse_iters)
                        .clamp(1, cap)
                })
                .collect(),
            inverse_tol: g.spec.inverse.tol,
        }
    }
}
