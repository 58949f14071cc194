//! Hostile and careless input, round 2 (issue 21) on the command line: one output guard for
//! every command (family 2), run directories as transactions (3), budgets of training and
//! evaluation (5), and every number checked and blamed on its flag or field (6). Same
//! contract as `hostile.rs`.

mod hostile_support;

use std::path::Path;

use hostile_support::*;

/// A 2-D flow `train` can fit to a generated density in a few steps.
const FLOW2: &str = r#"
name = "toy2"
kind = "flow"
input = [2]
[[stages]]
blocks = 2
hidden = [8]
[logdet]
estimator = "series"
terms = 2
[train]
batch = 16
steps = 4
heldout = 64
"#;

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "toy2.toml",
        "--data",
        "moons",
        "-o",
        out,
        "--no-plots",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn family2_every_output_behind_one_guard() {
    let d = workspace("r2-outputs", false);
    std::os::unix::fs::symlink(d.join("x.npy"), d.join("link.json")).unwrap();
    std::fs::create_dir(d.join("dir")).unwrap();
    std::os::unix::fs::symlink(d.join("dir"), d.join("dirlink")).unwrap();
    write(&d, "toy2.toml", FLOW2);
    let bench = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec![
            "bench",
            "flow.toml",
            "--backends",
            "cpu",
            "--entries",
            "forward",
        ];
        v.extend_from_slice(extra);
        v
    };
    // bench: the model file, a symlink, the same file twice.
    fails(
        &d,
        &bench(&["--json-out", "flow.toml"]),
        &[],
        &["--json-out", "input"],
    );
    fails(
        &d,
        &bench(&["--profile", "flow.toml"]),
        &[],
        &["--profile", "input"],
    );
    fails(
        &d,
        &bench(&["--json-out", "link.json"]),
        &[],
        &["symbolic link"],
    );
    fails(
        &d,
        &bench(&["--profile", "o.json", "--json-out", "./o.json"]),
        &[],
        &["name the same file"],
    );
    // train -o through a symlink, onto a file, onto the model.
    fails(&d, &train_args("dirlink", &[]), &[], &["symbolic link"]);
    fails(&d, &train_args("toy2.toml", &[]), &[], &["toy2.toml"]);
    // Trailing slashes name directories, never plain files.
    for (args, flag) in [
        (
            vec![
                "run",
                "flow.toml",
                "--backend",
                "cpu",
                "--mode",
                "forward",
                "--input",
                "x.npy",
                "--output",
                "new.npy/",
            ],
            "--output",
        ),
        (
            vec!["random-input", "flow.toml", "-o", "r.npy/"],
            "--output",
        ),
        (
            vec!["export-onnx", "flow.toml", "-o", "f.onnx/"],
            "--output",
        ),
    ] {
        fails(&d, &args, &[], &[flag, "ends in '/'"]);
    }
    // Outputs onto the model file or an input.
    fails(
        &d,
        &["random-input", "flow.toml", "-o", "flow.toml"],
        &[],
        &["input"],
    );
    fails(
        &d,
        &["export-onnx", "flow.toml", "-o", "flow.toml"],
        &[],
        &["input"],
    );
    // A failing command with missing parent directories leaves none behind.
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
            "nope.npy",
            "--output",
            "deep/er/z.npy",
        ],
        &[],
        &["nope.npy"],
    );
    assert!(!d.join("deep").exists());
    // One policy for missing parents: created for a new output, by every command.
    ok(&d, &["random-input", "flow.toml", "-o", "a/b/r.npy"]);
    assert!(d.join("a/b/r.npy").is_file());
    ok(&d, &["compile", "flow.toml", "-o", "c/d/bundle"]);
    assert!(d.join("c/d/bundle/plan.json").is_file());
    ok(&d, &["export-onnx", "flow.toml", "-o", "e/f/g.onnx"]);
    assert!(d.join("e/f/g.onnx").is_file() && d.join("e/f/g.json").is_file());
    ok(
        &d,
        &bench(&["--samples", "1", "--json-out", "h/i/rows.json"]),
    );
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("h/i/rows.json")).unwrap()).unwrap();
    assert!(!rows.as_array().unwrap().is_empty());
}

/// Rewrites the tensors of a checkpoint with `f` (name, dtype, shape, bytes), keeping its
/// metadata.
fn edit_checkpoint(
    path: &Path,
    f: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut t: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    f(&mut t);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = t
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let out = safetensors::tensor::serialize(views, meta.metadata().clone()).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn family3_a_run_directory_is_a_transaction() {
    let d = workspace("r2-runs", false);
    write(&d, "toy2.toml", FLOW2);
    // A run stopped after 2 of 4 steps: resumable.
    ok(&d, &train_args("run", &["--stop-after", "2"]));
    let ck = d.join("run/checkpoint.safetensors");
    let pristine = std::fs::read(&ck).unwrap();
    let resume = train_args("run", &["--resume", "run"]);
    // An absurd step, an inconsistent optimizer count, a missing optimizer tensor, another
    // model's name: refused before anything is written.
    let u64_tensor =
        |t: &mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>, name: &str, v: u64| {
            let e = t.iter_mut().find(|e| e.0 == name).unwrap();
            e.3 = v.to_le_bytes().to_vec();
        };
    edit_checkpoint(&ck, |t| {
        u64_tensor(t, "meta.step", 1 << 60);
        u64_tensor(t, "meta.optimizer_steps", 1 << 60);
    });
    fails(&d, &resume, &[], &["checkpoint.safetensors", "meta.step"]);
    std::fs::write(&ck, &pristine).unwrap();
    edit_checkpoint(&ck, |t| u64_tensor(t, "meta.optimizer_steps", 7));
    fails(&d, &resume, &[], &["meta.optimizer_steps"]);
    std::fs::write(&ck, &pristine).unwrap();
    edit_checkpoint(&ck, |t| {
        let i = t.iter().position(|e| e.0.starts_with("opt.v.")).unwrap();
        t.remove(i);
    });
    fails(&d, &resume, &[], &["opt.v.", "missing"]);
    std::fs::write(&ck, &pristine).unwrap();
    edit_checkpoint(&ck, |t| {
        let e = t.iter_mut().find(|e| e.0 == "meta.model").unwrap();
        e.3 = b"toy3".to_vec();
        e.2 = vec![4];
    });
    fails(&d, &resume, &[], &["meta.model", "toy3"]);
    std::fs::write(&ck, &pristine).unwrap();
    // Another model's run (same name, other widths): its tensors do not fit.
    write(
        &d,
        "wide.toml",
        &FLOW2.replace("hidden = [8]", "hidden = [6]"),
    );
    let mut other = train_args("run2", &["--stop-after", "1"]);
    other[1] = "wide.toml";
    ok(&d, &other);
    fails(
        &d,
        &train_args("run3", &["--resume", "run2"]),
        &[],
        &["checkpoint.safetensors"],
    );
    assert!(!d.join("run3").exists());
    std::fs::remove_dir_all(d.join("run2")).unwrap();
    // A resume that fails later (the loss diverges): the run is left exactly as it was.
    fails(
        &d,
        &train_args("run", &["--resume", "run", "--lr", "1e30", "--steps", "50"]),
        &[],
        &["loss"],
    );
    // A new run that fails leaves no directory behind.
    fails(
        &d,
        &train_args("fresh", &["--lr", "1e30", "--steps", "50"]),
        &[],
        &["loss"],
    );
    assert!(!d.join("fresh").exists());
    // The pristine run resumes and finishes, in place.
    ok(&d, &resume);
    assert!(d.join("run/final.safetensors").is_file());
    let lines = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
}

#[test]
fn family5_budgets_of_training_and_evaluation() {
    let d = workspace("r2-budgets", false);
    write(&d, "toy2.toml", FLOW2);
    npy(&d, "pts.npy", &[vec![0.1, 0.2], vec![0.3, -0.1]], &[2]);
    for (extra, needles) in [
        (vec!["--epochs", "inf"], vec!["--epochs"]),
        (vec!["--epochs", "1e30"], vec!["--epochs"]),
        (vec!["--epochs", "NaN"], vec!["--epochs"]),
        (vec!["--batch", "1000000000000"], vec!["--batch"]),
        (vec!["--steps", "1000000000000"], vec!["--steps"]),
    ] {
        fails(&d, &train_args("r", &extra), &[], &needles);
    }
    for (field, value) in [
        ("power_iters", "1000000000"),
        ("heldout", "1000000000000"),
        ("batch", "70000"),
        ("steps", "1000000000000"),
    ] {
        write(
            &d,
            "b.toml",
            &FLOW2
                .replace("[train]\n", &format!("[train]\n{field} = {value}\n"))
                .replace(&format!("{field} = 16\n"), "")
                .replace(&format!("{field} = 4\n"), "")
                .replace(&format!("{field} = 64\n"), ""),
        );
        let mut a = train_args("r", &[]);
        a[1] = "b.toml";
        fails(&d, &a, &[], &[&format!("train.{field}")]);
    }
    // A batch the memory budget cannot hold, named as the flag.
    fails(
        &d,
        &train_args("r", &["--batch", "60000"]),
        &[("IRESNETC_MEMORY_LIMIT", "64M")],
        &["--batch", "memory"],
    );
    fails(
        &d,
        &[
            "eval",
            "toy2.toml",
            "--data",
            "moons",
            "--num",
            "1000000000000",
        ],
        &[],
        &["--num"],
    );
    fails(
        &d,
        &["eval", "toy2.toml", "--data", "moons", "--num", "0"],
        &[],
        &["--num"],
    );
    assert!(!d.join("r").exists());
}

#[test]
fn family6_every_number_checked_and_named() {
    let d = workspace("r2-numbers", false);
    write(&d, "toy2.toml", FLOW2);
    // Negative values are the flag's bad value, not an unknown argument.
    for (flag, value) in [
        ("--steps", "-1"),
        ("--batch", "-5"),
        ("--threads", "-2"),
        ("--seed", "-1"),
    ] {
        let e = fails(&d, &train_args("r", &[flag, value]), &[], &[flag, value]);
        assert!(!e.contains("unexpected argument"), "{e}");
    }
    fails(
        &d,
        &["random-input", "flow.toml", "--num", "-3", "-o", "r.npy"],
        &[],
        &["--num", "-3"],
    );
    // Zero where at least one is needed.
    fails(&d, &train_args("r", &["--steps", "0"]), &[], &["--steps"]);
    fails(
        &d,
        &train_args("r", &["--threads", "0"]),
        &[],
        &["--threads"],
    );
    fails(
        &d,
        &["eval", "toy2.toml", "--data", "moons", "--threads", "0"],
        &[],
        &["--threads"],
    );
    // TOML type errors name the field.
    for (from, to, field) in [
        ("blocks = 2", "blocks = \"two\"", "stages[0].blocks"),
        ("steps = 4", "steps = 4\nwarmup = -5", "train.warmup"),
        ("terms = 2", "terms = 2.5", "logdet.terms"),
        ("batch = 16", "batch = [16]", "train.batch"),
    ] {
        write(&d, "t.toml", &FLOW2.replace(from, to));
        fails(&d, &["inspect", "t.toml"], &[], &["t.toml", field]);
    }
    // An impossible pad is the model field's fault, not the data's.
    write(
        &d,
        "img.toml",
        r#"
name = "img"
kind = "flow"
input = [1, 8, 8]
[[stages]]
blocks = 1
width = 4
[train]
pad = 1000000000
"#,
    );
    npy(&d, "imgs.npy", &[vec![0.5; 64]], &[1, 8, 8]);
    fails(
        &d,
        &["train", "img.toml", "--data", "imgs.npy", "-o", "r"],
        &[],
        &["img.toml", "train.pad"],
    );
    assert!(!d.join("r").exists());
}
