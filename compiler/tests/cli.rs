//! The `iresnetc` binary as a user runs it: round trips through `.npy` files,
//! and bad input of every kind giving a one-line error, exit code 2, no panic
//! and no output file.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iresnetc"))
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("iresnetc-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read(path: &Path, per_sample: &[usize]) -> Vec<Vec<f64>> {
    iresnetc::npy::read_batch(path, "x", per_sample)
        .unwrap()
        .samples
}

/// Runs and expects failure: exit code 2, a single-line message containing every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: stderr {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "args {args:?}: `{n}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn toy2d_forward_then_inverse_round_trips() {
    let d = tmpdir("toy");
    let x: Vec<Vec<f64>> = (0..8)
        .map(|i| vec![(i as f64 * 0.37).sin() * 2.0, (i as f64 * 0.91).cos()])
        .collect();
    let xin = d.join("x.npy");
    iresnetc::npy::write(&xin, &x, &[2], true).unwrap();
    let toy = models().join("toy2d.toml");
    let (z, ld, back) = (d.join("z.npy"), d.join("ld.npy"), d.join("back.npy"));
    let st = bin()
        .args([
            "run",
            toy.to_str().unwrap(),
            "--backend",
            "cpu",
            "--mode",
            "forward",
        ])
        .args([
            "--input",
            xin.to_str().unwrap(),
            "--output",
            z.to_str().unwrap(),
        ])
        .args(["--logdet-out", ld.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let st = bin()
        .args([
            "run",
            toy.to_str().unwrap(),
            "--backend",
            "cpu",
            "--mode",
            "inverse",
        ])
        .args([
            "--input",
            z.to_str().unwrap(),
            "--output",
            back.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    // The f32 input was widened to f64: compare against exactly those values.
    let x32: Vec<Vec<f64>> = x
        .iter()
        .map(|r| r.iter().map(|&v| v as f32 as f64).collect())
        .collect();
    let back = read(&back, &[2]);
    let err = x32
        .iter()
        .flatten()
        .zip(back.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-6, "round trip error {err:e}");
    assert_eq!(read(&ld, &[]).len(), 8);
}

#[test]
fn bad_model_files() {
    let d = tmpdir("spec");
    let cases: &[(&str, &str, &[&str])] = &[
        ("malformed.toml", "name = \"x\"\nkind = flow\n", &["malformed.toml"]),
        (
            "unknown.toml",
            "name = \"x\"\nkind = \"flow\"\ninput = [2]\nbogus = 1\n[[stages]]\nblocks = 1\nhidden = [4]\n",
            &["unknown.toml", "bogus"],
        ),
        (
            "odd.toml",
            "name = \"x\"\nkind = \"flow\"\ninput = [3, 5, 6]\nsqueeze = true\n[[stages]]\nblocks = 1\nwidth = 4\n",
            &["odd.toml", "squeeze", "5x6"],
        ),
        (
            "factor.toml",
            "name = \"x\"\nkind = \"flow\"\ninput = [3, 4, 4]\n[[stages]]\nblocks = 1\nwidth = 4\nfactor_out = true\n[[stages]]\nblocks = 1\nwidth = 4\n",
            &["factor.toml", "stages[0].factor_out", "3 channels"],
        ),
        (
            "coeff.toml",
            "name = \"x\"\nkind = \"flow\"\ninput = [2]\n[lipschitz]\ncoeff = 1.0\n[[stages]]\nblocks = 1\nhidden = [4]\n",
            &["coeff.toml", "lipschitz.coeff"],
        ),
        (
            "negcoeff.toml",
            "name = \"x\"\nkind = \"flow\"\ninput = [2]\n[lipschitz]\ncoeff = -0.5\n[[stages]]\nblocks = 1\nhidden = [4]\n",
            &["negcoeff.toml", "lipschitz.coeff"],
        ),
    ];
    for (file, text, needles) in cases {
        let p = d.join(file);
        std::fs::write(&p, text).unwrap();
        fails_with(&["inspect", p.to_str().unwrap()], needles);
    }
    fails_with(
        &["inspect", d.join("missing.toml").to_str().unwrap()],
        &["missing.toml"],
    );
}

#[test]
fn bad_arrays_and_nothing_written() {
    let d = tmpdir("arrays");
    let toy = models().join("toy2d.toml");
    let out = d.join("out.npy");
    let run = |input: &Path| -> Vec<String> {
        vec![
            "run".into(),
            toy.to_str().unwrap().into(),
            "--backend".into(),
            "cpu".into(),
            "--mode".into(),
            "forward".into(),
            "--input".into(),
            input.to_str().unwrap().into(),
            "--output".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let as_refs = |v: &[String]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let wrong_shape = d.join("wrong_shape.npy");
    iresnetc::npy::write(&wrong_shape, &[vec![1.0, 2.0, 3.0]], &[3], false).unwrap();
    let a = as_refs(&run(&wrong_shape));
    fails_with(
        &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        &["wrong_shape.npy", "input", "[B, 2]"],
    );

    let nan = d.join("nan.npy");
    iresnetc::npy::write(&nan, &[vec![1.0, f64::NAN]], &[2], false).unwrap();
    let a = as_refs(&run(&nan));
    fails_with(
        &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        &["nan.npy", "NaN"],
    );

    let inf = d.join("inf.npy");
    iresnetc::npy::write(&inf, &[vec![f64::INFINITY, 0.0]], &[2], true).unwrap();
    let a = as_refs(&run(&inf));
    fails_with(
        &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        &["inf.npy", "inf"],
    );

    let ints = d.join("ints.npy");
    npyz::to_file_1d(&ints, vec![1i32, 2]).unwrap();
    let a = as_refs(&run(&ints));
    fails_with(
        &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        &["ints.npy", "dtype"],
    );

    let garbage = d.join("garbage.npy");
    std::fs::write(&garbage, b"not an npy file").unwrap();
    let a = as_refs(&run(&garbage));
    fails_with(
        &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        &["garbage.npy"],
    );

    assert!(!out.exists(), "an output was written despite the errors");
}

#[test]
fn bad_weight_files() {
    let d = tmpdir("weights");
    let toml = d.join("m.toml");
    std::fs::write(
        &toml,
        "name = \"m\"\nkind = \"flow\"\ninput = [2]\n[[stages]]\nblocks = 1\nhidden = [3]\n",
    )
    .unwrap();
    let spec = iresnetc::spec::ModelSpec::from_file(&toml).unwrap();
    let g = iresnetc::ir::build(&spec).unwrap();
    let good = iresnetc::weights::init(&g, 1);

    let write = |name: &str, p: &iresnetc::tensor::Params| {
        let path = d.join(name);
        iresnetc::weights::save(p, &path).unwrap();
        path
    };
    let mut missing = good.clone();
    missing.remove("stage0.block0.dense1.weight");
    let mut extra = good.clone();
    extra.insert(
        "stage0.block0.dense9.weight".into(),
        iresnetc::tensor::Tensor::zeros(vec![2, 2]),
    );
    let mut shaped = good.clone();
    shaped.insert(
        "stage0.block0.dense0.weight".into(),
        iresnetc::tensor::Tensor::zeros(vec![2, 3]),
    );
    let mut nan = good.clone();
    if let Some(t) = nan.get_mut("prior.mean") {
        t.data[0] = f64::NAN;
    }
    let cases = [
        (
            write("missing.safetensors", &missing),
            vec![
                "missing.safetensors",
                "stage0.block0.dense1.weight",
                "missing",
            ],
        ),
        (
            write("extra.safetensors", &extra),
            vec!["extra.safetensors", "stage0.block0.dense9.weight"],
        ),
        (
            write("shaped.safetensors", &shaped),
            vec![
                "shaped.safetensors",
                "stage0.block0.dense0.weight",
                "[3, 2]",
            ],
        ),
        (
            write("nan.safetensors", &nan),
            vec!["nan.safetensors", "prior.mean", "NaN"],
        ),
    ];
    for (path, needles) in &cases {
        fails_with(
            &[
                "inspect",
                toml.to_str().unwrap(),
                "--weights",
                path.to_str().unwrap(),
            ],
            needles,
        );
    }
    // Wrong dtype: an I32 tensor where a float is expected.
    let bytes: Vec<u8> = [1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut tensors = vec![];
    for (n, t) in &good {
        let b: Vec<u8> = t
            .data
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect();
        tensors.push((n.clone(), t.shape.clone(), b));
    }
    if let Some(t) = tensors.iter_mut().find(|t| t.0 == "prior.mean") {
        t.2 = bytes;
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let dt = if n == "prior.mean" {
                safetensors::Dtype::I32
            } else {
                safetensors::Dtype::F32
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let dtype = d.join("dtype.safetensors");
    std::fs::write(&dtype, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    fails_with(
        &[
            "inspect",
            toml.to_str().unwrap(),
            "--weights",
            dtype.to_str().unwrap(),
        ],
        &["dtype.safetensors", "prior.mean", "I32"],
    );
    // A truncated (corrupt) file.
    let corrupt = d.join("corrupt.safetensors");
    let full = std::fs::read(&cases[0].0).unwrap();
    std::fs::write(&corrupt, &full[..full.len() / 2]).unwrap();
    fails_with(
        &[
            "inspect",
            toml.to_str().unwrap(),
            "--weights",
            corrupt.to_str().unwrap(),
        ],
        &["corrupt.safetensors"],
    );
}

#[test]
fn inspect_reports_certificate() {
    let out = bin()
        .args([
            "inspect",
            models().join("cifar-tiny.toml").to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let max = v["lipschitz"]["max_block_bound"].as_f64().unwrap();
    assert!(max > 0.0 && max < 1.0, "{max}");
    assert_eq!(v["lipschitz"]["blocks"].as_array().unwrap().len(), 6);
}

/// The CLI runs a mode in chunks of `DEFAULT_CHUNK` samples; probes depend on the sample's
/// index in the whole array, so the log-det of `2 * DEFAULT_CHUNK + 3` samples (two chunk
/// boundaries) equals one library call over all of them.
#[test]
fn chunked_logdet_matches_one_call() {
    use iresnetc_runtime::modes::DEFAULT_CHUNK;
    let n = 2 * DEFAULT_CHUNK + 3;
    let d = tmpdir("chunks");
    let model = models().join("cifar-tiny.toml");
    let m = iresnetc::pipeline::load_model(&model, &Default::default(), &|_, _| {}).unwrap();
    let method = m.graph.spec.logdet.method();
    assert!(
        matches!(method, iresnetc::reference::LogDetMethod::Series { probes, .. } if probes > 0),
        "the log-det must use probes: {method:?}"
    );
    let xs: Vec<Vec<f64>> = (0..n)
        .map(|s| {
            (0..m.graph.input_dim())
                .map(|i| ((i * 13 + s * 7) % 17) as f64 / 17.0)
                .collect()
        })
        .collect();
    let xin = d.join("x.npy");
    iresnetc::npy::write(&xin, &xs, &m.graph.spec.input, false).unwrap();
    let out = d.join("ld.npy");
    let st = bin()
        .args([
            "run",
            model.to_str().unwrap(),
            "--backend",
            "reference",
            "--mode",
            "logdet",
        ])
        .args([
            "--input",
            xin.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let got = read(&out, &[]);
    assert_eq!(got.len(), n);
    let want = iresnetc::reference::Reference::new(&m.graph)
        .forward(&xs, &method)
        .unwrap()
        .logdet;
    assert_eq!(want.len(), n);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g[0] - w).abs() < 1e-12, "sample {i}: {} vs {w}", g[0]);
    }
}

/// A one-block 2-D flow whose weights are written by hand, with `lipschitz.normalize` given.
fn hand_made_flow(d: &Path, normalize: &str) -> PathBuf {
    let toml = d.join(format!("flow-{normalize}.toml"));
    std::fs::write(
        &toml,
        format!(
            "name = \"hand\"\nkind = \"flow\"\ninput = [2]\n[lipschitz]\nnormalize = \"{normalize}\"\n[[stages]]\nblocks = 1\nhidden = [2]\nactivation = \"elu\"\n"
        ),
    )
    .unwrap();
    toml
}

/// The model's initial weights with every 2-D linear weight replaced by `gain` times the
/// identity: each layer's largest singular value is exactly `gain`, so the block's Lipschitz
/// bound is at least `gain^2` (two layers).
fn diagonal_weights(toml: &Path, gain: f64, out: &Path) {
    let spec = iresnetc::spec::ModelSpec::from_file(toml).unwrap();
    let g = iresnetc::ir::build(&spec).unwrap();
    let mut p = iresnetc::weights::init(&g, 1);
    let mut replaced = 0;
    for (name, t) in p.iter_mut() {
        if name.ends_with(".weight") && t.shape.len() == 2 {
            let cols = t.shape[1];
            for (k, v) in t.data.iter_mut().enumerate() {
                *v = if k / cols == k % cols { gain } else { 0.0 };
            }
            replaced += 1;
        }
    }
    assert_eq!(replaced, 2, "expected two linear layers: {:?}", p.keys());
    iresnetc::weights::save(&p, out).unwrap();
}

/// `normalize = "never"` keeps the given weights; a block whose certified bound is not below 1
/// is refused (exit 2, one line naming the model, the block and the bound), and nothing is
/// written. The same weights at gain 0.5 compile, and at gain 3 under `normalize = "always"`
/// they are scaled down and compile too: the refusal is the weights' and the setting's.
#[test]
fn non_contractive_weights_are_refused_when_never_normalized() {
    let d = tmpdir("contractive");
    let never = hand_made_flow(&d, "never");
    let always = hand_made_flow(&d, "always");
    let (big, small) = (d.join("big.safetensors"), d.join("small.safetensors"));
    diagonal_weights(&never, 3.0, &big);
    diagonal_weights(&never, 0.5, &small);
    let out = d.join("bundle");
    let out_s = out.to_str().unwrap();
    let args = |model: &Path, w: &Path| -> Vec<String> {
        vec![
            "compile".into(),
            model.to_str().unwrap().into(),
            "--weights".into(),
            w.to_str().unwrap().into(),
            "-o".into(),
            out_s.into(),
        ]
    };
    let a = args(&never, &big);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fails_with(&a, &["hand", "stage0.block0", "not guaranteed invertible"]);
    let err = String::from_utf8_lossy(&bin().args(&a).output().unwrap().stderr).into_owned();
    // The certified bound is an upper bound of the true one, 3 * 3 (ELU is 1-Lipschitz).
    let bound: f64 = err
        .split("bound ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no bound in: {err}"));
    eprintln!("refused: {err}");
    assert!(bound >= 9.0 - 1e-9, "bound {bound} below the true 9: {err}");
    assert!(!out.exists(), "a bundle was written for a refused model");

    for (model, w) in [(&never, &small), (&always, &big)] {
        let _ = std::fs::remove_dir_all(&out);
        let o = bin().args(args(model, w)).output().unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            model.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.join("plan.json").is_file());
    }
}

/// `export-onnx --validate` fails (exit 2, nothing written) when the exported f32 graph is
/// farther than 1e-4 from the f64 reference. Weights that make f32 lose the input are
/// written by hand: the first block's output bias is -1e8 and the second block adds the
/// constant +1e8 (ActNorm the identity), so the two cancel exactly in f64, while in f32
/// `x - 1e8` keeps no digit of x (the spacing of f32 at 1e8 is 8, and |z| is about 1): the
/// error is of the size of z itself, far above the tolerance. The initial weights validate.
#[test]
fn export_validate_fails_above_the_tolerance() {
    let d = tmpdir("validate");
    let toml = d.join("two.toml");
    std::fs::write(
        &toml,
        "name = \"two\"\nkind = \"flow\"\ninput = [2]\n[[stages]]\nblocks = 2\nhidden = [4]\nactivation = \"elu\"\n",
    )
    .unwrap();
    let spec = iresnetc::spec::ModelSpec::from_file(&toml).unwrap();
    let g = iresnetc::ir::build(&spec).unwrap();
    let clean = iresnetc::weights::init(&g, 1);
    // The last linear layer of each block: its bias is added to the block's output.
    let last_bias = |block: usize| -> String {
        let prefix = format!("stage0.block{block}.");
        clean
            .keys()
            .filter(|k| k.starts_with(&prefix) && k.ends_with(".bias") && k.contains("dense"))
            .max()
            .unwrap_or_else(|| panic!("no dense bias in block {block}: {:?}", clean.keys()))
            .clone()
    };
    let mut tampered = clean.clone();
    for (name, t) in tampered.iter_mut() {
        // ActNorm the identity and the second block's map the constant of its bias, so the
        // +1e8 cancels the -1e8 exactly in f64.
        if name.contains("actnorm")
            || (name.starts_with("stage0.block1.") && name.ends_with(".weight"))
        {
            t.data.iter_mut().for_each(|v| *v = 0.0);
        }
    }
    for (block, shift) in [(0, -1e8), (1, 1e8)] {
        let name = last_bias(block);
        let t = tampered.get_mut(&name).unwrap();
        assert_eq!(t.data.len(), 2, "{name}");
        t.data.iter_mut().for_each(|v| *v = shift);
    }
    let (wc, wt) = (d.join("clean.safetensors"), d.join("tampered.safetensors"));
    iresnetc::weights::save(&clean, &wc).unwrap();
    iresnetc::weights::save(&tampered, &wt).unwrap();
    let out = d.join("two.onnx");
    let export = |w: &Path| {
        bin()
            .args(["export-onnx", toml.to_str().unwrap(), "--weights"])
            .arg(w)
            .args(["--validate", "-o"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = export(&wt);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("tampered: {err}");
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(err.contains("1e-4") || err.contains("0.0001"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.exists(),
        "an ONNX file was written despite failing validation"
    );
    assert!(!d.join("two.json").exists());

    let o = export(&wc);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
}
