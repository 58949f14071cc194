//! Runs the hand-made bundle on whatever adapter wgpu finds (lavapipe in CI) and compares
//! with a CPU computation of the same f32 arithmetic.

mod common;

use common::*;
use iresnetc_runtime::{list_adapters, Bundle, GpuExecutor, RuntimeError};

fn inputs(batch: usize, seed: f32) -> Vec<f32> {
    (0..batch * N)
        .map(|k| (k as f32 * 0.37 + seed).sin() * 3.0)
        .collect()
}

fn cpu_forward(a: &[f32], w: &[f32]) -> Vec<f32> {
    a.iter()
        .enumerate()
        .map(|(k, &a)| a * w[k % N] + 1.0)
        .collect()
}

fn cpu_iterate(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&x| (0..10).fold(x, |x, _| 0.5 * x + 1.0))
        .collect()
}

fn executor(test: &str) -> Option<GpuExecutor> {
    let gpu = gpu_or_skip(test)?;
    eprintln!("{test}: adapter {}", gpu.adapter());
    let bundle = Bundle::load(write_test_bundle(test)).expect("load test bundle");
    Some(GpuExecutor::new(&gpu, &bundle).expect("build executor"))
}

#[test]
fn lists_adapters_without_panicking() {
    for a in list_adapters() {
        eprintln!("adapter: {a}");
    }
    if let Some(gpu) = gpu_or_skip("limits") {
        let l = gpu.limits();
        eprintln!(
            "{}: max_storage_buffer_binding_size {}, max_buffer_size {}, \
             max_storage_buffers_per_shader_stage {}, max_compute_workgroups_per_dimension {}, \
             max_compute_invocations_per_workgroup {}, timestamps {}",
            gpu.adapter().name,
            l.max_storage_buffer_binding_size,
            l.max_buffer_size,
            l.max_storage_buffers_per_shader_stage,
            l.max_compute_workgroups_per_dimension,
            l.max_compute_invocations_per_workgroup,
            gpu.has_timestamps()
        );
        // Requested with the adapter's own limits, not wgpu's defaults (8 storage buffers).
        assert!(l.max_storage_buffers_per_shader_stage >= 8);
    }
}

#[test]
fn forward_matches_cpu_for_batch_3() {
    let Some(mut exec) = executor("forward_batch3") else {
        return;
    };
    let batch = 3;
    let a = inputs(batch, 0.1);
    let out = exec.run("forward", batch, &[("a", &a)]).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["y"]);
    // One multiply-add per element: at most an FMA's rounding difference.
    assert_close(&out["y"], &cpu_forward(&a, &test_weights()), 1e-6, "y");
    assert_eq!(exec.dispatch_count("forward"), 1);
}

#[test]
fn repeat_copy_and_fill_match_cpu() {
    let Some(mut exec) = executor("iterate_batch3") else {
        return;
    };
    let batch = 3;
    let x = inputs(batch, 0.7);
    // Two runs: the second must not see the first one's buffers (Zero, Fill, Copy re-done).
    for run in 0..2 {
        let out = exec.run("iterate", batch, &[("x", &x)]).unwrap();
        assert_close(&out["x_out"], &cpu_iterate(&x), 1e-6, "x_out");
        assert_eq!(
            out["filled"],
            vec![FILL_VALUE; batch * N],
            "filled, run {run}"
        );
        assert_eq!(out["zeroed"], vec![0.0; batch * N], "zeroed, run {run}");
    }
    // 10 unrolled dispatches + the built-in fill kernel for 2.5 and 7.0 (0.0 is a buffer clear).
    assert_eq!(exec.dispatch_count("iterate"), 12);
    assert_eq!(exec.dispatch_count("no such entry"), 0);
}

#[test]
fn batches_are_split_into_chunks_transparently() {
    let Some(mut exec) = executor("chunks") else {
        return;
    };
    assert!(exec.max_batch() >= 1000, "max batch {}", exec.max_batch());
    let batch = 5;
    let a = inputs(batch, 0.3);
    let whole = exec.run("forward", batch, &[("a", &a)]).unwrap();
    exec.set_max_batch(2); // 2 + 2 + 1
    assert_eq!(exec.max_batch(), 2);
    let chunked = exec.run("forward", batch, &[("a", &a)]).unwrap();
    assert_eq!(whole["y"], chunked["y"]);
    assert_close(&chunked["y"], &cpu_forward(&a, &test_weights()), 1e-6, "y");
    let x = inputs(batch, 0.9);
    let out = exec.run("iterate", batch, &[("x", &x)]).unwrap();
    assert_close(&out["x_out"], &cpu_iterate(&x), 1e-6, "x_out");
}

#[test]
fn run_timed_reports_wall_time() {
    let Some(mut exec) = executor("timed") else {
        return;
    };
    let x = inputs(2, 0.2);
    let timed = exec.run_timed("iterate", 2, &[("x", &x)]).unwrap();
    assert!(timed.wall.as_nanos() > 0);
    assert_close(&timed.outputs["x_out"], &cpu_iterate(&x), 1e-6, "x_out");
    eprintln!(
        "iterate batch 2: wall {:?}, gpu {:?}",
        timed.wall, timed.gpu
    );
}

#[test]
fn bad_inputs_are_named() {
    let Some(mut exec) = executor("bad_inputs") else {
        return;
    };
    let short = vec![0.0f32; 2 * N - 1];
    let err = exec.run("forward", 2, &[("a", &short)]).unwrap_err();
    match &err {
        RuntimeError::BadInput { name, reason } => {
            assert_eq!(name, "a");
            assert!(reason.contains(&format!("{}", 2 * N)), "{reason}");
        }
        other => panic!("expected BadInput, got {other:?}"),
    }
    assert!(err.to_string().contains("\"a\""), "{err}");

    let ok = vec![0.0f32; N];
    match exec.run("forward", 1, &[]).unwrap_err() {
        RuntimeError::BadInput { name, .. } => assert_eq!(name, "a"),
        other => panic!("expected BadInput for a missing input, got {other:?}"),
    }
    match exec
        .run("forward", 1, &[("a", &ok), ("b", &ok)])
        .unwrap_err()
    {
        RuntimeError::BadInput { name, .. } => assert_eq!(name, "b"),
        other => panic!("expected BadInput for an unknown input, got {other:?}"),
    }
    match exec.run("forward", 0, &[("a", &[])]).unwrap_err() {
        RuntimeError::BadInput { name, .. } => assert_eq!(name, "batch"),
        other => panic!("expected BadInput for batch 0, got {other:?}"),
    }
    match exec.run("backward", 1, &[("a", &ok)]).unwrap_err() {
        RuntimeError::UnknownEntryPoint { name, available } => {
            assert_eq!(name, "backward");
            assert_eq!(available, ["forward", "iterate"]);
        }
        other => panic!("expected UnknownEntryPoint, got {other:?}"),
    }
    // The executor still works after refusing bad calls.
    let out = exec.run("forward", 1, &[("a", &ok)]).unwrap();
    assert_eq!(out["y"], vec![1.0; N]);
}

/// Builds an executor for the test plan with one WGSL file replaced; returns its error.
fn shader_error(
    test: &str,
    file: &str,
    source: &str,
    edit: impl FnOnce(&mut iresnetc_runtime::Plan),
) -> Option<RuntimeError> {
    let gpu = gpu_or_skip(test)?;
    let dir = write_test_bundle(test);
    std::fs::write(dir.join(file), source).unwrap();
    let mut plan = test_plan();
    edit(&mut plan);
    write_plan(&dir, &plan);
    let bundle = Bundle::load(&dir).expect("the bundle itself is consistent");
    Some(
        GpuExecutor::new(&gpu, &bundle)
            .err()
            .expect("executor must refuse"),
    )
}

#[test]
fn wgsl_syntax_error_names_kernel_file_and_line() {
    let broken = HALVE_WGSL.replace("0.5 * state[k]", "0.5 * * state[k]");
    let Some(err) = shader_error("syntax", "halve.wgsl", &broken, |_| {}) else {
        return;
    };
    eprintln!("{err}");
    let RuntimeError::Shader { kernel, message } = &err else {
        panic!("expected Shader, got {err:?}");
    };
    assert_eq!(kernel, "halve");
    assert!(message.starts_with("halve.wgsl:"), "{message}");
    assert!(!err.to_string().contains('\n'), "one line: {err}");

    // Parses, but fails validation: a store through a read-only binding.
    let read_only = HALVE_WGSL.replace("read_write", "read");
    let Some(err) = shader_error("store_read_only", "halve.wgsl", &read_only, |_| {}) else {
        return;
    };
    eprintln!("{err}");
    assert!(matches!(err, RuntimeError::Shader { .. }), "{err:?}");
    assert!(err.to_string().contains("halve.wgsl"), "{err}");
}

#[test]
fn access_mode_mismatch_is_refused() {
    // The plan says binding 0 is read-only but the WGSL writes it.
    let Some(err) = shader_error("access", "halve.wgsl", HALVE_WGSL, |plan| {
        plan.kernels[1].read_only = vec![true];
    }) else {
        return;
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, RuntimeError::Shader { .. }), "{err:?}");
    assert!(msg.contains("read_write") && msg.contains("state"), "{msg}");
}

#[test]
fn workgroup_size_and_binding_count_mismatches_are_refused() {
    let Some(err) = shader_error("wgsize", "halve.wgsl", HALVE_WGSL, |plan| {
        plan.kernels[1].workgroup_size = [128, 1, 1];
    }) else {
        return;
    };
    eprintln!("{err}");
    assert!(err.to_string().contains("@workgroup_size"), "{err}");

    let Some(err) = shader_error("bindings", "affine.wgsl", AFFINE_WGSL, |plan| {
        plan.kernels[0].bindings.pop();
    }) else {
        return;
    };
    eprintln!("{err}");
    assert!(err.to_string().contains("@binding(2)"), "{err}");

    let Some(err) = shader_error("entry", "affine.wgsl", AFFINE_WGSL, |plan| {
        plan.kernels[0].entry = "main".to_string();
    }) else {
        return;
    };
    eprintln!("{err}");
    assert!(err.to_string().contains("affine"), "{err}");
}

#[test]
fn gpu_validation_errors_become_runtime_errors() {
    // The kernel declares a fixed-size array of 400 floats; at batch 1 the bound buffer holds
    // only 300. wgpu catches that at dispatch; by default it would panic, here the run fails.
    let fixed = AFFINE_WGSL.replace(
        "var<storage, read> a: array<f32>;",
        "var<storage, read> a: array<f32, 400>;",
    );
    let Some(gpu) = gpu_or_skip("validation") else {
        return;
    };
    let dir = write_test_bundle("validation");
    replace_file(&dir, "affine.wgsl", fixed.as_bytes());
    let bundle = Bundle::load(&dir).unwrap();
    let mut exec = GpuExecutor::new(&gpu, &bundle).unwrap();
    let a = inputs(1, 0.0);
    let err = exec.run("forward", 1, &[("a", &a)]).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, RuntimeError::Gpu(_)), "{err:?}");
    assert!(!err.to_string().contains('\n'), "one line: {err}");
    // The device survives: batch 2 binds 600 floats, enough for the declared 400.
    let a = inputs(2, 0.0);
    let out = exec.run("forward", 2, &[("a", &a)]).unwrap();
    assert_close(&out["y"], &cpu_forward(&a, &test_weights()), 1e-6, "y");
}

/// A device that goes away under the executor (here destroyed on purpose, the
/// closest a test can get to a lost device) gives an error, never a panic.
#[test]
fn destroyed_device_is_an_error_not_a_panic() {
    let Some(mut exec) = executor("destroyed") else {
        return;
    };
    exec.device().device.destroy();
    let a = inputs(2, 0.3);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        exec.run("forward", 2, &[("a", &a)])
    }));
    match outcome {
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'), "{msg}");
            eprintln!("destroyed device: {msg}");
        }
        Ok(Ok(_)) => panic!("a run on a destroyed device reported success"),
        Err(_) => panic!("a run on a destroyed device panicked"),
    }
}
