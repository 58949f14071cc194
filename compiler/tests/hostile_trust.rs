//! Hostile and careless input, families 5-7 of issue 12: tampered bundles on every backend,
//! silent nonsense, one-line messages naming the culprit; same contract as `hostile.rs`.

mod hostile_support;

use hostile_support::*;

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
