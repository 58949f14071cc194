//! Checkpoints: one safetensors file (F64, so a resumed run continues with
//! the very same numbers) holding the raw parameters, the spectral norm's
//! `u, v`, the optimizer state, and the step and seed (U64 tensors, not
//! metadata: safetensors writes its metadata map in hash order, and the same
//! state must give the same bytes). The
//! random numbers of a step are streams of `(seed, step, ...)`, so `(seed,
//! step)` is the whole generator state. Written atomically.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::optim::Optimizer;
use super::specnorm::SpecNorm;
use crate::error::{Error, Result};
use crate::tensor::{Params, Tensor};

pub const FORMAT: &str = "iresnetc-checkpoint-1";

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub step: u64,
    pub seed: u64,
    pub model: String,
    pub params: Params,
    pub sn: SpecNorm,
    pub opt: Optimizer,
}

fn bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn save(c: &Checkpoint, path: &Path) -> Result<()> {
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, t) in &c.params {
        bufs.push((format!("param.{n}"), t.shape.clone(), bytes(&t.data)));
    }
    for l in &c.sn.layers {
        bufs.push((format!("sn.u.{}", l.name), vec![l.u.len()], bytes(&l.u)));
        bufs.push((format!("sn.v.{}", l.name), vec![l.v.len()], bytes(&l.v)));
    }
    for (prefix, st) in [
        ("opt.m", &c.opt.m),
        ("opt.v", &c.opt.v),
        ("opt.ema", &c.opt.ema),
    ] {
        for (n, v) in st {
            bufs.push((format!("{prefix}.{n}"), vec![v.len()], bytes(v)));
        }
    }
    let codegen = |e: safetensors::SafeTensorError| Error::Codegen {
        context: path.display().to_string(),
        message: e.to_string(),
    };
    for (name, v) in [
        ("meta.step", c.step),
        ("meta.seed", c.seed),
        ("meta.optimizer_steps", c.opt.t),
    ] {
        bufs.push((name.to_string(), vec![1], v.to_le_bytes().to_vec()));
    }
    let views = bufs
        .iter()
        .map(|(n, s, b)| {
            let dt = if n.starts_with("meta.") {
                Dtype::U64
            } else {
                Dtype::F64
            };
            TensorView::new(dt, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(codegen)?;
    // One key only: a one-entry map serializes the same way every time.
    let meta: HashMap<String, String> = [("format".to_string(), FORMAT.to_string())]
        .into_iter()
        .collect();
    let out = safetensors::tensor::serialize(views, Some(meta)).map_err(codegen)?;
    crate::fsutil::write_atomic(path, &out)
}

/// Reads a checkpoint into the state of a run (`params`, `sn` and `opt` come
/// from the run's model, so every expected tensor must be there with its size).
pub fn load(
    path: &Path,
    params: &mut Params,
    sn: &mut SpecNorm,
    opt: &mut Optimizer,
) -> Result<(u64, u64)> {
    let raw = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let bad = |reason: String| Error::WeightsFile {
        file: path.to_path_buf(),
        reason,
    };
    let st = SafeTensors::deserialize(&raw).map_err(|e| bad(format!("not a checkpoint ({e})")))?;
    let (_, meta) =
        SafeTensors::read_metadata(&raw).map_err(|e| bad(format!("not a checkpoint ({e})")))?;
    let md = meta.metadata().clone().unwrap_or_default();
    if md.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("not an {FORMAT} file")));
    }
    let num = |k: &str| -> Result<u64> {
        let v = st
            .tensor(&format!("meta.{k}"))
            .map_err(|_| bad(format!("tensor `meta.{k}` missing")))?;
        let b = v.data();
        if v.dtype() != Dtype::U64 || b.len() != 8 {
            return Err(bad(format!("tensor `meta.{k}`: expected one u64")));
        }
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    };
    let (step, seed, t) = (num("step")?, num("seed")?, num("optimizer_steps")?);
    let get = |name: &str, len: usize| -> Result<Vec<f64>> {
        let v = st.tensor(name).map_err(|_| {
            bad(format!(
                "tensor `{name}` missing: the checkpoint is of another model"
            ))
        })?;
        if v.dtype() != Dtype::F64 || v.data().len() != len * 8 {
            return Err(bad(format!("tensor `{name}`: expected {len} f64 values")));
        }
        Ok(v.data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    };
    let mut np = Params::new();
    for (n, t) in params.iter() {
        np.insert(
            n.clone(),
            Tensor::new(t.shape.clone(), get(&format!("param.{n}"), t.data.len())?),
        );
    }
    let mut nsn = sn.clone();
    for l in &mut nsn.layers {
        l.u = get(&format!("sn.u.{}", l.name), l.u.len())?;
        l.v = get(&format!("sn.v.{}", l.name), l.v.len())?;
    }
    let mut nopt = Optimizer::new(opt.cfg.clone());
    nopt.t = t;
    for name in st.names() {
        for (prefix, slot) in [
            ("opt.m.", &mut nopt.m),
            ("opt.v.", &mut nopt.v),
            ("opt.ema.", &mut nopt.ema),
        ] {
            if let Some(p) = name.strip_prefix(prefix) {
                let len = params.get(p).map(|t| t.data.len()).ok_or_else(|| {
                    bad(format!("tensor `{name}` names no parameter of the model"))
                })?;
                slot.insert(p.to_string(), get(name, len)?);
            }
        }
    }
    *params = np;
    *sn = nsn;
    *opt = nopt;
    Ok((step, seed))
}
