//! iresnetc: a compiler for invertible residual networks.
//!
//! Pipeline: [`spec`] (TOML) -> [`ir`] (petgraph) -> [`passes`] (shapes,
//! Lipschitz certificate) -> codegen / ONNX; [`reference`] is the f64 oracle
//! every backend is tested against.

pub mod bundle;
pub mod bundle_check;
pub mod codegen;
pub mod error;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod ir;
pub mod kernels;
pub mod limits;
pub mod netdesc;
pub mod npy;
pub mod onnx;
pub mod ops;
pub mod output;
pub mod passes;
pub mod pipeline;
pub mod reference;
pub mod spec;
pub mod spectral;
pub mod tensor;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
