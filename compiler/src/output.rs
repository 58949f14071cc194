//! The one guard every output of a command goes through.
//!
//! A command declares its outputs (and the inputs they must not touch) up front with
//! [`begin`], before any work: each output must be distinct from the others and from every
//! input (compared after resolving symlinks, `.`/`..` and hard links), is never a symbolic
//! link, a file output never ends in `/`, an existing file output must be a regular file, and
//! an existing directory given as a bundle output must already be an iresnetc bundle or be
//! empty. Missing parent directories of an output are created when it is written (as users
//! expect of `-o a/b/c`) and removed again if the command fails. Nothing is touched when a
//! check fails.
//!
//! While the transaction is open, [`crate::fsutil::write_atomic`] and
//! [`crate::bundle::write_bundle`] write to temporary names next to the declared paths
//! (writing an undeclared path is an error), and [`commit`] renames them all into place only
//! once the whole command succeeded; [`rollback`] (on error, or from the panic hook) removes
//! the temporaries. A failing command therefore leaves no file behind, and a command never
//! writes a path the user did not give.
//!
//! Without an open transaction (library use) writes go straight to their path, atomically.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// What a declared output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A regular file (an array, an ONNX graph, a PNG, a manifest).
    File,
    /// A bundle directory (replaced as a whole).
    BundleDir,
    /// A training run directory (replaced as a whole; staged as a copy of `Output::seed`
    /// when a run continues in place).
    RunDir,
}

impl OutputKind {
    fn is_dir(self) -> bool {
        self != OutputKind::File
    }
}

/// One declared output.
#[derive(Clone, Debug)]
pub struct Output {
    /// The path as the user gave it (used in messages and to match writes).
    pub path: PathBuf,
    /// The command-line option it came from, e.g. `--output`.
    pub option: String,
    pub kind: OutputKind,
    /// A run directory's staged copy starts as a copy of this directory (the run resumed in
    /// place), so a failure leaves the original exactly as it was.
    pub seed: Option<PathBuf>,
}

impl Output {
    pub fn file(path: &Path, option: &str) -> Output {
        Output {
            path: path.to_path_buf(),
            option: option.to_string(),
            kind: OutputKind::File,
            seed: None,
        }
    }

    pub fn bundle(path: &Path, option: &str) -> Output {
        Output {
            path: path.to_path_buf(),
            option: option.to_string(),
            kind: OutputKind::BundleDir,
            seed: None,
        }
    }

    /// A training run directory; `resumed` is the run it continues when that is the same
    /// directory.
    pub fn run_dir(path: &Path, option: &str, resumed: Option<&Path>) -> Output {
        Output {
            path: path.to_path_buf(),
            option: option.to_string(),
            kind: OutputKind::RunDir,
            seed: resumed.map(Path::to_path_buf),
        }
    }
}

/// A declared output, resolved: its final absolute path and, once written, the temporary.
#[derive(Debug)]
struct Entry {
    decl: Output,
    target: PathBuf,
    tmp: Option<PathBuf>,
    /// Parent directories this command created, outermost first (removed again on rollback).
    created: Vec<PathBuf>,
}

#[derive(Debug, Default)]
struct Transaction {
    entries: Vec<Entry>,
}

static ACTIVE: Mutex<Option<Transaction>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Transaction>> {
    // A poisoned lock only means a panic elsewhere; the data is still consistent enough to
    // clean up temporaries.
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Absolute path with symlinks resolved: the path itself when it exists, else its deepest
/// existing ancestor, resolved, joined with the plain names below it. None when a name below
/// the existing ancestor is not a plain name (`..` past a directory that does not exist).
fn resolve(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let mut rest = vec![path.file_name()?.to_os_string()];
    let mut dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    loop {
        if let Ok(p) = std::fs::canonicalize(&dir) {
            return Some(rest.iter().rev().fold(p, |acc, n| acc.join(n)));
        }
        match dir.components().next_back() {
            Some(std::path::Component::Normal(n)) => rest.push(n.to_os_string()),
            _ => return None,
        }
        dir = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
    }
}

/// The directories above `target` (resolved) that do not exist yet, outermost first.
fn missing_parents(target: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut dir = target.parent();
    while let Some(d) = dir {
        if std::fs::symlink_metadata(d).is_ok() {
            break;
        }
        out.push(d.to_path_buf());
        dir = d.parent();
    }
    out.reverse();
    out
}

/// The file's identity on disk (device, inode), when it exists: catches hard links.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// Whether `dir` holds an iresnetc bundle: a `plan.json` whose `format` is the bundle's.
pub fn is_bundle_dir(dir: &Path) -> bool {
    let plan = dir.join(iresnetc_runtime::plan::PLAN_FILE);
    let Ok(bytes) = iresnetc_runtime::fsread::read_bounded(
        &plan,
        iresnetc_runtime::fsread::MAX_JSON_FILE,
        "plan.json",
    ) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("format")?.as_str().map(str::to_string))
        .is_some_and(|f| f == iresnetc_runtime::BUNDLE_FORMAT)
}

/// Checks one output target without touching anything; returns its resolved path.
pub fn check_target(o: &Output) -> Result<PathBuf> {
    let p = &o.path;
    // Renaming onto a symlink's target would replace whatever file it points to, anywhere
    // on the machine: an output is never written through a link.
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(bad(
            p,
            format!(
                "{}: is a symbolic link; refusing to write through it (give the real path)",
                o.option
            ),
        ));
    }
    // `out.npy/` names a directory: writing a file there would not be what was asked.
    let bytes = p.as_os_str().as_encoded_bytes();
    if o.kind == OutputKind::File && (bytes.ends_with(b"/") || bytes.ends_with(b"/.")) {
        return Err(bad(
            p,
            format!(
                "{}: ends in '/', which names a directory; give a file name",
                o.option
            ),
        ));
    }
    let Some(target) = resolve(p) else {
        return Err(bad(
            p,
            format!(
                "{}: its directory does not exist and the path climbs out of it with '..'",
                o.option
            ),
        ));
    };
    if target.parent().is_none() || target.file_name().is_none() {
        return Err(bad(p, format!("{}: not a usable output path", o.option)));
    }
    // The deepest existing ancestor must be a directory (missing ones are created).
    let mut above = target.parent();
    while let Some(d) = above {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(bad(
                    p,
                    format!("{}: {} is not a directory", o.option, d.display()),
                ))
            }
            Err(_) => above = d.parent(),
        }
    }
    match (o.kind, std::fs::symlink_metadata(&target)) {
        (_, Err(_)) => {}
        (OutputKind::File, Ok(m)) if m.is_dir() => {
            return Err(bad(
                p,
                format!("{}: is a directory, expected a file name", o.option),
            ))
        }
        (OutputKind::File, Ok(m)) if !m.is_file() => {
            return Err(bad(
                p,
                format!(
                "{}: exists and is not a regular file (a device or FIFO); refusing to replace it",
                o.option
            ),
            ))
        }
        (OutputKind::File, Ok(_)) => {}
        (OutputKind::BundleDir | OutputKind::RunDir, Ok(m)) if !m.is_dir() => {
            return Err(bad(
                p,
                format!(
                    "{}: exists and is not a directory; refusing to replace it",
                    o.option
                ),
            ))
        }
        // What a run directory may be (new, empty, or the run resumed) is the train
        // command's policy, checked before this.
        (OutputKind::RunDir, Ok(_)) => {}
        (OutputKind::BundleDir, Ok(_)) => {
            let empty = std::fs::read_dir(&target)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty && !is_bundle_dir(&target) {
                return Err(bad(
                    p,
                    format!("{}: the directory exists and is not an iresnetc bundle (no plan.json of format {:?}); refusing to replace it, choose another path or empty it", o.option, iresnetc_runtime::BUNDLE_FORMAT),
                ));
            }
        }
    }
    Ok(target)
}

/// Checks every output (see the module doc) and opens the transaction. Nothing is written.
pub fn begin(outputs: Vec<Output>, inputs: &[PathBuf]) -> Result<()> {
    let mut entries: Vec<Entry> = vec![];
    let input_ids: Vec<(PathBuf, Option<PathBuf>, Option<(u64, u64)>)> = inputs
        .iter()
        .map(|i| (i.clone(), resolve(i), identity(i)))
        .collect();
    for o in outputs {
        let target = check_target(&o)?;
        let id = identity(&target);
        for e in &entries {
            if e.target == target || (id.is_some() && id == identity(&e.target)) {
                return Err(bad(
                    &o.path,
                    format!("{} and {} name the same file", o.option, e.decl.option),
                ));
            }
        }
        for (given, resolved, iid) in &input_ids {
            // A run resumed in place is staged as a copy: the original stays until commit.
            let resumed_here = o
                .seed
                .as_ref()
                .is_some_and(|s| resolve(s) == Some(target.clone()));
            let same = !resumed_here
                && (resolved.as_ref() == Some(&target) || (id.is_some() && id == *iid));
            // A bundle directory output holding an input, or an output replacing a file of
            // an input directory (a bundle's weights or plan): either destroys an input.
            let inside = (o.kind.is_dir()
                && !resumed_here
                && resolved.as_ref().is_some_and(|r| r.starts_with(&target)))
                || resolved
                    .as_ref()
                    .is_some_and(|r| r.is_dir() && target.starts_with(r) && target.exists());
            if same || inside {
                return Err(bad(
                    &o.path,
                    format!(
                        "{} would overwrite the input {} (outputs must differ from inputs)",
                        o.option,
                        given.display()
                    ),
                ));
            }
        }
        entries.push(Entry {
            decl: o,
            target,
            tmp: None,
            created: vec![],
        });
    }
    *lock() = Some(Transaction { entries });
    Ok(())
}

/// Whether a transaction is open.
pub fn active() -> bool {
    lock().is_some()
}

/// The temporary next to `target` that stands for it until commit.
fn tmp_name(target: &Path, dir: bool) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let pid = std::process::id();
    if dir {
        target.with_file_name(format!("{name}.tmp-{pid}"))
    } else {
        target.with_file_name(format!(".{name}.tmp-{pid}"))
    }
}

/// Where a write of `path` must go: Some(temporary) for a declared output, None when `path`
/// lies inside a bundle directory being staged (written directly: the whole directory is
/// renamed at commit). An undeclared path is an error.
fn staging_path(t: &mut Transaction, path: &Path, dir: bool) -> Result<Option<PathBuf>> {
    let resolved = resolve(path);
    for e in t.entries.iter() {
        if let Some(tmp) = &e.tmp {
            if e.decl.kind.is_dir() && path.starts_with(tmp) {
                return Ok(None);
            }
        }
    }
    let Some(e) = t
        .entries
        .iter_mut()
        .find(|e| e.decl.path == path || resolved.as_ref() == Some(&e.target))
    else {
        return Err(bad(
            path,
            "internal error: this command did not declare that output; nothing was written",
        ));
    };
    if e.decl.kind.is_dir() != dir {
        return Err(bad(
            path,
            "internal error: output written as the wrong kind",
        ));
    }
    let tmp = tmp_name(&e.target, dir);
    // Missing parents are created now, recorded so that a rollback removes them again.
    for d in missing_parents(&e.target) {
        std::fs::create_dir(&d).map_err(|err| Error::Io {
            path: d.clone(),
            source: err,
        })?;
        e.created.push(d);
    }
    e.tmp = Some(tmp.clone());
    Ok(Some(tmp))
}

/// Stages `bytes` for `path` when a transaction is open; returns false when none is (the
/// caller then writes directly).
pub fn stage_file(path: &Path, bytes: &[u8]) -> Result<bool> {
    let mut g = lock();
    let Some(t) = g.as_mut() else {
        return Ok(false);
    };
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| Error::Io { path: p, source: e }
    };
    match staging_path(t, path, false)? {
        Some(tmp) => std::fs::write(&tmp, bytes).map_err(io(path))?,
        None => std::fs::write(path, bytes).map_err(io(path))?,
    }
    Ok(true)
}

/// Creates and returns the temporary directory standing for bundle directory `dir`, or None
/// when no transaction is open.
pub fn stage_dir(dir: &Path) -> Result<Option<PathBuf>> {
    let mut g = lock();
    let Some(t) = g.as_mut() else {
        return Ok(None);
    };
    let Some(tmp) = staging_path(t, dir, true)? else {
        return Err(bad(dir, "internal error: a bundle inside a bundle"));
    };
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| Error::Io { path: p, source: e }
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let seed = t
        .entries
        .iter()
        .find(|e| e.tmp.as_ref() == Some(&tmp))
        .and_then(|e| e.decl.seed.clone());
    if let Some(from) = seed {
        copy_tree(&from, &tmp)?;
    }
    Ok(Some(tmp))
}

/// Copies the regular files and directories under `from` into `to` (links are not
/// followed: a run directory holds none of its own).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| Error::Io { path: p, source: e }
    };
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ty = entry.file_type().map_err(io(&src))?;
        if ty.is_dir() {
            std::fs::create_dir(&dst).map_err(io(&dst))?;
            copy_tree(&src, &dst)?;
        } else if ty.is_file() {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
    }
    Ok(())
}

/// Where the data of `path` is now: its temporary while staged, else `path` itself (for a
/// command that reads back what it wrote, e.g. export-onnx --time-batch).
pub fn current_path(path: &Path) -> PathBuf {
    let g = lock();
    let resolved = resolve(path);
    g.as_ref()
        .and_then(|t| {
            t.entries
                .iter()
                .find(|e| e.decl.path == path || resolved.as_ref() == Some(&e.target))
                .and_then(|e| e.tmp.clone())
        })
        .unwrap_or_else(|| path.to_path_buf())
}

/// Renames every staged output into place; closes the transaction.
pub fn commit() -> Result<()> {
    let Some(t) = lock().take() else {
        return Ok(());
    };
    // Check again what may have changed while the command ran.
    for e in &t.entries {
        if e.tmp.is_some() {
            if let Err(err) = check_target(&e.decl) {
                remove_temporaries(&t);
                return Err(err);
            }
        }
    }
    let mut seen = HashSet::new();
    for e in &t.entries {
        let Some(tmp) = &e.tmp else { continue };
        seen.insert(tmp.clone());
        let io = |err: std::io::Error| Error::Io {
            path: e.decl.path.clone(),
            source: err,
        };
        let r = match e.decl.kind {
            OutputKind::File => std::fs::rename(tmp, &e.target).map_err(io),
            OutputKind::BundleDir | OutputKind::RunDir => replace_dir(tmp, &e.target).map_err(io),
        };
        if let Err(err) = r {
            remove_temporaries(&t);
            return Err(err);
        }
    }
    Ok(())
}

/// Swaps a staged bundle directory in: the old bundle (checked in `begin`) is moved aside,
/// the new one renamed in, the old one removed; on failure the old one is put back.
fn replace_dir(tmp: &Path, target: &Path) -> std::io::Result<()> {
    if !target.exists() {
        return std::fs::rename(tmp, target);
    }
    let old = target.with_file_name(format!(
        "{}.old-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::rename(target, &old)?;
    if let Err(e) = std::fs::rename(tmp, target) {
        let _ = std::fs::rename(&old, target);
        return Err(e);
    }
    std::fs::remove_dir_all(&old)
}

fn remove_temporaries(t: &Transaction) {
    for e in &t.entries {
        if let Some(tmp) = &e.tmp {
            let _ = match e.decl.kind {
                OutputKind::File => std::fs::remove_file(tmp),
                OutputKind::BundleDir | OutputKind::RunDir => std::fs::remove_dir_all(tmp),
            };
        }
        for dir in e.created.iter().rev() {
            // Fails (and keeps it) if anything else appeared there meanwhile.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Removes every temporary and closes the transaction (on error; also from the panic hook,
/// where the lock may be held by the panicking thread: then it gives up rather than wait).
pub fn rollback() {
    let mut g = match ACTIVE.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if let Some(t) = g.take() {
        remove_temporaries(&t);
    }
}
