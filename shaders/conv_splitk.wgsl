// Direct convolution for hardware GPUs: each invocation computes TC output channels of one
// pixel (an output block; the input value it loads serves all TC), and the reduction is split
// S ways over input channels. A workgroup of WG invocations holds OPG = WG / S consecutive
// output blocks (channel-block-major, so lanes with the same split read consecutive pixels
// and share weights), each computed as S partial sums of CPS input channels x K x K taps; the
// partials meet in workgroup memory and lane j of split 0 adds them in split order
// (deterministic, no atomics) and runs the fused epilogue. Codegen picks TC and S so that a
// layer with few outputs (the 512 -> C convolutions at batch 1) still launches many
// workgroups and no invocation runs a long serial chain; S = 1 skips workgroup memory.
//
// The transposed convolution of the log-det's vjp is the same loop with swapped channels,
// flipped taps and pad K-1-PAD (see `wt`), as in conv.wgsl.
//
// Specialized by iresnetc codegen: every double-braced placeholder is replaced before naga
// validates it.
{{BINDINGS}}
{{GEOMETRY}}
const TC: u32 = {{TC}}u;
const BLOCKS: u32 = {{BLOCKS}}u;
const S: u32 = {{S}}u;
const OPG: u32 = {{OPG}}u;
const CPS: u32 = {{CPS}}u;
const GX: u32 = {{GX}}u;
{{FUNCTIONS}}
{{SHARED}}
fn wt(o: u32, i: u32, ky: u32, kx: u32) -> f32 {
    return {{WEIGHT_EXPR}};
}

@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let sample = wg.z;
    let j = lane % OPG;
    let split = lane / OPG;
    // Output block: channels co0 .. co0 + TC - 1 of pixel p.
    let lb = (wg.y * GX + wg.x) * OPG + j;
    let live = lb < BLOCKS;
    let lc = min(lb, BLOCKS - 1u);
    let co0 = (lc / OHW) * TC;
    let p = lc % OHW;
    let oy = i32(p / OW) * STRIDE - PAD;
    let ox = i32(p % OW) * STRIDE - PAD;
    let xb = sample * IN_N + IN_OFF;
    let ci0 = min(split * CPS, CIN);
    let ci1 = min(ci0 + CPS, CIN);
{{SETUP}}
    for (var ky = 0u; ky < K; ky++) {
        let iy = oy + i32(ky);
        for (var kx = 0u; kx < K; kx++) {
            let ix = ox + i32(kx);
            let ok = iy >= 0 && iy < i32(H) && ix >= 0 && ix < i32(W);
            let off = select(0u, u32(iy) * W + u32(ix), ok);
            for (var ci = ci0; ci < ci1; ci++) {
                let xv = select(0.0, src[xb + ci * (H * W) + off], ok);
{{INNER}}
            }
        }
    }
{{REDUCE}}
{{EPILOGUE}}
}
