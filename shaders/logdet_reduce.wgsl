// Ends one block's log-det: sums the block's accumulated `coef_k <w_k, v>` terms of one sample
// (one workgroup per sample), adds ActNorm's H*W*sum(log_scale), adds both to the sample's
// log-det and resets the accumulator and the term counter for the next block. One barrier
// tree per block and sample; the per-term work has no reduction at all.
//
// Specialized by iresnetc codegen: every double-braced placeholder is replaced before naga validates it.
{{BINDINGS}}
const D: u32 = {{D}}u;
const CHANNELS: u32 = {{CHANNELS}}u;
const SPATIAL: f32 = {{SPATIAL}};

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let sample = wg.z;
    var sum = 0.0;
    for (var i = lane; i < D; i += 64u) {
        sum += acc[sample * D + i];
        acc[sample * D + i] = 0.0;
    }
    partial[lane] = sum;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        var scales = 0.0;
        for (var c = 0u; c < CHANNELS; c++) {
            scales += log_scale[c];
        }
        logdet[sample] += partial[0] + SPATIAL * scales;
        counter[sample] = 0.0;
    }
}
