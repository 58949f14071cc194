//! Kernel generators: a convolution (forward, transposed, dense) with one of the fused
//! epilogues, and elementwise kernels with a generated body. Each returns the specialized
//! WGSL, its bindings and its dispatch grid; the lowering decides what to generate.

use std::fmt::Write as _;

use serde::Serialize;

pub use super::logdet_kernels::{dot_bindings, dot_body, LogDetBindings, TermCounter};
use super::logdet_kernels::{logdet_counters, push_logdet_bindings};
use super::wgsl::{self, act_suffix, Binding};
use crate::error::Result;
use crate::kernels::ConvGeom;
use crate::passes::fusion::ActRef;

/// How convolution kernels split their work. The register-blocked variant is the one that is
/// fast on lavapipe (docs/design.md#kernel-tiling: barriers are expensive there); the split-K variant gives a
/// real GPU enough invocations at batch 1 and short serial chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Tiling {
    /// Each invocation computes `pixels` x `channels` outputs in registers; `workgroup`
    /// invocations take consecutive pixels.
    RegisterBlocked {
        pixels: u32,
        channels: u32,
        workgroup: u32,
    },
    /// For hardware GPUs: one output per invocation in workgroups of `workgroup`, the
    /// reduction of each output split over its input channels (see
    /// `shaders/conv_splitk.wgsl`) until a convolution launches at least `target_groups`
    /// workgroups per sample and no invocation's chain exceeds `max_chain` multiply-adds
    /// (as far as the channels allow).
    SplitK {
        workgroup: u32,
        target_groups: u32,
        max_chain: u32,
    },
}

impl Tiling {
    /// For CPU adapters (lavapipe / llvmpipe): big register blocks.
    pub const CPU: Tiling = Tiling::RegisterBlocked {
        pixels: 4,
        channels: 8,
        workgroup: 64,
    };
    /// For hardware GPUs: the goals of the cost report (`codegen::cost`): at least 128
    /// workgroups of 128 per convolution at batch 1, chains of at most 1,152 multiply-adds.
    pub const GPU: Tiling = Tiling::SplitK {
        workgroup: 128,
        target_groups: 128,
        max_chain: 1152,
    };

    /// The tiling for an adapter: register blocks for CPU (software) adapters, more and
    /// smaller workgroups for everything else.
    pub fn for_adapter(a: &iresnetc_runtime::AdapterSummary) -> Tiling {
        if a.device_type == "cpu" || a.is_software {
            Tiling::CPU
        } else {
            Tiling::GPU
        }
    }
}

/// A generated kernel, ready for [`super::builder::PlanBuilder::kernel`].
pub struct Generated {
    pub source: String,
    pub bindings: Vec<Binding>,
    pub workgroup_size: u32,
    pub workgroups: [u32; 2],
    pub flops_per_sample: u64,
    /// Longest chain of dependent floating-point operations one invocation runs (the
    /// multiply-adds of its accumulator, plus the adds of a split reduction).
    pub chain: u64,
    /// Compulsory memory traffic of one dispatch (every array element touched counted
    /// once, read-modify-write twice): per sample, and shared by the batch (weights).
    pub bytes_per_sample: u64,
    pub bytes_shared: u64,
    pub kind: KernelKind,
}

/// What a kernel does, for the cost report: the GPU goals are about the convolutions (an
/// elementwise kernel over a whole tensor, or the log-det's final per-sample sum, has no
/// reduction to split and too few elements to fill a GPU at batch 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelKind {
    #[default]
    Conv,
    Elementwise,
    Reduce,
    Fill,
}

/// The activation after the epilogue's first value, with the buffer holding a second output.
#[derive(Clone, Debug)]
pub struct ActOut {
    pub buffer: String,
    pub act: ActRef,
}

/// What a convolution kernel does with `v = conv(x)[o] (+ bias)`.
#[derive(Clone, Debug)]
pub enum Epilogue {
    /// `dst = v`.
    Store { dst: String },
    /// `pre = v` (kept for the log-det's derivative mask), `dst = act(v)`.
    StoreAct {
        pre: Option<String>,
        dst: String,
        act: ActRef,
    },
    /// `y = res + v` (the residual add); with `next`, the next block's ActNorm is applied and
    /// its output (and its branch's leading activation) stored instead of `y`. Without it,
    /// `latent` also writes the parts of `y` that are parts of z there.
    Residual {
        res: String,
        dst: String,
        next: Option<NextActNorm>,
        latent: Option<LatentTaps>,
    },
    /// The inverse step `x = target - v` (`target` = the block output y) into `dst`, and
    /// `act(x)` for the first layer of the next iteration. On a block's last iteration,
    /// `actnorm` applies the inverse ActNorm to the final iterate: `dst` then receives the
    /// block's input and `lead` its activation (the start of the block before).
    FixedPoint {
        target: String,
        dst: String,
        lead: Option<ActOut>,
        actnorm: Option<ActNormInverse>,
    },
    /// vjp through the activation before this layer: `dst = v * act'(pre)`.
    VjpMask { mask: Mask, dst: String },
    /// The last vjp of a term: `u = v [* act'(pre)]`, `dst = u`, and `acc += coef_k * u * v_p`
    /// (the `<w_k, v>` product, summed over elements by the entry point's final sum), plus
    /// the block's ActNorm log-scale of the element's channel on its first term.
    VjpDot {
        mask: Option<Mask>,
        dst: String,
        ld: LogDetBindings,
    },
}

/// The activation derivative a vjp multiplies by, read from a stored buffer: the
/// pre-activation, or, for ELU and ReLU, the activation's output (their derivative is a
/// function of the output, so the forward need not store the pre-activation as well).
#[derive(Clone, Debug)]
pub struct Mask {
    pub buffer: String,
    pub act: ActRef,
    pub from_output: bool,
}

impl Mask {
    /// `act'` at the stored value `x` (a WGSL expression).
    pub fn call(&self, x: &str) -> String {
        if self.from_output {
            format!("dact_out_{}({x}, beta)", act_suffix(self.act.act))
        } else {
            dact_call(&self.act, x)
        }
    }
}

/// True when `act'(x)` is a function of `act(x)` (ELU: `y + 1` below 0; ReLU: `y > 0`).
pub fn derivative_from_output(act: &ActRef) -> bool {
    matches!(
        act.act,
        crate::spec::Activation::Elu | crate::spec::Activation::Relu
    )
}

/// Where parts of a block's output go in z: the per-sample elements `lo..hi` of the output
/// land at `z[sample * stride + offset + (li - lo)]`, for each `(lo, hi, offset)`.
#[derive(Clone, Debug)]
pub struct LatentTaps {
    pub z: String,
    pub stride: usize,
    pub parts: Vec<(usize, usize, usize)>,
}

/// `(x - bias) * exp(-log_scale)` per channel, stored in the epilogue's `dst` and, with
/// `copy`, a second buffer (the next fixed point's first iterate).
#[derive(Clone, Debug)]
pub struct ActNormInverse {
    pub log_scale: String,
    pub bias: String,
    pub copy: Option<String>,
}

#[derive(Clone, Debug)]
pub struct NextActNorm {
    pub log_scale: String,
    pub bias: String,
    pub lead: Option<ActOut>,
}

/// A convolution to generate: `geom` is the forward conv whose weights are bound; with
/// `transposed`, the kernel computes its adjoint (stride 1, 'same' padding).
#[derive(Clone, Debug)]
pub struct Conv {
    pub geom: ConvGeom,
    pub transposed: bool,
    pub src: String,
    pub weight: String,
    pub bias: Option<String>,
    pub epilogue: Epilogue,
    /// The log-det's term counter, advanced by one invocation per sample (the first vjp
    /// kernel of each term does it, instead of a one-invocation kernel of its own).
    pub bump: Option<TermCounter>,
    /// Where the input sits when `src` is not a buffer of the input's own size: values per
    /// sample and the input's offset in each (the log-det's first vjp reads its probe
    /// straight from the `probes` input).
    pub src_view: Option<(usize, usize)>,
    /// For a transposed convolution: `weight` holds the adjoint arrangement
    /// (`WeightLayout::Adjoint`), read in the forward order (the GPU tiling does this).
    pub adjoint_weight: bool,
}

impl Conv {
    /// `wgt[...]` for `wt(o, i, ky, kx)`: the weight of output channel `o`, input channel `i`
    /// and tap `(ky, kx)` of the map this kernel computes.
    pub(super) fn weight_expr(&self) -> &'static str {
        if self.transposed && !self.adjoint_weight {
            "wgt[((i * COUT + o) * K + (K - 1u - ky)) * K + (K - 1u - kx)]"
        } else {
            "wgt[((o * CIN + i) * K + ky) * K + kx]"
        }
    }

    /// Whether the weights read along the reduction (input channel x tap) are contiguous.
    pub(super) fn weights_in_forward_order(&self) -> bool {
        !self.transposed || self.adjoint_weight
    }

    /// `(values per sample, offset)` of the input inside `src`.
    pub(super) fn src_layout(&self) -> (usize, usize) {
        let (cin, _, _, _, _) = conv_map(self);
        self.src_view
            .unwrap_or((cin * self.geom.h * self.geom.w, 0))
    }
}

/// `let beta = ...;` for the kernel's activation, adding LipSwish's parameter binding.
fn beta_setup(act: Option<&ActRef>, bindings: &mut Vec<Binding>) -> String {
    match act.and_then(|a| a.beta.as_ref()) {
        Some(t) => {
            bindings.push(Binding::param("beta_raw", t.clone(), 1));
            "    let beta = softplus(beta_raw(0u));\n".to_string()
        }
        None => "    let beta = 0.0;\n".to_string(),
    }
}

fn act_call(a: &ActRef, x: &str) -> String {
    format!("act_{}({x}, beta)", act_suffix(a.act))
}

fn dact_call(a: &ActRef, x: &str) -> String {
    format!("dact_{}({x}, beta)", act_suffix(a.act))
}

/// The parts of a convolution kernel that do not depend on the tiling: bindings, the
/// epilogue statements (in terms of `v` the value, `o` the global index, `li` the index
/// within the sample, `co` the channel and `sample`), the per-kernel setup before them
/// (log-det counters, the term counter's bump) and `let beta = ...;`.
pub(super) struct ConvParts {
    pub bindings: Vec<Binding>,
    pub body: String,
    pub pre_epilogue: String,
    pub beta: String,
}

/// The map a convolution kernel computes: `(cin, cout, pad, out_h, out_w)`.
pub(super) fn conv_map(c: &Conv) -> (usize, usize, usize, usize, usize) {
    let f = &c.geom;
    if c.transposed {
        (f.cout, f.cin, f.k - 1 - f.pad, f.h, f.w)
    } else {
        (f.cin, f.cout, f.pad, f.out_h(), f.out_w())
    }
}

/// What every convolution template shares: the geometry constants (`{{GEOMETRY}}`: CIN ..
/// OUT_N, declared here once), `WEIGHT_EXPR` and the activation functions.
pub(super) fn conv_constants(c: &Conv) -> Vec<(&'static str, String)> {
    let f = &c.geom;
    let (cin, cout, pad, oh, ow) = conv_map(c);
    let (in_n, in_off) = c.src_layout();
    // The adjoint of a strided convolution is not generated (the vjp is stride 1).
    let stride = if c.transposed { 1 } else { f.stride };
    let mut geometry = String::new();
    for (name, value) in [
        ("CIN", cin),
        ("COUT", cout),
        ("H", f.h),
        ("W", f.w),
        ("OW", ow),
        ("OHW", oh * ow),
        ("K", f.k),
    ] {
        let _ = writeln!(geometry, "const {name}: u32 = {value}u;");
    }
    let _ = write!(
        geometry,
        "const STRIDE: i32 = {stride};\nconst PAD: i32 = {pad};\n// Values per sample of `src` and the input's offset in each.\nconst IN_N: u32 = {in_n}u;\nconst IN_OFF: u32 = {in_off}u;\nconst OUT_N: u32 = {}u;",
        cout * oh * ow
    );
    vec![
        ("GEOMETRY", geometry),
        ("WEIGHT_EXPR", c.weight_expr().to_string()),
        ("FUNCTIONS", wgsl::activation_functions()),
    ]
}

/// The statement that advances the log-det's term counter once per dispatch and sample;
/// `first` is the WGSL condition true for exactly one invocation per sample.
fn bump_statement(counter: &TermCounter, first: &str) -> String {
    format!(
        "    if ({first}) {{\n        {} += 1.0;\n    }}\n",
        counter.element()
    )
}

pub(super) fn conv_parts(c: &Conv, first_invocation: &str) -> ConvParts {
    // Every per-channel parameter of the epilogue has one value per output channel.
    let (_, cout, _, _, _) = conv_map(c);
    let mut b = vec![
        Binding::read("src", c.src.clone()),
        Binding::read("wgt", c.weight.clone()),
    ];
    if let Some(bias) = &c.bias {
        b.push(Binding::param("bias", bias.clone(), cout));
    }
    let mut body = String::new();
    let mut pre_epilogue = String::new();
    let mut act: Option<&ActRef> = None;
    match &c.epilogue {
        Epilogue::Store { dst } => {
            b.push(Binding::write("dst", dst.clone()));
            body.push_str("dst[o] = v;");
        }
        Epilogue::StoreAct { pre, dst, act: a } => {
            b.push(Binding::write("dst", dst.clone()));
            if let Some(pre) = pre {
                b.push(Binding::write("pre", pre.clone()));
                body.push_str("pre[o] = v; ");
            }
            let _ = write!(body, "dst[o] = {};", act_call(a, "v"));
            act = Some(a);
        }
        Epilogue::Residual {
            res,
            dst,
            next,
            latent,
        } => {
            b.push(Binding::read("res", res.clone()));
            b.push(Binding::write("dst", dst.clone()));
            body.push_str("let y = res[o] + v; ");
            match next {
                None => {
                    body.push_str("dst[o] = y;");
                    if let Some(t) = latent {
                        b.push(Binding::write("z", t.z.clone()));
                        for &(lo, hi, off) in &t.parts {
                            let _ = write!(
                                body,
                                " if (li >= {lo}u && li < {hi}u) {{ z[sample * {}u + {off}u + li - {lo}u] = y; }}",
                                t.stride
                            );
                        }
                    }
                }
                Some(n) => {
                    b.push(Binding::param("an_scale", n.log_scale.clone(), cout));
                    b.push(Binding::param("an_bias", n.bias.clone(), cout));
                    body.push_str("let a = y * exp(an_scale(co)) + an_bias(co); dst[o] = a;");
                    if let Some(l) = &n.lead {
                        b.push(Binding::write("lead", l.buffer.clone()));
                        let _ = write!(body, " lead[o] = {};", act_call(&l.act, "a"));
                        act = Some(&l.act);
                    }
                }
            }
        }
        Epilogue::FixedPoint {
            target,
            dst,
            lead,
            actnorm,
        } => {
            b.push(Binding::read("yt", target.clone()));
            b.push(Binding::write("dst", dst.clone()));
            body.push_str("let x = yt[o] - v; ");
            match actnorm {
                None => body.push_str("let out = x; dst[o] = out;"),
                Some(an) => {
                    b.push(Binding::param("an_scale", an.log_scale.clone(), cout));
                    b.push(Binding::param("an_bias", an.bias.clone(), cout));
                    body.push_str(
                        "let out = (x - an_bias(co)) * exp(-an_scale(co)); dst[o] = out;",
                    );
                    if let Some(copy) = &an.copy {
                        b.push(Binding::write("x0", copy.clone()));
                        body.push_str(" x0[o] = out;");
                    }
                }
            }
            if let Some(l) = lead {
                b.push(Binding::write("lead", l.buffer.clone()));
                let _ = write!(body, " lead[o] = {};", act_call(&l.act, "out"));
                act = Some(&l.act);
            }
        }
        Epilogue::VjpMask { mask, dst } => {
            b.push(Binding::read("pre", mask.buffer.clone()));
            b.push(Binding::write("dst", dst.clone()));
            let _ = write!(body, "dst[o] = v * {};", mask.call("pre[o]"));
            act = Some(&mask.act);
        }
        Epilogue::VjpDot { mask, dst, ld } => {
            b.push(Binding::write("dst", dst.clone()));
            match mask {
                Some(m) => {
                    b.push(Binding::read("pre", m.buffer.clone()));
                    let _ = write!(body, "let u = v * {}; ", m.call("pre[o]"));
                    act = Some(&m.act);
                }
                None => body.push_str("let u = v; "),
            }
            push_logdet_bindings(&mut b, ld, cout);
            pre_epilogue = logdet_counters(ld);
            let _ = write!(
                body,
                "dst[o] = u; acc[sample * {}u + li] += coef[coef_at] * u * probes[probe_at + li] + select(0.0, ld_scale(co), first_term);",
                ld.counter.stride
            );
        }
    }
    if let Some(counter) = &c.bump {
        b.push(Binding::write("acc", counter.buffer.clone()));
        pre_epilogue.push_str(&bump_statement(counter, first_invocation));
    }
    let beta = beta_setup(act, &mut b);
    ConvParts {
        bindings: b,
        body,
        pre_epilogue,
        beta,
    }
}

pub fn conv(c: &Conv, tiling: Tiling) -> Result<Generated> {
    let (pixels, channels, workgroup) = match tiling {
        Tiling::RegisterBlocked {
            pixels,
            channels,
            workgroup,
        } => (pixels, channels, workgroup),
        Tiling::SplitK { .. } => return super::splitk::conv(c, tiling),
    };
    let f = &c.geom;
    let (cin, cout, _, oh, ow) = conv_map(c);
    let ohw = oh * ow;
    let wg = (ohw as u32).next_power_of_two().clamp(1, workgroup);
    let tp = (ohw as u32).div_ceil(wg).clamp(1, pixels);
    let tc = (cout as u32).clamp(1, channels);
    let per_group = wg * tp;
    let ConvParts {
        bindings: b,
        body,
        pre_epilogue,
        beta,
    } = conv_parts(c, "wg.x == 0u && wg.y == 0u && lane == 0u");
    // The vec4 form reads its input as vec4s from offset 0, its weights as stored.
    let vec4 = match (c.src_view, c.adjoint_weight) {
        (None, false) => {
            super::vec4::conv1x1_vec4(c, tiling, cin, cout, ohw, &b, &beta, &pre_epilogue, &body)?
        }
        _ => None,
    };
    if let Some(g) = vec4 {
        return Ok(g);
    }

    let mut setup = beta;
    for j in 0..tp {
        let _ = writeln!(
            setup,
            "    let p{j} = pbase + {}u;\n    let live{j} = p{j} < OHW;\n    let oy{j} = i32(p{j} / OW) * STRIDE - PAD;\n    let ox{j} = i32(p{j} % OW) * STRIDE - PAD;",
            j * wg
        );
    }
    for t in 0..tc {
        let _ = writeln!(setup, "    let c{t} = min(co0 + {t}u, COUT - 1u);");
        for j in 0..tp {
            let _ = writeln!(setup, "    var acc{t}_{j} = 0.0;");
        }
    }
    let mut tap = String::new();
    for j in 0..tp {
        let _ = writeln!(
            tap,
            "            let iy{j} = oy{j} + i32(ky);\n            let ix{j} = ox{j} + i32(kx);\n            let ok{j} = live{j} && iy{j} >= 0 && iy{j} < i32(H) && ix{j} >= 0 && ix{j} < i32(W);\n            let off{j} = select(0u, u32(iy{j}) * W + u32(ix{j}), ok{j});"
        );
    }
    let mut inner = String::new();
    for j in 0..tp {
        let _ = writeln!(
            inner,
            "                let x{j} = select(0.0, src[cb + off{j}], ok{j});"
        );
    }
    for t in 0..tc {
        let _ = writeln!(inner, "                let w{t} = wt(c{t}, ci, ky, kx);");
        for j in 0..tp {
            let _ = writeln!(
                inner,
                "                acc{t}_{j} = fma(w{t}, x{j}, acc{t}_{j});"
            );
        }
    }
    let mut epilogue = pre_epilogue;
    let bias = if c.bias.is_some() { " + bias(co)" } else { "" };
    for t in 0..tc {
        for j in 0..tp {
            let _ = writeln!(
                epilogue,
                "    if (co0 + {t}u < COUT && live{j}) {{\n        let co = co0 + {t}u;\n        let li = co * OHW + p{j};\n        let o = sample * OUT_N + li;\n        let v = acc{t}_{j}{bias};\n        {body}\n    }}"
            );
        }
    }
    let source = wgsl::render(
        wgsl::CONV_TEMPLATE,
        &[
            conv_constants(c),
            vec![
                ("BINDINGS", wgsl::declare(&b)),
                ("TC", tc.to_string()),
                ("PIXELS_PER_GROUP", per_group.to_string()),
                ("WG", wg.to_string()),
                ("SETUP", setup),
                ("TAP", tap),
                ("INNER", inner),
                ("EPILOGUE", epilogue),
            ],
        ]
        .concat(),
    )?;
    let (bytes_per_sample, bytes_shared) = conv_bytes(c, &b);
    Ok(Generated {
        source,
        bindings: b,
        workgroup_size: wg,
        workgroups: [(ohw as u32).div_ceil(per_group), (cout as u32).div_ceil(tc)],
        flops_per_sample: 2 * (cin * cout * f.k * f.k * ohw) as u64,
        chain: (cin * f.k * f.k) as u64,
        bytes_per_sample,
        bytes_shared,
        kind: KernelKind::Conv,
    })
}

/// Compulsory traffic of a convolution kernel, `(per sample, shared)` bytes: the input map
/// and one pass over each per-output array of the epilogue per sample (the log-det
/// accumulator read and written), the weights and per-channel parameters once.
pub(super) fn conv_bytes(c: &Conv, bindings: &[Binding]) -> (u64, u64) {
    let (cin, cout, _, oh, ow) = conv_map(c);
    let (inputs, outputs) = (cin * c.geom.h * c.geom.w, cout * oh * ow);
    let (inputs, outputs) = if c.transposed {
        (cin * c.geom.out_h() * c.geom.out_w(), outputs)
    } else {
        (inputs, outputs)
    };
    let (mut per_sample, mut shared) = (0usize, 0usize);
    for b in bindings {
        match b.var {
            "src" => per_sample += inputs,
            "wgt" => shared += c.geom.weight_len(),
            "bias" | "an_scale" | "an_bias" => shared += cout,
            "beta_raw" => shared += 1,
            "coef" | "counter" => per_sample += 1,
            "acc" => per_sample += 2 * outputs,
            _ => per_sample += outputs,
        }
    }
    (4 * per_sample as u64, 4 * shared as u64)
}

/// An elementwise kernel over `n` elements per sample; `body` uses `sample`, `i` and `beta`.
pub fn eltwise(
    n: usize,
    mut bindings: Vec<Binding>,
    act: Option<&ActRef>,
    body: &str,
) -> Result<Generated> {
    let beta = beta_setup(act, &mut bindings);
    let source = wgsl::render(
        wgsl::ELTWISE_TEMPLATE,
        &[
            ("BINDINGS", wgsl::declare(&bindings)),
            ("N", n.to_string()),
            ("FUNCTIONS", wgsl::activation_functions()),
            ("BODY", format!("{beta}{body}")),
        ],
    )?;
    // Every binding but LipSwish's parameter is an array of n per sample.
    let arrays = bindings.iter().filter(|b| b.var != "beta_raw").count();
    Ok(Generated {
        source,
        bindings,
        workgroup_size: 256,
        workgroups: [(n as u32).div_ceil(256), 1],
        flops_per_sample: n as u64,
        chain: 1,
        bytes_per_sample: 4 * (n * arrays) as u64,
        bytes_shared: 0,
        kind: KernelKind::Elementwise,
    })
}

/// The end of an entry point's log-det: each sample's accumulator summed into `logdet`
/// (see `shaders/logdet_reduce.wgsl`).
/// `acc_stride`: values per sample of `acc` (its `acc_n` terms, then the term counter).
pub fn logdet_reduce(
    acc_n: usize,
    acc_stride: usize,
    acc: &str,
    logdet: &str,
) -> Result<Generated> {
    let bindings = vec![Binding::read("acc", acc), Binding::write("logdet", logdet)];
    let source = wgsl::render(
        wgsl::REDUCE_TEMPLATE,
        &[
            ("BINDINGS", wgsl::declare(&bindings)),
            ("D", acc_n.to_string()),
            ("STRIDE", acc_stride.to_string()),
            ("WG", REDUCE_WORKGROUP.to_string()),
        ],
    )?;
    Ok(Generated {
        source,
        bindings,
        workgroup_size: REDUCE_WORKGROUP as u32,
        workgroups: [1, 1],
        flops_per_sample: acc_n as u64,
        // Each lane sums D / WG values, then a log2(WG)-level tree.
        chain: (acc_n.div_ceil(REDUCE_WORKGROUP) + REDUCE_WORKGROUP.trailing_zeros() as usize)
            as u64,
        bytes_per_sample: 4 * (acc_n + 1) as u64,
        bytes_shared: 0,
        kind: KernelKind::Reduce,
    })
}

/// Lanes of the log-det's final sum (one workgroup per sample; a power of two).
const REDUCE_WORKGROUP: usize = 256;
