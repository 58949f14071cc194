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
    std::fs::write(
        dir.join("weights.safetensors"),
        safetensors_bytes(&[("layer1.weight", vec![N], &other)]),
    )
    .unwrap();
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
    std::fs::write(
        dir.join("weights.safetensors"),
        safetensors_bytes(&[(WEIGHT_TENSOR, vec![N], &w), ("stale.bias", vec![N], &w)]),
    )
    .unwrap();
    let err = Bundle::load(&dir).unwrap_err();
    assert!(err.to_string().contains("stale.bias"), "{err}");

    std::fs::write(
        dir.join("weights.safetensors"),
        safetensors_bytes(&[(WEIGHT_TENSOR, vec![N - 1], &w[..N - 1])]),
    )
    .unwrap();
    let err = Bundle::load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(WEIGHT_TENSOR) && msg.contains(&format!("{}", N - 1)),
        "{msg}"
    );

    std::fs::write(dir.join("weights.safetensors"), b"garbage").unwrap();
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
