//! The GPU tiling's kernel for larger batches (`shaders/conv_gemm.wgsl`): a convolution as a
//! shared-memory implicit GEMM whose rows are the pixels of every sample of the run, so its
//! grid grows with the batch instead of with the image. The split-K kernel
//! ([`super::splitk`]) stays the one that runs at small batches, where 64-row tiles would
//! leave a GPU nearly empty; the plan carries both and the runtime picks by batch
//! ([`iresnetc_runtime::Folded`]).

use std::fmt::Write as _;

use super::kernels::{
    conv_bytes, conv_constants, conv_map, conv_parts, Conv, ConvParts, Generated, KernelKind,
    Tiling,
};
use super::wgsl;
use crate::error::Result;

/// Output rows (pixels of any sample) per tile.
pub const TILE_ROWS: usize = 64;
/// Reduction indices (input channel x tap) staged per step.
const TILE_K: usize = 16;
/// Each invocation accumulates a 4 x 4 block of the tile.
const MICRO: usize = 4;
/// The batch-folded kernel is never chosen below this batch: at batch 1 the split-K kernel
/// meets the parallelism and chain goals, which a full-length GEMM reduction does not.
const MIN_BATCH_FLOOR: usize = 2;
/// Nor above this one: a layer that needs a larger batch to fill the GPU keeps split-K.
const MIN_BATCH_CEIL: usize = 4096;

/// Stages the TK x TM input slice one scalar per lane and round: row `idx % TM` (a pixel of
/// some sample) at reduction index `idx / TM` (input channel x tap), zero outside the image.
const A_STAGE_SCALAR: &str = "        for (var e = 0u; e < TK * TM / WG; e++) {
            let idx = lane + e * WG;
            let kk = k0 + idx / TM;
            let row = r0 + idx % TM;
            var v = 0.0;
            if (kk < KD && row < rows) {
                let s = row / OHW;
                let p = row % OHW;
                let ci = kk / KK;
                let iy = i32(p / OW) * STRIDE - PAD + i32((kk % KK) / K);
                let ix = i32(p % OW) * STRIDE - PAD + i32(kk % K);
                if (iy >= 0 && iy < i32(H) && ix >= 0 && ix < i32(W)) {
                    v = src[s * IN_N + IN_OFF + ci * (H * W) + u32(iy) * W + u32(ix)];
                }
            }
            a_tile[idx] = v;
        }";

/// The 1x1 case (stride 1, no padding) with 4 | OHW, IN_N, IN_OFF: rows 4q .. 4q+3 of a tile
/// are 4 consecutive pixels of one sample, contiguous in `src` for each input channel, and
/// all inside the batch when the first is. One vec4 per lane and round.
const A_STAGE_VEC4: &str = "        for (var e = 0u; e < TK * TM / (4u * WG); e++) {
            let idx = lane + e * WG;
            let q = idx % (TM / 4u);
            let kr = idx / (TM / 4u);
            let kk = k0 + kr;
            let row = r0 + 4u * q;
            var v = vec4<f32>();
            if (kk < KD && row < rows) {
                v = src[(row / OHW * IN_N + IN_OFF + kk * OHW + row % OHW) / 4u];
            }
            let at = kr * TM + 4u * q;
            a_tile[at] = v.x;
            a_tile[at + 1u] = v.y;
            a_tile[at + 2u] = v.z;
            a_tile[at + 3u] = v.w;
        }";

/// Stages the TK x TN weight slice one scalar per lane and round, through `wt`.
const B_STAGE_SCALAR: &str = "        for (var e = 0u; e < TK * TN / WG; e++) {
            let idx = lane + e * WG;
            let kr = idx % TK;
            let cc = idx / TK;
            let kk = k0 + kr;
            var w = 0.0;
            if (kk < KD && co0 + cc < COUT) {
                w = wt(co0 + cc, kk / KK, (kk % KK) / K, kk % K);
            }
            b_tile[kr * TN + cc] = w;
        }";

/// Stages it one vec4 (4 consecutive reduction indices of a channel) per lane and round;
/// KD is a multiple of 4, so a vec4 starting inside the reduction lies wholly inside.
const B_STAGE_VEC4: &str = "        for (var e = 0u; e < TK * TN / (4u * WG); e++) {
            let idx = lane + e * WG;
            let q = idx % (TK / 4u);
            let cc = idx / (TK / 4u);
            let kk = k0 + 4u * q;
            var w = vec4<f32>();
            if (kk < KD && co0 + cc < COUT) {
                w = wgt[((co0 + cc) * KD + kk) / 4u];
            }
            let r = 4u * q;
            b_tile[r * TN + cc] = w.x;
            b_tile[(r + 1u) * TN + cc] = w.y;
            b_tile[(r + 2u) * TN + cc] = w.z;
            b_tile[(r + 3u) * TN + cc] = w.w;
        }";

/// A kernel with its grid folded over the batch, and from which batch the runtime runs it.
pub struct FoldedKernel {
    pub generated: Generated,
    pub rows: u32,
    pub rows_per_group: u32,
    pub groups_y: u32,
    pub min_batch: u32,
}

/// Output channels per tile for `cout`, or None when the layer is too narrow for a tile (the
/// 512 -> C convolutions keep the split-K kernel at every batch).
fn tile_channels(cout: usize) -> Option<usize> {
    [64, 32].into_iter().find(|&tn| cout >= tn)
}

/// The smallest batch from which the folded kernel launches `target_groups` workgroups.
fn min_batch(rows: usize, groups_y: usize, target_groups: usize) -> Option<usize> {
    (MIN_BATCH_FLOOR..=MIN_BATCH_CEIL)
        .find(|&b| (b * rows).div_ceil(TILE_ROWS) * groups_y >= target_groups)
}

/// The batch-folded GEMM form of `c` in the GPU tiling (the run's batch is the length of its
/// output over a sample's); None in the CPU tiling and for layers that keep the split-K kernel.
pub fn conv(c: &Conv, tiling: Tiling) -> Result<Option<FoldedKernel>> {
    let Tiling::SplitK { target_groups, .. } = tiling else {
        return Ok(None);
    };
    let f = &c.geom;
    let (cin, cout, _, oh, ow) = conv_map(c);
    let ohw = oh * ow;
    let Some(tn) = tile_channels(cout) else {
        return Ok(None);
    };
    let groups_y = cout.div_ceil(tn);
    let Some(min_batch) = min_batch(ohw, groups_y, target_groups as usize) else {
        return Ok(None);
    };
    let tm = TILE_ROWS;
    let wg = (tm / MICRO) * (tn / MICRO);
    let kd = cin * f.k * f.k;
    // Weights contiguous along the reduction, in whole vec4s: each lane stages 4 reduction
    // indices of one channel with one load (a step of TK = 16 is 4 of them).
    let vec4_weights = c.weights_in_forward_order() && kd.is_multiple_of(4);
    let (in_n, in_off) = c.src_layout();
    let vec4_input = f.k == 1
        && (c.transposed || f.stride == 1)
        && f.pad == 0
        && [ohw, in_n, in_off].iter().all(|n| n.is_multiple_of(4));
    let a_stage = if vec4_input {
        A_STAGE_VEC4
    } else {
        A_STAGE_SCALAR
    };
    let (weight_fn, b_stage) = if vec4_weights {
        (String::new(), B_STAGE_VEC4.to_string())
    } else {
        (
            format!(
                "fn wt(o: u32, i: u32, ky: u32, kx: u32) -> f32 {{\n    return {};\n}}\n",
                c.weight_expr()
            ),
            B_STAGE_SCALAR.to_string(),
        )
    };
    // The term counter's bump: the invocation holding pixel 0, channel 0 of each sample.
    let ConvParts {
        bindings,
        body,
        pre_epilogue,
        beta,
    } = conv_parts(c, "p == 0u && co == 0u");
    let vec4_vars: Vec<&str> = [(vec4_weights, "wgt"), (vec4_input, "src")]
        .into_iter()
        .filter_map(|(on, var)| on.then_some(var))
        .collect();
    let declarations = wgsl::declare_vec4(&bindings, &vec4_vars);

    let mut setup = beta;
    let mut inner = String::new();
    for i in 0..MICRO {
        let _ = writeln!(
            inner,
            "            let a{i} = a_tile[kr * TM + tx + {}u];",
            i * tm / MICRO
        );
    }
    for j in 0..MICRO {
        let _ = writeln!(
            inner,
            "            let b{j} = b_tile[kr * TN + ty + {}u];",
            j * tn / MICRO
        );
    }
    for i in 0..MICRO {
        for j in 0..MICRO {
            let _ = writeln!(setup, "    var acc{i}_{j} = 0.0;");
            let _ = writeln!(
                inner,
                "            acc{i}_{j} = fma(a{i}, b{j}, acc{i}_{j});"
            );
        }
    }
    let bias = if c.bias.is_some() { " + bias(co)" } else { "" };
    let pre = pre_epilogue.replace('\n', "\n    ");
    let mut epilogue = String::new();
    for i in 0..MICRO {
        for j in 0..MICRO {
            let _ = writeln!(
                epilogue,
                "    {{\n        let row = r0 + tx + {ri}u;\n        let co = co0 + ty + {cj}u;\n        if (row < rows && co < COUT) {{\n            let sample = row / OHW;\n            let p = row % OHW;\n            let li = co * OHW + p;\n            let o = sample * OUT_N + li;\n            let v = acc{i}_{j}{bias};\n        {pre}\n            {body}\n        }}\n    }}",
                ri = i * tm / MICRO,
                cj = j * tn / MICRO,
            );
        }
    }
    let source = wgsl::render(
        wgsl::CONV_GEMM_TEMPLATE,
        &[
            conv_constants(c),
            vec![
                ("BINDINGS", declarations),
                ("TM", tm.to_string()),
                ("TN", tn.to_string()),
                ("TK", TILE_K.to_string()),
                ("WG", wg.to_string()),
                ("A_TILE", (TILE_K * tm).to_string()),
                ("B_TILE", (TILE_K * tn).to_string()),
                ("WEIGHT_FN", weight_fn),
                ("A_STAGE", a_stage.to_string()),
                ("B_STAGE", b_stage),
                ("SETUP", setup),
                ("INNER", inner),
                ("EPILOGUE", epilogue),
            ],
        ]
        .concat(),
    )?;
    let (bytes_per_sample, bytes_shared) = conv_bytes(c, &bindings);
    let u = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(Some(FoldedKernel {
        generated: Generated {
            source,
            bindings,
            workgroup_size: u(wg),
            workgroups: [1, u(groups_y)],
            flops_per_sample: 2 * (cin * cout * f.k * f.k * ohw) as u64,
            // Every accumulator runs the whole reduction.
            chain: (cin * f.k * f.k) as u64,
            bytes_per_sample,
            bytes_shared,
            kind: KernelKind::Conv,
        },
        rows: u(ohw),
        rows_per_group: u(tm),
        groups_y: u(groups_y),
        min_batch: u(min_batch),
    }))
}
