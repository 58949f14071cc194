//! The per-kernel cost report (`codegen::cost`) against figures derived independently: the
//! constants each generated convolution shader actually declares, and the index arithmetic of
//! its template (which invocation computes which outputs over which input channels), replayed
//! here invocation by invocation (no GPU needed); and against what the executor records, in
//! the per-dispatch profile (on whatever adapter wgpu finds).

mod common;

use std::collections::HashMap;

use common::{device, gpu_lock, inputs, model_file};
use iresnetc::codegen::cost::{self, KernelRow};
use iresnetc::codegen::kernels::KernelKind;
use iresnetc::codegen::{self, entries, CodegenOptions, Generated, Tiling};
use iresnetc::pipeline::Model;
use iresnetc_runtime::{Folded, GpuExecutor, Step};

fn generate(m: &Model, fuse: bool, tiling: Tiling) -> Generated {
    codegen::generate(m, &CodegenOptions { fuse, tiling }).expect("codegen")
}

/// `const NAME: u32 = 12u;` (or `i32`) of a generated shader.
fn constant(source: &str, name: &str) -> u64 {
    let prefix = format!("const {name}: ");
    let line = source
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no constant {name}"));
    let value = line.split('=').nth(1).expect("value");
    value
        .trim()
        .trim_end_matches(';')
        .trim_end_matches('u')
        .parse()
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn workgroup_size(source: &str) -> u64 {
    let at = source.find("@workgroup_size(").expect("workgroup_size") + 16;
    source[at..]
        .split(')')
        .next()
        .expect(")")
        .parse()
        .expect("size")
}

/// The grid of each dispatched kernel of `entry`, straight from the plan's steps.
fn grids(g: &Generated, entry: &str) -> HashMap<String, [u32; 3]> {
    fn walk(steps: &[Step], out: &mut HashMap<String, [u32; 3]>) {
        for s in steps {
            match s {
                Step::Dispatch {
                    kernel, workgroups, ..
                } => {
                    out.insert(kernel.clone(), *workgroups);
                }
                Step::Repeat { steps, .. } => walk(steps, out),
                _ => {}
            }
        }
    }
    let mut out = HashMap::new();
    walk(&g.plan.entry_points[entry].steps, &mut out);
    out
}

fn source_of<'a>(g: &'a Generated, kernel: &str) -> &'a str {
    let decl = g
        .plan
        .kernels
        .iter()
        .find(|k| k.name == kernel)
        .expect("kernel");
    &g.shaders[&decl.file]
}

/// Replays `conv_splitk.wgsl`'s indexing for one sample: every output (channel, pixel) must
/// be computed by exactly `S` invocations whose channel ranges partition `0..CIN`; returns
/// the longest chain (multiply-adds of one accumulator plus the `S - 1` adds of the
/// reduction).
fn replay_splitk(source: &str, grid: [u32; 3]) -> u64 {
    let c = |name| constant(source, name);
    let (cin, cout, k, ohw, out_n) = (c("CIN"), c("COUT"), c("K"), c("OHW"), c("OUT_N"));
    let (tc, blocks, s, opg, cps, gx) = (c("TC"), c("BLOCKS"), c("S"), c("OPG"), c("CPS"), c("GX"));
    let wg = workgroup_size(source);
    assert_eq!(s * opg, wg, "splits x blocks per group fill the workgroup");
    assert_eq!(
        blocks * tc,
        out_n,
        "blocks of TC channels cover the outputs"
    );
    assert_eq!(cout * ohw, out_n);
    let mut covered = vec![Vec::new(); out_n as usize];
    let mut chain = 0;
    for y in 0..u64::from(grid[1]) {
        for x in 0..u64::from(grid[0]) {
            for lane in 0..wg {
                let (j, split) = (lane % opg, lane / opg);
                let lb = (y * gx + x) * opg + j;
                let ci0 = (split * cps).min(cin);
                let ci1 = (ci0 + cps).min(cin);
                chain = chain.max((ci1 - ci0) * k * k + s - 1);
                if lb < blocks {
                    let (co0, p) = ((lb / ohw) * tc, lb % ohw);
                    for t in 0..tc {
                        covered[((co0 + t) * ohw + p) as usize].push((ci0, ci1));
                    }
                }
            }
        }
    }
    for (li, ranges) in covered.iter_mut().enumerate() {
        assert_eq!(ranges.len() as u64, s, "output {li}: {s} partial sums");
        ranges.sort_unstable();
        let mut next = 0;
        for &(a, b) in ranges.iter().filter(|(a, b)| a < b) {
            assert_eq!(
                a, next,
                "output {li}: channels {ranges:?} do not partition 0..{cin}"
            );
            next = b;
        }
        assert_eq!(next, cin, "output {li}: channels {ranges:?}");
    }
    chain
}

fn row<'a>(rows: &'a [KernelRow], kernel: &str) -> &'a KernelRow {
    rows.iter().find(|r| r.kernel == kernel).expect("row")
}

/// Every convolution of every entry point, both tilings, fused and unfused, at batch 3: the
/// report's grid, chain and FLOPs equal what the shader's own constants and indexing give.
#[test]
fn conv_figures_match_the_shaders() {
    let m = model_file("cifar-tiny.toml");
    let batch = 3u64;
    let mut checked = 0;
    for tiling in [Tiling::CPU, Tiling::GPU] {
        for fuse in [true, false] {
            let g = generate(&m, fuse, tiling);
            let report = cost::report(&g.plan, &g.costs, batch as usize);
            for (entry, e) in &report.entry_points {
                let grid = grids(&g, entry);
                for r in e.kernels.iter().filter(|r| r.kind == KernelKind::Conv) {
                    let src = source_of(&g, &r.kernel);
                    let gr = grid[&r.kernel];
                    let wg = workgroup_size(src);
                    let groups = u64::from(gr[0] * gr[1] * gr[2]) * batch;
                    assert_eq!(r.workgroups, groups, "{}", r.kernel);
                    assert_eq!(r.invocations, groups * wg, "{}", r.kernel);
                    // The vec4 template is the 1x1 case and declares no K.
                    let vec4 = src.contains("const HW4");
                    let (cin, cout) = (constant(src, "CIN"), constant(src, "COUT"));
                    let k = if vec4 { 1 } else { constant(src, "K") };
                    let outputs = constant(src, "OUT_N");
                    assert_eq!(outputs % cout, 0, "{}", r.kernel);
                    assert_eq!(r.flops, 2 * outputs * cin * k * k * batch, "{}", r.kernel);
                    let chain = if src.contains("const S: u32") {
                        replay_splitk(src, gr)
                    } else {
                        // Register blocks: each accumulator sums every channel and tap.
                        cin * k * k
                    };
                    assert_eq!(r.chain, chain, "{} ({entry})", r.kernel);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100, "{checked} convolution rows checked");
}

/// The batch-folded alternative of every dispatch of `entry` that has one.
fn folded(g: &Generated, entry: &str) -> Vec<Folded> {
    fn walk(steps: &[Step], out: &mut Vec<Folded>) {
        for s in steps {
            match s {
                Step::Dispatch {
                    large_batch: Some(f),
                    ..
                } => out.push(f.clone()),
                Step::Repeat { steps, .. } => walk(steps, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&g.plan.entry_points[entry].steps, &mut out);
    out
}

/// Whether the `wg` lanes, over `rounds` rounds, write each of a tile's `slots` exactly once
/// when load `idx = lane + round * wg` writes the slots `slots_of(idx)`.
fn staged_once(slots: u64, wg: u64, rounds: u64, slots_of: impl Fn(u64) -> Vec<u64>) -> bool {
    let mut seen = vec![0u8; slots as usize];
    for lane in 0..wg {
        for e in 0..rounds {
            for slot in slots_of(lane + e * wg) {
                seen[slot as usize] += 1;
            }
        }
    }
    seen.iter().all(|&n| n == 1)
}

/// Replays `conv_gemm.wgsl`'s indexing at `batch` over the grid the runtime dispatches:
/// the staging loops fill each tile slot once per step, the steps cover the reduction, and
/// every output (sample, channel, pixel) is stored by exactly one invocation. Returns the
/// chain (multiply-adds per accumulator).
fn replay_gemm(source: &str, f: &Folded, batch: u64) -> u64 {
    let c = |name| constant(source, name);
    let (cin, cout, k, ohw, out_n) = (c("CIN"), c("COUT"), c("K"), c("OHW"), c("OUT_N"));
    let (tm, tn, tk, wg) = (c("TM"), c("TN"), c("TK"), workgroup_size(source));
    assert_eq!(wg, (tm / 4) * (tn / 4), "4 x 4 per invocation");
    assert_eq!((tk * tm) % wg, 0, "A staging: whole rounds");
    assert_eq!((tk * tn) % wg, 0, "B staging: whole rounds");
    assert_eq!((u64::from(f.rows), u64::from(f.rows_per_group)), (ohw, tm));
    // Scalar staging: slot `idx` of the A tile ([kk][row]); (idx % TK, idx / TK) of the B
    // tile, a bijection onto its [kk][channel] slots, so checking `idx` is enough.
    assert!(
        staged_once(tk * tm, wg, tk * tm / wg, |idx| vec![idx]),
        "A staging"
    );
    assert!(
        staged_once(tk * tn, wg, tk * tn / wg, |idx| vec![idx]),
        "B staging"
    );
    if source.contains("src: array<vec4<f32>>") {
        // Input staged as vec4s (1x1): lane -> (4 rows q, reduction index kr), 4 consecutive
        // pixels of one sample per load.
        assert_eq!((k, ohw % 4, constant(source, "IN_N") % 4), (1, 0, 0));
        let slots = |idx: u64| {
            let (q, kr) = (idx % (tm / 4), idx / (tm / 4));
            (4 * q..4 * q + 4).map(|r| kr * tm + r).collect()
        };
        assert!(
            staged_once(tk * tm, wg, tk * tm / (4 * wg), slots),
            "vec4 input staging"
        );
    }
    if source.contains("wgt: array<vec4<f32>>") {
        // Weights staged as vec4s: lane -> (4 reduction indices q, channel cc), whole vec4s
        // of a reduction that is a multiple of 4.
        assert_eq!((cin * k * k) % 4, 0);
        let slots = |idx: u64| {
            let (q, cc) = (idx % (tk / 4), idx / (tk / 4));
            (4 * q..4 * q + 4).map(|r| r * tn + cc).collect()
        };
        assert!(
            staged_once(tk * tn, wg, tk * tn / (4 * wg), slots),
            "vec4 weight staging"
        );
    }
    let kd = cin * k * k;
    let steps = (0..kd).step_by(tk as usize).count() as u64;
    assert!(steps * tk >= kd && (steps - 1) * tk < kd);

    let [gx, gy, gz] = f.grid(batch as usize, 65_535).expect("grid");
    assert_eq!(gy as u64, cout.div_ceil(tn));
    let rows = batch * ohw;
    let mut stored = vec![0u8; (batch * out_n) as usize];
    for z in 0..u64::from(gz) {
        for x in 0..u64::from(gx) {
            for y in 0..u64::from(gy) {
                let (r0, co0) = ((z * u64::from(gx) + x) * tm, y * tn);
                for lane in 0..wg {
                    let (tx, ty) = (lane % (tm / 4), lane / (tm / 4));
                    for i in 0..4 {
                        for j in 0..4 {
                            let (row, co) = (r0 + tx + i * tm / 4, co0 + ty + j * tn / 4);
                            if row < rows && co < cout {
                                let (sample, p) = (row / ohw, row % ohw);
                                stored[(sample * out_n + co * ohw + p) as usize] += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(stored.iter().all(|&n| n == 1), "every output stored once");
    kd
}

/// The GPU tiling's batch-folded GEMM kernels on a CIFAR block, with the tiling's own
/// threshold and from batch 2: below its `min_batch` the report shows the split-K kernel,
/// from it the GEMM kernel with the grid, chain and FLOPs its shader's indexing gives, and
/// the runtime's grid helper agrees with the replay.
#[test]
fn gemm_kernels_cover_every_output_once() {
    let m = model_file("cifar-block.toml");
    let from_2 = Tiling::SplitK {
        workgroup: 128,
        target_groups: 1,
        max_chain: 1152,
    };
    let mut checked = 0;
    for (tiling, fuse) in [(Tiling::GPU, true), (from_2, true), (from_2, false)] {
        let g = generate(&m, fuse, tiling);
        for entry in [entries::FORWARD, entries::INVERSE] {
            let folds = folded(&g, entry);
            // 12 -> 512 3x3 and 512 -> 512 1x1 (and their vjps): every 512-wide output.
            assert!(!folds.is_empty(), "{entry}");
            for f in &folds {
                let src = source_of(&g, &f.kernel);
                for batch in [f.min_batch as u64, 3, 64] {
                    let batch = batch.max(u64::from(f.min_batch));
                    let report = cost::report(&g.plan, &g.costs, batch as usize);
                    let r = row(&report.entry_points[entry].kernels, &f.kernel);
                    let chain = replay_gemm(src, f, batch);
                    let grid = f.grid(batch as usize, 65_535).expect("grid");
                    let groups: u64 = grid.iter().map(|&n| u64::from(n)).product();
                    assert_eq!((r.workgroups, r.chain), (groups, chain), "{}", f.kernel);
                    let (cin, cout, k) = (
                        constant(src, "CIN"),
                        constant(src, "COUT"),
                        constant(src, "K"),
                    );
                    assert_eq!(r.flops, 2 * constant(src, "OUT_N") * cin * k * k * batch);
                    assert!(cout >= 32);
                    checked += 1;
                }
                // One below the threshold, the split-K kernel runs instead.
                let below = cost::report(&g.plan, &g.costs, f.min_batch as usize - 1);
                assert!(below.entry_points[entry]
                    .kernels
                    .iter()
                    .all(|r| r.kernel != f.kernel));
            }
        }
        if tiling == Tiling::GPU {
            // 256 rows per sample (4 tiles of 64) x 8 tiles of 64 channels: 32 workgroups per
            // sample, 128 from batch 4.
            let f = &folded(&g, entries::FORWARD)[0];
            assert_eq!(f.min_batch, 4, "{f:?}");
        }
    }
    assert!(checked > 10, "{checked}");
    // The 512-wide layers' reductions (108, 512) are multiples of 4: their weights stage as
    // vec4s, the transposed ones from the adjoint arrangement.
    let g = generate(&m, true, Tiling::GPU);
    let vec4 = g
        .shaders
        .values()
        .filter(|src| src.contains("wgt: array<vec4<f32>>") && src.contains("const TM"))
        .count();
    assert!(vec4 >= 4, "{vec4} GEMM kernels with vec4 weights");
    // The 512 -> 512 1x1 convolution and its vjp also load their input as vec4s.
    let vec4_in = g
        .shaders
        .values()
        .filter(|src| src.contains("src: array<vec4<f32>>") && src.contains("const TM"))
        .count();
    assert!(vec4_in >= 2, "{vec4_in} GEMM kernels with vec4 input");
    assert!(g.plan.buffers.iter().any(|b| matches!(
        &b.init,
        iresnetc_runtime::BufferInit::Weight {
            layout: iresnetc_runtime::WeightLayout::Adjoint { .. },
            ..
        }
    )));
}

/// A CIFAR block (width 512, 12x16x16) at batch 1: in the GPU tiling every convolution of
/// forward, log-det and inverse meets the goals (the 512 -> 12 convolution split 32 ways);
/// the CPU tiling, which keeps register blocks for lavapipe, does not (its 512 -> 12
/// convolutions run 4,608 multiply-adds in series on 128 invocations). No dispatch of the
/// log-det is a one-invocation counter kernel.
#[test]
fn gpu_tiling_meets_the_goals_on_a_cifar_block() {
    let m = model_file("cifar-block.toml");
    let g = generate(&m, true, Tiling::GPU);
    let report = cost::report(&g.plan, &g.costs, 1);
    for entry in [entries::FORWARD, entries::LOGDET, entries::INVERSE] {
        let e = &report.entry_points[entry];
        assert!(e.goals.met_by_convolutions, "{entry}: {:?}", e.goals);
        assert!(e.goals.longest_chain <= cost::GOAL_MAX_CHAIN);
        for r in e.kernels.iter().filter(|r| r.kind == KernelKind::Conv) {
            assert!(r.invocations >= 32_768 || r.workgroups >= 128, "{r:?}");
        }
    }
    // The last convolution of the branch, 512 -> 12 3x3 on 16x16: blocks of 8 channels do
    // not divide 12; blocks of 4: 3 x 256 = 768 blocks, which reach 128 groups of 128 with
    // 32 splits (768 x 32 / 128 = 192) of 16 channels: chains of 16 x 9 + 31 = 175.
    let fwd = &report.entry_points[entries::FORWARD];
    let last = fwd
        .kernels
        .iter()
        .find(|r| r.kernel.ends_with("conv2"))
        .expect("conv2");
    assert_eq!((last.workgroups, last.chain), (192, 175), "{last:?}");

    let cpu = generate(&m, true, Tiling::CPU);
    let cpu_report = cost::report(&cpu.plan, &cpu.costs, 1);
    let cpu_last = row(
        &cpu_report.entry_points[entries::FORWARD].kernels,
        &last.kernel,
    );
    assert_eq!((cpu_last.invocations, cpu_last.chain), (128, 4608));
    assert!(
        !cpu_report.entry_points[entries::FORWARD]
            .goals
            .met_by_convolutions
    );

    // The counter lives in the last slot of each sample's accumulator, and no dispatched
    // kernel binds that buffer alone (the bump rides on the term's first vjp kernel).
    for entry in [entries::FORWARD, entries::LOGDET, entries::FORWARD_ROULETTE] {
        for r in &report.entry_points[entry].kernels {
            let decl = g
                .plan
                .kernels
                .iter()
                .find(|k| k.name == r.kernel)
                .expect("decl");
            assert_ne!(decl.bindings, vec!["ld.acc".to_string()], "{}", r.kernel);
        }
    }
}

/// The per-dispatch profile times every dispatch the entry point records, in order, with the
/// grid the executor dispatches (batch folded into z); an adapter without timestamp queries
/// is refused with a message that says so.
#[test]
fn profile_times_every_dispatch() {
    let m = model_file("cifar-tiny.toml");
    let batch = 2;
    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    let gen = codegen::generate(
        &m,
        &CodegenOptions {
            fuse: true,
            tiling: Tiling::GPU,
        },
    )
    .expect("codegen");
    let report = codegen::cost::report(&gen.plan, &gen.costs, batch);
    let (plan, shaders) = (gen.plan.clone(), gen.shaders.clone());
    let weights = iresnetc::netdesc::weights_f32(&m.graph.params);
    let bundle = iresnetc_runtime::Bundle::from_parts(plan, shaders, weights).expect("bundle");
    let mut ex = GpuExecutor::new(dev, &bundle).expect("executor");
    let x: Vec<f32> = inputs(batch, m.graph.input_dim(), 3)
        .iter()
        .flatten()
        .map(|&v| v as f32)
        .collect();
    match ex.profile_mode() {
        None => {
            let e = ex
                .profile(entries::ENCODE, batch, &[("x", &x)])
                .unwrap_err();
            assert!(e.to_string().contains("no timestamp queries"), "{e}");
        }
        Some(mode) => {
            let p = ex
                .profile(entries::ENCODE, batch, &[("x", &x)])
                .expect("profile");
            assert_eq!(
                p.dispatches.len(),
                ex.dispatch_count(entries::ENCODE),
                "{mode:?}"
            );
            let rows = &report.entry_points[entries::ENCODE].kernels;
            let expected: Vec<&str> = rows
                .iter()
                .flat_map(|r| std::iter::repeat_n(r.kernel.as_str(), r.dispatches as usize))
                .collect();
            let mut got: Vec<&str> = p.dispatches.iter().map(|d| d.kernel.as_str()).collect();
            let mut want = expected.clone();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want);
            for d in &p.dispatches {
                let r = rows.iter().find(|r| r.kernel == d.kernel).expect("row");
                let groups: u64 = d.grid.iter().map(|&g| u64::from(g)).product();
                assert_eq!(groups, r.workgroups, "{}", d.kernel);
                assert!(d.ns.is_finite() && d.ns >= 0.0);
            }
        }
    }
    let t = ex
        .run_timed(entries::ENCODE, batch, &[("x", &x)])
        .expect("timed run");
    assert!(t.record > std::time::Duration::ZERO && t.record <= t.wall);
}
