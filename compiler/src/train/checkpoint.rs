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
    // The model's name, so that another model's checkpoint of the same shapes is refused.
    bufs.push((
        "meta.model".to_string(),
        vec![c.model.len()],
        c.model.as_bytes().to_vec(),
    ));
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
            let dt = if n == "meta.model" {
                Dtype::U8
            } else if n.starts_with("meta.") {
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

/// Parameters the optimizer never steps (statistics, not gradients).
fn untrained(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Reads a checkpoint of model `model` into the state of a run (`params`, `sn` and `opt`
/// come from the run's model, so every expected tensor must be there with its size, and no
/// other). Nothing of the run changes unless the whole checkpoint checks out: a step beyond
/// [`crate::limits::MAX_TRAIN_STEPS`] or disagreeing with the optimizer's, a missing or
/// extra optimizer tensor, another model's name are refused.
pub fn load(
    path: &Path,
    model: &str,
    params: &mut Params,
    sn: &mut SpecNorm,
    opt: &mut Optimizer,
) -> Result<(u64, u64)> {
    let raw = iresnetc_runtime::fsread::read_bounded(
        path,
        iresnetc_runtime::fsread::memory_budget()?,
        "checkpoint",
    )?;
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
    if step > crate::limits::MAX_TRAIN_STEPS {
        return Err(bad(format!(
            "tensor `meta.step`: step {step} is beyond any run (at most {})",
            crate::limits::MAX_TRAIN_STEPS
        )));
    }
    if t != step {
        return Err(bad(format!(
            "tensor `meta.optimizer_steps`: {t} optimizer steps at step {step}; the checkpoint is inconsistent"
        )));
    }
    // Older checkpoints carry no name; a present one must be this model's.
    if let Ok(v) = st.tensor("meta.model") {
        if v.dtype() != Dtype::U8 || v.data() != model.as_bytes() {
            return Err(bad(format!(
                "tensor `meta.model`: the checkpoint is of model {:?}, not {:?}",
                iresnetc_runtime::fsread::clip(&String::from_utf8_lossy(v.data()), 40),
                iresnetc_runtime::fsread::clip(model, 40)
            )));
        }
    }
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
    // Every tensor is one this model's run writes.
    let expected = |name: &str| {
        [
            "meta.step",
            "meta.seed",
            "meta.optimizer_steps",
            "meta.model",
        ]
        .contains(&name)
            || name
                .strip_prefix("param.")
                .is_some_and(|p| params.contains_key(p))
            || ["sn.u.", "sn.v."].iter().any(|pre| {
                name.strip_prefix(pre)
                    .is_some_and(|l| sn.layers.iter().any(|x| x.name == l))
            })
            || ["opt.m.", "opt.v.", "opt.ema."]
                .iter()
                .any(|pre| name.starts_with(pre))
    };
    if let Some(extra) = st.names().into_iter().find(|n| !expected(n)) {
        return Err(bad(format!(
            "tensor `{}` is not one of this model's: the checkpoint is of another model",
            iresnetc_runtime::fsread::clip(extra, 60)
        )));
    }
    // After a step, the optimizer holds both moments of every trained parameter (and the
    // EMA of every parameter when it is on).
    if t > 0 {
        for (n, _) in params.iter().filter(|(n, _)| !untrained(n)) {
            for (prefix, slot) in [("opt.m", &nopt.m), ("opt.v", &nopt.v)] {
                if !slot.contains_key(n) {
                    return Err(bad(format!(
                        "tensor `{prefix}.{n}` missing: the optimizer state is incomplete"
                    )));
                }
            }
            if nopt.cfg.ema > 0.0 && !nopt.ema.contains_key(n) {
                return Err(bad(format!(
                    "tensor `opt.ema.{n}` missing: the optimizer state is incomplete"
                )));
            }
        }
    }
    *params = np;
    *sn = nsn;
    *opt = nopt;
    Ok((step, seed))
}
