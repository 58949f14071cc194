//! The network description (`net.json`): everything the native CPU engine needs to know about a
//! model's structure, in evaluation order, with the names of the tensors it reads from
//! `weights.safetensors`. The compiler writes it from its IR (`iresnetc::netdesc`); the CLI builds
//! it in memory for model files. It is the contract between the two crates, so it is plain data
//! with its own enums (the runtime does not depend on the compiler's spec types).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// Name of the description inside a bundle.
pub const NET_FILE: &str = "net.json";
pub const NET_FORMAT: &str = "iresnetc-net";
pub const NET_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetKind {
    Flow,
    Classifier,
}

/// Where input channel `c` at offset `(dy, dx)` of a 2x2 cell goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqueezeOrder {
    /// `(2*dy + dx) * C + c` (ONNX SpaceToDepth; the official i-ResNet code).
    SpaceToDepth,
    /// `4*c + 2*dy + dx` (PyTorch `pixel_unshuffle`).
    PixelUnshuffle,
}

/// Which half of the channels a factor-out sends to z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactorOutHalf {
    /// Channels `0..C/2` go to z, `C/2..C` continue (the official i-ResNet code).
    First,
    /// Channels `0..C/2` continue, `C/2..C` go to z.
    Second,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActKind {
    Elu,
    Relu,
    /// `x * sigmoid(softplus(beta) * x) / 1.1`.
    LipSwish,
}

/// One step of the network, in evaluation order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Layer {
    /// 2x2 space-to-depth, in the description's `squeeze_order`.
    Squeeze,
    /// Injective zero-padding of the channel axis up to `channels`.
    PadChannels { channels: usize },
    /// `x -> a = ActNorm(x) -> a + g(a)`.
    Block(BlockDesc),
    /// Half of the channels to z (which half: `factor_out_half`), the rest continues.
    FactorOut,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockDesc {
    pub name: String,
    /// ActNorm `a = x * exp(log_scale) + bias`, per channel.
    pub actnorm_log_scale: String,
    pub actnorm_bias: String,
    /// The residual branch g, in order (a leading `act` is absent in a model's first block).
    pub branch: Vec<BranchLayer>,
    /// Certified `Lip(g)` (< 1).
    pub lipschitz_bound: f64,
    /// Fixed-point iterations the certificate guarantees enough for `inverse.tol`, capped by
    /// `inverse.max_iters`: the inverse's cap for this block.
    pub max_iters: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BranchLayer {
    /// Zero-padded `k x k` convolution, stride 1, padding `k / 2`, with bias.
    /// Weight `[cout, cin, k, k]`, bias `[cout]`.
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
        weight: String,
        bias: String,
    },
    /// `y = W x + b`, weight `[fout, fin]`.
    Dense {
        fin: usize,
        fout: usize,
        weight: String,
        bias: String,
    },
    /// Elementwise activation; `beta` names LipSwish's scalar parameter.
    Act { act: ActKind, beta: Option<String> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNormDesc {
    pub weight: String,
    pub bias: String,
    pub running_mean: String,
    pub running_var: String,
    pub eps: f64,
}

/// Classifier head: `[batch norm] -> [ReLU -> global average pool] -> linear`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadDesc {
    pub batchnorm: Option<BatchNormDesc>,
    /// Image classifiers: ReLU then the mean over the spatial axes.
    pub relu_pool: bool,
    pub classes: usize,
    pub weight: String,
    pub bias: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriorDesc {
    pub mean: String,
    pub log_std: String,
}

// The log-det settings are the runtime's one definition (the model file's `[logdet]` table).
pub use crate::logdet::{
    Estimator as EstimatorKind, LogDetSpec as LogDetSettings, ProbeKind,
    RouletteDist as RouletteKind,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InverseSettings {
    pub tol: f64,
    pub max_iters: usize,
}

/// `net.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDesc {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub kind: NetKind,
    /// Per-sample input shape: `[C, H, W]` or `[D]`.
    pub input: Vec<usize>,
    pub squeeze_order: SqueezeOrder,
    pub factor_out_half: FactorOutHalf,
    pub layers: Vec<Layer>,
    /// Flows: the diagonal Gaussian over z.
    pub prior: Option<PriorDesc>,
    /// Classifiers.
    pub head: Option<HeadDesc>,
    /// Density inputs are pixels in [0, 1], dequantized first.
    pub dequantize: bool,
    pub logdet: LogDetSettings,
    pub inverse: InverseSettings,
}

impl NetDesc {
    /// Reads `dir/net.json`, hash-checked against the bundle's plan and size-bounded.
    pub fn load(dir: &Path) -> Result<NetDesc> {
        let plan = crate::bundle::load_plan(dir)?;
        let bytes = crate::bundle::read_verified(
            dir,
            &plan,
            NET_FILE,
            crate::fsread::MAX_JSON_FILE,
            "network description",
        )?;
        let path = dir.join(NET_FILE);
        let text =
            String::from_utf8(bytes).map_err(|_| RuntimeError::corrupt(&path, "not UTF-8 text"))?;
        Self::parse(&text).map_err(|r| RuntimeError::corrupt(&path, r))
    }

    /// Parses a description, checking its format and version before its fields.
    pub fn parse(text: &str) -> std::result::Result<NetDesc, String> {
        #[derive(Deserialize)]
        struct Head {
            format: Option<String>,
            version: Option<u32>,
        }
        let head: Head =
            serde_json::from_str(text).map_err(|e| crate::fsread::clip(&e.to_string(), 200))?;
        if head.format.as_deref() != Some(NET_FORMAT) || head.version != Some(NET_VERSION) {
            return Err(format!(
                "format {:?} version {:?}, expected {NET_FORMAT:?} version {NET_VERSION}: recompile the bundle with `iresnetc compile`",
                head.format.as_deref().map(|f| crate::fsread::clip(f, 40)),
                head.version
            ));
        }
        serde_json::from_str(text).map_err(|e| crate::fsread::clip(&e.to_string(), 200))
    }

    pub fn to_json(&self) -> String {
        // Plain data: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Number of residual blocks.
    pub fn block_count(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| matches!(l, Layer::Block(_)))
            .count()
    }
}
