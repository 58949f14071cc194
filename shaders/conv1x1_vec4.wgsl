// 1x1 convolution (the i-ResNet's widest layer, W x W channels) with vec4 loads: each
// invocation keeps 4 consecutive pixels x TC output channels in TC vec4 registers. Weights
// are read as vec4 along the contiguous axis of the [cout, cin] matrix: input channels for
// the forward map, output channels for the transposed one (the log-det's vjp). On llvmpipe
// this halves the load instructions per FMA compared with the scalar template (conv.wgsl).
//
// Specialized by iresnetc codegen: every double-braced placeholder is replaced before naga
// validates it.
{{BINDINGS}}
const CIN: u32 = {{CIN}}u;
const COUT: u32 = {{COUT}}u;
const OHW: u32 = {{OHW}}u;
const HW4: u32 = {{HW4}}u;
const OUT_N: u32 = {{OUT_N}}u;
const TC: u32 = {{TC}}u;
{{FUNCTIONS}}
@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let sample = wg.z;
    let co0 = wg.y * TC;
    let q = wg.x * {{WG}}u + lane;
    let live = q < HW4;
    let qq = min(q, HW4 - 1u);
    let xb = sample * CIN * HW4 + qq;
{{SETUP}}
{{LOOP}}
{{EPILOGUE}}
}
