//! The training loop: one step = power iterations on the persistent `u, v`,
//! the normalized weights, a batch (dequantized for image flows), loss and
//! gradient (split over threads), the gradient through the spectral norm, the
//! optimizer update, and the classifier's running statistics. Every random
//! number is a stream of `(seed, step, ...)`, so a run resumed from a
//! checkpoint takes exactly the steps the uninterrupted run takes.

use super::checkpoint::Checkpoint;
use super::data::Data;
use super::grad::{loss_grad, loss_grad_parallel, Options};
use super::kernels::Backend;
use super::logdet::{LogDetGrad, Noise};
use super::mat::Mat;
use super::optim::{OptimConfig, Optimizer};
use super::specnorm::SpecNorm;
use crate::error::{Error, Result};
use crate::ir::{self, Graph};
use crate::ops::{param_name, Op};
use crate::passes::{self, LipschitzReport};
use crate::spec::{Estimator, ModelKind, ModelSpec, TrainSpec};
use crate::tensor::{Params, Tensor};
use iresnetc_runtime::rng::Rng;

pub const STREAM_DEQUANTIZE: u64 = 106;
/// Largest per-block dimension for which training and evaluation use the exact log-det.
pub const EXACT_DIM: usize = 16;

/// Settings of a run: the `[train]` table after the flags are applied.
#[derive(Clone, Debug)]
pub struct Config {
    pub train: TrainSpec,
    pub seed: u64,
    pub threads: usize,
    /// Where the matrix products of a step run.
    pub backend: Backend,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Mean `-log p` (nats) or cross-entropy of the batch.
    pub loss: f64,
    /// Image flows: bits/dim of the batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_dim: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Largest over blocks of the product of the layers' normalized sigma estimates.
    pub lipschitz: f64,
    pub samples_per_s: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalMetrics {
    pub samples: usize,
    /// Mean `-log p` in nats (flows) or cross-entropy (classifiers).
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_dim: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

pub struct Trainer {
    pub graph: Graph,
    pub raw: Params,
    pub sn: SpecNorm,
    pub opt: Optimizer,
    pub step: u64,
    pub cfg: Config,
}

/// The log-det used by training for a model.
pub fn train_logdet(spec: &ModelSpec, dim: usize, override_: Option<Estimator>) -> LogDetGrad {
    let ld = &spec.logdet;
    match override_.or(spec.train.estimator).unwrap_or(ld.estimator) {
        Estimator::Exact if dim <= EXACT_DIM => LogDetGrad::Exact,
        Estimator::Roulette => LogDetGrad::Neumann {
            terms: ld.terms,
            probes: ld.probes,
            kind: ld.probe,
            roulette: Some((ld.roulette, ld.roulette_param)),
        },
        _ => LogDetGrad::Neumann {
            terms: ld.terms,
            probes: ld.probes,
            kind: ld.probe,
            roulette: None,
        },
    }
}

/// Sets every LipSwish beta of fresh initial weights to `beta` (stored raw,
/// as the inverse softplus: the activation uses `softplus(raw)`).
pub fn init_lipswish_beta(raw: &mut Params, beta: f64) {
    // softplus^-1(b) = ln(e^b - 1) = b + ln(1 - e^-b), stable for large b.
    let r = beta + (-(-beta).exp()).ln_1p();
    for (name, t) in raw.iter_mut() {
        if name.ends_with(".beta") {
            t.data.iter_mut().for_each(|v| *v = r);
        }
    }
}

fn largest_block_dim(g: &Graph) -> usize {
    g.blocks
        .iter()
        .map(|b| g.node(b.actnorm).shape.iter().product::<usize>())
        .max()
        .unwrap_or(0)
}

impl Trainer {
    /// A fresh run from initial parameters (`raw`: e.g. `weights::init`).
    pub fn new(spec: ModelSpec, raw: Params, cfg: Config) -> Result<Self> {
        let mut graph = ir::build(&spec)?;
        graph.params = raw.clone();
        graph.verify()?;
        let mut sn = SpecNorm::new(&graph, cfg.seed);
        // Start the persistent vectors near the top singular pair.
        sn.power_iterate(&raw, 50);
        let t = &cfg.train;
        let opt = Optimizer::new(OptimConfig {
            kind: t.optimizer,
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            momentum: t.momentum,
            weight_decay: t.weight_decay,
            warmup: t.warmup,
            clip: t.clip,
            ema: t.ema,
        });
        Ok(Self {
            graph,
            raw,
            sn,
            opt,
            step: 0,
            cfg,
        })
    }

    pub fn logdet(&self) -> LogDetGrad {
        train_logdet(&self.graph.spec, largest_block_dim(&self.graph), None)
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            step: self.step,
            seed: self.cfg.seed,
            model: self.graph.spec.name.clone(),
            params: self.raw.clone(),
            sn: self.sn.clone(),
            opt: self.opt.clone(),
        }
    }

    pub fn restore(&mut self, path: &std::path::Path) -> Result<()> {
        let (step, seed) = super::checkpoint::load(
            path,
            &self.graph.spec.name,
            &mut self.raw,
            &mut self.sn,
            &mut self.opt,
        )?;
        self.step = step;
        self.cfg.seed = seed;
        Ok(())
    }

    /// Dequantized copy of an image batch: `(255 x + u) / 256 - 0.5`.
    fn dequantize(&self, x: &mut Mat, stream: u64, step: u64) {
        if !self.graph.spec.data.dequantize {
            return;
        }
        for r in 0..x.rows {
            let mut rng =
                Rng::for_stream(self.cfg.seed, &[STREAM_DEQUANTIZE, stream, step, r as u64]);
            for v in x.row_mut(r) {
                *v = (255.0 * *v + rng.uniform()) / 256.0 - 0.5;
            }
        }
    }

    /// ActNorm from the first batch, in graph order: zero mean and unit
    /// variance per channel of each ActNorm's output.
    fn actnorm_init(&mut self, x: &Mat) -> Result<()> {
        let order = self.graph.topo_order()?;
        let residual_of = self.graph.block_of_residual();
        let mut vals = std::collections::HashMap::new();
        vals.insert(self.graph.input, x.clone());
        self.graph.params = self.sn.normalize(&self.raw).0;
        for ix in order {
            let n = self.graph.node(ix).clone();
            if n.op == Op::Input || n.block.is_some() {
                continue;
            }
            let ins = self.graph.inputs(ix);
            let in_shape = self.graph.input_shape(ix);
            if n.op == Op::ActNorm {
                let xin: &Mat = &vals[&ins[0]];
                let c = in_shape[0];
                let hw = crate::ops::actnorm::spatial(&in_shape);
                let (mut s1, mut s2) = (vec![0.0; c], vec![0.0; c]);
                for r in 0..xin.rows {
                    for (j, v) in xin.row(r).iter().enumerate() {
                        s1[j / hw] += v;
                        s2[j / hw] += v * v;
                    }
                }
                let cnt = (xin.rows * hw) as f64;
                let mut ls = vec![0.0; c];
                let mut b = vec![0.0; c];
                for k in 0..c {
                    let m = s1[k] / cnt;
                    let var = (s2[k] / cnt - m * m).max(0.0);
                    ls[k] = -(var.sqrt() + 1e-6).ln();
                    b[k] = -m * ls[k].exp();
                }
                for (suffix, v) in [("log_scale", ls), ("bias", b)] {
                    let name = param_name(&n.name, suffix);
                    self.raw
                        .insert(name.clone(), Tensor::new(vec![c], v.clone()));
                    self.graph.params.insert(name, Tensor::new(vec![c], v));
                }
            }
            let y = if let Some(&b) = residual_of.get(&ix) {
                let a: &Mat = &vals[&ins[0]];
                let cache = super::branch::forward(self.cfg.backend.kernels(), &self.graph, b, a);
                let mut y = a.clone();
                y.add_assign(&cache.out);
                y
            } else {
                let args: Vec<&Mat> = ins.iter().map(|i| &vals[i]).collect();
                let cols: usize = n.shape.iter().product();
                let mut y = Mat::zeros(x.rows, cols);
                for r in 0..x.rows {
                    let rows: Vec<&[f64]> = args.iter().map(|m| m.row(r)).collect();
                    let o = n.op.eval(&n.name, &self.graph.params, &rows, &in_shape);
                    y.row_mut(r).copy_from_slice(&o);
                }
                y
            };
            vals.insert(ix, y);
        }
        Ok(())
    }

    /// One optimizer step on the batch of the current step.
    pub fn train_step(&mut self, data: &Data) -> Result<StepMetrics> {
        let t0 = std::time::Instant::now();
        let bs = self.cfg.train.batch;
        let (mut x, labels) = data.batch(self.cfg.seed, self.step, bs);
        self.dequantize(&mut x, 0, self.step);
        if self.step == 0 && self.cfg.train.actnorm_init {
            self.actnorm_init(&x)?;
        }
        self.sn.power_iterate(&self.raw, self.cfg.train.power_iters);
        let (eff, scales) = self.sn.normalize(&self.raw);
        self.graph.params = eff;
        let opt = Options {
            logdet: self.logdet(),
            noise: Noise {
                seed: self.cfg.seed,
                step: self.step,
            },
            grads: true,
            bn_train: true,
            total: bs,
            first: 0,
            backend: self.cfg.backend,
        };
        let mut out =
            loss_grad_parallel(&self.graph, &x, labels.as_deref(), &opt, self.cfg.threads)?;
        let loss = out.loss.iter().sum::<f64>() / bs as f64;
        if !loss.is_finite() {
            return Err(Error::Unsupported {
                what: format!("training step {}", self.step),
                reason: format!("the loss is {loss} (lower train.lr or raise train.warmup)"),
            });
        }
        self.sn.backprop(&self.raw, &mut out.grads);
        let info = self.opt.step(&mut self.raw, &out.grads);
        let mom = self.cfg.train.bn_momentum;
        for (node, mean, var, cnt) in &out.bn {
            let unbias = *cnt as f64 / (*cnt as f64 - 1.0).max(1.0);
            for (suffix, stat, f) in [("running_mean", mean, 1.0), ("running_var", var, unbias)] {
                if let Some(t) = self.raw.get_mut(&param_name(node, suffix)) {
                    t.data
                        .iter_mut()
                        .zip(stat)
                        .for_each(|(r, s)| *r = (1.0 - mom) * *r + mom * s * f);
                }
            }
        }
        let sigmas = self.sn.sigmas(&self.raw);
        let lipschitz = self.block_bounds(&sigmas, &scales);
        self.step += 1;
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        Ok(StepMetrics {
            step: self.step,
            loss,
            bits_per_dim: self.bpd(loss),
            accuracy: (!out.correct.is_empty())
                .then(|| out.correct.iter().filter(|&&c| c).count() as f64 / bs as f64),
            lr: info.lr,
            grad_norm: info.grad_norm,
            lipschitz,
            samples_per_s: bs as f64 / dt,
        })
    }

    fn bpd(&self, nll: f64) -> Option<f64> {
        let g = &self.graph;
        (g.spec.kind == ModelKind::Flow && g.spec.is_image()).then(|| {
            nll / (g.input_dim() as f64 * std::f64::consts::LN_2)
                + if g.spec.data.dequantize { 8.0 } else { 0.0 }
        })
    }

    /// Largest over blocks of `prod sigma_i / s_i` (power-iteration estimates).
    fn block_bounds(&self, sigmas: &[f64], scales: &[f64]) -> f64 {
        let by_name: std::collections::HashMap<&str, f64> = self
            .sn
            .layers
            .iter()
            .zip(sigmas.iter().zip(scales))
            .map(|(l, (s, k))| (l.name.as_str(), s / k))
            .collect();
        self.graph
            .blocks
            .iter()
            .map(|b| {
                b.body
                    .iter()
                    .filter_map(|&ix| by_name.get(self.graph.node(ix).name.as_str()))
                    .product::<f64>()
            })
            .fold(0.0, f64::max)
    }

    /// The weights to evaluate and export: normalized, from the EMA when on.
    pub fn effective(&self) -> Params {
        self.sn.normalize(&self.opt.averaged(&self.raw)).0
    }

    /// Loss on an evaluation set with the effective weights, in chunks.
    pub fn evaluate(&self, xs: &[Vec<f64>], labels: Option<&[usize]>) -> Result<EvalMetrics> {
        let mut g = self.graph.clone();
        g.params = self.effective();
        evaluate(
            &g,
            xs,
            labels,
            self.cfg.seed,
            self.cfg.threads,
            self.cfg.backend,
        )
    }

    /// The final model: effective weights, normalized once more to a converged
    /// sigma and certified by the compiler's Lipschitz pass.
    pub fn final_model(&self) -> Result<(Graph, LipschitzReport)> {
        let mut g = self.graph.clone();
        g.params = self.effective();
        passes::infer_shapes(&mut g)?;
        let rep = passes::lipschitz::certify(&mut g)?;
        Ok((g, rep))
    }
}

/// Evaluation of a graph as it is (its parameters used unchanged): mean
/// `-log p` with the exact log-det for small blocks or the `[logdet]` series
/// (probes from the seed), or the classifier's cross-entropy and accuracy.
pub fn evaluate(
    g: &Graph,
    xs: &[Vec<f64>],
    labels: Option<&[usize]>,
    seed: u64,
    threads: usize,
    backend: Backend,
) -> Result<EvalMetrics> {
    let dim = g.input_dim();
    let spec = &g.spec;
    let logdet = match train_logdet(spec, largest_block_dim(g), Some(spec.logdet.estimator)) {
        LogDetGrad::Neumann {
            terms,
            probes,
            kind,
            ..
        } => LogDetGrad::Neumann {
            terms,
            probes,
            kind,
            roulette: None,
        },
        e => e,
    };
    let chunk = 500;
    let (mut total, mut correct) = (0.0, 0usize);
    for (ci, rows) in xs.chunks(chunk).enumerate() {
        let mut x = Mat::from_rows(rows, dim);
        if spec.data.dequantize {
            for r in 0..x.rows {
                let mut rng =
                    Rng::for_stream(seed, &[STREAM_DEQUANTIZE, 1, (ci * chunk + r) as u64]);
                for v in x.row_mut(r) {
                    *v = (255.0 * *v + rng.uniform()) / 256.0 - 0.5;
                }
            }
        }
        let lab = labels.map(|l| &l[ci * chunk..ci * chunk + rows.len()]);
        let opt = Options {
            logdet: logdet.clone(),
            noise: Noise {
                seed,
                step: u64::MAX - ci as u64,
            },
            grads: false,
            bn_train: false,
            total: rows.len(),
            first: 0,
            backend,
        };
        let out = if threads > 1 {
            loss_grad_parallel(g, &x, lab, &opt, threads)?
        } else {
            loss_grad(g, &x, lab, &opt)?
        };
        total += out.loss.iter().sum::<f64>();
        correct += out.correct.iter().filter(|&&c| c).count();
    }
    let n = xs.len().max(1) as f64;
    let loss = total / n;
    let flow = spec.kind == ModelKind::Flow;
    Ok(EvalMetrics {
        samples: xs.len(),
        loss,
        bits_per_dim: (flow && spec.is_image()).then(|| {
            loss / (dim as f64 * std::f64::consts::LN_2)
                + if spec.data.dequantize { 8.0 } else { 0.0 }
        }),
        accuracy: (!flow).then(|| correct as f64 / n),
    })
}
