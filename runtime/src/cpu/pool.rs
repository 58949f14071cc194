//! The engine's threads and its reusable buffers.
//!
//! One rayon pool of `IRESNETC_THREADS` threads (default: every core) runs everything: the GEMMs
//! split their output tiles across it and the memory-bound passes (im2col, activations,
//! layout ops) split channels across it. The batch is folded into the GEMMs' columns rather than
//! run sample-parallel on top, so the two kinds of parallelism never compete for cores.

use crate::error::{Result, RuntimeError};

/// Environment variable that sets the engine's thread count.
pub const THREADS_ENV: &str = "IRESNETC_THREADS";

/// Largest thread count accepted: beyond this a value is a typo, not a machine.
pub const MAX_THREADS: usize = 4096;

/// The thread count from `IRESNETC_THREADS` (validated), else the number of cores.
pub fn threads_from_env() -> Result<usize> {
    match std::env::var(THREADS_ENV) {
        Ok(v) => parse_threads(&v),
        Err(std::env::VarError::NotPresent) => Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)),
        Err(std::env::VarError::NotUnicode(v)) => Err(RuntimeError::BadEnv {
            var: THREADS_ENV.into(),
            value: v.to_string_lossy().into_owned(),
            reason: "not valid UTF-8".into(),
        }),
    }
}

/// A thread count as written by a user: an integer in `1..=MAX_THREADS`.
pub fn parse_threads(v: &str) -> Result<usize> {
    let bad = |reason: String| RuntimeError::BadEnv {
        var: THREADS_ENV.into(),
        value: v.into(),
        reason,
    };
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| bad("expected a whole number of threads, e.g. 2".into()))?;
    if n == 0 || n > MAX_THREADS {
        return Err(bad(format!("must be between 1 and {MAX_THREADS}")));
    }
    Ok(n)
}

pub fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("iresnetc-cpu-{i}"))
        .build()
        .map_err(|e| RuntimeError::BadEnv {
            var: THREADS_ENV.into(),
            value: threads.to_string(),
            reason: format!("could not start the thread pool: {e}"),
        })
}

/// Buffers reused across blocks and calls. They only grow (to the largest size a call needs),
/// so in steady state a forward, log-det or inverse allocates nothing per block.
#[derive(Default, Debug)]
pub struct Workspace {
    /// The flow's state `[C][B][H*W]`.
    pub cur: Vec<f32>,
    /// Ping-pong buffers for the branch's hidden activations.
    pub h: [Vec<f32>; 2],
    /// im2col / shifted-accumulation scratch.
    pub col: Vec<f32>,
    /// Activation derivative masks of the current block, one per activation in its branch.
    pub masks: Vec<Vec<f32>>,
    /// Log-det: the probe and the two vjp vectors.
    pub probe: Vec<f32>,
    pub w: [Vec<f32>; 2],
    /// Inverse: the block's output y and the next iterate.
    pub y: Vec<f32>,
    pub next: Vec<f32>,
    /// Layout ops (squeeze, factor-out) write here, then swap with `cur`.
    pub tmp: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_validated() {
        assert_eq!(parse_threads("2").unwrap(), 2);
        assert_eq!(parse_threads(" 8 ").unwrap(), 8);
        for bad in ["0", "-1", "two", "", "1e3", "100000"] {
            let msg = parse_threads(bad).unwrap_err().to_string();
            assert!(msg.contains(THREADS_ENV), "{bad:?}: {msg}");
            assert!(!msg.contains('\n'));
        }
    }
}
