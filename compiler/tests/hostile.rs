//! Hostile and careless input, families 1-4 of issue 12 (outputs, all-or-nothing, sizes,
//! budgets): every case must end with exit code 2, exactly one line on stderr, no panic,
//! nothing written or changed on disk (the working directory is snapshotted before and
//! after), within seconds, under a memory cap (`ulimit -v`). Families 5-7 (bundles,
//! nonsense, one-line messages) are in `hostile_trust.rs`.

mod hostile_support;

use std::process::Command;

use hostile_support::*;

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
    // The second output cannot be written (its directory is a file): the first is not left
    // behind. (A missing directory is created: issue 21's one policy for `-o a/b`.)
    fails(
        &d,
        &with(&["--logdet-out", "x.npy/ld.npy"]),
        &[],
        &["--logdet-out", "not a directory"],
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
    // A block of dimension 0 with 2^60 probes fits any total but would loop for ever.
    let mut w = v.clone();
    w["probes"]["blocks"][0]["offset"] = serde_json::json!(0);
    w["probes"]["blocks"][0]["dim"] = serde_json::json!(0);
    w["probes"]["blocks"][0]["count"] = serde_json::json!(1u64 << 60);
    let err = iresnetc_runtime::tract::Manifest::parse(&w.to_string()).unwrap_err();
    assert!(err.contains("must be >= 1"), "{err}");
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
            "blocks = 2\nhidden = [8]",
            "blocks = 9000\nhidden = [8]\n[[stages]]\nblocks = 9000\nhidden = [8]",
            "blocks in all",
        ),
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
