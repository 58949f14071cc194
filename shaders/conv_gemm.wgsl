// Convolution as a shared-memory implicit GEMM over the whole batch, for hardware GPUs at
// larger batches: out[row, co] = sum_kk A[row, kk] * B[kk, co], where a row is one output
// pixel of one sample (the samples' pixels are concatenated, so the batch is folded into the
// rows and the grid does not depend on the image size) and kk runs over input channel x tap
// (A is the im2col matrix, never stored; B the weights of the direction this kernel computes).
//
// A workgroup owns a TM x TN output tile. Per step of TK reduction indices it stages the A and
// B slices in workgroup memory (consecutive lanes load consecutive pixels and consecutive
// weights, so global reads coalesce; weights stored along the reduction, as forward ones and
// the adjoint arrangement of transposed ones are, load as vec4s, and so does the input of a
// 1x1 convolution, 4 consecutive pixels of one channel), then each invocation accumulates a 4 x 4 register block:
// rows tx + i * TM/4 and channels ty + j * TN/4, so lanes of a SIMD group read consecutive
// A-tile entries and write consecutive pixels. The sum over kk runs in a fixed order: the
// result does not depend on the schedule. The run's batch is the length of `dst` over OUT_N (the
// runtime sizes every per-sample buffer to exactly the run's batch and binds it whole: no
// binding of its own for the batch, so kernels stay within WebGPU's default of 8 storage
// buffers); rows past it load zeros and store nothing (no early exit: every lane reaches
// every barrier).
//
// The transposed convolution of the log-det's vjp is the same loop with swapped channels,
// flipped taps and pad K-1-PAD (see `wt`), as in conv.wgsl.
//
// Specialized by iresnetc codegen: every double-braced placeholder is replaced before naga
// validates it.
{{BINDINGS}}
{{GEOMETRY}}
const KK: u32 = K * K;
const KD: u32 = CIN * KK;
const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const TK: u32 = {{TK}}u;
const WG: u32 = {{WG}}u;
{{FUNCTIONS}}
var<workgroup> a_tile: array<f32, {{A_TILE}}>;
var<workgroup> b_tile: array<f32, {{B_TILE}}>;

{{WEIGHT_FN}}
@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let rows = arrayLength(&dst) / OUT_N * OHW;
    let r0 = (wg.z * groups.x + wg.x) * TM;
    let co0 = wg.y * TN;
    let tx = lane % (TM / 4u);
    let ty = lane / (TM / 4u);
{{SETUP}}
    for (var k0 = 0u; k0 < KD; k0 += TK) {
{{A_STAGE}}
{{B_STAGE}}
        workgroupBarrier();
        for (var kr = 0u; kr < TK; kr++) {
{{INNER}}
        }
        workgroupBarrier();
    }
{{EPILOGUE}}
}
