//! The convolution kernel of the GPU tiling ([`Tiling::SplitK`], `shaders/conv_splitk.wgsl`):
//! one output per invocation, fixed workgroups, the reduction split over input channels and
//! summed in workgroup memory in a fixed order before the fused epilogue.

use super::kernels::{
    conv_bytes, conv_map, conv_parts, Conv, ConvParts, Generated, KernelKind, Tiling,
};
use super::wgsl;
use crate::error::Result;

/// Largest grid dimension used before a dispatch goes 2-D (the WebGPU minimum limit).
const MAX_GROUPS_X: usize = 65_535;

/// How a split-K kernel divides its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// Partial sums per output (a power of two dividing the workgroup).
    pub splits: usize,
    /// Input channels per partial sum.
    pub channels_per_split: usize,
    /// Outputs per workgroup: `workgroup / splits`.
    pub outputs_per_group: usize,
    /// Workgroups per sample.
    pub groups: usize,
}

/// The split for `outputs` outputs per sample, each a reduction over `cin` channels x `taps`
/// taps: double the splits until the layer has `target_groups` workgroups and chains of at
/// most `max_chain` multiply-adds, without splitting finer than one channel or than the
/// workgroup.
pub fn choose_split(
    outputs: usize,
    cin: usize,
    taps: usize,
    workgroup: usize,
    target_groups: usize,
    max_chain: usize,
) -> Split {
    let mut splits = 1usize;
    loop {
        let chain = cin.div_ceil(splits) * taps;
        let groups = outputs.div_ceil(workgroup / splits);
        let done = chain <= max_chain && groups >= target_groups;
        if done || splits * 2 > workgroup || splits * 2 > cin.max(1) {
            break;
        }
        splits *= 2;
    }
    let outputs_per_group = workgroup / splits;
    Split {
        splits,
        channels_per_split: cin.div_ceil(splits).max(1),
        outputs_per_group,
        groups: outputs.div_ceil(outputs_per_group).max(1),
    }
}

pub fn conv(c: &Conv, tiling: Tiling) -> Result<Generated> {
    let Tiling::SplitK {
        workgroup,
        target_groups,
        max_chain,
    } = tiling
    else {
        return super::kernels::conv(c, tiling);
    };
    let f = &c.geom;
    let (cin, cout, pad, oh, ow) = conv_map(c);
    let ohw = oh * ow;
    let outputs = cout * ohw;
    let wg = workgroup as usize;
    let split = choose_split(
        outputs,
        cin,
        f.k * f.k,
        wg,
        target_groups as usize,
        max_chain as usize,
    );
    let gx = split.groups.min(MAX_GROUPS_X);
    let gy = split.groups.div_ceil(gx);
    let weight_expr = if c.transposed {
        "wgt[((i * COUT + o) * K + (K - 1u - ky)) * K + (K - 1u - kx)]"
    } else {
        "wgt[((o * CIN + i) * K + ky) * K + kx]"
    };
    let ConvParts {
        bindings,
        body,
        pre_epilogue,
        beta,
    } = conv_parts(c, "li == 0u && lane == 0u");
    let (shared, reduce) = if split.splits == 1 {
        (String::new(), "    let total = partial;".to_string())
    } else {
        (
            format!("var<workgroup> part: array<f32, {wg}>;"),
            "    part[lane] = partial;\n    workgroupBarrier();\n    var total = 0.0;\n    if (split == 0u) {\n        for (var t = 0u; t < S; t++) {\n            total += part[t * OPG + j];\n        }\n    }".to_string(),
        )
    };
    let source = wgsl::render(
        wgsl::CONV_SPLITK_TEMPLATE,
        &[
            ("BINDINGS", wgsl::declare(&bindings)),
            ("CIN", cin.to_string()),
            ("COUT", cout.to_string()),
            ("H", f.h.to_string()),
            ("W", f.w.to_string()),
            ("OW", ow.to_string()),
            ("OHW", ohw.to_string()),
            ("K", f.k.to_string()),
            (
                "STRIDE",
                if c.transposed { 1 } else { f.stride }.to_string(),
            ),
            ("PAD", pad.to_string()),
            ("IN_N", (cin * f.h * f.w).to_string()),
            ("OUT_N", outputs.to_string()),
            ("S", split.splits.to_string()),
            ("OPG", split.outputs_per_group.to_string()),
            ("CPS", split.channels_per_split.to_string()),
            ("GX", gx.to_string()),
            ("FUNCTIONS", wgsl::activation_functions()),
            ("SHARED", shared),
            ("WEIGHT_EXPR", weight_expr.to_string()),
            ("WG", wg.to_string()),
            ("BETA", beta),
            ("REDUCE", reduce),
            ("PRE_EPILOGUE", pre_epilogue),
            (
                "BIAS",
                if c.bias.is_some() { " + bias[co]" } else { "" }.to_string(),
            ),
            ("BODY", body),
        ],
    )?;
    let (bytes_per_sample, bytes_shared) = conv_bytes(c, &bindings);
    Ok(Generated {
        source,
        bindings,
        workgroup_size: workgroup,
        workgroups: [gx as u32, gy as u32],
        flops_per_sample: 2 * (cin * cout * f.k * f.k * ohw) as u64,
        chain: (split.channels_per_split * f.k * f.k + split.splits - 1) as u64,
        bytes_per_sample,
        bytes_shared,
        kind: KernelKind::Conv,
    })
}
