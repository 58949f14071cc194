//! The tract backend: a bundle's per-block segment graphs on the CPU (f32), chained by
//! [`SegmentRunner`]; each graph is optimized by tract once per batch size and kept. The
//! log-det graphs were exported for one estimator (the model file's); another estimator is
//! refused with the way to get it. Decoding iterates each block's one-step graph until the
//! model's `inverse.tol` holds, at most the certified count, and reports the iterations.

use crate::bundle::Bundle;
use crate::engine::{
    require_kind, Backend, BackendInfo, Batch, BlockInversion, Decoded, Encoded, ModelInfo,
    Precision, Prior,
};
use crate::error::{Result, RuntimeError};
use crate::logdet::{LogDetMethod, ProbeKind};
use crate::plan::ModelKind;
use crate::tract::TractBundle;
use crate::tract_segments::{ProbeDraw, SegmentRunner};

pub struct TractBackend {
    runner: SegmentRunner,
    info: ModelInfo,
    prior: Option<Prior>,
}

impl TractBackend {
    /// A bundle's graphs (`graphs`) with the model description and prior of its plan.
    pub fn new(bundle: &Bundle, graphs: TractBundle) -> Result<TractBackend> {
        let info = super::bundle_info(bundle)?;
        let prior = if info.is_flow() {
            Some(super::bundle_prior(bundle, &info)?)
        } else {
            None
        };
        if graphs.manifest.input_shape != info.input_shape {
            return Err(RuntimeError::corrupt(
                crate::tract::MANIFEST_FILE,
                format!(
                    "input shape {:?} contradicts plan.json's {:?}",
                    graphs.manifest.input_shape, info.input_shape
                ),
            ));
        }
        let blocks = graphs
            .manifest
            .segments
            .iter()
            .filter(|s| s.inverse.is_some())
            .count();
        if info.is_flow() && blocks != info.blocks.len() {
            return Err(RuntimeError::corrupt(
                crate::tract::MANIFEST_FILE,
                format!(
                    "{blocks} invertible segments, plan.json lists {} blocks",
                    info.blocks.len()
                ),
            ));
        }
        Ok(TractBackend {
            runner: SegmentRunner::new(graphs)?,
            info,
            prior,
        })
    }

    /// The probes for `method` if the exported log-det graphs compute that estimator
    /// (None: the estimator takes no probes).
    fn check_estimator(&self, method: &LogDetMethod, first: usize) -> Result<Option<ProbeDraw>> {
        let m = self.runner.manifest();
        let refuse = |what: String| {
            Err(RuntimeError::Unsupported(format!(
                "the bundle's ONNX log-det graph computes {} ({} terms, {} probes); {what}: set it in the model file's [logdet] and recompile, or use --backend cpu or reference",
                m.logdet_estimator,
                m.logdet_terms,
                m.probes.as_ref().and_then(|p| p.blocks.first()).map_or(0, |b| b.count)
            )))
        };
        match (method, m.logdet_estimator.as_str(), &m.probes) {
            (LogDetMethod::Exact, "exact2d", _) => Ok(None),
            (
                LogDetMethod::Series {
                    terms,
                    probes,
                    kind,
                    seed,
                },
                "series",
                Some(layout),
            ) if *terms == m.logdet_terms
                && layout.blocks.iter().all(|b| b.count == *probes)
                && layout.rademacher == (*kind == ProbeKind::Rademacher) =>
            {
                Ok(Some(ProbeDraw {
                    seed: *seed,
                    first_sample: first,
                }))
            }
            (LogDetMethod::Roulette { .. }, _, _) => refuse(
                "the roulette estimator has a random term count and cannot be exported".into(),
            ),
            (other, _, _) => refuse(format!("{other:?} was asked for")),
        }
    }

    fn forward(
        &mut self,
        x: &Batch,
        logdet: Option<Option<ProbeDraw>>,
    ) -> Result<(Batch, Option<Vec<f64>>)> {
        let xs = x.to_f32("input")?;
        let out = self.runner.forward(&xs, x.batch, logdet)?;
        Ok((
            Batch::from_f32(&out.out, x.batch),
            out.logdet
                .map(|l| l.iter().map(|&v| f64::from(v)).collect()),
        ))
    }
}

impl Backend for TractBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "tract",
            device: format!("CPU, {} threads", crate::tract::threads().max(1)),
            precision: Precision::F32,
        }
    }

    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn prior(&self) -> Result<Prior> {
        self.prior
            .clone()
            .ok_or_else(|| RuntimeError::Unsupported("a classifier has no prior".into()))
    }

    fn encode(&mut self, x: &Batch, logdet: &LogDetMethod, first_sample: usize) -> Result<Encoded> {
        require_kind(&self.info, ModelKind::Flow, "encode")?;
        let draw = match logdet {
            LogDetMethod::None => None,
            m => Some(self.check_estimator(m, first_sample)?),
        };
        let (z, logdet) = self.forward(x, draw)?;
        Ok(Encoded { z, logdet })
    }

    fn decode(&mut self, z: &Batch) -> Result<Decoded> {
        require_kind(&self.info, ModelKind::Flow, "decode")?;
        let zs = z.to_f32("z")?;
        let (x, stats) = self.runner.inverse(&zs, z.batch, self.info.inverse_tol)?;
        Ok(Decoded {
            x: Batch::from_f32(&x, z.batch),
            converged: Some(stats.iter().all(|s| s.converged)),
            blocks: self
                .info
                .blocks
                .iter()
                .zip(&stats)
                .map(|(name, s)| BlockInversion {
                    block: name.clone(),
                    iters: s.iters,
                    residual: s.change,
                })
                .collect(),
        })
    }

    fn classify(&mut self, x: &Batch) -> Result<Batch> {
        require_kind(&self.info, ModelKind::Classifier, "classify")?;
        Ok(self.forward(x, None)?.0)
    }
}
