//! The convolution kernel of the GPU tiling ([`Tiling::SplitK`], `shaders/conv_splitk.wgsl`):
//! a block of output channels of one pixel per invocation, fixed workgroups, the reduction
//! split over input channels and summed in workgroup memory in a fixed order before the
//! fused epilogue.

use super::kernels::{
    conv_bytes, conv_constants, conv_map, conv_parts, Conv, ConvParts, Generated, KernelKind,
    Tiling,
};
use std::fmt::Write as _;

use super::wgsl;
use crate::error::Result;

/// Largest grid dimension used before a dispatch goes 2-D (the WebGPU minimum limit).
const MAX_GROUPS_X: usize = 65_535;

/// Output channels per invocation tried, largest first: each input value loaded serves
/// that many multiply-adds, as long as the layer keeps its workgroups.
const CHANNEL_BLOCKS: [usize; 4] = [8, 4, 2, 1];

/// How a split-K kernel divides its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// Output channels per invocation (an output block is TC channels of one pixel).
    pub channels_per_block: usize,
    /// Output blocks per sample.
    pub blocks: usize,
    /// Partial sums per output (a power of two dividing the workgroup).
    pub splits: usize,
    /// Input channels per partial sum.
    pub channels_per_split: usize,
    /// Output blocks per workgroup: `workgroup / splits`.
    pub outputs_per_group: usize,
    /// Workgroups per sample.
    pub groups: usize,
}

impl Split {
    /// Dependent operations of one invocation: the multiply-adds of each of its
    /// accumulators, then the adds of the split reduction.
    pub fn chain(&self, taps: usize) -> usize {
        self.channels_per_split * taps + self.splits - 1
    }
}

/// The split of a convolution with `cout` x `pixels` outputs per sample, each a reduction
/// over `cin` channels x `taps` taps: the largest channel block that still reaches
/// `target_groups` workgroups with chains of at most `max_chain` multiply-adds once the
/// reduction is split (splits doubled until both hold, never finer than one channel or than
/// the workgroup); blocks of one channel when none does.
pub fn choose_split(
    cout: usize,
    pixels: usize,
    cin: usize,
    taps: usize,
    workgroup: usize,
    target_groups: usize,
    max_chain: usize,
) -> Split {
    let mut fallback = None;
    for tc in CHANNEL_BLOCKS {
        if tc > cout.max(1) || !cout.is_multiple_of(tc) {
            continue;
        }
        let blocks = (cout / tc) * pixels;
        let mut splits = 1usize;
        let ok = |splits: usize| {
            cin.div_ceil(splits) * taps <= max_chain
                && blocks.div_ceil(workgroup / splits) >= target_groups
        };
        while !ok(splits) && splits * 2 <= workgroup && splits * 2 <= cin.max(1) {
            splits *= 2;
        }
        let outputs_per_group = workgroup / splits;
        let split = Split {
            channels_per_block: tc,
            blocks,
            splits,
            channels_per_split: cin.div_ceil(splits).max(1),
            outputs_per_group,
            groups: blocks.div_ceil(outputs_per_group).max(1),
        };
        if ok(splits) {
            return split;
        }
        fallback = Some(split);
    }
    // tc = 1 always divides cout, so the loop's last round set the fallback.
    fallback.unwrap_or(Split {
        channels_per_block: 1,
        blocks: pixels,
        splits: 1,
        channels_per_split: cin.max(1),
        outputs_per_group: workgroup,
        groups: pixels.div_ceil(workgroup).max(1),
    })
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
    let (cin, cout, _, oh, ow) = conv_map(c);
    let ohw = oh * ow;
    let wg = workgroup as usize;
    let split = choose_split(
        cout,
        ohw,
        cin,
        f.k * f.k,
        wg,
        target_groups as usize,
        max_chain as usize,
    );
    let tc = split.channels_per_block;
    let gx = split.groups.min(MAX_GROUPS_X);
    let gy = split.groups.div_ceil(gx);
    let ConvParts {
        bindings,
        body,
        pre_epilogue,
        beta,
    } = conv_parts(c, "lb == 0u && lane == 0u");
    let mut setup = beta;
    let mut inner = String::new();
    for t in 0..tc {
        let _ = writeln!(setup, "    var acc{t} = 0.0;");
        let _ = writeln!(
            inner,
            "                acc{t} = fma(wt(co0 + {t}u, ci, ky, kx), xv, acc{t});"
        );
    }
    let (shared, mut reduce) = if split.splits == 1 {
        (String::new(), String::new())
    } else {
        (
            format!("var<workgroup> part: array<f32, {}>;", wg * tc),
            "    workgroupBarrier();\n".to_string(),
        )
    };
    for t in 0..tc {
        if split.splits == 1 {
            let _ = writeln!(reduce, "    let total{t} = acc{t};");
        } else {
            // Stored before the barrier, summed after it in split order.
            reduce.insert_str(0, &format!("    part[{t}u * {wg}u + lane] = acc{t};\n"));
            let _ = writeln!(
                reduce,
                "    var total{t} = 0.0;\n    if (split == 0u) {{\n        for (var s = 0u; s < S; s++) {{\n            total{t} += part[{t}u * {wg}u + s * OPG + j];\n        }}\n    }}"
            );
        }
    }
    let bias = if c.bias.is_some() { " + bias(co)" } else { "" };
    let mut epilogue = pre_epilogue;
    for t in 0..tc {
        let _ = writeln!(
            epilogue,
            "    if (live && split == 0u) {{\n        let co = co0 + {t}u;\n        let li = co * OHW + p;\n        let o = sample * OUT_N + li;\n        let v = total{t}{bias};\n        {body}\n    }}"
        );
    }
    let source = wgsl::render(
        wgsl::CONV_SPLITK_TEMPLATE,
        &[
            conv_constants(c),
            vec![
                ("BINDINGS", wgsl::declare(&bindings)),
                ("TC", tc.to_string()),
                ("BLOCKS", split.blocks.to_string()),
                ("S", split.splits.to_string()),
                ("OPG", split.outputs_per_group.to_string()),
                ("CPS", split.channels_per_split.to_string()),
                ("GX", gx.to_string()),
                ("SHARED", shared),
                ("WG", wg.to_string()),
                ("SETUP", setup),
                ("INNER", inner),
                ("REDUCE", reduce),
                ("EPILOGUE", epilogue),
            ],
        ]
        .concat(),
    )?;
    let (bytes_per_sample, bytes_shared) = conv_bytes(c, &bindings);
    Ok(Generated {
        source,
        bindings,
        workgroup_size: workgroup,
        workgroups: [gx as u32, gy as u32],
        flops_per_sample: 2 * (cin * cout * f.k * f.k * ohw) as u64,
        chain: split.chain(f.k * f.k) as u64,
        bytes_per_sample,
        bytes_shared,
        kind: KernelKind::Conv,
    })
}
