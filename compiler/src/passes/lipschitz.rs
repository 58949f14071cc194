//! The Lipschitz pass: spectral normalization of every linear map inside a
//! residual branch, then a *certificate* per layer and per block.
//!
//! 1. Power iteration on the layer as an operator at its real input shape
//!    (convs with their padding and stride; Lanczos-accelerated for kxk convs)
//!    estimates sigma from below, to `power_tol` relative change or `power_max_iters`.
//! 2. Soft scaling `W <- W / max(1, sigma / c)`, per `lipschitz.normalize`:
//!    `always` (every layer), `if_needed` (a block whose weights *as given*
//!    already certify a bound below 1 keeps them bit for bit), `never`.
//! 3. A certified upper bound of the scaled layer: exact SVD for dense and
//!    1x1 layers and for small kxk operators, the circular-embedding (FFT of
//!    the kernel) bound for larger kxk ones.
//! 4. Block bound `L = prod(layer bounds)` (activations are 1-Lipschitz),
//!    which must be < 1; from it the fixed-point iterations that the inverse
//!    needs (Banach) and the truncation error of the log-det series.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::{param_name, Op};
use crate::spec::Normalize;
use crate::spectral;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerReport {
    pub name: String,
    pub kind: String,
    /// Power-iteration estimate before scaling.
    pub sigma_estimate: f64,
    pub power_iterations: usize,
    pub converged: bool,
    /// The factor the weight was divided by (>= 1); the bias is left as is.
    pub scale: f64,
    /// Certified upper bound of the operator norm after scaling.
    pub certified_bound: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockReport {
    pub name: String,
    /// Product of the layers' certified bounds: Lip(g) <= this.
    pub lipschitz_bound: f64,
    /// Dimension of the block's input.
    pub dim: usize,
    /// Fixed-point iterations that guarantee an error below
    /// `inverse.tol * |x_1 - x_0|` (the first step), from the Banach bound.
    pub inverse_iters: usize,
    /// Bound on |truncated series - log-det| for `logdet.terms` terms.
    pub logdet_truncation_bound: f64,
    pub macs: u64,
    /// The block's weights were left exactly as given (`lipschitz.normalize` =
    /// `if_needed` with a certified bound below 1 as given, or `never`).
    #[serde(default)]
    pub kept_as_given: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LipschitzReport {
    pub coeff: f64,
    /// The `lipschitz.normalize` mode the weights went through.
    #[serde(default)]
    pub normalize: Normalize,
    pub layers: Vec<LayerReport>,
    pub blocks: Vec<BlockReport>,
    pub max_block_bound: f64,
}

/// Relative slack of the soft scaling: `sigma <= c (1 + this)` counts as normalized.
pub const ALREADY_NORMALIZED: f64 = 1e-6;

/// Iterations n with `L^n / (1 - L) * first_step <= tol`: after n steps of the
/// fixed point started at `x_0 = y`, the distance to the true inverse is below `tol`.
pub fn banach_iters(lip: f64, tol: f64, first_step: f64) -> usize {
    if first_step <= tol * (1.0 - lip) || first_step == 0.0 {
        return 1;
    }
    if lip <= 0.0 {
        return 1;
    }
    let n = ((tol * (1.0 - lip) / first_step).ln() / lip.ln()).ceil();
    if n.is_finite() {
        (n as usize).max(1)
    } else {
        usize::MAX
    }
}

/// `d * (-ln(1 - L) - sum_{k<=n} L^k / k)`: the series' tail bound.
pub fn truncation_bound(lip: f64, terms: usize, dim: usize) -> f64 {
    let partial: f64 = (1..=terms).map(|k| lip.powi(k as i32) / k as f64).sum();
    (dim as f64 * (-(1.0 - lip).ln() - partial)).max(0.0)
}

/// Normalizes and certifies; `progress(done, total)` is called per layer.
pub fn certify_with_progress(
    g: &mut Graph,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<LipschitzReport> {
    let lip = g.spec.lipschitz.clone();
    let seed = g.spec.seed;
    // Every linear layer of every branch is independent: estimate them in parallel.
    let work: Vec<(String, Op)> = g
        .blocks
        .iter()
        .flat_map(|b| b.body.iter())
        .filter(|&&ix| g.dag[ix].op.is_linear())
        .map(|&ix| (g.dag[ix].name.clone(), g.dag[ix].op.clone()))
        .collect();
    let total = work.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let params = &g.params;
    let mut results: Vec<Option<Candidate>> = vec![None; total];
    let next = std::sync::atomic::AtomicUsize::new(0);
    let chunks: Vec<Vec<(usize, Candidate)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= total {
                            break;
                        }
                        let (name, op) = &work[i];
                        let w = params
                            .get(&param_name(name, "weight"))
                            .map(|t| t.data.as_slice())
                            .unwrap_or(&[]);
                        out.push((
                            i,
                            layer(
                                name,
                                op,
                                w,
                                lip.coeff,
                                lip.power_tol,
                                lip.power_max_iters,
                                seed,
                                lip.normalize,
                            ),
                        ));
                        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        progress(d, total);
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for (i, r) in chunks.into_iter().flatten() {
        results[i] = Some(r);
    }
    let mut candidates = Vec::with_capacity(total);
    for (i, r) in results.into_iter().enumerate() {
        candidates.push(r.ok_or_else(|| Error::Graph {
            node: work[i].0.clone(),
            reason: "spectral estimate failed".into(),
        })?);
    }
    let index: std::collections::HashMap<String, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.report.name.clone(), i))
        .collect();
    // Per block: keep the weights as given, or take each layer's normalized version.
    let mut kept = vec![false; g.blocks.len()];
    for (bi, b) in g.blocks.iter().enumerate() {
        let members: Vec<usize> = b
            .body
            .iter()
            .filter_map(|&ix| index.get(&g.dag[ix].name).copied())
            .collect();
        let raw: f64 = members
            .iter()
            .map(|&i| candidates[i].raw_bound.unwrap_or(f64::INFINITY))
            .product();
        kept[bi] = match lip.normalize {
            Normalize::Always => false,
            Normalize::IfNeeded => raw < 1.0,
            Normalize::Never => true,
        };
        if kept[bi] {
            for &i in &members {
                let c = &mut candidates[i];
                c.report.scale = 1.0;
                c.report.certified_bound = c.raw_bound.unwrap_or(f64::INFINITY);
            }
        }
    }
    let mut layers = Vec::with_capacity(total);
    for c in candidates {
        let r = c.report;
        // Only the weight is scaled: the bias does not change the Lipschitz constant.
        if r.scale != 1.0 {
            if let Some(t) = g.params.get_mut(&param_name(&r.name, "weight")) {
                t.data.iter_mut().for_each(|v| *v /= r.scale);
            }
        }
        layers.push(r);
    }

    let by_name: std::collections::HashMap<&str, f64> = layers
        .iter()
        .map(|l| (l.name.as_str(), l.certified_bound))
        .collect();
    let mut blocks = Vec::new();
    for (bi, b) in g.blocks.iter().enumerate() {
        let bound: f64 = b
            .body
            .iter()
            .filter_map(|&ix| by_name.get(g.dag[ix].name.as_str()))
            .product();
        let dim: usize = g.dag[b.actnorm].shape.iter().product();
        if !(bound < 1.0) {
            return Err(Error::NotContractive {
                model: g.spec.name.clone(),
                block: b.name.clone(),
                bound,
            });
        }
        blocks.push(BlockReport {
            name: b.name.clone(),
            lipschitz_bound: bound,
            dim,
            inverse_iters: banach_iters(bound, g.spec.inverse.tol, 1.0),
            logdet_truncation_bound: truncation_bound(bound, g.spec.logdet.terms, dim),
            macs: g.block_macs(bi),
            kept_as_given: kept[bi],
        });
    }
    let max_block_bound = blocks.iter().map(|b| b.lipschitz_bound).fold(0.0, f64::max);
    Ok(LipschitzReport {
        coeff: lip.coeff,
        normalize: lip.normalize,
        layers,
        blocks,
        max_block_bound,
    })
}

/// The pass in its plain form.
pub fn certify(g: &mut Graph) -> Result<LipschitzReport> {
    certify_with_progress(g, &|_, _| {})
}

/// One layer's normalized version, and (unless `normalize = always`) the
/// certified bound of its weights as given, for the per-block decision.
#[derive(Clone, Debug)]
struct Candidate {
    report: LayerReport,
    raw_bound: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
fn layer(
    name: &str,
    op: &Op,
    w: &[f64],
    coeff: f64,
    tol: f64,
    max_iters: usize,
    seed: u64,
    mode: Normalize,
) -> Candidate {
    let layer_seed = iresnetc_runtime::rng::Rng::for_name(seed, name).next_u64();
    let est = match op {
        // A 1x1 conv applies the same [cout, cin] matrix at every pixel: its operator norm
        // is that matrix's.
        Op::Conv2d { geom } if geom.k == 1 && geom.stride == 1 => {
            matrix_estimate(geom.cin, geom.cout, w, tol, max_iters, layer_seed)
        }
        // Lanczos is power iteration's Krylov acceleration: the same estimate from below,
        // but conv spectra bunch up near the top and plain power iteration needs hundreds of
        // steps (and stalls short of 1e-6) there.
        Op::Conv2d { geom } => spectral::conv_sigma_lanczos(geom, w, tol, max_iters, layer_seed),
        Op::Dense { fin, fout } => matrix_estimate(*fin, *fout, w, tol, max_iters, layer_seed),
        _ => unreachable!("only linear layers are normalized"),
    };
    let bound_of = |w: &[f64]| certified_bound(op, w);
    // Weights that are already normalized (a bundle's, or PyTorch's after
    // spectral_norm) come back through f32 with sigma a few ulps above c;
    // rescaling them by 1 + 1e-9 would only churn them, so within
    // ALREADY_NORMALIZED of c they are left as they are. The certificate below
    // uses the weights as they end up, so nothing is assumed.
    let ratio = est.sigma / coeff;
    let scale = if ratio > 1.0 + ALREADY_NORMALIZED {
        ratio
    } else {
        1.0
    };
    let raw_bound = (mode != Normalize::Always).then(|| bound_of(w));
    let certified_bound = match raw_bound {
        // `never` keeps every block as given: the scaled bound would be unused.
        Some(b) if scale == 1.0 || mode == Normalize::Never => b,
        _ => {
            let scaled: Vec<f64> = w.iter().map(|v| v / scale).collect();
            bound_of(&scaled)
        }
    };
    Candidate {
        report: LayerReport {
            name: name.to_string(),
            kind: op.kind().to_string(),
            sigma_estimate: est.sigma,
            power_iterations: est.iterations,
            converged: est.converged,
            scale,
            certified_bound,
        },
        raw_bound,
    }
}

/// A certified upper bound of a linear layer's operator norm with weight `w`: the SVD for
/// dense and 1x1 layers (tight), exact on small kxk operators (where the circular bound is
/// loose), the circular-embedding bound elsewhere. Infinite for anything else.
pub fn certified_bound(op: &Op, w: &[f64]) -> f64 {
    match op {
        Op::Conv2d { geom } if geom.k == 1 && geom.stride == 1 => {
            spectral::matrix_sigma_max(geom.cout, geom.cin, w)
        }
        Op::Conv2d { geom } => spectral::conv_operator_sigma_exact(geom, w)
            .unwrap_or_else(|| spectral::conv_sigma_upper_bound(geom, w)),
        Op::Dense { fin, fout } => spectral::matrix_sigma_max(*fout, *fin, w),
        _ => f64::INFINITY,
    }
}

/// Per block, `(name, product of its linear layers' certified bounds)` for the weights as
/// they are now (nothing estimated, nothing scaled): what a loader checks a bundle's
/// contraction with, whatever its report says. Layers run in parallel.
pub fn block_bounds(g: &Graph) -> Vec<(String, f64)> {
    let work: Vec<(usize, &Op, &[f64])> = g
        .blocks
        .iter()
        .enumerate()
        .flat_map(|(bi, b)| b.body.iter().map(move |&ix| (bi, ix)))
        .filter(|&(_, ix)| g.dag[ix].op.is_linear())
        .map(|(bi, ix)| {
            let w = g
                .params
                .get(&param_name(&g.dag[ix].name, "weight"))
                .map_or(&[][..], |t| t.data.as_slice());
            (bi, &g.dag[ix].op, w)
        })
        .collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let found: Vec<(usize, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(_, op, w)) = work.get(i) else {
                            break;
                        };
                        // A missing weight cannot be certified: infinite.
                        let b = if w.is_empty() {
                            f64::INFINITY
                        } else {
                            certified_bound(op, w)
                        };
                        out.push((i, b));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    // A layer without a result (a worker that panicked) or a NaN counts as unbounded.
    let mut per_layer = vec![f64::INFINITY; work.len()];
    for (i, b) in found {
        per_layer[i] = if b.is_nan() { f64::INFINITY } else { b };
    }
    let mut bounds = vec![1.0f64; g.blocks.len()];
    for (&(bi, _, _), b) in work.iter().zip(per_layer) {
        bounds[bi] *= b;
    }
    g.blocks
        .iter()
        .zip(bounds)
        .map(|(b, l)| (b.name.clone(), l))
        .collect()
}

/// Estimate for a `[fout, fin]` matrix: Lanczos-accelerated power iteration
/// from a seeded random start (a few dozen matrix-vector products, far cheaper
/// than the SVD that certifies the bound).
fn matrix_estimate(
    fin: usize,
    fout: usize,
    w: &[f64],
    tol: f64,
    max_iters: usize,
    seed: u64,
) -> spectral::PowerIteration {
    spectral::lanczos_sigma(
        fin,
        fout,
        |x| crate::kernels::dense(fin, fout, x, w, None),
        |y| crate::kernels::dense_adjoint(fin, fout, y, w),
        None,
        tol,
        max_iters,
        seed,
    )
}
