//! The f64 reference executor: the oracle every backend is compared with.
//!
//! It interprets the graph one sample at a time (samples run on all cores),
//! straightforwardly and in double precision; clarity beats speed here, but
//! the heavy lifting (convs) goes through the im2col + GEMM kernels.

mod backend;
mod logdet;

pub use backend::ReferenceBackend;

pub use logdet::{
    draw, exact_block_logdet, series_exact_traces, survival, BlockLogDet, LogDetMethod,
};

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::{actnorm, layout, Op};
use crate::spec::ModelKind;
use iresnetc_runtime::rng::{streams, Rng};

/// Output of a forward pass over a batch.
#[derive(Clone, Debug)]
pub struct ForwardOut {
    /// Flows: `z` flattened per sample (latent parts in order); classifiers: logits.
    pub outputs: Vec<Vec<f64>>,
    /// Per-sample total log-det (0 for classifiers or when not requested).
    pub logdet: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct InverseStats {
    /// Largest number of fixed-point iterations any block needed (over samples).
    pub max_iters: usize,
    /// Largest final residual `max|x + g(x) - y|` over blocks and samples.
    pub max_residual: f64,
    /// Whether every block reached the tolerance before the cap.
    pub converged: bool,
    /// Per block (in model order): the largest iteration count over samples.
    pub block_iters: Vec<usize>,
    /// Per block: the largest final residual over samples.
    pub block_residuals: Vec<f64>,
}

pub struct Reference<'g> {
    pub g: &'g Graph,
}

/// Runs `f` on every sample, on all cores, keeping order.
fn par_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(usize, T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if threads <= 1 || items.len() <= 1 {
        return items
            .into_iter()
            .enumerate()
            .map(|(i, t)| f(i, t))
            .collect();
    }
    let n = items.len();
    let slots: Vec<std::sync::Mutex<Option<T>>> = items
        .into_iter()
        .map(|t| std::sync::Mutex::new(Some(t)))
        .collect();
    let results: Vec<std::sync::Mutex<Option<R>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.min(n) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let item = slots[i].lock().ok().and_then(|mut g| g.take());
                if let Some(item) = item {
                    let r = f(i, item);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .ok()
                .flatten()
                .expect("every sample was processed")
        })
        .collect()
}

impl<'g> Reference<'g> {
    pub fn new(g: &'g Graph) -> Self {
        Self { g }
    }

    /// `g(x)` of block `b`, and the input of every node of the branch (the vjp needs them).
    pub fn branch(&self, b: usize, x: &[f64]) -> (Vec<f64>, Vec<Vec<f64>>) {
        let block = &self.g.blocks[b];
        let mut h = x.to_vec();
        let mut inputs = Vec::with_capacity(block.body.len());
        for &ix in &block.body {
            let n = self.g.node(ix);
            let in_shape = self.g.input_shape(ix);
            let out = n.op.eval(&n.name, &self.g.params, &[&h], &in_shape);
            inputs.push(std::mem::replace(&mut h, out));
        }
        (h, inputs)
    }

    /// `w^T J_g` at the point whose branch inputs are `inputs` (from [`Self::branch`]).
    pub fn branch_vjp(&self, b: usize, inputs: &[Vec<f64>], w: &[f64]) -> Vec<f64> {
        let block = &self.g.blocks[b];
        let mut dy = w.to_vec();
        for (k, &ix) in block.body.iter().enumerate().rev() {
            let n = self.g.node(ix);
            dy =
                n.op.vjp(&n.name, &self.g.params, &inputs[k], &dy)
                    .expect("the verifier only admits ops with a vjp in a branch");
        }
        dy
    }

    /// Forward pass of one sample; `ld(b, x)` returns the log-det of block b's
    /// branch at its input x (or 0 when no log-det is wanted).
    fn forward_one(
        &self,
        x: &[f64],
        mut ld: impl FnMut(usize, &[f64]) -> f64,
    ) -> Result<(Vec<f64>, f64)> {
        let g = self.g;
        let mut vals: HashMap<NodeIndex, Vec<f64>> = HashMap::new();
        vals.insert(g.input, x.to_vec());
        let block_of_residual = g.block_of_residual();
        let mut logdet = 0.0;
        for ix in g.topo_order()? {
            let n = g.node(ix);
            if n.op == Op::Input || n.block.is_some() {
                continue;
            }
            let ins = g.inputs(ix);
            let in_shape = g.input_shape(ix);
            let out = if let Some(&b) = block_of_residual.get(&ix) {
                let a = &vals[&ins[0]];
                let (gx, _) = self.branch(b, a);
                logdet += ld(b, a);
                a.iter().zip(&gx).map(|(a, g)| a + g).collect()
            } else {
                if n.op == Op::ActNorm {
                    logdet += actnorm::logdet(&n.name, &g.params, &in_shape);
                }
                let args: Vec<&[f64]> = ins.iter().map(|i| vals[i].as_slice()).collect();
                n.op.eval(&n.name, &g.params, &args, &in_shape)
            };
            vals.insert(ix, out);
        }
        let out = match g.spec.kind {
            ModelKind::Flow => g
                .latents
                .iter()
                .flat_map(|l| vals[l].iter().copied())
                .collect(),
            ModelKind::Classifier => g.logits.map(|l| vals[&l].clone()).unwrap_or_default(),
        };
        Ok((out, logdet))
    }

    /// Forward over a batch with the given log-det method.
    pub fn forward(&self, xs: &[Vec<f64>], method: &LogDetMethod) -> Result<ForwardOut> {
        self.forward_from(xs, method, 0)
    }

    /// Forward of a slice of a larger array whose first sample has index
    /// `first`: probes and roulette draws depend on the index within the whole
    /// array, so running in chunks gives the same numbers as one call.
    pub fn forward_from(
        &self,
        xs: &[Vec<f64>],
        method: &LogDetMethod,
        first: usize,
    ) -> Result<ForwardOut> {
        self.check_batch(xs, self.g.input_dim(), "input")?;
        if matches!(method, LogDetMethod::Exact) {
            let g = self.g;
            if let Some(b) = g
                .blocks
                .iter()
                .find(|b| g.node(b.actnorm).shape.iter().product::<usize>() > logdet::EXACT_MAX_DIM)
            {
                return Err(Error::Unsupported {
                    what: format!("logdet.estimator = \"exact\" on block `{}`", b.name),
                    reason: format!(
                        "its dimension {} exceeds {} (a dense Jacobian per block); use \"series\" or \"roulette\"",
                        g.node(b.actnorm).shape.iter().product::<usize>(),
                        logdet::EXACT_MAX_DIM
                    ),
                });
            }
        }
        let results = par_map(xs.to_vec(), |i, x| {
            self.forward_one(&x, |b, a| method.block_logdet(self, b, first + i, a))
        });
        let mut out = ForwardOut {
            outputs: vec![],
            logdet: vec![],
        };
        for r in results {
            let (o, l) = r?;
            out.outputs.push(o);
            out.logdet.push(l);
        }
        Ok(out)
    }

    fn check_batch(&self, xs: &[Vec<f64>], dim: usize, what: &str) -> Result<()> {
        for (i, x) in xs.iter().enumerate() {
            if x.len() != dim {
                return Err(Error::Array {
                    file: "<memory>".into(),
                    array: what.into(),
                    reason: format!("sample {i} has {} values, expected {dim}", x.len()),
                });
            }
            if let Some(j) = x.iter().position(|v| !v.is_finite()) {
                return Err(Error::Array {
                    file: "<memory>".into(),
                    array: what.into(),
                    reason: format!("sample {i} element {j} is {}", x[j]),
                });
            }
        }
        Ok(())
    }

    /// Fixed-point inverse of block b's `y = a + g(a)`: returns `a` and the iterations used.
    pub fn invert_block(&self, b: usize, y: &[f64]) -> (Vec<f64>, usize, f64, bool) {
        let spec = &self.g.spec.inverse;
        let mut x = y.to_vec();
        let mut iters = 0;
        let mut converged = false;
        while iters < spec.max_iters {
            let (gx, _) = self.branch(b, &x);
            let next: Vec<f64> = y.iter().zip(&gx).map(|(y, g)| y - g).collect();
            let step = next
                .iter()
                .zip(&x)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            x = next;
            iters += 1;
            if step <= spec.tol {
                converged = true;
                break;
            }
        }
        let (gx, _) = self.branch(b, &x);
        let residual = x
            .iter()
            .zip(&gx)
            .zip(y)
            .map(|((x, g), y)| (x + g - y).abs())
            .fold(0.0, f64::max);
        (x, iters, residual, converged)
    }

    /// One sample's inverse: x, per block the iterations and final residual, all converged.
    fn inverse_one(&self, z: &[f64]) -> Result<(Vec<f64>, Vec<usize>, Vec<f64>, bool)> {
        let g = self.g;
        if g.spec.kind != ModelKind::Flow {
            return Err(Error::Unsupported {
                what: format!("model `{}`", g.spec.name),
                reason: "only flows are invertible end to end (a classifier's head is not)".into(),
            });
        }
        // Split z into its latent parts.
        let mut vals: HashMap<NodeIndex, Vec<f64>> = HashMap::new();
        let mut off = 0;
        for &l in &g.latents {
            let n: usize = g.node(l).shape.iter().product();
            vals.insert(l, z[off..off + n].to_vec());
            off += n;
        }
        let block_of_residual = g.block_of_residual();
        let mut block_iters = vec![0; g.blocks.len()];
        let mut block_res = vec![0.0; g.blocks.len()];
        let mut all_conv = true;
        for ix in g.inverse_order()? {
            let n = g.node(ix);
            let y = vals.get(&ix).cloned().ok_or_else(|| Error::Graph {
                node: n.name.clone(),
                reason: "inverse reached a node whose output is unknown".into(),
            })?;
            let ins = g.inputs(ix);
            let in_shape = g.input_shape(ix);
            match &n.op {
                Op::Residual => {
                    let b = block_of_residual[&ix];
                    let (a, it, res, conv) = self.invert_block(b, &y);
                    block_iters[b] = it;
                    block_res[b] = res;
                    all_conv &= conv;
                    vals.insert(ins[0], a);
                }
                Op::ActNorm => {
                    vals.insert(ins[0], actnorm::inverse(&n.name, &g.params, &y, &in_shape));
                }
                Op::Squeeze { order } => {
                    vals.insert(ins[0], layout::unsqueeze(&y, &in_shape, *order));
                }
                Op::PadChannels { .. } => {
                    let len: usize = in_shape.iter().product();
                    vals.insert(ins[0], y[..len].to_vec());
                }
                Op::SliceChannels { start, .. } => {
                    let per: usize = in_shape[1..].iter().product::<usize>().max(1);
                    let total: usize = in_shape.iter().product();
                    let full = vals.entry(ins[0]).or_insert_with(|| vec![0.0; total]);
                    full[start * per..start * per + y.len()].copy_from_slice(&y);
                }
                other => {
                    return Err(Error::Unsupported {
                        what: n.name.clone(),
                        reason: format!("op {} has no inverse", other.kind()),
                    })
                }
            }
        }
        let x = vals.remove(&g.input).ok_or_else(|| Error::Graph {
            node: "input".into(),
            reason: "inverse did not reach the input".into(),
        })?;
        Ok((x, block_iters, block_res, all_conv))
    }

    /// Inverse over a batch: `x` with `forward(x) = z`.
    pub fn inverse(&self, zs: &[Vec<f64>]) -> Result<(Vec<Vec<f64>>, InverseStats)> {
        self.check_batch(zs, self.g.latent_dim(), "z")?;
        let results = par_map(zs.to_vec(), |_, z| self.inverse_one(&z));
        let mut stats = InverseStats {
            converged: true,
            block_iters: vec![0; self.g.blocks.len()],
            block_residuals: vec![0.0; self.g.blocks.len()],
            ..Default::default()
        };
        let mut xs = vec![];
        for r in results {
            let (x, it, res, conv) = r?;
            for (s, i) in stats.block_iters.iter_mut().zip(&it) {
                *s = (*s).max(*i);
            }
            for (s, r) in stats.block_residuals.iter_mut().zip(&res) {
                *s = s.max(*r);
                stats.max_residual = stats.max_residual.max(*r);
            }
            stats.converged &= conv;
            xs.push(x);
        }
        stats.max_iters = stats.block_iters.iter().copied().max().unwrap_or(0);
        Ok((xs, stats))
    }

    /// Log-density of z under the learned diagonal Gaussian prior.
    pub fn prior_logp(&self, z: &[f64]) -> f64 {
        let (mu, ls) = self.prior();
        iresnetc_runtime::modes::prior_logp(z, mu, ls)
    }

    fn prior(&self) -> (&[f64], &[f64]) {
        let get = |n: &str| {
            self.g
                .params
                .get(n)
                .map(|t| t.data.as_slice())
                .unwrap_or(&[])
        };
        (get("prior.mean"), get("prior.log_std"))
    }

    /// Dequantized input for density evaluation: `(255 x + u) / 256 - 0.5`, u ~ U(0,1) seeded.
    pub fn dequantize(&self, xs: &[Vec<f64>], seed: u64, first: usize) -> Vec<Vec<f64>> {
        xs.iter()
            .enumerate()
            .map(|(i, x)| {
                let mut r = Rng::for_stream(seed, &[streams::DEQUANTIZE, (first + i) as u64]);
                x.iter()
                    .map(|v| (255.0 * v + r.uniform()) / 256.0 - 0.5)
                    .collect()
            })
            .collect()
    }

    /// Per sample `(log p(x), bits/dim)`. With `data.dequantize` the input is in
    /// [0, 1], dequantized first, and bits/dim includes the 8 bits of the 1/256 bins.
    pub fn density(
        &self,
        xs: &[Vec<f64>],
        method: &LogDetMethod,
        seed: u64,
    ) -> Result<Vec<(f64, f64)>> {
        self.density_from(xs, method, seed, 0)
    }

    /// [`Self::density`] of a chunk starting at sample `first` (see [`Self::forward_from`]).
    pub fn density_from(
        &self,
        xs: &[Vec<f64>],
        method: &LogDetMethod,
        seed: u64,
        first: usize,
    ) -> Result<Vec<(f64, f64)>> {
        if self.g.spec.kind != ModelKind::Flow {
            return Err(Error::Unsupported {
                what: format!("model `{}`", self.g.spec.name),
                reason: "density needs a flow".into(),
            });
        }
        let deq = self.g.spec.data.dequantize;
        let inputs = if deq {
            self.dequantize(xs, seed, first)
        } else {
            xs.to_vec()
        };
        let fwd = self.forward_from(&inputs, method, first)?;
        let d = self.g.input_dim() as f64;
        Ok(fwd
            .outputs
            .iter()
            .zip(&fwd.logdet)
            .map(|(z, ld)| {
                let logp = self.prior_logp(z) + ld;
                let bpd = -logp / (d * std::f64::consts::LN_2) + if deq { 8.0 } else { 0.0 };
                (logp, bpd)
            })
            .collect())
    }

    /// `num` samples from the prior, mapped back through the inverse.
    pub fn sample(&self, num: usize, seed: u64) -> Result<(Vec<Vec<f64>>, InverseStats)> {
        let (mu, ls) = self.prior();
        let zs: Vec<Vec<f64>> = (0..num)
            .map(|i| {
                let mut r = Rng::for_stream(seed, &[streams::PRIOR_SAMPLE, i as u64]);
                mu.iter()
                    .zip(ls)
                    .map(|(m, s)| m + s.exp() * r.normal())
                    .collect()
            })
            .collect();
        self.inverse(&zs)
    }
}
