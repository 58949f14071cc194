//! The tract backend: a bundle's ONNX graphs on the CPU (f32). Each graph is optimized by
//! tract once per batch size and kept. The log-det graph was exported for one estimator (the
//! model file's); another estimator is refused with the way to get it.

use std::collections::HashMap;

use crate::bundle::Bundle;
use crate::engine::{
    require_kind, Backend, BackendInfo, Batch, Decoded, Encoded, ModelInfo, Precision, Prior,
};
use crate::error::{Result, RuntimeError};
use crate::logdet::{LogDetMethod, ProbeKind};
use crate::plan::ModelKind;
use crate::tract::{TractBundle, TractGraph};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Which {
    Forward,
    ForwardLogdet,
    Inverse,
}

pub struct TractBackend {
    graphs: TractBundle,
    info: ModelInfo,
    prior: Option<Prior>,
    loaded: HashMap<(Which, usize), TractGraph>,
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
        Ok(TractBackend {
            graphs,
            info,
            prior,
            loaded: HashMap::new(),
        })
    }

    fn graph(&mut self, which: Which, batch: usize) -> Result<&TractGraph> {
        if !self.loaded.contains_key(&(which, batch)) {
            let g = match which {
                Which::Forward => self.graphs.forward(batch)?,
                Which::ForwardLogdet => self.graphs.forward_logdet(batch)?,
                Which::Inverse => self.graphs.inverse(batch)?,
            };
            self.loaded.insert((which, batch), g);
        }
        self.loaded
            .get(&(which, batch))
            .ok_or_else(|| RuntimeError::Unsupported("tract graph cache".into()))
    }

    /// The probe matrix for `method` if the exported log-det graph computes that estimator.
    fn check_estimator(
        &self,
        method: &LogDetMethod,
        first: usize,
        batch: usize,
    ) -> Result<Vec<f32>> {
        let m = &self.graphs.manifest;
        let refuse = |what: String| {
            Err(RuntimeError::Unsupported(format!(
                "the bundle's ONNX log-det graph computes {} ({} terms, {} probes); {what}: set it in the model file's [logdet] and recompile, or use --backend cpu or reference",
                m.logdet_estimator,
                m.logdet_terms,
                m.probes.as_ref().and_then(|p| p.blocks.first()).map_or(0, |b| b.count)
            )))
        };
        match (method, m.logdet_estimator.as_str(), &m.probes) {
            (LogDetMethod::Exact, "exact2d", _) => Ok(vec![]),
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
                Ok(layout.matrix(*seed, first, batch))
            }
            (LogDetMethod::Roulette { .. }, _, _) => refuse(
                "the roulette estimator has a random term count and cannot be exported".into(),
            ),
            (other, _, _) => refuse(format!("{other:?} was asked for")),
        }
    }

    fn single_output(&mut self, which: Which, x: &Batch, name: &str) -> Result<Batch> {
        let xs = x.to_f32(name)?;
        let b = x.batch;
        let outs = self.graph(which, b)?.run(&[&xs])?;
        let (_, data) = outs
            .into_iter()
            .next()
            .ok_or_else(|| RuntimeError::Unsupported("a tract graph with no output".into()))?;
        Ok(Batch::from_f32(&data, b))
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
        if matches!(logdet, LogDetMethod::None) {
            return Ok(Encoded {
                z: self.single_output(Which::Forward, x, "input")?,
                logdet: None,
            });
        }
        let probes = self.check_estimator(logdet, first_sample, x.batch)?;
        let xs = x.to_f32("input")?;
        let b = x.batch;
        let g = self.graph(Which::ForwardLogdet, b)?;
        let outs = if probes.is_empty() {
            g.run(&[&xs])?
        } else {
            g.run(&[&xs, &probes])?
        };
        let mut it = outs.into_iter();
        let (Some((_, z)), Some((_, ld))) = (it.next(), it.next()) else {
            return Err(RuntimeError::corrupt(
                crate::tract::MANIFEST_FILE,
                "the log-det graph must return z and logdet",
            ));
        };
        Ok(Encoded {
            z: Batch::from_f32(&z, b),
            logdet: Some(ld.iter().map(|&v| f64::from(v)).collect()),
        })
    }

    fn decode(&mut self, z: &Batch) -> Result<Decoded> {
        require_kind(&self.info, ModelKind::Flow, "decode")?;
        Ok(Decoded {
            x: self.single_output(Which::Inverse, z, "z")?,
            blocks: vec![],
            converged: None,
        })
    }

    fn classify(&mut self, x: &Batch) -> Result<Batch> {
        require_kind(&self.info, ModelKind::Classifier, "classify")?;
        self.single_output(Which::Forward, x, "input")
    }
}
