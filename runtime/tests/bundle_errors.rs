//! Damaged and mismatched bundles are refused with errors that name the problem; no GPU needed.

mod common;

use common::*;
use iresnetc_runtime::{buffers, max_batch_for_limits, Bundle, Plan, RuntimeError, BUNDLE_VERSION};

#[test]
fn test_bundle_loads_and_round_trips() {
    let dir = write_test_bundle("loads");
    let bundle = Bundle::load(&dir).unwrap();
    assert_eq!(bundle.plan.model, "runtime-test");
    assert_eq!(bundle.weights[WEIGHT_TENSOR].data, test_weights());
    assert_eq!(bundle.shader_source("affine"), Some(AFFINE_WGSL));
    // plan.json written from the types reads back identically.
    let text = std::fs::read_to_string(dir.join("plan.json")).unwrap();
    let again: Plan = serde_json::from_str(&text).unwrap();
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&bundle.plan).unwrap()
    );
}

#[test]
fn other_bundle_version_is_refused_naming_both_versions() {
    let dir = write_test_bundle("version");
    let mut plan = serde_json::to_value(test_plan()).unwrap();
    plan["version"] = serde_json::json!(BUNDLE_VERSION + 1);
    // A future version may add fields; the version must be reported, not the unknown field.
    plan["new_field_of_v2"] = serde_json::json!(true);
    std::fs::write(dir.join("plan.json"), plan.to_string()).unwrap();
    let err = Bundle::load(&dir).unwrap_err();
    match err {
        RuntimeError::BundleVersion { found, expected } => {
            assert_eq!(found, BUNDLE_VERSION + 1);
            assert_eq!(expected, BUNDLE_VERSION);
        }
        ref other => panic!("expected BundleVersion, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("version {}", BUNDLE_VERSION + 1))
            && msg.contains(&format!("version {BUNDLE_VERSION}")),
        "{msg}"
    );
}

#[test]
fn truncated_plan_is_corrupt() {
    let dir = write_test_bundle("truncated");
    let text = serde_json::to_string_pretty(&test_plan()).unwrap();
    std::fs::write(dir.join("plan.json"), &text[..text.len() / 2]).unwrap();
    match Bundle::load(&dir).unwrap_err() {
        RuntimeError::BundleCorrupt { file, reason } => {
            assert!(file.ends_with("plan.json"), "{}", file.display());
            assert!(reason.contains("JSON"), "{reason}");
        }
        other => panic!("expected BundleCorrupt, got {other:?}"),
    }
}

#[test]
fn not_a_bundle_is_corrupt() {
    let dir = write_test_bundle("format");
    std::fs::write(dir.join("plan.json"), r#"{"format": "onnx", "version": 1}"#).unwrap();
    let err = Bundle::load(&dir).unwrap_err();
    assert!(matches!(err, RuntimeError::BundleCorrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("not an iresnetc bundle"), "{err}");
}

#[test]
fn missing_weight_tensor_is_named() {
    let dir = write_test_bundle("missing_weight");
    let other = vec![0.0f32; N];
    replace_file(
        &dir,
        "weights.safetensors",
        &safetensors_bytes(&[("layer1.weight", vec![N], &other)]),
    );
    let err = Bundle::load(&dir).unwrap_err();
    match &err {
        RuntimeError::BundleCorrupt { file, reason } => {
            assert!(file.ends_with("weights.safetensors"), "{}", file.display());
            assert!(reason.contains(WEIGHT_TENSOR), "{reason}");
        }
        other => panic!("expected BundleCorrupt, got {other:?}"),
    }
}

#[test]
fn extra_and_misshapen_weights_are_named() {
    let dir = write_test_bundle("extra_weight");
    let w = test_weights();
    replace_file(
        &dir,
        "weights.safetensors",
        &safetensors_bytes(&[(WEIGHT_TENSOR, vec![N], &w), ("stale.bias", vec![N], &w)]),
    );
    let err = Bundle::load(&dir).unwrap_err();
    assert!(err.to_string().contains("stale.bias"), "{err}");

    replace_file(
        &dir,
        "weights.safetensors",
        &safetensors_bytes(&[(WEIGHT_TENSOR, vec![N - 1], &w[..N - 1])]),
    );
    let err = Bundle::load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(WEIGHT_TENSOR) && msg.contains(&format!("{}", N - 1)),
        "{msg}"
    );

    replace_file(&dir, "weights.safetensors", b"garbage");
    let err = Bundle::load(&dir).unwrap_err();
    assert!(matches!(err, RuntimeError::BundleCorrupt { .. }), "{err:?}");
}

#[test]
fn missing_files_are_named() {
    let dir = write_test_bundle("missing_files");
    std::fs::remove_file(dir.join("halve.wgsl")).unwrap();
    match Bundle::load(&dir).unwrap_err() {
        RuntimeError::MissingFile(path) => assert!(path.ends_with("halve.wgsl")),
        other => panic!("expected MissingFile, got {other:?}"),
    }
    std::fs::remove_file(dir.join("weights.safetensors")).unwrap();
    std::fs::remove_file(dir.join("plan.json")).unwrap();
    match Bundle::load(&dir).unwrap_err() {
        RuntimeError::MissingFile(path) => assert!(path.ends_with("plan.json")),
        other => panic!("expected MissingFile, got {other:?}"),
    }
    match Bundle::load(dir.join("no-such-bundle")).unwrap_err() {
        RuntimeError::MissingFile(path) => assert!(path.ends_with("no-such-bundle")),
        other => panic!("expected MissingFile, got {other:?}"),
    }
}

#[test]
fn inconsistent_plans_are_refused_with_the_name() {
    type Edit = Box<dyn Fn(&mut Plan)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "does not divide",
            Box::new(|p| {
                let w = p.buffers.iter_mut().find(|b| b.name == "w").unwrap();
                if let iresnetc_runtime::BufferInit::Weight { layout, .. } = &mut w.init {
                    // cout x k x k overflows u64: refused, not wrapped.
                    *layout = iresnetc_runtime::WeightLayout::Adjoint {
                        cout: u32::MAX,
                        k: u32::MAX,
                    };
                }
            }),
        ),
        (
            "holds the batch size",
            Box::new(|p| p.buffers[0].init = iresnetc_runtime::BufferInit::Batch),
        ),
        (
            "\"nope\"",
            Box::new(|p| p.kernels[0].bindings[0] = "nope".to_string()),
        ),
        (
            "\"ghost\"",
            Box::new(|p| {
                p.entry_points.get_mut("forward").unwrap().steps =
                    vec![iresnetc_runtime::Step::Dispatch {
                        kernel: "ghost".to_string(),
                        workgroups: [1, 1, 1],
                        large_batch: None,
                    }]
            }),
        ),
        (
            "[0, 1, 1]",
            Box::new(|p| {
                p.entry_points.get_mut("forward").unwrap().steps =
                    vec![iresnetc_runtime::Step::Dispatch {
                        kernel: "affine".to_string(),
                        workgroups: [0, 1, 1],
                        large_batch: None,
                    }]
            }),
        ),
        (
            "shape [3, 10, 11]",
            Box::new(|p| {
                p.entry_points.get_mut("forward").unwrap().inputs[0].shape = vec![3, 10, 11]
            }),
        ),
        (
            "../",
            Box::new(|p| p.kernels[0].file = "../outside.wgsl".to_string()),
        ),
    ];
    for (needle, edit) in cases {
        let dir = write_test_bundle("inconsistent");
        let mut plan = test_plan();
        edit(&mut plan);
        write_plan(&dir, &plan);
        let err = Bundle::load(&dir).unwrap_err();
        assert!(matches!(err, RuntimeError::BundleCorrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(needle), "{needle} not in: {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}

#[test]
fn limits_name_the_buffer_and_bound_the_batch() {
    let plan = test_plan();
    let mut limits = iresnetc_runtime::wgpu::Limits {
        // 10 samples of 300 f32 per buffer.
        max_storage_buffer_binding_size: 10 * N as u64 * 4,
        ..Default::default()
    };
    assert_eq!(max_batch_for_limits(&plan, &limits), 10);
    buffers::check_limits(&plan, &limits, 10).unwrap();
    match buffers::check_limits(&plan, &limits, 11).unwrap_err() {
        RuntimeError::LimitExceeded {
            limit,
            what,
            requested,
            max,
        } => {
            assert_eq!(limit, "max_storage_buffer_binding_size");
            assert!(what.contains("\"a\""), "{what}");
            assert_eq!(requested, 11 * N as u64 * 4);
            assert_eq!(max, 10 * N as u64 * 4);
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    // The dispatch's z dimension (z_per_sample * batch) bounds the batch too.
    limits.max_storage_buffer_binding_size = u64::from(u32::MAX);
    limits.max_compute_workgroups_per_dimension = 7;
    assert_eq!(max_batch_for_limits(&plan, &limits), 7);
    let err = buffers::check_limits(&plan, &limits, 8).unwrap_err();
    assert!(
        err.to_string()
            .contains("max_compute_workgroups_per_dimension"),
        "{err}"
    );
}

/// The test bundle records SHA-256 hashes like a compiled one: loading checks every file it
/// reads against them, and a byte changed after the hashes were written, or a file the plan
/// does not vouch for, is refused naming the file.
#[test]
fn files_changed_after_hashing_are_refused() {
    let dir = write_test_bundle("integrity");
    let plan = Bundle::load(&dir).expect("sealed bundle loads").plan;
    // The recorded hashes are those of the files on disk (computed here with sha2).
    assert_eq!(plan.integrity.len(), 3, "{:?}", plan.integrity);
    for (file, hash) in &plan.integrity {
        assert_eq!(
            hash,
            &sha256_of(&std::fs::read(dir.join(file)).unwrap()),
            "{file}"
        );
    }
    for file in ["halve.wgsl", "affine.wgsl", "weights.safetensors"] {
        let dir = write_test_bundle("integrity-flip");
        let path = dir.join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        // One bit of the last byte: a change every parser would still accept.
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        match Bundle::load(&dir) {
            Err(RuntimeError::BundleCorrupt { file: f, reason }) => {
                assert!(f.ends_with(file), "{}", f.display());
                assert!(reason.contains("SHA-256"), "{reason}");
            }
            Err(other) => panic!("{file}: expected BundleCorrupt, got {other:?}"),
            Ok(_) => panic!("{file}: changed after hashing, and the bundle loaded"),
        }
    }
    // A plan that vouches for the weights but not for a kernel's file.
    let dir = write_test_bundle("integrity-unlisted");
    let mut plan = test_plan();
    plan.integrity = hashes(&dir, &plan);
    plan.integrity.remove("affine.wgsl");
    write_plan_as_is(&dir, &plan);
    match Bundle::load(&dir) {
        Err(RuntimeError::BundleCorrupt { file, reason }) => {
            assert!(file.ends_with("affine.wgsl"), "{}", file.display());
            assert!(reason.contains("no hash"), "{reason}");
        }
        Err(other) => panic!("expected BundleCorrupt, got {other:?}"),
        Ok(_) => panic!("a file the plan records no hash for was loaded"),
    }
}

/// Without `integrity` the library still loads a bundle (hand-made bundles like this one have
/// no compiler to hash them) and, having nothing to compare with, does not notice an edited
/// file; `require_integrity`, which every compiler entry point calls, refuses such a bundle.
#[test]
fn a_plan_without_hashes_loads_but_cannot_be_verified() {
    let dir = write_test_bundle("no-integrity");
    let mut plan = test_plan();
    plan.integrity.clear();
    write_plan_as_is(&dir, &plan);
    // An edit the hashes would have caught (a comment in a kernel): accepted here.
    let path = dir.join("halve.wgsl");
    std::fs::write(&path, format!("// edited\n{HALVE_WGSL}")).unwrap();
    let bundle = Bundle::load(&dir).expect("no hashes: the library loads it");
    assert!(bundle.plan.integrity.is_empty());
    assert!(bundle
        .shader_source("halve")
        .unwrap()
        .starts_with("// edited"));
    match iresnetc_runtime::bundle::require_integrity(&dir, &bundle.plan) {
        Err(RuntimeError::BundleCorrupt { file, reason }) => {
            assert!(file.ends_with("plan.json"), "{}", file.display());
            assert!(reason.contains("integrity"), "{reason}");
        }
        Err(other) => panic!("expected BundleCorrupt, got {other:?}"),
        Ok(()) => panic!("require_integrity accepted a plan without hashes"),
    }
    // The same bundle with hashes passes the requirement.
    write_plan(&dir, &plan);
    let sealed = Bundle::load(&dir).unwrap();
    iresnetc_runtime::bundle::require_integrity(&dir, &sealed.plan).expect("hashes recorded");
}
