// Ends an entry point's log-det: one workgroup per sample sums the sample's accumulator, into
// which every block's vjp kernels added their `coef_k <w_k, v>` terms elementwise and their
// ActNorm's log-scales (one channel value per element, with the block's first term). The
// terms need no reduction of their own; this one tree per sample, in a fixed order, is the
// only one of the run.
//
// Specialized by iresnetc codegen: every double-braced placeholder is replaced before naga validates it.
{{BINDINGS}}
const D: u32 = {{D}}u;
// Values per sample of `acc`: its D terms, then the log-det's term counter.
const STRIDE: u32 = {{STRIDE}}u;
const WG: u32 = {{WG}}u;

var<workgroup> partial: array<f32, {{WG}}>;

@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let sample = wg.z;
    var sum = 0.0;
    for (var i = lane; i < D; i += WG) {
        sum += acc[sample * STRIDE + i];
    }
    partial[lane] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        logdet[sample] = partial[0];
    }
}
