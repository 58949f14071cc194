//! Hostile and careless input, one test per family of issue 12: every case must end with
//! exit code 2, exactly one line on stderr, no panic, nothing written or changed on disk
//! (the working directory is snapshotted before and after), within seconds, under a memory
//! cap (`ulimit -v`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Address-space cap of every run (KiB): tract and the binary map far less than this.
const MEMORY_CAP_KIB: u64 = 4 << 20;
const TIME_LIMIT: Duration = Duration::from_secs(20);

const FLOW: &str = r#"
name = "tiny-flow"
kind = "flow"
input = [4]
[[stages]]
blocks = 2
hidden = [8]
[logdet]
estimator = "series"
terms = 3
"#;

const CLASSIFIER: &str = r#"
name = "tiny-cls"
kind = "classifier"
input = [1, 4, 4]
[[stages]]
blocks = 1
width = 4
[head]
classes = 3
"#;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_iresnetc")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("iresnetc-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every file under `dir` (relative path -> bytes; directories as empty markers).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.insert(rel, None);
                stack.push(p);
            } else if meta.is_file() {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            } else {
                out.insert(
                    rel,
                    Some(
                        std::fs::read_link(&p)
                            .unwrap_or_default()
                            .into_os_string()
                            .into_encoded_bytes(),
                    ),
                );
            }
        }
    }
    out
}

/// Runs `iresnetc ARGS` in `dir` under the memory cap; asserts the failure contract and that
/// stderr names every needle. Returns stderr.
fn fails(dir: &Path, args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let before = snapshot(dir);
    let start = Instant::now();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -v {MEMORY_CAP_KIB}; exec \"$0\" \"$@\""))
        .arg(bin())
        .args(args)
        .current_dir(dir)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .env_remove("IRESNETC_THREADS")
        .env_remove("IRESNETC_MEMORY_LIMIT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let ctx = format!("args {args:?} env {env:?}: stderr {err:?}");
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line: {ctx}");
    assert!(
        err.len() < 1000,
        "message too long ({} bytes): {ctx}",
        err.len()
    );
    assert!(!err.contains("panicked"), "{ctx}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing: {ctx}");
    }
    assert!(took < TIME_LIMIT, "took {took:?}: {ctx}");
    let after = snapshot(dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files changed: {ctx}"
    );
    assert!(before == after, "file contents changed: {ctx}");
    err
}

/// Runs and expects success; returns stderr.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "args {args:?}: {err}");
    err
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn npy(dir: &Path, name: &str, rows: &[Vec<f64>], per_sample: &[usize]) {
    iresnetc::npy::write(&dir.join(name), rows, per_sample, false).unwrap();
}

/// A directory with the two tiny models, a valid input for each, and a compiled flow bundle.
fn workspace(name: &str, bundle: bool) -> PathBuf {
    let d = tmpdir(name);
    write(&d, "flow.toml", FLOW);
    write(&d, "cls.toml", CLASSIFIER);
    npy(
        &d,
        "x.npy",
        &[vec![0.1, -0.2, 0.3, 0.4], vec![1.0, 0.5, -0.5, 0.0]],
        &[4],
    );
    npy(&d, "img.npy", &[vec![0.25; 16]], &[1, 4, 4]);
    if bundle {
        ok(&d, &["compile", "flow.toml", "-o", "bundle"]);
    }
    d
}

#[test]
fn family1_never_overwrites_what_was_not_asked() {
    let d = workspace("overwrite", false);
    write(&d, "notes.txt", "precious");
    std::fs::create_dir(d.join("home")).unwrap();
    write(&d.join("home"), "diary.txt", "precious too");
    // An existing directory that is not a bundle, `.` and its parent.
    fails(
        &d,
        &["compile", "flow.toml", "-o", "home"],
        &[],
        &["home", "not an iresnetc bundle"],
    );
    fails(
        &d,
        &["compile", "flow.toml", "-o", "."],
        &[],
        &["not an iresnetc bundle"],
    );
    fails(
        &d.join("home"),
        &["compile", "../flow.toml", "-o", ".."],
        &[],
        &["not an iresnetc bundle"],
    );
    // A regular file as the bundle directory: refused, no `*.tmp-PID` left.
    fails(
        &d,
        &["compile", "flow.toml", "-o", "notes.txt"],
        &[],
        &["notes.txt", "not a directory"],
    );
    // Names are names, not paths.
    for name in [
        "../victim",
        "/tmp/victim",
        "..",
        ".",
        "a/b",
        "x\\y",
        "",
        "tab\tname",
    ] {
        let text = FLOW.replace("name = \"tiny-flow\"", &format!("name = {name:?}"));
        write(&d, "evil.toml", &text);
        fails(&d, &["compile", "evil.toml"], &[], &["evil.toml", "`name`"]);
        std::fs::remove_file(d.join("evil.toml")).unwrap();
    }
    // --output equal to --input or --logdet-out, also through a symlink or a hard link.
    let run = [
        "run",
        "flow.toml",
        "--backend",
        "cpu",
        "--mode",
        "forward",
        "--input",
        "x.npy",
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        run.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails(
        &d,
        &with(&["--output", "x.npy"]),
        &[],
        &["--output", "x.npy"],
    );
    fails(&d, &with(&["--output", "./x.npy"]), &[], &["x.npy"]);
    fails(
        &d,
        &with(&["--output", "z.npy", "--logdet-out", "z.npy"]),
        &[],
        &["--logdet-out"],
    );
    fails(&d, &with(&["--output", "flow.toml"]), &[], &["flow.toml"]);
    std::os::unix::fs::symlink("x.npy", d.join("link.npy")).unwrap();
    fails(&d, &with(&["--output", "link.npy"]), &[], &["link.npy"]);
    // A symlink to a file elsewhere is not written through (the victim keeps its bytes).
    let victim_dir = tmpdir("victim");
    let victim = write(&victim_dir, "victim.txt", "precious");
    std::os::unix::fs::symlink(&victim, d.join("out-link.npy")).unwrap();
    fails(
        &d,
        &with(&["--output", "out-link.npy"]),
        &[],
        &["symbolic link"],
    );
    std::os::unix::fs::symlink(&victim_dir, d.join("dir-link")).unwrap();
    fails(
        &d,
        &["compile", "flow.toml", "-o", "dir-link"],
        &[],
        &["symbolic link"],
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 1);
    std::fs::hard_link(d.join("x.npy"), d.join("hard.npy")).unwrap();
    fails(&d, &with(&["--output", "hard.npy"]), &[], &["hard.npy"]);
    // A file of an input bundle is not an output.
    ok(&d, &["compile", "flow.toml", "-o", "b0"]);
    fails(
        &d,
        &["export-onnx", "b0", "-o", "b0/forward.onnx"],
        &[],
        &["b0"],
    );
    fails(
        &d,
        &[
            "run",
            "b0",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "x.npy",
            "--output",
            "b0/weights.safetensors",
        ],
        &[],
        &["would overwrite"],
    );
    // export-onnx: the manifest sibling of `x.json` is `x.json` itself.
    fails(
        &d,
        &["export-onnx", "flow.toml", "-o", "m.json"],
        &[],
        &["same file"],
    );
    // Not a regular file, or a directory, as an output.
    fails(&d, &with(&["--output", "home"]), &[], &["is a directory"]);
    fails(
        &d,
        &with(&["--output", "/dev/null"]),
        &[],
        &["not a regular file"],
    );
    // wgpu's sample mode no longer writes OUTPUT.png unasked; --png is refused off-mode.
    fails(
        &d,
        &with(&["--output", "z.npy", "--png", "z.png"]),
        &[],
        &["--png"],
    );
    // An existing bundle is still replaced (atomically), and the PNG only when asked.
    ok(&d, &["compile", "flow.toml", "-o", "b1"]);
    ok(&d, &["compile", "flow.toml", "-o", "b1"]);
    assert!(d.join("b1/plan.json").is_file());
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn family2_all_or_nothing() {
    let d = workspace("atomic", false);
    std::fs::create_dir(d.join("out")).unwrap();
    let run = [
        "run",
        "flow.toml",
        "--backend",
        "cpu",
        "--mode",
        "forward",
        "--input",
        "x.npy",
        "--output",
        "out/z.npy",
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        run.iter().copied().chain(extra.iter().copied()).collect()
    };
    // The second output cannot be written: the first is not left behind.
    fails(
        &d,
        &with(&["--logdet-out", "missing/ld.npy"]),
        &[],
        &["--logdet-out", "does not exist"],
    );
    fails(
        &d,
        &with(&["--logdet-out", "out"]),
        &[],
        &["is a directory"],
    );
    // Bad option values are found before anything is written.
    fails(
        &d,
        &with(&["--mode", "sample", "--num", "0"]),
        &[],
        &["--mode"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "sample",
            "--num",
            "0",
            "--output",
            "out/s.npy",
        ],
        &[],
        &["--num 0"],
    );
    fails(
        &d,
        &[
            "export-onnx",
            "flow.toml",
            "-o",
            "out/m.onnx",
            "--inverse-steps",
            "0",
        ],
        &[],
        &["--inverse-steps 0"],
    );
    fails(
        &d,
        &[
            "export-onnx",
            "flow.toml",
            "-o",
            "out/m.onnx",
            "--time-batch",
            "0",
        ],
        &[],
        &["--time-batch"],
    );
    fails(
        &d,
        &[
            "export-onnx",
            "cls.toml",
            "-o",
            "out/m.onnx",
            "--inverse-steps",
            "3",
        ],
        &[],
        &["needs a flow"],
    );
    fails(
        &d,
        &["random-input", "flow.toml", "--num", "0", "-o", "out/r.npy"],
        &[],
        &["--num 0"],
    );
    // A failure after the work (bad input shape) leaves nothing either.
    npy(&d, "wrong.npy", &[vec![0.0; 3]], &[3]);
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "wrong.npy",
            "--output",
            "out/z.npy",
            "--logdet-out",
            "out/ld.npy",
        ],
        &[],
        &["wrong.npy", "shape"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "tract",
            "--mode",
            "forward",
            "--input",
            "wrong.npy",
            "--output",
            "out/z.npy",
        ],
        &[],
        &["wrong.npy"],
    );
    // And a success writes both.
    ok(&d, &with(&["--logdet-out", "out/ld.npy"]));
    assert!(d.join("out/z.npy").is_file() && d.join("out/ld.npy").is_file());
}

#[test]
fn family3_no_panic_on_sizes() {
    let d = workspace("sizes", true);
    for input in [
        "[18446744073709551615]",
        "[4, 4294967296, 4294967296]",
        "[65536, 65536, 65536]",
        "[0]",
        "[-1]",
    ] {
        let text = FLOW.replace("input = [4]", &format!("input = {input}"));
        write(&d, "big.toml", &text);
        fails(&d, &["inspect", "big.toml"], &[], &["big.toml"]);
        fails(
            &d,
            &["random-input", "big.toml", "-o", "r.npy"],
            &[],
            &["big.toml"],
        );
        std::fs::remove_file(d.join("big.toml")).unwrap();
    }
    for threads in ["1000000000", "0", "abc", "-3", ""] {
        fails(
            &d,
            &[
                "run",
                "flow.toml",
                "--backend",
                "tract",
                "--mode",
                "forward",
                "--input",
                "x.npy",
                "--output",
                "z.npy",
            ],
            &[("IRESNETC_THREADS", threads)],
            &["IRESNETC_THREADS"],
        );
    }
    // A tampered manifest offset must be an error, not a slice out of range; the tampered
    // file is also caught by its hash, so check the parser itself too.
    let man = std::fs::read_to_string(d.join("bundle/onnx.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&man).unwrap();
    v["probes"]["blocks"][0]["offset"] = serde_json::json!(1u64 << 40);
    let err = iresnetc_runtime::tract::Manifest::parse(&v.to_string()).unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
    std::fs::write(d.join("bundle/onnx.json"), v.to_string()).unwrap();
    fails(
        &d,
        &[
            "run",
            "bundle",
            "--backend",
            "tract",
            "--mode",
            "forward",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
        ],
        &[],
        &["onnx.json"],
    );
}

#[test]
fn family4_budget_not_abort_or_hang() {
    let d = workspace("budget", false);
    let cases: &[(&str, &str, &str)] = &[
        (
            "blocks = 2\nhidden = [8]",
            "blocks = 9000\nhidden = [60000, 60000]",
            "stages[0]",
        ),
        ("hidden = [8]", "hidden = [1000000000]", "stages[0].hidden"),
        ("terms = 3", "terms = 1000000000", "logdet.terms"),
        ("terms = 3", "terms = 3\nprobes = 100000", "logdet.probes"),
        (
            "[logdet]",
            "[inverse]\ntol = 1e-300\nmax_iters = 1000000000000\n[logdet]",
            "inverse.tol",
        ),
        (
            "[logdet]",
            "[inverse]\nmax_iters = 1000000000000\n[logdet]",
            "inverse.max_iters",
        ),
        (
            "[logdet]",
            "[lipschitz]\npower_max_iters = 1000000000\n[logdet]",
            "lipschitz.power_max_iters",
        ),
        ("blocks = 2", "blocks = 100000000", "stages[0].blocks"),
        (
            "terms = 3",
            "terms = 3\nroulette_param = 1e-300",
            "logdet.roulette_param",
        ),
    ];
    for (from, to, field) in cases {
        write(&d, "m.toml", &FLOW.replace(from, to));
        fails(&d, &["inspect", "m.toml"], &[], &["m.toml", field]);
    }
    std::fs::remove_file(d.join("m.toml")).unwrap();
    // A model the budget cannot hold names the bytes.
    fails(
        &d,
        &["inspect", "flow.toml"],
        &[("IRESNETC_MEMORY_LIMIT", "1K")],
        &["bytes", "IRESNETC_MEMORY_LIMIT"],
    );
    fails(
        &d,
        &["inspect", "flow.toml"],
        &[("IRESNETC_MEMORY_LIMIT", "lots")],
        &["IRESNETC_MEMORY_LIMIT"],
    );
    // Counts from the command line.
    fails(
        &d,
        &[
            "random-input",
            "flow.toml",
            "--num",
            "100000000000",
            "-o",
            "r.npy",
        ],
        &[],
        &["--num"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "sample",
            "--num",
            "100000000000",
            "--output",
            "s.npy",
        ],
        &[],
        &["--num"],
    );
    // The exact estimator on a large flow is refused up front.
    let big = "name = \"wide\"\nkind = \"flow\"\ninput = [3, 32, 32]\n[[stages]]\nblocks = 8\nwidth = 4\n";
    write(&d, "wide.toml", big);
    npy(&d, "wx.npy", &[vec![0.0; 3072]], &[3, 32, 32]);
    fails(
        &d,
        &[
            "run",
            "wide.toml",
            "--backend",
            "cpu",
            "--mode",
            "logdet",
            "--estimator",
            "exact",
            "--input",
            "wx.npy",
            "--output",
            "ld.npy",
        ],
        &[],
        &["exact", "IRESNETC_EXACT_MAX_VJPS"],
    );
    // Files that never end, or are not files.
    fails(
        &d,
        &["inspect", "/dev/zero"],
        &[],
        &["/dev/zero", "not a regular file"],
    );
    fails(
        &d,
        &["inspect", "flow.toml", "--weights", "/dev/zero"],
        &[],
        &["/dev/zero"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "/dev/zero",
            "--output",
            "z.npy",
        ],
        &[],
        &["/dev/zero"],
    );
    fails(&d, &["inspect", "."], &[], &["directory"]);
    // A FIFO would block the open until a writer appears: refused from its metadata.
    assert!(Command::new("mkfifo")
        .arg(d.join("pipe.npy"))
        .status()
        .unwrap()
        .success());
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "pipe.npy",
            "--output",
            "z.npy",
        ],
        &[],
        &["pipe.npy", "not a regular file"],
    );
    fails(
        &d,
        &["inspect", "pipe.npy"],
        &[],
        &["pipe.npy", "not a regular file"],
    );
    // An exported inverse unrolled far beyond what tract can load.
    write(&d, "many.toml", &FLOW.replace("blocks = 2", "blocks = 50"));
    fails(
        &d,
        &[
            "export-onnx",
            "many.toml",
            "-o",
            "m.onnx",
            "--inverse-steps",
            "9999",
        ],
        &[],
        &["--inverse-steps", "unrolled"],
    );
}

/// Rewrites the bundle's weights with `f` applied to every value (keeping the F32 layout).
fn tamper_weights(bundle: &Path, f: impl Fn(&str, f32) -> f32) {
    let path = bundle.join("weights.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .flat_map(|c| f(&n, f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect();
            (n, v.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn family5_bundles_are_verified() {
    let d = workspace("trust", true);
    let pristine = snapshot(&d.join("bundle"));
    let restore = || {
        for (rel, bytes) in &pristine {
            if let Some(b) = bytes {
                std::fs::write(d.join("bundle").join(rel), b).unwrap();
            }
        }
    };
    let modes: &[&[&str]] = &[
        &[
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
        ],
        &[
            "--backend",
            "tract",
            "--mode",
            "forward",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
        ],
        &[
            "--backend",
            "wgpu",
            "--mode",
            "inverse",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
        ],
        &[
            "--backend",
            "tract",
            "--mode",
            "sample",
            "--output",
            "z.npy",
        ],
    ];
    let all = |needles: &[&str]| {
        for m in modes {
            let args: Vec<&str> = ["run", "bundle"]
                .iter()
                .copied()
                .chain(m.iter().copied())
                .collect();
            fails(&d, &args, &[], needles);
        }
        fails(&d, &["inspect", "bundle/model.toml"], &[], needles);
    };
    // Scaled by 50: no longer contractive; the hash no longer matches.
    tamper_weights(&d.join("bundle"), |_, v| v * 50.0);
    all(&["weights.safetensors", "SHA-256"]);
    restore();
    tamper_weights(&d.join("bundle"), |n, v| {
        if n.ends_with("weight") {
            f32::NAN
        } else {
            v
        }
    });
    all(&["weights.safetensors"]);
    restore();
    // model.toml contradicting plan.json.
    let toml = std::fs::read_to_string(d.join("bundle/model.toml")).unwrap();
    std::fs::write(
        d.join("bundle/model.toml"),
        toml.replace("max_iters = 100", "max_iters = 1"),
    )
    .unwrap();
    all(&["model.toml"]);
    restore();
    // Hashes removed, or the version changed: refused on every backend.
    let plan = std::fs::read_to_string(d.join("bundle/plan.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    v.as_object_mut().unwrap().remove("integrity");
    std::fs::write(d.join("bundle/plan.json"), v.to_string()).unwrap();
    all(&["plan.json", "integrity"]);
    let mut v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    v["version"] = serde_json::json!(7);
    std::fs::write(d.join("bundle/plan.json"), v.to_string()).unwrap();
    all(&["version 7"]);
    // A plan asking for 65535 x 65535 workgroups or a repeat of 4e9.
    let mut v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let eps = v["entry_points"].as_object_mut().unwrap();
    let first = eps.values_mut().next().unwrap();
    first["steps"] =
        serde_json::json!([{"repeat": {"times": 4000000000u64, "steps": first["steps"].clone()}}]);
    std::fs::write(d.join("bundle/plan.json"), v.to_string()).unwrap();
    all(&["plan.json"]);
    let mut v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let eps = v["entry_points"].as_object_mut().unwrap();
    let steps = eps.values_mut().next().unwrap()["steps"]
        .as_array_mut()
        .unwrap();
    let dispatch = steps
        .iter_mut()
        .find(|s| s.get("dispatch").is_some())
        .unwrap();
    dispatch["dispatch"]["workgroups"] = serde_json::json!([65535, 65535, 1]);
    std::fs::write(d.join("bundle/plan.json"), v.to_string()).unwrap();
    all(&["plan.json", "workgroups"]);
    restore();
    // The pristine bundle still runs.
    ok(
        &d,
        &[
            "run",
            "bundle",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
        ],
    );
}

#[test]
fn family6_no_silent_nonsense() {
    let d = workspace("nonsense", false);
    npy(&d, "huge.npy", &[vec![1e300, 0.0, 0.0, 0.0]], &[4]);
    let run = |input: &'static str| -> Vec<&'static str> {
        vec![
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            input,
            "--output",
            "z.npy",
        ]
    };
    fails(&d, &run("huge.npy"), &[], &["huge.npy", "f32 range"]);
    // Log-det of a classifier, classify of a flow, sample of a classifier.
    fails(
        &d,
        &[
            "run",
            "cls.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "img.npy",
            "--output",
            "z.npy",
            "--logdet-out",
            "ld.npy",
        ],
        &[],
        &["classifier has no log-det"],
    );
    fails(
        &d,
        &[
            "run",
            "cls.toml",
            "--backend",
            "cpu",
            "--mode",
            "logdet",
            "--input",
            "img.npy",
            "--output",
            "z.npy",
        ],
        &[],
        &["needs a flow"],
    );
    fails(
        &d,
        &[
            "run",
            "cls.toml",
            "--backend",
            "cpu",
            "--mode",
            "classify",
            "--input",
            "img.npy",
            "--output",
            "z.npy",
            "--estimator",
            "series",
        ],
        &[],
        &["--estimator"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "classify",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
        ],
        &[],
        &["needs a classifier"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "sample",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
        ],
        &[],
        &["reads no --input"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "inverse",
            "--output",
            "z.npy",
        ],
        &[],
        &["needs --input"],
    );
    // bench typos.
    fails(
        &d,
        &["bench", "flow.toml", "--backends", "foo"],
        &[],
        &["--backends", "foo"],
    );
    fails(
        &d,
        &["bench", "flow.toml", "--entries", "nosuch"],
        &[],
        &["--entries", "nosuch"],
    );
    fails(
        &d,
        &["bench", "flow.toml", "--batch", "0"],
        &[],
        &["--batch"],
    );
    fails(
        &d,
        &["bench", "flow.toml", "--samples", "0"],
        &[],
        &["--samples"],
    );
    fails(
        &d,
        &run("x.npy"),
        &[("IRESNETC_THREADS", "abc")],
        &["IRESNETC_THREADS"],
    );
    // Weights whose prior scale overflows: refused naming file and tensor.
    ok(&d, &["compile", "flow.toml", "-o", "b"]);
    tamper_weights(
        &d.join("b"),
        |n, v| if n == "prior.log_std" { 1e30 } else { v },
    );
    std::fs::rename(d.join("b/weights.safetensors"), d.join("w.safetensors")).unwrap();
    std::fs::remove_dir_all(d.join("b")).unwrap();
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "x.npy",
            "--output",
            "z.npy",
            "--weights",
            "w.safetensors",
        ],
        &[],
        &["w.safetensors", "prior.log_std"],
    );
}

#[test]
fn family7_one_line_naming_the_culprit() {
    let d = workspace("oneline", false);
    // clap usage errors.
    fails(
        &d,
        &["run", "flow.toml", "--frobnicate"],
        &[],
        &["--frobnicate", "--help"],
    );
    fails(
        &d,
        &["run", "flow.toml", "--output", "z.npy"],
        &[],
        &["--mode"],
    );
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--mode",
            "nonsense",
            "--output",
            "z.npy",
        ],
        &[],
        &["nonsense"],
    );
    fails(
        &d,
        &["random-input", "flow.toml", "--num", "-4", "-o", "r.npy"],
        &[],
        &["-4"],
    );
    fails(&d, &["no-such-command"], &[], &["no-such-command"]);
    fails(&d, &[], &[], &["--help"]);
    // npy header garbage.
    std::fs::write(
        d.join("bad.npy"),
        b"\x93NUMPY\x01\x00\x10\x00{'descr': <f8', 'fortran_order':\n\n\n\n}",
    )
    .unwrap();
    fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "bad.npy",
            "--output",
            "z.npy",
        ],
        &[],
        &["bad.npy"],
    );
    // A long line in a model file is not echoed back; a file beyond the size a model file can
    // be is refused before parsing.
    let long = format!(
        "name = \"tiny\"\nkind = \"flow\"\ninput = [4]\nbogus = \"{}\"\n",
        "x".repeat(500_000)
    );
    write(&d, "long.toml", &long);
    fails(&d, &["inspect", "long.toml"], &[], &["long.toml", "line 4"]);
    write(&d, "huge.toml", &"#".repeat(10_000_000));
    fails(&d, &["inspect", "huge.toml"], &[], &["huge.toml", "bytes"]);
    let long = format!(
        "name = \"{}\"\nkind = \"flow\"\ninput = [4]\n[[stages]]\nblocks = 1\nhidden = [4]\n",
        "y".repeat(100_000)
    );
    write(&d, "long2.toml", &long);
    fails(&d, &["inspect", "long2.toml"], &[], &["long2.toml", "name"]);
    // I/O errors state their cause once.
    let err = fails(&d, &["inspect", "missing.toml"], &[], &["missing.toml"]);
    assert_eq!(err.matches("o such file").count(), 1, "{err}");
    let err = fails(
        &d,
        &[
            "run",
            "flow.toml",
            "--backend",
            "cpu",
            "--mode",
            "forward",
            "--input",
            "nope.npy",
            "--output",
            "z.npy",
        ],
        &[],
        &["nope.npy"],
    );
    assert_eq!(err.matches("o such file").count(), 1, "{err}");
}
