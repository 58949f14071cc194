// Direct convolution as an implicit GEMM, register-blocked: each invocation keeps a block of
// TP output pixels x TC output channels in registers (acc{t}_{j}), reads the input straight
// from the storage buffer and uses no workgroup memory and no barriers. That is what llvmpipe
// (lavapipe) runs fastest; the block sizes are codegen parameters.
//
// Lanes of a workgroup take consecutive pixels, so input loads are contiguous across lanes;
// every lane of a workgroup shares the same output channels, so weight loads are uniform.
// Dense layers are the 1x1 case on a 1x1 image. The transposed convolution of the log-det's
// vector-Jacobian product is the same loop with swapped channels, flipped taps and pad
// K-1-PAD (see `wt`), so one template serves forward, inverse and vjp kernels.
//
// Specialized by iresnetc codegen: every double-braced placeholder is replaced before naga validates it.
{{BINDINGS}}
{{GEOMETRY}}
const TC: u32 = {{TC}}u;
const PIXELS_PER_GROUP: u32 = {{PIXELS_PER_GROUP}}u;
{{FUNCTIONS}}
// Weight of (output channel o, input channel i, tap ky, kx) of the map this kernel computes.
fn wt(o: u32, i: u32, ky: u32, kx: u32) -> f32 {
    return {{WEIGHT_EXPR}};
}

@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let sample = wg.z;
    let co0 = wg.y * TC;
    let xb = sample * IN_N + IN_OFF;
    let pbase = wg.x * PIXELS_PER_GROUP + lane;
{{SETUP}}
    for (var ky = 0u; ky < K; ky++) {
        for (var kx = 0u; kx < K; kx++) {
{{TAP}}
            for (var ci = 0u; ci < CIN; ci++) {
                let cb = xb + ci * (H * W);
{{INNER}}
            }
        }
    }
{{EPILOGUE}}
}
