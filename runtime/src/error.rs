//! The runtime's one error type.
//!
//! Every message is a single line that names what went wrong *and where*: the file of a damaged
//! bundle, the limit and the buffer that exceeded it, the input whose length is wrong. Callers
//! (the CLI, tests) print `Display` as is, so a message must make sense without the variant name.

use std::path::PathBuf;

/// Shorthand used throughout the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "no GPU adapter found (wgpu enumerated none; on Linux install mesa-vulkan-drivers and \
         libvulkan1 for the lavapipe software adapter, or check WGPU_BACKEND)"
    )]
    NoAdapter,

    #[error("no adapter name contains {wanted:?} (from IRESNETC_ADAPTER or --adapter); available: {}", available_list(.available))]
    AdapterNotFound {
        wanted: String,
        available: Vec<String>,
    },

    #[error("environment variable {var}={value:?} is not usable: {reason}")]
    BadEnv {
        var: String,
        value: String,
        reason: String,
    },

    #[error("could not open a device on adapter {adapter:?}: {reason}")]
    DeviceRequest { adapter: String, reason: String },

    #[error(
        "bundle has version {found} but this runtime reads version {expected}; recompile the \
         model with an iresnetc of the same release as this runtime"
    )]
    BundleVersion { found: u32, expected: u32 },

    #[error("bundle file {} is damaged: {reason}", file.display())]
    BundleCorrupt { file: PathBuf, reason: String },

    #[error("bundle file {} is missing", .0.display())]
    MissingFile(PathBuf),

    #[error("kernel {kernel:?}: {message}")]
    Shader { kernel: String, message: String },

    #[error("{what} needs {requested}, but the adapter's {limit} is {max}")]
    LimitExceeded {
        /// The wgpu limit's field name, e.g. `max_storage_buffer_binding_size`.
        limit: String,
        /// What asked for it, e.g. "buffer `h1` at batch 64 (bytes)".
        what: String,
        requested: u64,
        max: u64,
    },

    #[error("GPU device lost: {0}")]
    DeviceLost(String),

    /// A validation / out-of-memory / internal error that wgpu reported while running a plan.
    /// It points at a runtime or codegen bug, not at the user's data.
    #[error("GPU error: {0}")]
    Gpu(String),

    #[error("input {name:?}: {reason}")]
    BadInput { name: String, reason: String },

    #[error("bundle has no entry point {name:?}; it has: {}", available_list(.available))]
    UnknownEntryPoint {
        name: String,
        available: Vec<String>,
    },

    /// A request this backend or this compiled plan cannot serve (the message says what can).
    #[error("{0}")]
    Unsupported(String),

    /// An error of a backend implemented outside this crate (the f64 reference), already one line.
    #[error("{0}")]
    Backend(String),

    #[error("tract: {context}: {message}")]
    Tract { context: String, message: String },

    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },

    #[error(
        "{what} would need {} of memory, more than the {} this run may use (set IRESNETC_MEMORY_LIMIT to change the budget)",
        human_bytes(.needed),
        human_bytes(.available)
    )]
    Budget {
        what: String,
        needed: u64,
        available: u64,
    },

    #[error("{what}: {reason}")]
    WorkBound { what: String, reason: String },

    /// An inverse whose result does not map back to its input: never returned as a result.
    #[error("the inverse did not converge: {0}")]
    NotInverted(String),

    #[error("{}: {}", path.display(), crate::fsread::io_reason(.source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `1.5 GiB`; `u64::MAX` (an overflowed size) reads as "more than 16 EiB".
fn human_bytes(b: &u64) -> String {
    let b = *b;
    if b == u64::MAX {
        return "more than 16 EiB".to_string();
    }
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else {
        format!("{v:.1} {} ({b} bytes)", units[u])
    }
}

fn available_list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

impl RuntimeError {
    /// A damaged-bundle error; `file` is relative to the bundle or absolute.
    pub(crate) fn corrupt(file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        RuntimeError::BundleCorrupt {
            file: file.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn bad_input(name: impl Into<String>, reason: impl Into<String>) -> Self {
        RuntimeError::BadInput {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
