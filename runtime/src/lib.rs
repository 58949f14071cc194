//! `iresnetc-runtime`: loads a bundle compiled by `iresnetc` and runs it, without the compiler.
//!
//! Layout, one module per concept:
//! - [`plan`]: the serde types of `plan.json`, the contract with the compiler's codegen, and
//!   their internal consistency check ([`Plan::validate`]).
//! - [`bundle`]: reading a bundle directory (`plan.json`, the `.wgsl` files,
//!   `weights.safetensors`) and checking the files against each other ([`Bundle::load`]).
//! - [`device`]: listing and choosing a wgpu adapter (`IRESNETC_ADAPTER`, `WGPU_BACKEND`) and
//!   opening it with its full limits; wgpu errors become [`RuntimeError`]s, never panics.
//! - [`buffers`]: buffer sizes for a batch, checks against the device limits, the largest
//!   batch that fits ([`max_batch_for_limits`]), weight upload, allocation.
//! - [`executor`]: [`GpuExecutor`], which builds every pipeline once and runs an entry point
//!   as a single submission (steps recorded into one encoder, `Repeat` unrolled), splitting
//!   batches that exceed the limits.
//! - [`limits`]: the device limits a bundle needs ([`RequiredLimits`], reflected from its WGSL,
//!   recorded in `plan.json`) and WebGPU's defaults, which every compiled bundle fits.
//! - [`fsread`]: bounded file reads, the memory budget, SHA-256 of bundle files.
//! - [`error`]: [`RuntimeError`], one-line messages naming the file, limit or input at fault.
//! - [`tract`]: the bundle's ONNX graphs (`onnx.json`) loaded and run by tract;
//!   [`tract_segments`]: its per-block segment graphs chained into whole passes.
//! - [`engine`]: the execution API, [`Backend`], that every backend implements; [`modes`]:
//!   density, sampling and classification written once over it; [`logdet`]: the estimator
//!   and the layout of its inputs, typed once; [`backends`]: the wgpu and tract backends.
//! - [`cpu`]: the native CPU engine ([`CpuEngine`]): f32 on the `gemm` crate, from `net.json`.
//! - [`tract`]: the CPU backend, the bundle's ONNX graphs (`onnx.json`) run by tract.
//! - [`rng`]: the seeded generator shared with the compiler (probes, sampling noise), so
//!   random streams are bit-identical on every backend.

pub mod backends;
pub mod buffers;
pub mod bundle;
pub mod cpu;
pub mod device;
pub mod engine;
pub mod error;
pub mod executor;
pub mod fsread;
pub mod limits;
pub mod logdet;
pub mod modes;
pub mod onnx_data;
pub mod plan;
pub mod rng;
pub mod tract;
pub mod tract_segments;

pub use buffers::{buffer_bytes, check_limits, max_batch_for_limits};
pub use bundle::{Bundle, WeightTensor};
pub use cpu::{CpuEngine, NetDesc};
pub use device::{
    has_hardware_gpu, list_adapters, AdapterSummary, GpuDevice, ADAPTER_ENV, BACKEND_ENV,
};
pub use engine::{
    Backend, BackendInfo, Batch, BlockInversion, Decoded, Encoded, ModelInfo, Precision, Prior,
};
pub use error::{Result, RuntimeError};
pub use executor::{GpuExecutor, Outputs, TimedRun};
pub use limits::{required_limits, RequiredLimits};
pub use plan::{
    dispatch_at, BufferDecl, BufferInit, EntryPoint, Folded, IoDecl, KernelDecl, ModelKind, Plan,
    Step, WeightLayout, BUNDLE_FORMAT, BUNDLE_VERSION,
};
/// The wgpu this runtime was built against, for callers that need its types (limits, adapters).
pub use wgpu;
