//! The one rule every GPU test follows when wgpu opens no device (shared by the runtime's and
//! the compiler's integration tests; the compiler's `tests/common` includes this file).
//!
//! A passing test cannot say "skipped", so a missing adapter is never silent:
//!
//! - adapter found: the test runs;
//! - no adapter, `IRESNETC_REQUIRE_GPU` set (CI): the test fails;
//! - no adapter, `IRESNETC_ALLOW_NO_GPU` set and `IRESNETC_REQUIRE_GPU` not: the GPU part is
//!   skipped, with a `SKIPPED` line on stderr; the person running the tests asked for it;
//! - no adapter, neither set (a plain `cargo test`): the test fails, its message naming both
//!   variables and the lavapipe package;
//! - any other device error (an adapter that will not open, `IRESNETC_ADAPTER` naming none):
//!   the test fails, whatever the variables say.
//!
//! A variable counts as set when it holds anything but "" or "0".
#![allow(dead_code)]

use iresnetc_runtime::{GpuDevice, RuntimeError};

pub const REQUIRE_GPU: &str = "IRESNETC_REQUIRE_GPU";
pub const ALLOW_NO_GPU: &str = "IRESNETC_ALLOW_NO_GPU";

fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The name of the running test (libtest names each test's thread after it).
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a GPU test")
        .to_string()
}

/// What a test does when opening the device failed with `err`: `None` (skip the GPU part)
/// only for a missing adapter under `IRESNETC_ALLOW_NO_GPU`; otherwise it panics, so the
/// test fails with the reason.
pub fn on_device_error<T>(test: &str, err: &RuntimeError) -> Option<T> {
    let no_adapter = matches!(err, RuntimeError::NoAdapter);
    if no_adapter && flag(ALLOW_NO_GPU) && !flag(REQUIRE_GPU) {
        eprintln!("SKIPPED {test}: GPU part not run: {err} ({ALLOW_NO_GPU} is set)");
        return None;
    }
    if no_adapter && flag(REQUIRE_GPU) {
        panic!("{test}: {REQUIRE_GPU} is set and wgpu found no adapter: {err}");
    }
    if no_adapter {
        panic!(
            "{test}: wgpu found no adapter: {err}. Install mesa-vulkan-drivers (lavapipe), \
             or set {ALLOW_NO_GPU}=1 to skip the GPU parts of the tests on this machine"
        );
    }
    panic!("{test}: cannot open a GPU device: {err}")
}

/// A fresh device for the running test, or `None` when the rule above says skip.
pub fn open_gpu(test: &str) -> Option<GpuDevice> {
    match GpuDevice::new() {
        Ok(d) => Some(d),
        Err(e) => on_device_error(test, &e),
    }
}
