//! Every file the runtime or the compiler reads goes through [`read_bounded`], and every size
//! derived from user data that is about to be allocated goes through [`check_budget`].
//!
//! Why: a path such as `/dev/zero` or a FIFO given as a model, weights or input file would
//! otherwise be read until memory runs out, and a damaged size field would turn into an
//! allocation the machine cannot hold (an abort, not an error). Each format knows the largest
//! file it can legitimately be; the read stops there with an error naming the file.
//!
//! The memory budget is the smallest of: the `IRESNETC_MEMORY_LIMIT` environment variable
//! (bytes, or with a `K`/`M`/`G` suffix), the process's address-space limit (`ulimit -v`,
//! read from `/proc/self/limits`) and the memory the kernel reports as available
//! (`MemAvailable` in `/proc/meminfo`). Where none is known, 16 GiB.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Result, RuntimeError};

/// Environment variable that overrides the memory budget (bytes; `K`, `M`, `G` suffixes).
pub const MEMORY_ENV: &str = "IRESNETC_MEMORY_LIMIT";

/// Budget used when the machine tells nothing.
const DEFAULT_BUDGET: u64 = 16 << 30;

/// Largest plausible size of the small text files of a model or bundle.
pub const MAX_MODEL_FILE: u64 = 1 << 20;
/// `plan.json`, `report.json`, `onnx.json`, one `.wgsl` file.
pub const MAX_JSON_FILE: u64 = 64 << 20;

/// The memory budget in bytes (see the module doc).
pub fn memory_budget() -> Result<u64> {
    if let Ok(v) = std::env::var(MEMORY_ENV) {
        return parse_size(&v).ok_or_else(|| RuntimeError::BadEnv {
            var: MEMORY_ENV.into(),
            value: clip(&v, 40),
            reason: "expected a positive number of bytes, optionally with a K, M or G suffix"
                .into(),
        });
    }
    let mut budget = DEFAULT_BUDGET;
    if let Some(avail) = mem_available() {
        budget = avail;
    }
    if let Some(limit) = address_space_limit() {
        // The binary, its libraries and thread stacks live in the same address space.
        budget = budget.min(limit.saturating_sub(256 << 20));
    }
    Ok(budget)
}

/// `n`, `nK`, `nM`, `nG` -> bytes; None for 0, garbage or overflow.
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, shift) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 10),
        (i, 'm' | 'M') => (&v[..i], 20),
        (i, 'g' | 'G') => (&v[..i], 30),
        _ => (v, 0),
    };
    let n: u64 = digits.trim().parse().ok()?;
    let bytes = n.checked_mul(1u64 << shift)?;
    (bytes > 0).then_some(bytes)
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn address_space_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max address space"))?;
    // "Max address space   <soft>   <hard>   bytes"; "unlimited" parses to None.
    line["Max address space".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Errors when `bytes` (what `what` needs) exceed the memory budget.
pub fn check_budget(what: &str, bytes: u64) -> Result<()> {
    let available = memory_budget()?;
    if bytes > available {
        return Err(RuntimeError::Budget {
            what: what.to_string(),
            needed: bytes,
            available,
        });
    }
    Ok(())
}

/// `a * b * ...` in u64, or a budget error naming `what` on overflow.
pub fn checked_bytes(what: &str, factors: &[u64]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| RuntimeError::Budget {
            what: what.to_string(),
            needed: u64::MAX,
            available: memory_budget().unwrap_or(DEFAULT_BUDGET),
        })
}

/// Reads a regular file of at most `max` bytes (also bounded by the memory budget).
/// Directories, devices and FIFOs are refused before anything is read, and the read itself
/// stops after `max + 1` bytes, so a file that grows while being read cannot exhaust memory.
pub fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let file_err = |reason: String| RuntimeError::File {
        path: path.to_path_buf(),
        reason,
    };
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            file_err("no such file".into())
        } else {
            file_err(io_reason(&e))
        }
    };
    // stat before open: opening a FIFO would block until a writer appears.
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return Err(file_err(format!("is a directory, expected a {what}")));
    }
    if !meta.is_file() {
        return Err(file_err(format!(
            "not a regular file (a device, FIFO or socket), expected a {what}"
        )));
    }
    let max = max.min(memory_budget()?);
    if meta.len() > max {
        return Err(file_err(format!(
            "{} bytes is more than a {what} can be here ({max} bytes)",
            meta.len()
        )));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        return Err(file_err(format!("not a regular file, expected a {what}")));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(file_err(format!(
            "more than {max} bytes, the most a {what} can be here"
        )));
    }
    Ok(bytes)
}

/// [`read_bounded`] for UTF-8 text.
pub fn read_text_bounded(path: &Path, max: u64, what: &str) -> Result<String> {
    let bytes = read_bounded(path, max, what)?;
    String::from_utf8(bytes).map_err(|e| RuntimeError::File {
        path: path.to_path_buf(),
        reason: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
    })
}

/// An I/O error's cause once, without the "(os error N)" suffix repeated by callers.
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Lower-case hex SHA-256 of `bytes` (what `plan.json`'s `integrity` records per file).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// At most `max` characters of `s`, with an ellipsis when cut: user text quoted in an error
/// (a 10 MB line of a model file) must not become a 10 MB message.
pub fn clip(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_reject_nonsense() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("3K"), Some(3 << 10));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("abc"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn sha256_matches_the_published_test_vector() {
        // FIPS 180-2 example "abc".
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn devices_and_directories_are_refused_before_reading() {
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20, "model file").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = read_bounded(Path::new("/"), 1 << 20, "model file").unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[test]
    fn clip_cuts_long_text_to_one_line() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("a\nb", 5), "a b");
    }
}
