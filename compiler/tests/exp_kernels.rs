//! TEMPORARY kernel experiments (to be deleted).
use std::collections::BTreeMap;
use iresnetc_runtime::*;

fn run(name: &str, src: &str, wg: u32, grid: [u32; 3], xn: u64, wn: u64, yn: u64, flops: f64, batch: usize) {
    let mut buffers = vec![
        BufferDecl { name: "x".into(), elems: xn, per_sample: true, init: BufferInit::Input },
        BufferDecl { name: "w".into(), elems: wn, per_sample: false, init: BufferInit::Weight { tensor: "w".into() } },
        BufferDecl { name: "y".into(), elems: yn, per_sample: true, init: BufferInit::Output },
    ];
    let _ = &mut buffers;
    let mut eps = BTreeMap::new();
    eps.insert("f".to_string(), EntryPoint {
        inputs: vec![IoDecl { name: "x".into(), buffer: "x".into(), shape: vec![xn as usize] }],
        outputs: vec![IoDecl { name: "y".into(), buffer: "y".into(), shape: vec![yn as usize] }],
        steps: vec![Step::Repeat { times: 4, steps: vec![Step::Dispatch { kernel: "k".into(), workgroups: grid }] }],
    });
    let plan = Plan { format: BUNDLE_FORMAT.into(), version: BUNDLE_VERSION, compiler_version: "x".into(), model: "x".into(), kind: ModelKind::Flow, input_shape: vec![xn as usize], buffers,
        kernels: vec![KernelDecl { name: "k".into(), file: "k.wgsl".into(), entry: "main".into(), workgroup_size: [wg, 1, 1], bindings: vec!["x".into(), "w".into(), "y".into()], read_only: vec![] }],
        entry_points: eps, meta: serde_json::Value::Null };
    let mut shaders = BTreeMap::new();
    shaders.insert("k.wgsl".to_string(), src.to_string());
    let mut weights = BTreeMap::new();
    weights.insert("w".to_string(), WeightTensor { shape: vec![wn as usize], data: (0..wn).map(|i| ((i % 7) as f32) * 0.01).collect() });
    let b = Bundle::from_parts(plan, shaders, weights).unwrap();
    let dev = GpuDevice::new().unwrap();
    let mut ex = GpuExecutor::new(&dev, &b).unwrap();
    let x: Vec<f32> = (0..xn as usize * batch).map(|i| ((i % 13) as f32) * 0.1).collect();
    ex.run("f", batch, &[("x", &x)]).unwrap();
    let mut t: Vec<f64> = (0..3).map(|_| ex.run_timed("f", batch, &[("x", &x)]).unwrap().wall.as_secs_f64()).collect();
    t.sort_by(f64::total_cmp);
    let out = ex.run("f", batch, &[("x", &x)]).unwrap();
    let sum: f64 = out["y"].iter().map(|&v| v as f64).sum();
    eprintln!("{name:<40} {:>8.1} ms/dispatch  {:>6.2} GFLOP/s  checksum {sum:.6e}", t[1] * 1e3 / 4.0, flops * batch as f64 * 4.0 / t[1] / 1e9);
}

const A_1X1: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> wgt: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
const CIN = 512u; const HW = 256u;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let s = wg.z; let co0 = wg.y * 8u; let p = lane;
    var a0 = 0.0; var a1 = 0.0; var a2 = 0.0; var a3 = 0.0; var a4 = 0.0; var a5 = 0.0; var a6 = 0.0; var a7 = 0.0;
    var b0 = 0.0; var b1 = 0.0; var b2 = 0.0; var b3 = 0.0; var b4 = 0.0; var b5 = 0.0; var b6 = 0.0; var b7 = 0.0;
    var c0 = 0.0; var c1 = 0.0; var c2 = 0.0; var c3 = 0.0; var c4 = 0.0; var c5 = 0.0; var c6 = 0.0; var c7 = 0.0;
    var d0 = 0.0; var d1 = 0.0; var d2 = 0.0; var d3 = 0.0; var d4 = 0.0; var d5 = 0.0; var d6 = 0.0; var d7 = 0.0;
    for (var ci = 0u; ci < CIN; ci++) {
        let xb = (s * CIN + ci) * HW + p;
        let x0 = src[xb]; let x1 = src[xb + 64u]; let x2 = src[xb + 128u]; let x3 = src[xb + 192u];
        let wb = co0 * CIN + ci;
        let w0 = wgt[wb]; let w1 = wgt[wb + CIN]; let w2 = wgt[wb + 2u*CIN]; let w3 = wgt[wb + 3u*CIN];
        let w4 = wgt[wb + 4u*CIN]; let w5 = wgt[wb + 5u*CIN]; let w6 = wgt[wb + 6u*CIN]; let w7 = wgt[wb + 7u*CIN];
        a0 += w0*x0; a1 += w1*x0; a2 += w2*x0; a3 += w3*x0; a4 += w4*x0; a5 += w5*x0; a6 += w6*x0; a7 += w7*x0;
        b0 += w0*x1; b1 += w1*x1; b2 += w2*x1; b3 += w3*x1; b4 += w4*x1; b5 += w5*x1; b6 += w6*x1; b7 += w7*x1;
        c0 += w0*x2; c1 += w1*x2; c2 += w2*x2; c3 += w3*x2; c4 += w4*x2; c5 += w5*x2; c6 += w6*x2; c7 += w7*x2;
        d0 += w0*x3; d1 += w1*x3; d2 += w2*x3; d3 += w3*x3; d4 += w4*x3; d5 += w5*x3; d6 += w6*x3; d7 += w7*x3;
    }
    let ob = (s * 512u + co0) * HW + p;
    dst[ob] = a0 + b0 + c0 + d0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + b1 + b2 + b3 + b4 + b5 + b6 + b7 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + d1 + d2 + d3 + d4 + d5 + d6 + d7;
}
"#;

const B_VEC4: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> wgt: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;
const CIN = 512u; const HW4 = 64u;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let s = wg.z; let co0 = wg.y * TCu; let q = lane;
    ACCDECL
    for (var ci = 0u; ci < CIN; ci++) {
        let xv = src[(s * CIN + ci) * HW4 + q];
        let wb = co0 * CIN + ci;
        FMAS
    }
    STORES
}
"#;

const E_VEC4W: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> wgt: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;
const CIN = 512u; const HW4 = 64u; const CIN4 = 128u;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let s = wg.z; let co0 = wg.y * TCu; let q = lane;
    ACCDECL
    for (var c4 = 0u; c4 < CIN4; c4++) {
        let xb = (s * CIN + c4 * 4u) * HW4 + q;
        let x0 = src[xb]; let x1 = src[xb + HW4]; let x2 = src[xb + 2u * HW4]; let x3 = src[xb + 3u * HW4];
        FMAS
    }
    STORES
}
"#;

fn gen(t: &str, tc: usize, e: bool) -> String {
    let mut decl = String::new(); let mut fm = String::new(); let mut st = String::new();
    for c in 0..tc {
        decl += &format!("var a{c} = vec4<f32>(0.0);\n");
        if e {
            fm += &format!("let w{c} = wgt[(co0 + {c}u) * CIN4 + c4]; a{c} += w{c}.x * x0 + w{c}.y * x1 + w{c}.z * x2 + w{c}.w * x3;\n");
        } else {
            fm += &format!("a{c} += wgt[wb + {c}u * CIN] * xv;\n");
        }
        st += &format!("dst[(s * 512u + co0 + {c}u) * HW4 + q] = a{c};\n");
    }
    t.replace("TCu", &format!("{tc}u")).replace("ACCDECL", &decl).replace("FMAS", &fm).replace("STORES", &st)
}

#[test]
#[ignore]
fn exp_conv1x1() {
    let f = 2.0 * 512.0 * 512.0 * 256.0;
    let (xn, wn, yn) = (512 * 256, 512 * 512, 512 * 256);
    run("A scalar 4px x 8co", A_1X1, 64, [1, 64, 1], xn, wn, yn, f, 8);
    for tc in [8, 16] {
        run(&format!("B vec4 px, {tc} co"), &gen(B_VEC4, tc, false), 64, [1, 512 / tc as u32, 1], xn, wn, yn, f, 8);
        run(&format!("E vec4 px + vec4 w, {tc} co"), &gen(E_VEC4W, tc, true), 64, [1, 512 / tc as u32, 1], xn, wn, yn, f, 8);
    }
}
