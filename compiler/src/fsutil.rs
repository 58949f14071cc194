//! Output files are written to a temporary name and renamed into place, so an
//! error half-way never leaves a truncated file where a good one is expected. Inside a
//! command's output transaction ([`crate::output`]) the file is only staged, and renamed into
//! place when the whole command succeeded.

use std::path::Path;

use crate::error::{Error, Result};

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if crate::output::stage_file(path, bytes)? {
        return Ok(());
    }
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
