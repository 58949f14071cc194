//! `iresnetc run --backend cpu`: the native f32 engine of the runtime crate, every mode.
//!
//! A bundle directory runs from its `net.json` and weights alone (no certification, no
//! compiler work); a model file is loaded and certified, then described in memory.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::run::{model_and_weights, EstimatorArg, Mode, RunArgs};
use iresnetc::netdesc;
use iresnetc::npy;
use iresnetc_runtime::cpu::net::{EstimatorKind, NetKind, NET_FILE};
use iresnetc_runtime::cpu::{CpuEngine, InverseReport, LogDetRequest};

/// Values per engine call: bounds the activations' memory on large inputs (chunks keep the
/// numbers of one call: probes are keyed by the sample's index in the whole array).
const CHUNK_VALUES: usize = 1 << 16;

pub fn run_cpu(a: &RunArgs) -> Result<()> {
    run_inner(a).map_err(|e| {
        e.context(
            "--backend cpu is the native f32 engine (the f64 reference executor it used to be \
             is now --backend reference)",
        )
    })
}

/// The engine for a bundle (its own files) or a model file (certified here).
pub fn open(model: &Path, a: &RunArgs) -> Result<CpuEngine> {
    if model.is_dir() && a.weights.is_none() && a.seed.is_none() && model.join(NET_FILE).is_file() {
        return Ok(CpuEngine::open_bundle(model)?);
    }
    let (file, weights) = model_and_weights(a)?;
    let m = super::load(&file, weights.as_deref(), a.seed)?;
    let net = netdesc::describe(&m)?;
    Ok(CpuEngine::from_parts(
        net,
        &netdesc::weights_f32(&m.graph.params),
    )?)
}

/// The model's log-det settings with this run's `--estimator` and `--probe-seed`.
fn request(e: &CpuEngine, a: &RunArgs) -> LogDetRequest {
    let mut r = LogDetRequest::from_settings(&e.net().logdet);
    if let Some(s) = a.probe_seed {
        r.seed = s;
    }
    if let Some(est) = a.estimator {
        r.estimator = match est {
            EstimatorArg::Exact => EstimatorKind::Exact,
            EstimatorArg::Series => EstimatorKind::Series,
            EstimatorArg::Roulette => EstimatorKind::Roulette,
        };
    }
    r
}

fn rows(v: &[f32], width: usize) -> Vec<Vec<f64>> {
    v.chunks(width.max(1))
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect()
}

fn run_inner(a: &RunArgs) -> Result<()> {
    let mut e = open(&a.model, a)?;
    let net = e.net().clone();
    let flow = net.kind == NetKind::Flow;
    let need_flow = |what: &str| -> Result<()> {
        if !flow {
            bail!(
                "{}: --mode {what} needs a flow (kind = \"flow\")",
                a.model.display()
            );
        }
        Ok(())
    };
    let in_dim = e.input_dim();
    let chunk = (CHUNK_VALUES / in_dim.max(1)).max(1);
    let tag = format!("backend cpu (native f32, {} threads)", e.threads());
    let read = |shape: &[usize], array: &str| -> Result<(Vec<f32>, usize)> {
        let b = a.read_input(shape, array)?;
        let n = b.samples.len();
        Ok((b.samples.iter().flatten().map(|&v| v as f32).collect(), n))
    };
    let req = request(&e, a);
    match a.mode {
        Mode::Forward | Mode::Classify if !flow => {
            let (x, n) = read(&net.input, "input")?;
            let mut logits = vec![];
            for c in x.chunks(chunk * in_dim) {
                logits.extend(e.classify(c, c.len() / in_dim)?);
            }
            let classes = logits.len() / n.max(1);
            npy::write(&a.output, &rows(&logits, classes), &[classes], false)?;
            eprintln!("{tag}: logits of {n} samples -> {}", a.output.display());
        }
        Mode::Classify => bail!(
            "{}: --mode classify needs a classifier (kind = \"classifier\")",
            a.model.display()
        ),
        Mode::Forward | Mode::Logdet => {
            need_flow("logdet")?;
            let (x, n) = read(&net.input, "input")?;
            let want_ld = a.mode == Mode::Logdet || a.logdet_out.is_some();
            let (mut z, mut lds) = (vec![], vec![]);
            for (i, c) in x.chunks(chunk * in_dim).enumerate() {
                let r = LogDetRequest {
                    first_sample: i * chunk,
                    ..req.clone()
                };
                let (zc, lc) = e.encode(c, c.len() / in_dim, want_ld.then_some(&r))?;
                z.extend(zc);
                lds.extend(lc);
            }
            let ld_rows: Vec<Vec<f64>> = lds.iter().map(|&l| vec![l]).collect();
            if a.mode == Mode::Logdet {
                npy::write(&a.output, &ld_rows, &[], false)?;
                eprintln!("{tag}: log-det ({:?}) of {n} samples", req.estimator);
            } else {
                let d = e.latent_dim();
                npy::write(&a.output, &rows(&z, d), &[d], false)?;
                if let Some(p) = &a.logdet_out {
                    npy::write(p, &ld_rows, &[], false)?;
                }
                eprintln!("{tag}: forward of {n} samples -> {}", a.output.display());
            }
        }
        Mode::Inverse => {
            need_flow("inverse")?;
            let d = e.latent_dim();
            let (z, _) = read(&[d], "z")?;
            let mut x = vec![];
            let mut rep = InverseReport::default();
            for c in z.chunks(chunk.max(1) * d) {
                let (xc, r) = e.decode(c, c.len() / d)?;
                x.extend(xc);
                merge(&mut rep, r);
            }
            npy::write(&a.output, &rows(&x, in_dim), &net.input, false)?;
            report_inverse(&tag, "inverse", &rep);
        }
        Mode::Density => {
            need_flow("density")?;
            let (x, n) = read(&net.input, "input")?;
            let mut out = vec![];
            for (i, c) in x.chunks(chunk * in_dim).enumerate() {
                let r = LogDetRequest {
                    first_sample: i * chunk,
                    ..req.clone()
                };
                out.extend(e.density(c, c.len() / in_dim, &r, req.seed)?);
            }
            let mean = out.iter().map(|v| v.1).sum::<f64>() / n.max(1) as f64;
            let cols: Vec<Vec<f64>> = out.iter().map(|&(l, b)| vec![l, b]).collect();
            npy::write(&a.output, &cols, &[2], false)?;
            eprintln!("{tag}: columns (log p(x) nats, bits/dim); mean bits/dim {mean:.4}");
        }
        Mode::Sample => {
            need_flow("sample")?;
            if a.num == 0 {
                bail!("--num must be >= 1");
            }
            let (x, rep) = e.sample(a.num, req.seed).context("sampling")?;
            npy::write(&a.output, &rows(&x, in_dim), &net.input, false)?;
            report_inverse(&tag, &format!("{} samples", a.num), &rep);
        }
    }
    Ok(())
}

/// Worst case over chunks, per block.
fn merge(into: &mut InverseReport, r: InverseReport) {
    if into.blocks.is_empty() {
        *into = r;
        return;
    }
    for (a, b) in into.blocks.iter_mut().zip(r.blocks) {
        a.iters = a.iters.max(b.iters);
        a.residual = a.residual.max(b.residual);
        a.converged &= b.converged;
        a.precision_floor |= b.precision_floor;
    }
}

fn report_inverse(tag: &str, what: &str, r: &InverseReport) {
    let floor = r.blocks.iter().filter(|b| b.precision_floor).count();
    eprintln!(
        "{tag}: {what}, at most {} fixed-point iterations per block, max residual {:.3e}{}{}",
        r.max_iters(),
        r.max_residual(),
        if floor > 0 {
            format!(" ({floor} block(s) stopped at f32 precision before inverse.tol)")
        } else {
            String::new()
        },
        if r.converged() {
            ""
        } else {
            " (NOT converged: raise inverse.max_iters)"
        }
    );
    let iters: Vec<usize> = r.blocks.iter().map(|b| b.iters).collect();
    eprintln!("  iterations per block: {iters:?}");
}
