//! The log-det estimator, typed once for every backend.
//!
//! A block's `ln det(I + J_g) = sum_k (-1)^(k+1) tr(J_g^k) / k` is estimated with Hutchinson
//! probes: term `k` is `<w_k, v> / k` with `w_k = v^T J^k` from the vjp chain. What differs
//! between the estimators is only the weight of each term (all ones for the truncated series,
//! the inverse survival probability of the roulette draw beyond the exact terms). Every
//! backend takes its probes from [`crate::rng::probe_vector`] and its weights from
//! [`LogDetMethod::term_weights`], so the same seed gives the same estimate everywhere.
//!
//! [`LogDetLayout`] says where the probes and weights of a whole batch sit in the flat `probes`
//! and `coef` inputs of a compiled plan (`plan.json`'s `logdet` field).

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::rng::{probe_vector, streams, Rng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Gaussian,
    Rademacher,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RouletteDist {
    #[default]
    Geometric,
    Poisson,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// Full Jacobian, `ln|det|` (small dimensions only).
    Exact,
    /// Truncated power series with Hutchinson probes (biased, cheap).
    #[default]
    Series,
    /// Russian-roulette series (unbiased).
    Roulette,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogDetSpec {
    pub estimator: Estimator,
    /// Series terms (the deterministic part for roulette).
    pub terms: usize,
    pub probes: usize,
    pub probe: ProbeKind,
    pub seed: u64,
    pub roulette: RouletteDist,
    /// Geometric success probability, or Poisson mean.
    pub roulette_param: f64,
}

impl Default for LogDetSpec {
    fn default() -> Self {
        Self {
            estimator: Estimator::Series,
            terms: 5,
            probes: 1,
            probe: ProbeKind::Gaussian,
            seed: 0,
            roulette: RouletteDist::Geometric,
            roulette_param: 0.5,
        }
    }
}

impl LogDetSpec {
    /// The estimator these settings describe.
    pub fn method(&self) -> LogDetMethod {
        match self.estimator {
            Estimator::Exact => LogDetMethod::Exact,
            Estimator::Series => LogDetMethod::Series {
                terms: self.terms,
                probes: self.probes,
                kind: self.probe,
                seed: self.seed,
            },
            Estimator::Roulette => LogDetMethod::Roulette {
                terms: self.terms,
                probes: self.probes,
                kind: self.probe,
                seed: self.seed,
                dist: self.roulette,
                param: self.roulette_param,
            },
        }
    }
}

/// How a forward pass computes each block's log-det.
#[derive(Clone, Debug, PartialEq)]
pub enum LogDetMethod {
    /// No log-det (classifiers, or z only).
    None,
    /// `ln|det(I + J)|` from the full Jacobian.
    Exact,
    /// Truncated series, Hutchinson probes from the seeded generator.
    Series {
        terms: usize,
        probes: usize,
        kind: ProbeKind,
        seed: u64,
    },
    /// Russian roulette: `terms` exact terms plus a random number more, reweighted.
    Roulette {
        terms: usize,
        probes: usize,
        kind: ProbeKind,
        seed: u64,
        dist: RouletteDist,
        param: f64,
    },
}

impl LogDetMethod {
    /// Whether the estimate is random (its probes or roulette draws come from a seed).
    pub fn is_stochastic(&self) -> bool {
        matches!(self, Self::Series { .. } | Self::Roulette { .. })
    }

    /// The same estimator with its probes and draws from `seed`.
    pub fn with_seed(&self, seed: u64) -> LogDetMethod {
        let mut m = self.clone();
        if let Self::Series { seed: s, .. } | Self::Roulette { seed: s, .. } = &mut m {
            *s = seed;
        }
        m
    }

    /// The probe seed (None for deterministic methods).
    pub fn seed(&self) -> Option<u64> {
        match *self {
            Self::Series { seed, .. } | Self::Roulette { seed, .. } => Some(seed),
            _ => None,
        }
    }

    /// The settings this method stands for (None for [`LogDetMethod::None`]); fields a method
    /// does not use keep their defaults. The inverse of [`LogDetSpec::method`].
    pub fn spec(&self) -> Option<LogDetSpec> {
        let d = LogDetSpec::default();
        Some(match *self {
            Self::None => return None,
            Self::Exact => LogDetSpec {
                estimator: Estimator::Exact,
                ..d
            },
            Self::Series {
                terms,
                probes,
                kind,
                seed,
            } => LogDetSpec {
                estimator: Estimator::Series,
                terms,
                probes,
                probe: kind,
                seed,
                ..d
            },
            Self::Roulette {
                terms,
                probes,
                kind,
                seed,
                dist,
                param,
            } => LogDetSpec {
                estimator: Estimator::Roulette,
                terms,
                probes,
                probe: kind,
                seed,
                roulette: dist,
                roulette_param: param,
            },
        })
    }

    /// Probes per block (0 for the methods that take none).
    pub fn probes(&self) -> usize {
        match *self {
            Self::Series { probes, .. } | Self::Roulette { probes, .. } => probes,
            Self::None | Self::Exact => 0,
        }
    }

    /// Seed and kind of the probes (None for the methods that take none).
    pub fn probe_stream(&self) -> Option<(u64, ProbeKind)> {
        match *self {
            Self::Series { seed, kind, .. } | Self::Roulette { seed, kind, .. } => {
                Some((seed, kind))
            }
            Self::None | Self::Exact => None,
        }
    }

    /// Weight of each series term (index k-1 for term k) for `block` of the `sample`-th sample
    /// of the array being run: ones for the truncated series; for roulette the exact terms,
    /// then the drawn extra terms each divided by `P(N >= k - terms)`. Empty for the methods
    /// without a series.
    pub fn term_weights(&self, block: usize, sample: usize) -> Vec<f64> {
        match *self {
            Self::Series { terms, .. } => vec![1.0; terms],
            Self::Roulette {
                terms,
                seed,
                dist,
                param,
                ..
            } => {
                let mut rng =
                    Rng::for_stream(seed, &[streams::ROULETTE, block as u64, sample as u64]);
                let extra = draw(dist, param, &mut rng);
                (1..=terms + extra)
                    .map(|k| {
                        if k <= terms {
                            1.0
                        } else {
                            1.0 / survival(dist, param, k - terms)
                        }
                    })
                    .collect()
            }
            Self::None | Self::Exact => vec![],
        }
    }

    /// The probe of `(block, sample, probe)` for this method's seed and kind.
    pub fn probe(&self, block: usize, sample: usize, probe: usize, dim: usize) -> Vec<f64> {
        let (seed, kind) = self.probe_stream().unwrap_or((0, ProbeKind::Gaussian));
        probe_vector(
            seed,
            block,
            sample,
            probe,
            dim,
            kind == ProbeKind::Rademacher,
        )
    }
}

/// Draws the number of extra roulette terms N (N >= 0; capped at 10,000 so a degenerate
/// parameter cannot loop for ever).
pub fn draw(dist: RouletteDist, param: f64, rng: &mut Rng) -> usize {
    match dist {
        // P(N = m) = p (1-p)^m.
        RouletteDist::Geometric => {
            let mut n = 0;
            while rng.uniform() >= param && n < 10_000 {
                n += 1;
            }
            n
        }
        // Knuth's product of uniforms; fine for the small means used here.
        RouletteDist::Poisson => {
            let l = (-param).exp();
            let (mut k, mut prod) = (0usize, rng.uniform());
            while prod > l && k < 10_000 {
                k += 1;
                prod *= rng.uniform();
            }
            k
        }
    }
}

/// `P(N >= m)`.
pub fn survival(dist: RouletteDist, param: f64, m: usize) -> f64 {
    match dist {
        RouletteDist::Geometric => (1.0 - param).powi(m as i32),
        RouletteDist::Poisson => {
            // 1 - P(N <= m-1).
            let mut pmf = (-param).exp();
            let mut cdf = 0.0;
            for j in 0..m {
                if j > 0 {
                    pmf *= param / j as f64;
                }
                cdf += pmf;
            }
            (1.0 - cdf).max(f64::MIN_POSITIVE)
        }
    }
}

/// Where a compiled plan's log-det inputs sit. Per sample, `probes` holds block 0's probes
/// 0..P, then block 1's, ...; `coef` holds `coef_stride` weights per block, weight `k`
/// (0-based) being `w_k (-1)^k / ((k+1) P)`, so that the accumulation
/// `sum_k coef_k <w_k, v>` is the probe average of the series.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogDetLayout {
    /// Per block: dimension.
    pub block_dims: Vec<usize>,
    pub probes: usize,
    /// Coefficient slots per block (`terms` + the room left for roulette draws).
    pub coef_stride: usize,
    /// Terms of the plan's plain series entry point.
    pub terms: usize,
}

use crate::plan::entries::{FORWARD as SERIES_ENTRY, FORWARD_ROULETTE as ROULETTE_ENTRY};

impl LogDetLayout {
    pub fn probe_elems(&self) -> usize {
        self.block_dims.iter().sum::<usize>() * self.probes
    }

    pub fn coef_elems(&self) -> usize {
        self.block_dims.len() * self.coef_stride
    }

    /// Probes for samples `first..first + batch` of an array, in this layout.
    pub fn probes_for(&self, method: &LogDetMethod, first: usize, batch: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(batch * self.probe_elems());
        for sample in first..first + batch {
            for (b, &dim) in self.block_dims.iter().enumerate() {
                for p in 0..self.probes {
                    out.extend(method.probe(b, sample, p, dim).iter().map(|&x| x as f32));
                }
            }
        }
        out
    }

    /// The entry point to run and its `coef` input for samples `first..first + batch`.
    /// `None` for the methods a plan does not run (exact, none); an error when the method needs
    /// more terms or probes than the plan was compiled for.
    pub fn coefs_for(
        &self,
        method: &LogDetMethod,
        first: usize,
        batch: usize,
    ) -> Result<Option<(&'static str, Vec<f32>)>> {
        let (entry, max_terms) = match *method {
            LogDetMethod::None | LogDetMethod::Exact => return Ok(None),
            LogDetMethod::Series { terms, .. } if terms <= self.terms => (SERIES_ENTRY, self.terms),
            LogDetMethod::Series { .. } | LogDetMethod::Roulette { .. } => {
                (ROULETTE_ENTRY, self.coef_stride)
            }
        };
        if method.probes() != self.probes {
            return Err(RuntimeError::Unsupported(format!(
                "{} probes per block: the plan was compiled for {}; recompile with that logdet.probes",
                method.probes(),
                self.probes
            )));
        }
        let mut out = vec![0.0f32; batch * self.coef_elems()];
        for (i, sample) in (first..first + batch).enumerate() {
            for b in 0..self.block_dims.len() {
                let w = method.term_weights(b, sample);
                if w.len() > max_terms {
                    return Err(RuntimeError::Unsupported(format!(
                        "a log-det of {} terms (block {b}, sample {sample}): the compiled plan runs at most {max_terms}; recompile with a larger logdet.terms",
                        w.len()
                    )));
                }
                let base = i * self.coef_elems() + b * self.coef_stride;
                for (k0, wk) in w.iter().enumerate() {
                    let k1 = k0 + 1;
                    let sign = if k1 % 2 == 1 { 1.0 } else { -1.0 };
                    out[base + k0] = (sign * wk / (k1 as f64 * self.probes as f64)) as f32;
                }
            }
        }
        Ok(Some((entry, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `LogDetMethod::spec` and `LogDetSpec::method` are inverses on every estimator.
    #[test]
    fn method_and_spec_round_trip() {
        let methods = [
            LogDetMethod::Exact,
            LogDetMethod::Series {
                terms: 7,
                probes: 3,
                kind: ProbeKind::Rademacher,
                seed: 11,
            },
            LogDetMethod::Roulette {
                terms: 2,
                probes: 1,
                kind: ProbeKind::Gaussian,
                seed: 5,
                dist: RouletteDist::Poisson,
                param: 2.0,
            },
        ];
        for m in methods {
            assert_eq!(m.spec().map(|s| s.method()), Some(m.clone()));
        }
        assert_eq!(LogDetMethod::None.spec(), None);
    }
}
