//! The Python tools' own test suites (examples/pytorch), run under `cargo test` so
//! that CI runs them: one test per unittest module, each `python3 -m unittest -v
//! MODULE` from examples/pytorch, which must exit 0. They need numpy only (no torch:
//! the checkpoints they read are written by `torchsave_testing.py`). A machine
//! without python3 or numpy fails here with the command that installs it, rather
//! than skipping: `.ci/run` installs numpy before the cargo command.
//!
//! `IRESNETC_PYTHON` names another interpreter (default `python3`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pytorch")
}

fn python() -> String {
    std::env::var("IRESNETC_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn require_numpy(py: &str) {
    let probe = Command::new(py)
        .args(["-c", "import numpy"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{py}` ({e}): the Python tools' tests need Python >= 3.10 with numpy; \
                 install python3 (e.g. `apt-get install -y python3 python3-pip`), or set IRESNETC_PYTHON"
            )
        });
    assert!(
        probe.status.success(),
        "`{py} -c 'import numpy'` failed: the Python tools' tests need numpy; \
         install it with `{py} -m pip install numpy`\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

fn run_module(module: &str) {
    let py = python();
    require_numpy(&py);
    let out = Command::new(&py)
        .args(["-m", "unittest", "-v", module])
        .current_dir(tools_dir())
        // No stale bytecode next to the sources, and no user site-packages shadowing numpy.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{py} -m unittest {module}`: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`{py} -m unittest -v {module}` (in examples/pytorch) failed with {}:\n{text}",
        out.status
    );
    // A module that ran no test at all (renamed away, or an import that hides them) is a failure too.
    assert!(
        text.contains("\nOK") && !text.contains("Ran 0 tests"),
        "`{py} -m unittest -v {module}` ran no tests:\n{text}"
    );
}

/// Every unittest module of examples/pytorch, each run by one test below.
const MODULES: [&str; 4] = [
    "test_torchfile",
    "test_safeio",
    "test_convert_official",
    "test_resflows_ref",
];

#[test]
fn python_torchfile() {
    run_module("test_torchfile");
}

#[test]
fn python_safeio() {
    run_module("test_safeio");
}

#[test]
fn python_convert_official() {
    run_module("test_convert_official");
}

#[test]
fn python_resflows_ref() {
    run_module("test_resflows_ref");
}

/// A new test module is run too: it must be listed (and given its test) above.
#[test]
fn python_every_test_module_is_run() {
    let mut found: Vec<String> = std::fs::read_dir(tools_dir())
        .expect("examples/pytorch")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("test_") && n.ends_with(".py"))
        .map(|n| n.trim_end_matches(".py").to_string())
        .collect();
    found.sort();
    let mut listed: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "examples/pytorch test modules vs the ones python_tools.rs runs"
    );
}

/// The loaders never use an unrestricted unpickler: no `pickle.load(s)` call and no
/// `weights_only=False` anywhere in the Python tools (torchfile.py calls the
/// restricted unpickler's `.load()` method instead).
#[test]
fn python_tools_never_unpickle_unrestricted() {
    let mut offenders = Vec::new();
    for entry in std::fs::read_dir(tools_dir()).expect("examples/pytorch") {
        let path = entry.expect("directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("py") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("python source");
        let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        for bad in ["pickle.load(", "pickle.loads(", "weights_only=False"] {
            if squeezed.contains(bad) {
                offenders.push(format!("{}: {bad}", path.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "unrestricted unpickling: {offenders:?}"
    );
}
