//! Log-determinant estimators of a block's `ln det(I + J_g)`.

use nalgebra::DMatrix;

use super::Reference;
use crate::spec::{Estimator, LogDetSpec, ProbeKind, RouletteDist};
use iresnetc_runtime::rng::{probe_vector, roulette, streams, Rng};

/// How the forward pass computes each block's log-det.
#[derive(Clone, Debug)]
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
    pub fn from_spec(s: &LogDetSpec) -> Self {
        match s.estimator {
            Estimator::Exact => Self::Exact,
            Estimator::Series => Self::Series {
                terms: s.terms,
                probes: s.probes,
                kind: s.probe,
                seed: s.seed,
            },
            Estimator::Roulette => Self::Roulette {
                terms: s.terms,
                probes: s.probes,
                kind: s.probe,
                seed: s.seed,
                dist: s.roulette,
                param: s.roulette_param,
            },
        }
    }

    pub fn block_logdet(&self, r: &Reference<'_>, b: usize, sample: usize, x: &[f64]) -> f64 {
        match *self {
            Self::None => 0.0,
            Self::Exact => exact_block_logdet(r, b, x),
            Self::Series {
                terms,
                probes,
                kind,
                seed,
            } => {
                let weights = vec![1.0; terms];
                hutchinson(r, b, sample, x, &weights, probes, kind, seed)
            }
            Self::Roulette {
                terms,
                probes,
                kind,
                seed,
                dist,
                param,
            } => {
                let mut rng = Rng::for_stream(seed, &[streams::ROULETTE, b as u64, sample as u64]);
                let extra = draw(dist, param, &mut rng);
                // Term k (1-based) beyond the exact ones is divided by P(N >= k - terms).
                let weights: Vec<f64> = (1..=terms + extra)
                    .map(|k| {
                        if k <= terms {
                            1.0
                        } else {
                            1.0 / survival(dist, param, k - terms)
                        }
                    })
                    .collect();
                hutchinson(r, b, sample, x, &weights, probes, kind, seed)
            }
        }
    }
}

/// Hutchinson estimate of `sum_k weights[k-1] (-1)^(k+1) tr(J^k) / k`, averaged over probes.
#[allow(clippy::too_many_arguments)]
fn hutchinson(
    r: &Reference<'_>,
    b: usize,
    sample: usize,
    x: &[f64],
    weights: &[f64],
    probes: usize,
    kind: ProbeKind,
    seed: u64,
) -> f64 {
    let (_, inputs) = r.branch(b, x);
    let mut total = 0.0;
    for p in 0..probes {
        let v = probe_vector(seed, b, sample, p, x.len(), kind == ProbeKind::Rademacher);
        let mut w = v.clone();
        for (k0, wt) in weights.iter().enumerate() {
            let k = k0 + 1;
            w = r.branch_vjp(b, &inputs, &w);
            let t: f64 = w.iter().zip(&v).map(|(a, b)| a * b).sum();
            let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
            total += sign * wt * t / k as f64;
        }
    }
    total / probes as f64
}

/// Draws the number of extra terms N (N >= 0): the runtime's draw, so every backend
/// (the native CPU engine included) uses the same numbers for a seed.
pub fn draw(dist: RouletteDist, param: f64, rng: &mut Rng) -> usize {
    roulette::draw(runtime_dist(dist), param, rng)
}

/// `P(N >= m)`.
pub fn survival(dist: RouletteDist, param: f64, m: usize) -> f64 {
    roulette::survival(runtime_dist(dist), param, m)
}

fn runtime_dist(d: RouletteDist) -> roulette::Dist {
    match d {
        RouletteDist::Geometric => roulette::Dist::Geometric,
        RouletteDist::Poisson => roulette::Dist::Poisson,
    }
}

/// Largest dimension the exact estimator accepts (a d x d Jacobian, d vjps and an LU).
pub const EXACT_MAX_DIM: usize = 4096;

/// The full Jacobian `J_g` at x, row i = `e_i^T J`.
pub fn block_jacobian(r: &Reference<'_>, b: usize, x: &[f64]) -> DMatrix<f64> {
    let d = x.len();
    let (_, inputs) = r.branch(b, x);
    let mut j = DMatrix::zeros(d, d);
    let mut e = vec![0.0; d];
    for i in 0..d {
        e[i] = 1.0;
        let row = r.branch_vjp(b, &inputs, &e);
        e[i] = 0.0;
        for (c, v) in row.iter().enumerate() {
            j[(i, c)] = *v;
        }
    }
    j
}

/// `ln|det(I + J_g(x))|`.
pub fn exact_block_logdet(r: &Reference<'_>, b: usize, x: &[f64]) -> f64 {
    let j = block_jacobian(r, b, x);
    let d = j.nrows();
    let lu = (DMatrix::identity(d, d) + j).lu();
    // Sum of log|u_ii| rather than ln|det|: the determinant itself can overflow.
    lu.u().diagonal().iter().map(|v| v.abs().ln()).sum()
}

/// The series with exact traces: `sum_{k<=terms} (-1)^(k+1) tr(J^k) / k`.
pub fn series_exact_traces(r: &Reference<'_>, b: usize, x: &[f64], terms: usize) -> f64 {
    let j = block_jacobian(r, b, x);
    let mut p = j.clone();
    let mut s = 0.0;
    for k in 1..=terms {
        let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
        s += sign * p.trace() / k as f64;
        p = &p * &j;
    }
    s
}
