//! The CPU side of a plan's log-det inputs: Hutchinson probes and per-term weights, from the
//! same seeded streams as the reference executor, so that GPU and reference see identical
//! probes (and identical roulette draws).
//!
//! Layout (see [`LogDetLayout`]): per sample, `probes` holds block 0's probes 0..P, then
//! block 1's, ...; `coef` holds `coef_stride` weights per block, weight `k` (0-based) being
//! `w_k (-1)^k / ((k+1) P)`, so that the GPU's accumulation `sum_k coef_k <w_k, v>` is the
//! probe average of the series.

use iresnetc_runtime::rng::{probe_vector, streams, Rng};

use super::lower::LogDetLayout;
use crate::error::{Error, Result};
use crate::reference::{draw, survival, LogDetMethod};
use crate::spec::{ProbeKind, RouletteDist};

/// Probes for samples `first..first + batch` of an array (the index is the stream's sample).
pub fn probes(layout: &LogDetLayout, seed: u64, kind: ProbeKind, batch: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch * layout.probe_elems());
    for sample in 0..batch {
        for (b, &dim) in layout.block_dims.iter().enumerate() {
            for p in 0..layout.probes {
                let v = probe_vector(seed, b, sample, p, dim, kind == ProbeKind::Rademacher);
                out.extend(v.iter().map(|&x| x as f32));
            }
        }
    }
    out
}

fn term_coef(k1: usize, weight: f64, probes: usize) -> f32 {
    let sign = if k1 % 2 == 1 { 1.0 } else { -1.0 };
    (sign * weight / (k1 as f64 * probes as f64)) as f32
}

/// Weights of the truncated series with `terms` terms (the plan's `forward` entry runs
/// `layout.terms` terms; later slots are zero).
pub fn series_coefs(layout: &LogDetLayout, terms: usize, batch: usize) -> Vec<f32> {
    let mut one = vec![0.0f32; layout.coef_elems()];
    for b in 0..layout.block_dims.len() {
        for k in 1..=terms.min(layout.coef_stride) {
            one[b * layout.coef_stride + k - 1] = term_coef(k, 1.0, layout.probes);
        }
    }
    one.repeat(batch)
}

/// Russian-roulette weights: per (block, sample) N extra terms drawn from the reference's
/// stream; term k beyond `terms` is divided by `P(N >= k - terms)`. Refuses draws beyond the
/// plan's room (`forward_roulette` runs `coef_stride` terms).
pub fn roulette_coefs(
    layout: &LogDetLayout,
    seed: u64,
    dist: RouletteDist,
    param: f64,
    batch: usize,
) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; batch * layout.coef_elems()];
    for sample in 0..batch {
        for b in 0..layout.block_dims.len() {
            let mut rng = Rng::for_stream(seed, &[streams::ROULETTE, b as u64, sample as u64]);
            let extra = draw(dist, param, &mut rng);
            let total = layout.terms + extra;
            if total > layout.coef_stride {
                return Err(Error::Unsupported {
                    what: format!("roulette log-det of block {b}, sample {sample}"),
                    reason: format!(
                        "drew {extra} extra terms; the compiled plan has room for {} (logdet.terms + {})",
                        layout.coef_stride - layout.terms,
                        super::ROULETTE_EXTRA_TERMS
                    ),
                });
            }
            let base = sample * layout.coef_elems() + b * layout.coef_stride;
            for k in 1..=total {
                let w = if k <= layout.terms {
                    1.0
                } else {
                    1.0 / survival(dist, param, k - layout.terms)
                };
                out[base + k - 1] = term_coef(k, w, layout.probes);
            }
        }
    }
    Ok(out)
}

/// Entry point, `coef` input, probe seed and probe kind of a log-det run.
pub type LogDetInputs = (&'static str, Vec<f32>, u64, ProbeKind);

/// The entry point and `coef` input for a log-det method on a batch; `None` for methods the
/// GPU plan does not run (exact, none).
pub fn coefs_for(
    layout: &LogDetLayout,
    method: &LogDetMethod,
    batch: usize,
) -> Result<Option<LogDetInputs>> {
    Ok(match *method {
        LogDetMethod::Series {
            terms, kind, seed, ..
        } => {
            let entry = if terms <= layout.terms {
                super::entries::FORWARD
            } else if terms <= layout.coef_stride {
                super::entries::FORWARD_ROULETTE
            } else {
                return Err(Error::Unsupported {
                    what: format!("{terms} series terms"),
                    reason: format!(
                        "the compiled plan runs at most {} terms; recompile with a larger logdet.terms",
                        layout.coef_stride
                    ),
                });
            };
            Some((entry, series_coefs(layout, terms, batch), seed, kind))
        }
        LogDetMethod::Roulette {
            kind,
            seed,
            dist,
            param,
            ..
        } => Some((
            super::entries::FORWARD_ROULETTE,
            roulette_coefs(layout, seed, dist, param, batch)?,
            seed,
            kind,
        )),
        LogDetMethod::Exact | LogDetMethod::None => None,
    })
}
