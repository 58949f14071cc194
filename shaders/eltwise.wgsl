// One invocation per element of a per-sample tensor: ActNorm (forward, inverse, fused with the
// branch's leading activation and a squeeze in its loads), activations and their derivative
// masks, layout moves (squeeze, slices, padding, concatenation into z; in the inverse also
// writing the start of the next fixed point), and the `<w_k, v>` accumulation of the
// unfused plans.
//
// Specialized by iresnetc codegen: every double-braced placeholder is replaced before naga validates it.
{{BINDINGS}}
const N: u32 = {{N}}u;
{{FUNCTIONS}}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let sample = wg.z;
    let i = wg.x * 256u + lane;
    if (i >= N) {
        return;
    }
{{BODY}}
}
