//! Typed errors of the compiler library. Each message is one line naming the
//! file and the field, tensor or array at fault; the CLI maps them to exit code 2.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {}", path.display(), iresnetc_runtime::fsread::io_reason(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    SpecParse { file: PathBuf, message: String },
    #[error("{file}: field `{field}`: {reason}")]
    SpecInvalid {
        file: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Weights {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    WeightsFile { file: PathBuf, reason: String },
    #[error("{file}: array `{array}`: {reason}")]
    Array {
        file: PathBuf,
        array: String,
        reason: String,
    },
    #[error("graph: node `{node}`: {reason}")]
    Graph { node: String, reason: String },
    #[error("{model}: block `{block}`: certified Lipschitz bound {bound:.6} >= 1, the block is not guaranteed invertible (lower lipschitz.coeff)")]
    NotContractive {
        model: String,
        block: String,
        bound: f64,
    },
    #[error("{what}: {reason}")]
    Unsupported { what: String, reason: String },
    #[error("{}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
    #[error("{0}")]
    Runtime(#[from] iresnetc_runtime::RuntimeError),
    #[error("{context}: {message}")]
    Codegen { context: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
