//! The vec4 form of a 1x1 convolution in the register-blocked (CPU) tiling
//! (`shaders/conv1x1_vec4.wgsl`): the i-ResNet's widest layer, with half the load
//! instructions per FMA of the scalar template on llvmpipe.

use std::fmt::Write as _;

use super::kernels::{conv_bytes, Conv, Generated, KernelKind, Tiling};
use super::wgsl::{self, Binding};
use crate::error::Result;

/// The vec4 variant of a 1x1 convolution (see `shaders/conv1x1_vec4.wgsl`), when the shapes
/// allow it: pixels a multiple of 4, and the vector axis of the weights (input channels
/// forward, output channels transposed) a multiple of 4 and of the channel block.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv1x1_vec4(
    c: &Conv,
    tiling: Tiling,
    cin: usize,
    cout: usize,
    ohw: usize,
    bindings: &[Binding],
    beta: &str,
    pre_epilogue: &str,
    body: &str,
) -> Result<Option<Generated>> {
    let Tiling::RegisterBlocked {
        channels,
        workgroup,
        ..
    } = tiling
    else {
        return Ok(None);
    };
    let tc = (channels as usize * 2).min(cout);
    let fits = c.geom.k == 1
        && c.geom.stride == 1
        && c.geom.pad == 0
        && ohw.is_multiple_of(4)
        && tc.is_multiple_of(4)
        && cout.is_multiple_of(tc)
        && cin.is_multiple_of(4);
    if !fits {
        return Ok(None);
    }
    let hw4 = ohw / 4;
    let wg = (hw4 as u32).next_power_of_two().clamp(1, workgroup);
    let decl = wgsl::declare_vec4(bindings, &["src", "wgt"]);
    let mut setup = beta.to_string();
    for t in 0..tc {
        let _ = writeln!(setup, "    var acc{t} = vec4<f32>(0.0);");
    }
    let lanes = ["x", "y", "z", "w"];
    let mut inner = String::new();
    let looped = if c.transposed {
        // Weight row i (a forward output channel) holds this kernel's outputs contiguously.
        for m in 0..tc / 4 {
            let _ = writeln!(
                inner,
                "        let w{m} = wgt[(ci * COUT + co0) / 4u + {m}u];"
            );
            for (k, l) in lanes.iter().enumerate() {
                let t = 4 * m + k;
                let _ = writeln!(
                    inner,
                    "        acc{t} = fma(vec4<f32>(w{m}.{l}), xv, acc{t});"
                );
            }
        }
        format!(
            "    for (var ci = 0u; ci < CIN; ci++) {{\n        let xv = src[xb + ci * HW4];\n{inner}    }}"
        )
    } else {
        for t in 0..tc {
            let _ = writeln!(
                inner,
                "        let w{t} = wgt[min(co0 + {t}u, COUT - 1u) * (CIN / 4u) + c4];"
            );
            for (k, l) in lanes.iter().enumerate() {
                let _ = writeln!(
                    inner,
                    "        acc{t} = fma(vec4<f32>(w{t}.{l}), x{k}, acc{t});"
                );
            }
        }
        format!(
            "    for (var c4 = 0u; c4 < CIN / 4u; c4++) {{\n        let xc = xb + c4 * 4u * HW4;\n        let x0 = src[xc];\n        let x1 = src[xc + HW4];\n        let x2 = src[xc + 2u * HW4];\n        let x3 = src[xc + 3u * HW4];\n{inner}    }}"
        )
    };
    let mut epilogue = pre_epilogue.to_string();
    let bias = if c.bias.is_some() { " + bias(co)" } else { "" };
    for t in 0..tc {
        for (k, l) in lanes.iter().enumerate() {
            let _ = writeln!(
                epilogue,
                "    if (co0 + {t}u < COUT && live) {{\n        let co = co0 + {t}u;\n        let li = co * OHW + 4u * q + {k}u;\n        let o = sample * OUT_N + li;\n        let v = acc{t}.{l}{bias};\n        {body}\n    }}"
            );
        }
    }
    let source = wgsl::render(
        wgsl::CONV1X1_VEC4_TEMPLATE,
        &[
            ("BINDINGS", decl),
            ("CIN", cin.to_string()),
            ("COUT", cout.to_string()),
            ("OHW", ohw.to_string()),
            ("HW4", hw4.to_string()),
            ("OUT_N", (cout * ohw).to_string()),
            ("TC", tc.to_string()),
            ("FUNCTIONS", wgsl::activation_functions()),
            ("WG", wg.to_string()),
            ("SETUP", setup),
            ("LOOP", looped),
            ("EPILOGUE", epilogue),
        ],
    )?;
    Ok(Some(Generated {
        source,
        bindings: bindings.to_vec(),
        workgroup_size: wg,
        workgroups: [(hw4 as u32).div_ceil(wg), (cout / tc) as u32],
        flops_per_sample: 2 * (cin * cout * ohw) as u64,
        chain: cin as u64,
        bytes_per_sample: conv_bytes(c, bindings).0,
        bytes_shared: conv_bytes(c, bindings).1,
        kind: KernelKind::Conv,
    }))
}
