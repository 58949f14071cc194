//! [`CpuEngine`]: a network description plus its weights, resolved once into a list of steps
//! with packed weights, a thread pool and reusable buffers.

use std::collections::BTreeMap;
use std::path::Path;

use super::act::{softplus, Act};
use super::conv::Linear;
use super::net::{
    BranchLayer, EstimatorKind, FactorOutHalf, Layer, LogDetSettings, NetDesc, NetKind, ProbeKind,
    RouletteKind, SqueezeOrder,
};
use super::pool::{build_pool, threads_from_env, Workspace};
use crate::bundle::{parse_weights, WeightTensor};
use crate::error::{Result, RuntimeError};
use crate::plan::WEIGHTS_FILE;

/// A layer of a residual branch, ready to run.
#[derive(Debug)]
pub(crate) enum BLayer {
    Linear(Linear),
    Act(Act),
}

#[derive(Debug)]
pub(crate) struct Block {
    /// Index in model order (probes and roulette draws are keyed by it).
    pub index: usize,
    pub name: String,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// ActNorm as `a = x * scale + shift` (scale = exp(log_scale)).
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    /// `H*W*sum(log_scale)`, the ActNorm's log-det per sample.
    pub actnorm_logdet: f64,
    /// Every layer but the last, which is always linear (`last`).
    pub hidden: Vec<BLayer>,
    pub last: Linear,
    pub max_iters: usize,
    /// Activations in `hidden` (the masks the log-det keeps).
    pub acts: usize,
}

#[derive(Debug)]
pub(crate) enum Step {
    Squeeze {
        c: usize,
        h: usize,
        w: usize,
    },
    Pad {
        cin: usize,
        cout: usize,
        hw: usize,
    },
    Block(Box<Block>),
    /// `c` channels of `hw` pixels in; the z part is written at `z_offset` of each sample's z.
    FactorOut {
        c: usize,
        hw: usize,
        z_offset: usize,
    },
}

#[derive(Debug)]
pub(crate) struct Head {
    /// Per-channel affine of the eval-form batch norm.
    pub bn: Option<(Vec<f32>, Vec<f32>)>,
    pub relu_pool: bool,
    pub linear: Linear,
}

/// How one call computes the log-det (the model file's settings, possibly overridden).
#[derive(Clone, Debug, PartialEq)]
pub struct LogDetRequest {
    pub estimator: EstimatorKind,
    pub terms: usize,
    pub probes: usize,
    pub probe: ProbeKind,
    pub seed: u64,
    pub roulette: RouletteKind,
    pub roulette_param: f64,
    /// Index of the batch's first sample in the whole array being run: probes and roulette draws
    /// depend on it, so running in chunks gives the numbers of one call.
    pub first_sample: usize,
}

impl LogDetRequest {
    /// The estimator as every backend names it ([`crate::logdet::LogDetMethod`]).
    pub fn method(&self) -> crate::logdet::LogDetMethod {
        LogDetSettings {
            estimator: self.estimator,
            terms: self.terms,
            probes: self.probes,
            probe: self.probe,
            seed: self.seed,
            roulette: self.roulette,
            roulette_param: self.roulette_param,
        }
        .method()
    }

    /// The request for `method` on an array chunk starting at `first_sample` (None: no log-det).
    pub fn from_method(m: &crate::logdet::LogDetMethod, first_sample: usize) -> Option<Self> {
        m.spec().map(|s| Self {
            first_sample,
            ..Self::from_settings(&s)
        })
    }

    pub fn from_settings(s: &LogDetSettings) -> Self {
        Self {
            estimator: s.estimator,
            terms: s.terms,
            probes: s.probes,
            probe: s.probe,
            seed: s.seed,
            roulette: s.roulette,
            roulette_param: s.roulette_param,
            first_sample: 0,
        }
    }
}

/// Per-block outcome of the fixed-point inverse (over the whole batch).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockInverse {
    pub name: String,
    /// Fixed-point steps taken.
    pub iters: usize,
    /// `max |x + g(x) - y|` of the last iterate whose g was evaluated (= the last step size).
    pub residual: f64,
    /// The step fell below `inverse.tol`.
    pub converged: bool,
    /// The step stopped shrinking before `inverse.tol`: f32 round-off, not the cap, ended it.
    pub precision_floor: bool,
}

/// The inverse's report, blocks in model order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InverseReport {
    pub blocks: Vec<BlockInverse>,
}

impl InverseReport {
    pub fn max_iters(&self) -> usize {
        self.blocks.iter().map(|b| b.iters).max().unwrap_or(0)
    }
    pub fn max_residual(&self) -> f64 {
        self.blocks.iter().map(|b| b.residual).fold(0.0, f64::max)
    }
    /// Every block reached the tolerance or f32's precision floor before its cap.
    pub fn converged(&self) -> bool {
        self.blocks.iter().all(|b| b.converged || b.precision_floor)
    }
}

/// The native f32 CPU engine.
pub struct CpuEngine {
    pub(crate) net: NetDesc,
    pub(crate) steps: Vec<Step>,
    pub(crate) head: Option<Head>,
    /// Flows: prior mean and log-std over z (f64, as stored).
    pub prior: Option<(Vec<f64>, Vec<f64>)>,
    pub(crate) input_chw: (usize, usize, usize),
    /// Shape after the last step.
    pub(crate) final_chw: (usize, usize, usize),
    pub(crate) latent_dim: usize,
    pub(crate) threads: usize,
    pub(crate) pool: rayon::ThreadPool,
    pub(crate) ws: Workspace,
}

impl std::fmt::Debug for CpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuEngine")
            .field("model", &self.net.name)
            .field("threads", &self.threads)
            .finish()
    }
}

/// `[C, H, W]` or `[D]` as (C, H, W).
fn chw(shape: &[usize]) -> Option<(usize, usize, usize)> {
    match *shape {
        [c, h, w] => Some((c, h, w)),
        [d] => Some((d, 1, 1)),
        _ => None,
    }
}

struct Weights<'a> {
    map: &'a BTreeMap<String, WeightTensor>,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        let t = self.map.get(name).ok_or_else(|| {
            RuntimeError::corrupt(WEIGHTS_FILE, format!("missing tensor {name:?}"))
        })?;
        if t.shape != shape {
            return Err(RuntimeError::corrupt(
                WEIGHTS_FILE,
                format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    t.shape
                ),
            ));
        }
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(RuntimeError::corrupt(
                WEIGHTS_FILE,
                format!("tensor {name:?} element {i} is {}", t.data[i]),
            ));
        }
        Ok(&t.data)
    }
}

fn bad_net(reason: impl Into<String>) -> RuntimeError {
    RuntimeError::corrupt(super::net::NET_FILE, reason)
}

impl CpuEngine {
    /// Loads a compiled bundle's `net.json` and `weights.safetensors`.
    pub fn open_bundle(dir: impl AsRef<Path>) -> Result<CpuEngine> {
        let dir = dir.as_ref();
        let net = NetDesc::load(dir)?;
        let path = dir.join(WEIGHTS_FILE);
        let plan = crate::bundle::load_plan(dir)?;
        let budget = crate::fsread::memory_budget()?;
        let bytes = crate::bundle::read_verified(dir, &plan, WEIGHTS_FILE, budget, "weights file")?;
        let weights = parse_weights(&bytes).map_err(|r| RuntimeError::corrupt(&path, r))?;
        Self::from_parts(net, &weights).map_err(|e| match e {
            // Name the bundle's own files rather than the bare file names.
            RuntimeError::BundleCorrupt { file, reason } => RuntimeError::BundleCorrupt {
                file: dir.join(file),
                reason,
            },
            e => e,
        })
    }

    /// Resolves a description against its weights (checked: every tensor present, with its
    /// shape, finite) and packs the weights; threads from `IRESNETC_THREADS`.
    pub fn from_parts(net: NetDesc, weights: &BTreeMap<String, WeightTensor>) -> Result<Self> {
        let threads = threads_from_env()?;
        Self::with_threads(net, weights, threads)
    }

    /// [`Self::from_parts`] with an explicit thread count.
    pub fn with_threads(
        net: NetDesc,
        weights: &BTreeMap<String, WeightTensor>,
        threads: usize,
    ) -> Result<Self> {
        let wt = Weights { map: weights };
        let input_chw = chw(&net.input)
            .filter(|&(c, h, w)| {
                // Sizes come from a file: they must be positive and their product sane.
                c.checked_mul(h)
                    .and_then(|v| v.checked_mul(w))
                    .is_some_and(|n| n > 0 && n <= 1 << 30)
            })
            .ok_or_else(|| {
                bad_net(format!(
                    "input shape {:?} is not [C, H, W] or [D]",
                    net.input
                ))
            })?;
        let image = net.input.len() == 3;
        let (mut c, mut h, mut w) = input_chw;
        let mut steps = Vec::new();
        let mut z_offset = 0usize;
        let mut block_index = 0;
        for layer in &net.layers {
            match layer {
                Layer::Squeeze => {
                    if !image || h % 2 != 0 || w % 2 != 0 {
                        return Err(bad_net(format!(
                            "squeeze of shape [{c}, {h}, {w}] (needs an image with even sides)"
                        )));
                    }
                    steps.push(Step::Squeeze { c, h, w });
                    (c, h, w) = (c * 4, h / 2, w / 2);
                }
                Layer::PadChannels { channels } => {
                    if *channels < c || *channels > (1 << 24) {
                        return Err(bad_net(format!("pad {c} channels to {channels}")));
                    }
                    steps.push(Step::Pad {
                        cin: c,
                        cout: *channels,
                        hw: h * w,
                    });
                    c = *channels;
                }
                Layer::FactorOut => {
                    if net.kind != NetKind::Flow || c < 2 {
                        return Err(bad_net(format!(
                            "factor-out of {c} channels (flows only, at least 2 channels)"
                        )));
                    }
                    steps.push(Step::FactorOut {
                        c,
                        hw: h * w,
                        z_offset,
                    });
                    let (zc, keep) = split(net.factor_out_half, c);
                    z_offset += zc.1 * h * w;
                    c = keep.1;
                }
                Layer::Block(b) => {
                    let blk = resolve_block(b, &wt, block_index, (c, h, w), image)?;
                    steps.push(Step::Block(Box::new(blk)));
                    block_index += 1;
                }
            }
        }
        let final_chw = (c, h, w);
        let latent_dim = z_offset + c * h * w;
        let (head, prior) = match net.kind {
            NetKind::Flow => {
                let p = net
                    .prior
                    .as_ref()
                    .ok_or_else(|| bad_net("a flow needs `prior`"))?;
                let mean = wt.get(&p.mean, &[latent_dim])?;
                let ls = wt.get(&p.log_std, &[latent_dim])?;
                let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
                (None, Some((f(mean), f(ls))))
            }
            NetKind::Classifier => {
                let hd = net
                    .head
                    .as_ref()
                    .ok_or_else(|| bad_net("a classifier needs `head`"))?;
                (Some(resolve_head(hd, &wt, final_chw, image)?), None)
            }
        };
        let pool = build_pool(threads)?;
        Ok(Self {
            net,
            steps,
            head,
            prior,
            input_chw,
            final_chw,
            latent_dim,
            threads,
            pool,
            ws: Workspace::default(),
        })
    }

    pub fn net(&self) -> &NetDesc {
        &self.net
    }
    pub fn threads(&self) -> usize {
        self.threads
    }
    /// Values per input sample.
    pub fn input_dim(&self) -> usize {
        let (c, h, w) = self.input_chw;
        c * h * w
    }
    /// Values per z sample (flows).
    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }
    pub fn block_count(&self) -> usize {
        self.blocks().count()
    }
    pub(crate) fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.steps.iter().filter_map(|s| match s {
            Step::Block(b) => Some(b.as_ref()),
            _ => None,
        })
    }
    /// Multiply-accumulates of one evaluation of every branch, per sample (for GFLOP/s).
    pub fn forward_macs(&self) -> u64 {
        self.blocks()
            .map(|b| {
                let hw = (b.h * b.w) as u64;
                let lin = |l: &Linear| (l.cin * l.cout * l.fwd.k * l.fwd.k) as u64 * hw;
                b.hidden
                    .iter()
                    .map(|l| match l {
                        BLayer::Linear(l) => lin(l),
                        BLayer::Act(_) => 0,
                    })
                    .sum::<u64>()
                    + lin(&b.last)
            })
            .sum()
    }
}

/// `(z channels range start, len)` and `(kept start, len)` of a factor-out of `c` channels.
pub(crate) fn split(half: FactorOutHalf, c: usize) -> ((usize, usize), (usize, usize)) {
    let first = c / 2;
    match half {
        FactorOutHalf::First => ((0, first), (first, c - first)),
        FactorOutHalf::Second => ((first, c - first), (0, first)),
    }
}

/// Output channel of input channel `c` (of `channels`) at cell offset `(dy, dx)`.
pub(crate) fn squeeze_channel(
    order: SqueezeOrder,
    channels: usize,
    c: usize,
    dy: usize,
    dx: usize,
) -> usize {
    match order {
        SqueezeOrder::SpaceToDepth => (2 * dy + dx) * channels + c,
        SqueezeOrder::PixelUnshuffle => 4 * c + 2 * dy + dx,
    }
}

fn resolve_block(
    b: &super::net::BlockDesc,
    wt: &Weights<'_>,
    index: usize,
    (c, h, w): (usize, usize, usize),
    image: bool,
) -> Result<Block> {
    let bad = |r: String| bad_net(format!("block {:?}: {r}", b.name));
    let ls = wt.get(&b.actnorm_log_scale, &[c])?;
    let bias = wt.get(&b.actnorm_bias, &[c])?;
    let mut layers = Vec::new();
    let mut ch = c;
    let mut acts = 0;
    for l in &b.branch {
        match l {
            BranchLayer::Conv {
                cin,
                cout,
                k,
                weight,
                bias,
            } => {
                if !image || *cin != ch || *k == 0 || k % 2 == 0 || *k > h.max(w) * 2 + 1 {
                    return Err(bad(format!(
                        "conv {cin}->{cout} k={k} does not fit its input of {ch} channels at {h}x{w}"
                    )));
                }
                let wgt = wt.get(weight, &[*cout, *cin, *k, *k])?;
                let bs = wt.get(bias, &[*cout])?;
                layers.push(BLayer::Linear(Linear::new(*cin, *cout, *k, wgt, bs)));
                ch = *cout;
            }
            BranchLayer::Dense {
                fin,
                fout,
                weight,
                bias,
            } => {
                if image || *fin != ch {
                    return Err(bad(format!("dense {fin}->{fout} after {ch} features")));
                }
                let wgt = wt.get(weight, &[*fout, *fin])?;
                let bs = wt.get(bias, &[*fout])?;
                layers.push(BLayer::Linear(Linear::new(*fin, *fout, 1, wgt, bs)));
                ch = *fout;
            }
            BranchLayer::Act { act, beta } => {
                let beta = match (act, beta) {
                    (super::net::ActKind::LipSwish, Some(name)) => {
                        softplus(wt.get(name, &[1])?[0] as f64) as f32
                    }
                    (super::net::ActKind::LipSwish, None) => {
                        return Err(bad("LipSwish without its `beta` tensor".into()))
                    }
                    _ => 0.0,
                };
                layers.push(BLayer::Act(Act { kind: *act, beta }));
                acts += 1;
            }
        }
    }
    let last = match layers.pop() {
        Some(BLayer::Linear(l)) if ch == c => l,
        _ => {
            return Err(bad(format!(
                "the branch must end with a linear layer back to {c} channels"
            )))
        }
    };
    let actnorm_logdet = (h * w) as f64 * ls.iter().map(|&v| v as f64).sum::<f64>();
    Ok(Block {
        index,
        name: b.name.clone(),
        c,
        h,
        w,
        scale: ls.iter().map(|v| v.exp()).collect(),
        shift: bias.to_vec(),
        actnorm_logdet,
        hidden: layers,
        last,
        max_iters: b.max_iters.max(1),
        acts,
    })
}

fn resolve_head(
    hd: &super::net::HeadDesc,
    wt: &Weights<'_>,
    (c, _h, _w): (usize, usize, usize),
    image: bool,
) -> Result<Head> {
    let bn = match &hd.batchnorm {
        Some(bn) => {
            let (g, b) = (wt.get(&bn.weight, &[c])?, wt.get(&bn.bias, &[c])?);
            let (m, v) = (
                wt.get(&bn.running_mean, &[c])?,
                wt.get(&bn.running_var, &[c])?,
            );
            let mut scale = Vec::with_capacity(c);
            let mut shift = Vec::with_capacity(c);
            for i in 0..c {
                let s = g[i] as f64 / (v[i] as f64 + bn.eps).sqrt();
                scale.push(s as f32);
                shift.push((b[i] as f64 - m[i] as f64 * s) as f32);
            }
            Some((scale, shift))
        }
        None => None,
    };
    if hd.relu_pool && !image {
        return Err(bad_net("head: ReLU + pool needs an image model"));
    }
    let wgt = wt.get(&hd.weight, &[hd.classes, c])?;
    let bias = wt.get(&hd.bias, &[hd.classes])?;
    Ok(Head {
        bn,
        relu_pool: hd.relu_pool,
        linear: Linear::new(c, hd.classes, 1, wgt, bias),
    })
}
