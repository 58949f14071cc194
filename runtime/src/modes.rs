//! What users run, written once over [`Backend`]: encode with log-det, density and bits/dim,
//! sampling from the prior, classification. Every backend gets them by implementing the
//! trait's three directions; the random streams (dequantization noise, prior draws, probes)
//! come from [`crate::rng`], so a seed means the same numbers on every backend.

use crate::engine::{require_kind, Backend, Batch, Decoded, Encoded, ModelInfo, Prior};
use crate::error::{Result, RuntimeError};
use crate::logdet::LogDetMethod;
use crate::plan::ModelKind;
use crate::rng::{streams, Rng};

/// Progress callback: called with the number of samples just finished.
pub type Progress<'a> = &'a mut dyn FnMut(usize);

/// Samples per call into a backend when a mode runs a long array: small enough that progress
/// moves and memory stays bounded, large enough to keep a backend's kernels busy.
pub const DEFAULT_CHUNK: usize = 8;

/// Splits `x` into chunks of at most `chunk` samples (the last may be shorter).
fn chunks(x: &Batch, chunk: usize) -> impl Iterator<Item = (usize, Batch)> + '_ {
    let per = x.per_sample().max(1);
    let chunk = chunk.max(1);
    x.data.chunks(per * chunk).enumerate().map(move |(i, c)| {
        (
            i * chunk,
            Batch {
                data: c.to_vec(),
                batch: c.len() / per,
            },
        )
    })
}

/// `x -> z` (and the log-det) over a whole array, in chunks.
pub fn encode(
    be: &mut dyn Backend,
    x: &Batch,
    method: &LogDetMethod,
    chunk: usize,
    progress: Progress<'_>,
) -> Result<Encoded> {
    let mut z = vec![];
    let mut ld: Option<Vec<f64>> = None;
    for (first, c) in chunks(x, chunk) {
        let out = be.encode(&c, method, first)?;
        z.extend(out.z.data);
        if let Some(l) = out.logdet {
            ld.get_or_insert_with(Vec::new).extend(l);
        }
        progress(c.batch);
    }
    Ok(Encoded {
        z: Batch {
            data: z,
            batch: x.batch,
        },
        logdet: ld,
    })
}

/// Logits over a whole array, in chunks.
pub fn classify(
    be: &mut dyn Backend,
    x: &Batch,
    chunk: usize,
    progress: Progress<'_>,
) -> Result<Batch> {
    require_kind(be.model(), ModelKind::Classifier, "classify")?;
    let mut out = vec![];
    for (_, c) in chunks(x, chunk) {
        out.extend(be.classify(&c)?.data);
        progress(c.batch);
    }
    Ok(Batch {
        data: out,
        batch: x.batch,
    })
}

/// `z -> x` over a whole array, in chunks; the per-block statistics are the worst over chunks.
pub fn decode(
    be: &mut dyn Backend,
    z: &Batch,
    chunk: usize,
    progress: Progress<'_>,
) -> Result<Decoded> {
    require_kind(be.model(), ModelKind::Flow, "decode")?;
    let mut x = vec![];
    let mut blocks: Vec<crate::engine::BlockInversion> = vec![];
    let mut converged: Option<bool> = None;
    for (_, c) in chunks(z, chunk) {
        let d = be.decode(&c)?;
        check_inverse(be, &c, &d)?;
        x.extend(d.x.data);
        if blocks.is_empty() {
            blocks = d.blocks;
        } else {
            for (a, b) in blocks.iter_mut().zip(d.blocks) {
                a.iters = a.iters.max(b.iters);
                a.residual = a.residual.max(b.residual);
            }
        }
        converged = match (converged, d.converged) {
            (Some(a), Some(b)) => Some(a && b),
            (a, b) => a.or(b),
        };
        progress(c.batch);
    }
    Ok(Decoded {
        x: Batch {
            data: x,
            batch: z.batch,
        },
        blocks,
        converged,
    })
}

/// Largest `max |forward(x) - z| / (1 + max |z|)` accepted of an inverse. The fixed point
/// stops at `inverse.tol` per block; what is left is f32 rounding, amplified by the forward's
/// Lipschitz constant. A diverged or cut-short inverse misses by orders of magnitude more.
pub const MAX_INVERSE_MISMATCH: f64 = 1e-2;

/// Largest last fixed-point step, relative to `1 + max |z|`, of a block that missed its
/// tolerance and still counts as inverted: f32 stops moving about a hundred ulps above the
/// solution, so a model whose `inverse.tol` is beyond f32 (1e-9) reports "not converged"
/// from the f32 backends with steps of 1e-7.
pub const F32_STEP_FLOOR: f64 = 1e-5;

/// A result is checked, not believed: a block that reports a step well above f32's floor
/// after its last iteration is named, and every inverse (on every backend, measured or not)
/// is mapped forward again and compared with the `z` it came from, so weights that are not
/// contractive never give exit code 0.
fn check_inverse(be: &mut dyn Backend, z: &Batch, d: &Decoded) -> Result<()> {
    let scale = 1.0 + z.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = d
        .blocks
        .iter()
        .max_by(|a, b| a.residual.total_cmp(&b.residual));
    let moving = worst.is_some_and(|b| b.residual.is_nan() || b.residual > F32_STEP_FLOOR * scale);
    if d.converged == Some(false) && (moving || worst.is_none()) {
        return Err(RuntimeError::NotInverted(match worst {
            Some(b) => format!(
                "block {:?} still moved by {:.3e} after {} fixed-point iterations (tolerance {:.1e}); the weights are not contractive enough for its inverse.max_iters",
                crate::fsread::clip(&b.block, 60),
                b.residual,
                b.iters,
                be.model().inverse_tol
            ),
            None => "a block missed the model's tolerance".to_string(),
        }));
    }
    if let Some(i) = d.x.data.iter().position(|v| !v.is_finite()) {
        return Err(RuntimeError::NotInverted(format!(
            "x element {i} is {} (the fixed point diverged)",
            d.x.data[i]
        )));
    }
    let again = be.encode(&d.x, &LogDetMethod::None, 0)?;
    let miss = again.z.data.iter().zip(&z.data).fold(0.0f64, |m, (a, b)| {
        let d = (a - b).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    let relative = miss / scale;
    if again.z.data.len() != z.data.len() || relative.is_nan() || relative > MAX_INVERSE_MISMATCH {
        let worst = worst
            .map(|b| {
                format!(
                    " (largest last step: block {:?}, {:.3e})",
                    crate::fsread::clip(&b.block, 60),
                    b.residual
                )
            })
            .unwrap_or_default();
        return Err(RuntimeError::NotInverted(format!(
            "forward(x) misses z by {miss:.3e} (relative {relative:.3e}, at most {MAX_INVERSE_MISMATCH:e} accepted){worst}; the weights are not contractive"
        )));
    }
    Ok(())
}

/// Dequantization of 8-bit images in [0, 1]: `(255 x + u) / 256 - 0.5`, `u ~ U(0, 1)` from the
/// sample's own stream (index `first + i` in the whole array).
pub fn dequantize(x: &Batch, seed: u64, first: usize) -> Batch {
    let per = x.per_sample().max(1);
    let mut out = x.clone();
    for (i, row) in out.data.chunks_mut(per).enumerate() {
        let mut r = Rng::for_stream(seed, &[streams::DEQUANTIZE, (first + i) as u64]);
        for v in row {
            *v = (255.0 * *v + r.uniform()) / 256.0 - 0.5;
        }
    }
    out
}

/// `log N(z; mean, exp(log_std))`, summed over the dimensions: the one definition every
/// backend, the reference and the trainer use.
pub fn prior_logp(z: &[f64], mean: &[f64], log_std: &[f64]) -> f64 {
    let c = 0.5 * (2.0 * std::f64::consts::PI).ln();
    z.iter()
        .zip(mean)
        .zip(log_std)
        .map(|((z, m), s)| {
            let t = (z - m) * (-s).exp();
            -0.5 * t * t - s - c
        })
        .sum()
}

/// Bits per dimension of a log-density over `dim` dimensions (+8 for dequantized 8-bit data).
pub fn bits_per_dim(logp: f64, dim: usize, dequantized: bool) -> f64 {
    -logp / (dim as f64 * std::f64::consts::LN_2) + if dequantized { 8.0 } else { 0.0 }
}

/// One sample's density.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Density {
    /// `log p(x)` in nats (of the dequantized input when the model dequantizes).
    pub logp: f64,
    pub bits_per_dim: f64,
}

/// Per-sample `log p(x)` and bits/dim. `seed` drives the dequantization noise (the probes and
/// roulette draws come from `method`'s own seed).
pub fn density(
    be: &mut dyn Backend,
    x: &Batch,
    method: &LogDetMethod,
    seed: u64,
    chunk: usize,
    progress: Progress<'_>,
) -> Result<Vec<Density>> {
    let model: ModelInfo = be.model().clone();
    require_kind(&model, ModelKind::Flow, "density")?;
    if matches!(method, LogDetMethod::None) {
        return Err(RuntimeError::Unsupported(
            "density needs a log-det estimator".into(),
        ));
    }
    let prior = be.prior()?;
    let mut out = Vec::with_capacity(x.batch);
    for (first, c) in chunks(x, chunk) {
        let input = if model.dequantize {
            dequantize(&c, seed, first)
        } else {
            c
        };
        let enc = be.encode(&input, method, first)?;
        let lds = enc.logdet.ok_or_else(|| {
            RuntimeError::Unsupported(format!("backend {} returned no log-det", be.info().name))
        })?;
        for (z, ld) in enc.z.rows().zip(lds) {
            let logp = prior_logp(z, &prior.mean, &prior.log_std) + ld;
            out.push(Density {
                logp,
                bits_per_dim: bits_per_dim(logp, model.input_dim(), model.dequantize),
            });
        }
        progress(input.batch);
    }
    check_finite_densities(&out)?;
    Ok(out)
}

/// A sample's density estimated `repeats` times with independent probes (and roulette
/// draws): the mean, and its standard error (the spread of the repeats over `sqrt(repeats)`;
/// zero for the exact log-det, which is not random).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DensityEstimate {
    pub mean: Density,
    pub stderr: Density,
}

/// [`density`] with an error bar: the log-det is estimated `repeats` times (repeat 0 with
/// `method`'s own seed, so its values are [`density`]'s; repeat r with a seed derived from it),
/// the dequantization noise is the same in every repeat. `repeats` >= 2 for a stochastic
/// method; a deterministic one is run once.
pub fn density_with_error(
    be: &mut dyn Backend,
    x: &Batch,
    method: &LogDetMethod,
    seed: u64,
    repeats: usize,
    chunk: usize,
    progress: Progress<'_>,
) -> Result<Vec<DensityEstimate>> {
    let Some(base) = method.seed() else {
        let d = density(be, x, method, seed, chunk, progress)?;
        let zero = Density {
            logp: 0.0,
            bits_per_dim: 0.0,
        };
        return Ok(d
            .into_iter()
            .map(|mean| DensityEstimate { mean, stderr: zero })
            .collect());
    };
    if repeats < 2 {
        return Err(RuntimeError::bad_input(
            "repeats",
            format!("a standard error needs at least 2 repeats, got {repeats}"),
        ));
    }
    let mut runs: Vec<Vec<Density>> = Vec::with_capacity(repeats);
    for r in 0..repeats {
        let m = if r == 0 {
            method.clone()
        } else {
            method.with_seed(Rng::for_stream(base, &[streams::REPEAT, r as u64]).next_u64())
        };
        runs.push(density(be, x, &m, seed, chunk, &mut *progress)?);
    }
    let n = repeats as f64;
    let stats = |values: &mut dyn Iterator<Item = f64>| -> (f64, f64) {
        let v: Vec<f64> = values.collect();
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        (mean, (var / n).sqrt())
    };
    Ok((0..x.batch)
        .map(|i| {
            let (logp, logp_se) = stats(&mut runs.iter().map(|r| r[i].logp));
            let (bpd, bpd_se) = stats(&mut runs.iter().map(|r| r[i].bits_per_dim));
            DensityEstimate {
                mean: Density {
                    logp,
                    bits_per_dim: bpd,
                },
                stderr: Density {
                    logp: logp_se,
                    bits_per_dim: bpd_se,
                },
            }
        })
        .collect())
}

/// A NaN or infinite density is never a result: it means the weights or the input left the
/// range where the model is defined.
fn check_finite_densities(d: &[Density]) -> Result<()> {
    match d.iter().position(|d| !d.logp.is_finite()) {
        None => Ok(()),
        Some(i) => Err(RuntimeError::bad_input(
            "input",
            format!(
                "sample {i}: log p(x) is {} (the input or the weights are outside the model's range)",
                d[i].logp
            ),
        )),
    }
}

/// `num` draws `z = mean + exp(log_std) * N(0, 1)`, one stream per draw.
pub fn prior_draws(prior: &Prior, num: usize, seed: u64) -> Batch {
    let mut data = Vec::with_capacity(num * prior.mean.len());
    for i in 0..num {
        let mut r = Rng::for_stream(seed, &[streams::PRIOR_SAMPLE, i as u64]);
        data.extend(
            prior
                .mean
                .iter()
                .zip(&prior.log_std)
                .map(|(m, s)| m + s.exp() * r.normal()),
        );
    }
    Batch { data, batch: num }
}

/// `num` samples from the model: prior draws mapped back through the inverse.
pub fn sample(
    be: &mut dyn Backend,
    num: usize,
    seed: u64,
    chunk: usize,
    progress: Progress<'_>,
) -> Result<Decoded> {
    require_kind(be.model(), ModelKind::Flow, "sample")?;
    if num == 0 {
        return Err(RuntimeError::bad_input("--num", "must be at least 1"));
    }
    let prior = be.prior()?;
    let z = prior_draws(&prior, num, seed);
    decode(be, &z, chunk, progress)
}
