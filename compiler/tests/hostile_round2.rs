//! Hostile and careless input, round 2 (issue 21, the binary's families 2-6): bundles whose
//! hashes were recomputed after an edit, every command's outputs behind one guard, numbers
//! checked and blamed on their flag or field, training budgets, and run directories as
//! transactions. Same contract as `hostile.rs`: exit code 2, one line, no panic, nothing
//! changed on disk, within seconds and under a memory cap.

mod hostile_support;

use std::path::Path;

use hostile_support::*;

/// Recomputes every integrity hash of `bundle/plan.json`, as anyone editing a bundle can.
fn rehash(bundle: &Path) {
    let plan_path = bundle.join("plan.json");
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    let files: Vec<String> = plan["integrity"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for f in files {
        if let Ok(bytes) = std::fs::read(bundle.join(&f)) {
            plan["integrity"][&f] = serde_json::json!(iresnetc_runtime::fsread::sha256_hex(&bytes));
        }
    }
    std::fs::write(&plan_path, serde_json::to_string_pretty(&plan).unwrap()).unwrap();
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Runs `args` on a bundle with every backend and `inspect`; each must fail naming `needles`.
fn refused_everywhere(d: &Path, bundle: &str, needles: &[&str]) {
    for backend in ["cpu", "tract", "reference", "wgpu"] {
        fails(
            d,
            &[
                "run",
                bundle,
                "--backend",
                backend,
                "--mode",
                "forward",
                "--input",
                "x.npy",
                "--output",
                "z.npy",
            ],
            &[],
            needles,
        );
    }
    fails(
        d,
        &["inspect", &format!("{bundle}/model.toml")],
        &[],
        needles,
    );
}

#[test]
fn family4_a_hash_is_not_a_certificate() {
    let d = workspace("r2-meaning", true);
    let b = d.join("bundle");
    let pristine = snapshot(&b);
    let restore = || {
        for (rel, bytes) in &pristine {
            if let Some(bytes) = bytes {
                std::fs::write(b.join(rel), bytes).unwrap();
            }
        }
    };
    // Weights scaled by 50, hashes recomputed: the weights themselves are not contractive.
    tamper_weights(&b, |n, v| if n.ends_with("weight") { v * 50.0 } else { v });
    rehash(&b);
    refused_everywhere(
        &d,
        "bundle",
        &["weights.safetensors", "Lipschitz bound", "block"],
    );
    restore();
    // A log-scale out of range is blamed on its tensor.
    tamper_weights(&b, |n, v| if n.ends_with("log_scale") { 1e3 } else { v });
    rehash(&b);
    refused_everywhere(
        &d,
        "bundle",
        &["weights.safetensors", "log_scale", "log-scale"],
    );
    restore();
    // net.json without its last block.
    edit_json(&b.join("net.json"), |v| {
        let layers = v["layers"].as_array_mut().unwrap();
        assert!(layers.len() >= 2);
        layers.pop();
    });
    rehash(&b);
    refused_everywhere(&d, "bundle", &["net.json", "does not agree"]);
    restore();
    // report.json claiming one inverse iteration is enough.
    edit_json(&b.join("report.json"), |v| {
        v["lipschitz"]["blocks"][0]["inverse_iters"] = serde_json::json!(1);
    });
    rehash(&b);
    refused_everywhere(&d, "bundle", &["report.json", "inverse_iters"]);
    restore();
    // report.json claiming a tighter bound than the weights give.
    edit_json(&b.join("report.json"), |v| {
        v["lipschitz"]["blocks"][1]["lipschitz_bound"] = serde_json::json!(0.01);
    });
    rehash(&b);
    refused_everywhere(&d, "bundle", &["report.json", "the weights certify"]);
    restore();
    // forward.onnx with one byte changed.
    let mut onnx = std::fs::read(b.join("forward.onnx")).unwrap();
    let last = onnx.len() - 1;
    onnx[last] ^= 1;
    std::fs::write(b.join("forward.onnx"), onnx).unwrap();
    rehash(&b);
    refused_everywhere(&d, "bundle", &["forward.onnx", "does not agree"]);
    restore();
    // model.toml with another inverse cap (the plan's counts no longer follow from it).
    let toml = std::fs::read_to_string(b.join("model.toml")).unwrap();
    assert!(toml.contains("max_iters = 100"));
    std::fs::write(
        b.join("model.toml"),
        toml.replace("max_iters = 100", "max_iters = 1"),
    )
    .unwrap();
    rehash(&b);
    refused_everywhere(&d, "bundle", &["does not agree"]);
    restore();
    // Integrity entries outside the bundle, of a missing file, of a file never compiled.
    for (entry, needle) in [
        ("../x.npy", "must not leave the bundle"),
        ("/etc/passwd", "must be relative"),
        ("gone.wgsl", "no such file"),
    ] {
        edit_json(&b.join("plan.json"), |v| {
            v["integrity"][entry] = serde_json::json!("00".repeat(32));
        });
        refused_everywhere(&d, "bundle", &["plan.json", "integrity entry", needle]);
        restore();
    }
    std::fs::write(b.join("notes.txt"), "x").unwrap();
    edit_json(&b.join("plan.json"), |v| {
        v["integrity"]["notes.txt"] = serde_json::json!("00".repeat(32));
    });
    rehash(&b);
    refused_everywhere(
        &d,
        "bundle",
        &["notes.txt", "not a file the compiler writes"],
    );
    std::fs::remove_file(b.join("notes.txt")).unwrap();
    restore();
    // The pristine bundle still runs everywhere, checked in full (a cache that knows nothing).
    let fresh = d
        .join("..")
        .join(format!("r2-fresh-cache-{}", std::process::id()));
    for backend in ["cpu", "tract", "reference", "wgpu"] {
        let _ = std::fs::remove_dir_all(&fresh);
        ok_env(
            &d,
            &[
                "run",
                "bundle",
                "--backend",
                backend,
                "--mode",
                "forward",
                "--input",
                "x.npy",
                "--output",
                "z.npy",
            ],
            &[("IRESNETC_CACHE_DIR", fresh.to_str().unwrap())],
        );
    }
    // A shipped image model's bundle passes the full check too (ONNX constants, kernels).
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cifar-tiny.toml");
    ok(&d, &["compile", model.to_str().unwrap(), "-o", "tiny"]);
    let _ = std::fs::remove_dir_all(&fresh);
    ok_env(
        &d,
        &["inspect", "tiny/model.toml"],
        &[("IRESNETC_CACHE_DIR", fresh.to_str().unwrap())],
    );
    assert!(fresh.join("verified-bundles").read_dir().unwrap().count() >= 1);
    let _ = std::fs::remove_dir_all(&fresh);
}

/// The batch-folded alternative of a dispatch (GPU tiling) swapped for another kernel, with
/// the hashes recomputed: wgpu would run the wrong kernel from that batch size on.
#[test]
fn family4_folded_alternatives_agree_with_the_model() {
    let d = workspace("r2-folded", false);
    write(
        &d,
        "img.toml",
        r#"
name = "img-flow"
kind = "flow"
input = [2, 8, 8]
[[stages]]
blocks = 1
width = 64
[logdet]
estimator = "series"
terms = 2
"#,
    );
    ok(&d, &["compile", "img.toml", "--tiling", "gpu", "-o", "gb"]);
    let plan_path = d.join("gb/plan.json");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    let text = plan.to_string();
    assert!(
        text.contains("large_batch"),
        "the GPU tiling folds a dispatch"
    );
    let kernels: Vec<String> = plan["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect();
    // Point the first folded alternative at another kernel.
    let mut swapped = plan.clone();
    fn first_folded(v: &mut serde_json::Value) -> Option<&mut serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => {
                if m.contains_key("large_batch") && !m["large_batch"].is_null() {
                    return m.get_mut("large_batch");
                }
                m.values_mut().find_map(first_folded)
            }
            serde_json::Value::Array(a) => a.iter_mut().find_map(first_folded),
            _ => None,
        }
    }
    // Every folded kernel, to swap one for another of the same kind where there is one.
    let mut folded: Vec<String> = vec![];
    let mut v = plan["entry_points"].clone();
    while let Some(f) = first_folded(&mut v) {
        folded.push(f["kernel"].as_str().unwrap().to_string());
        *f = serde_json::Value::Null;
    }
    let f = first_folded(&mut swapped["entry_points"]).unwrap();
    let was = f["kernel"].as_str().unwrap().to_string();
    let other = folded.iter().chain(&kernels).find(|k| **k != was).unwrap();
    f["kernel"] = serde_json::json!(other);
    std::fs::write(&plan_path, swapped.to_string()).unwrap();
    npy(&d, "xi.npy", &[vec![0.3; 128]], &[2, 8, 8]);
    for backend in ["wgpu", "cpu"] {
        fails(
            &d,
            &[
                "run",
                "gb",
                "--backend",
                backend,
                "--mode",
                "forward",
                "--input",
                "xi.npy",
                "--output",
                "z.npy",
            ],
            &[],
            &["plan.json"],
        );
    }
    std::fs::write(&plan_path, plan.to_string()).unwrap();
    ok(
        &d,
        &[
            "run",
            "gb",
            "--backend",
            "wgpu",
            "--mode",
            "forward",
            "--input",
            "xi.npy",
            "--output",
            "z.npy",
        ],
    );
}

/// Results are checked: an inverse cut short by `inverse.max_iters = 1` is an error on every
/// backend (measured blocks named; wgpu, which measures nothing, caught by mapping x forward).
#[test]
fn family4_a_non_converged_inverse_is_an_error() {
    let d = workspace("r2-inverse", false);
    write(
        &d,
        "short.toml",
        &FLOW.replace("[logdet]", "[inverse]\nmax_iters = 1\n[logdet]"),
    );
    npy(
        &d,
        "z.npy",
        &[vec![2.0, -1.5, 1.0, 0.5], vec![-2.0, 1.0, 0.0, 1.5]],
        &[4],
    );
    for (backend, needle) in [
        ("cpu", "block"),
        ("tract", "block"),
        ("reference", "block"),
        ("wgpu", "forward(x) misses z"),
    ] {
        fails(
            &d,
            &[
                "run",
                "short.toml",
                "--backend",
                backend,
                "--mode",
                "inverse",
                "--input",
                "z.npy",
                "--output",
                "x_out.npy",
            ],
            &[],
            &["the inverse did not converge", needle],
        );
    }
    fails(
        &d,
        &[
            "run",
            "short.toml",
            "--backend",
            "cpu",
            "--mode",
            "sample",
            "--output",
            "s.npy",
        ],
        &[],
        &["the inverse did not converge"],
    );
    // A tolerance beyond f32 (cifar-tiny's 1e-9) is met as far as f32 goes: not an error.
    let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cifar-tiny.toml");
    let tiny = tiny.to_str().unwrap();
    ok(&d, &["random-input", tiny, "--num", "4", "-o", "xi.npy"]);
    for backend in ["cpu", "tract"] {
        ok(
            &d,
            &[
                "run",
                tiny,
                "--backend",
                backend,
                "--mode",
                "forward",
                "--input",
                "xi.npy",
                "--output",
                "zi.npy",
            ],
        );
        ok(
            &d,
            &[
                "run",
                tiny,
                "--backend",
                backend,
                "--mode",
                "inverse",
                "--input",
                "zi.npy",
                "--output",
                "xi_back.npy",
            ],
        );
    }
    // The model's own cap inverts to tolerance on every backend.
    for backend in ["cpu", "tract", "reference", "wgpu"] {
        ok(
            &d,
            &[
                "run",
                "flow.toml",
                "--backend",
                backend,
                "--mode",
                "inverse",
                "--input",
                "z.npy",
                "--output",
                "x_out.npy",
            ],
        );
    }
}
