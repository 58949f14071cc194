//! Bundles in the browser. Every kernel of every shipped model file (models/*.toml), in both
//! tilings, fused and unfused, fits WebGPU's default limits (reflected here from the WGSL
//! with naga and from the plan's buffers and grids, apart from the runtime's
//! `required_limits`, whose recorded result must agree), so a page runs any bundle on the
//! device it gets without asking for more; a device below a bundle's recorded limits is
//! refused at load naming the limit. And the browser runtime (web/iresnetc/) in a real
//! headless Chromium on WebGPU: `node web/test/run.mjs` compiles toy2d and cifar-tiny bundles
//! (both tilings), runs forward with log-det, inverse, sampling and density in the page,
//! compares them with the CLI's native wgpu and f64 reference outputs, and builds a pipeline
//! for every kernel of every shipped model on a device with WebGPU's default limits. That
//! test needs Debian's `chromium` and `npm ci` in web/ (`.ci/run` installs both); without
//! them it fails with a hint, it never skips.
//!
//! The shipped models are loaded (and certified) once for all tests of this file, two at a
//! time: the large ones take most of a minute each.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use common::{device, gpu_lock, model_file};
use iresnetc::codegen::{self, CodegenOptions, Generated, Tiling};
use iresnetc_runtime::{GpuExecutor, RequiredLimits, RuntimeError, Step};

const CHROMIUM: &str = "/usr/bin/chromium";

/// One compiled variant of a shipped model.
struct Variant {
    model: String,
    tiling: &'static str,
    fuse: bool,
    gen: Generated,
}

/// Every models/*.toml in both tilings, fused and unfused.
fn variants() -> &'static [Variant] {
    static ALL: OnceLock<Vec<Variant>> = OnceLock::new();
    ALL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("models/")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        names.sort();
        assert!(names.len() >= 8, "models/ has {} files", names.len());
        let compile = |name: &String| -> Vec<Variant> {
            let m = model_file(name);
            let mut out = Vec::new();
            for (tiling, t) in [(Tiling::CPU, "cpu"), (Tiling::GPU, "gpu")] {
                for fuse in [true, false] {
                    let gen = codegen::generate(&m, &CodegenOptions { fuse, tiling })
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    out.push(Variant {
                        model: name.clone(),
                        tiling: t,
                        fuse,
                        gen,
                    });
                }
            }
            out
        };
        // Two workers take the models in turn (the machine has two cores).
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut all: Vec<Variant> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(name) = names.get(i) else { break mine };
                            mine.extend(compile(name));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("worker"))
                .collect()
        });
        all.sort_by(|a, b| (&a.model, a.tiling, a.fuse).cmp(&(&b.model, b.tiling, b.fuse)));
        all
    })
}

/// WebGPU's defaults, written out from the specification's limits table.
const MAX_STORAGE_BUFFERS: u32 = 8;
const MAX_BIND_GROUPS: u32 = 4;
const MAX_INVOCATIONS: u32 = 256;
const MAX_SIZE: [u32; 3] = [256, 256, 64];
const MAX_WORKGROUP_STORAGE: u32 = 16_384;
const MAX_WORKGROUPS_PER_DIM: u32 = 65_535;
const MAX_BINDING_BYTES: u64 = 128 << 20;

/// What one kernel's WGSL asks for: (storage buffers used, highest group + 1, workgroup
/// size, workgroup-memory bytes), from naga's IR.
fn reflect(source: &str, entry: &str) -> (u32, u32, [u32; 3], u32) {
    let module = naga::front::wgsl::parse_str(source).expect("parses");
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .expect("validates");
    let (index, ep) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, ep)| ep.name == entry)
        .expect("entry point");
    let uses = info.get_entry_point(index);
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).expect("layout");
    let (mut storage, mut groups, mut shared) = (0, BTreeSet::new(), 0);
    for (h, var) in module.global_variables.iter() {
        if uses[h].is_empty() {
            continue;
        }
        if let Some(b) = &var.binding {
            groups.insert(b.group);
        }
        match var.space {
            naga::AddressSpace::Storage { .. } => storage += 1,
            naga::AddressSpace::WorkGroup => shared += layouter[var.ty].size,
            _ => {}
        }
    }
    let group_count = groups.last().map_or(0, |g| g + 1);
    (storage, group_count, ep.workgroup_size, shared)
}

fn max_grid(steps: &[Step], max: &mut u32) {
    for s in steps {
        match s {
            Step::Dispatch {
                workgroups,
                large_batch,
                ..
            } => {
                *max = (*max).max(workgroups.iter().copied().max().unwrap_or(0));
                if let Some(f) = large_batch {
                    // At its smallest batch, the folded grid must fit too.
                    let g = f
                        .grid(f.min_batch as usize, MAX_WORKGROUPS_PER_DIM)
                        .expect("folded grid fits at its min_batch");
                    *max = (*max).max(g.into_iter().max().unwrap_or(0));
                }
            }
            Step::Repeat { steps, .. } => max_grid(steps, max),
            _ => {}
        }
    }
}

#[test]
fn every_shipped_model_fits_webgpu_default_limits() {
    let mut kernels_checked = 0;
    let mut widest = 0;
    for v in variants() {
        let (name, g) = (&v.model, &v.gen);
        let what = |k: &str| format!("{name} {} fuse={} kernel {k}", v.tiling, v.fuse);
        let mut need = RequiredLimits::default();
        for k in &g.plan.kernels {
            let (storage, groups, size, shared) = reflect(&g.shaders[&k.file], &k.entry);
            // The plan binds exactly the buffers the WGSL uses.
            assert_eq!(storage as usize, k.bindings.len(), "{}", what(&k.name));
            assert!(
                storage <= MAX_STORAGE_BUFFERS,
                "{}: {storage} storage buffers",
                what(&k.name)
            );
            assert!(groups <= MAX_BIND_GROUPS, "{}", what(&k.name));
            assert!(
                size.iter().product::<u32>() <= MAX_INVOCATIONS,
                "{}: {size:?}",
                what(&k.name)
            );
            for (s, m) in size.iter().zip(MAX_SIZE) {
                assert!(*s <= m, "{}: {size:?}", what(&k.name));
            }
            assert!(
                shared <= MAX_WORKGROUP_STORAGE,
                "{}: {shared} bytes",
                what(&k.name)
            );
            need.max_storage_buffers_per_shader_stage =
                need.max_storage_buffers_per_shader_stage.max(storage);
            need.max_compute_workgroup_storage_size =
                need.max_compute_workgroup_storage_size.max(shared);
            widest = widest.max(storage);
            kernels_checked += 1;
        }
        for b in &g.plan.buffers {
            assert!(
                b.elems * 4 <= MAX_BINDING_BYTES,
                "{name}: buffer {} at batch 1",
                b.name
            );
        }
        let mut grid = 0;
        for ep in g.plan.entry_points.values() {
            max_grid(&ep.steps, &mut grid);
        }
        assert!(grid <= MAX_WORKGROUPS_PER_DIM, "{name}: grid {grid}");
        // The recorded limits agree with this independent reflection (the built-in fill
        // kernel binds 2).
        let recorded = g.plan.limits.expect("plan.json records its limits");
        assert_eq!(
            recorded.max_storage_buffers_per_shader_stage,
            need.max_storage_buffers_per_shader_stage.max(2),
            "{name}"
        );
        assert_eq!(
            recorded.max_compute_workgroup_storage_size, need.max_compute_workgroup_storage_size,
            "{name}"
        );
        recorded
            .check(&RequiredLimits::WEBGPU_DEFAULT)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The fused epilogues are the widest kernels: the check saw them at the limit.
    assert_eq!(widest, MAX_STORAGE_BUFFERS, "widest kernel");
    assert!(kernels_checked > 500, "{kernels_checked} kernels");
}

/// A device below what plan.json records is refused before any pipeline is built, with a
/// one-line error naming the limit.
#[test]
fn device_below_recorded_limits_is_refused_naming_the_limit() {
    let _l = gpu_lock();
    let Some(dev) = device() else { return };
    let m = model_file("toy2d-small.toml");
    let (mut bundle, _) = codegen::compile_in_memory(
        &m,
        &CodegenOptions {
            fuse: true,
            tiling: Tiling::CPU,
        },
    )
    .expect("codegen");
    let have = dev.limits().max_storage_buffers_per_shader_stage;
    let limits = bundle.plan.limits.as_mut().expect("limits");
    limits.max_storage_buffers_per_shader_stage = have + 1;
    match GpuExecutor::new(dev, &bundle) {
        Err(e @ RuntimeError::LimitExceeded { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("max_storage_buffers_per_shader_stage"),
                "{text}"
            );
            assert!(text.contains(&format!("needs {}", have + 1)), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a device below the recorded limits was accepted"),
    }
}

/// Every distinct kernel (source, entry point, binding access) of every models/*.toml, as
/// the JSON run.mjs reads.
fn all_kernels() -> serde_json::Value {
    let mut seen = BTreeSet::new();
    let mut kernels = Vec::new();
    for v in variants() {
        for k in &v.gen.plan.kernels {
            let source = &v.gen.shaders[&k.file];
            if seen.insert((source.clone(), k.entry.clone(), k.read_only.clone())) {
                kernels.push(serde_json::json!({
                    "where": format!("{} {} fuse={} {}", v.model, v.tiling, v.fuse, k.name),
                    "source": source,
                    "entry": k.entry,
                    "read_only": k.read_only,
                }));
            }
        }
    }
    serde_json::json!({ "kernels": kernels })
}

#[test]
fn bundles_run_in_headless_chromium_like_native() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    assert!(
        Path::new(CHROMIUM).exists(),
        "no {CHROMIUM}: install it with `apt-get install -y chromium` (.ci/run does)"
    );
    assert!(
        root.join("web/node_modules/playwright-core").is_dir(),
        "web/node_modules is missing: run `npm ci` in web/ (.ci/run does)"
    );
    let kernels =
        std::env::temp_dir().join(format!("iresnetc-kernels-{}.json", std::process::id()));
    std::fs::write(&kernels, all_kernels().to_string()).expect("write kernels.json");
    let out = Command::new("node")
        .arg("web/test/run.mjs")
        .current_dir(&root)
        .env("IRESNETC", env!("CARGO_BIN_EXE_iresnetc"))
        .env("KERNELS", &kernels)
        .output()
        .expect("node must be installed (apt-get install -y nodejs)");
    let _ = std::fs::remove_file(&kernels);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "node web/test/run.mjs failed ({}): {}",
        out.status,
        stderr.lines().last().unwrap_or("")
    );
    // The summary lines say what ran: four bundles compared, every kernel built.
    assert_eq!(stdout.matches(": browser run in").count(), 4, "{stdout}");
    assert!(stdout.contains("browser test: all passed"), "{stdout}");
}
