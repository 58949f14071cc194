//! The native CPU engine: f32 on the `gemm` crate, every mode, from a bundle's `net.json` and
//! weights (or a description built in memory), without the compiler.
//!
//! - [`net`]: the network description, the contract with the compiler.
//! - [`engine`]: [`CpuEngine`], resolving the description into steps with packed weights.
//! - [`conv`]: convolutions and dense layers as GEMMs (im2col or shifted accumulation), adjoints.
//! - [`grad`]: training kernels: a linear layer, its adjoint and its weight gradient on a batch.
//! - [`act`]: activations and their derivative masks.
//! - [`layout`]: squeeze, factor-out and the batch-major <-> channel-major transposes.
//! - `forward` / `logdet` / `inverse`: encode and classify, the log-det estimators, decode.
//! - `simd`: elementwise kernels compiled for the CPU's widest SIMD level, chosen at run time.
//! - [`pool`]: `IRESNETC_THREADS`, the thread pool and the reusable buffers.

pub mod act;
pub mod conv;
pub mod engine;
mod forward;
pub mod grad;
mod inverse;
pub mod layout;
pub mod logdet;
pub mod net;
pub mod pool;
mod simd;

pub use engine::{BlockInverse, CpuEngine, InverseReport, LogDetRequest};
pub use net::NetDesc;
pub use pool::THREADS_ENV;
