//! `iresnetc export-onnx`: standard ONNX of a model, optionally validated and timed in tract.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::ValueEnum;

use super::backend::{Source, WeightArgs};
use super::run::{logdet_spec, EstimatorArg};
use iresnetc::ir::Graph;
use iresnetc::onnx::{self, ConvStyle, LogDetExport};
use iresnetc::pipeline::Model;
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{LogDetSpec, ModelKind};
use iresnetc_runtime::rng::Rng;
use iresnetc_runtime::tract::TractGraph;

/// Largest relative error `--validate` accepts.
const VALIDATE_TOL: f64 = 1e-4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConvStyleArg {
    /// Every convolution as ONNX Conv.
    Conv,
    /// 1x1 convolutions as MatMul.
    PointwiseMatmul,
    /// 1x1 convolutions as MatMul, k x k convolutions that reduce channels as one
    /// MatMul over the taps plus shifted sums (fastest in tract).
    TapSum,
}

impl From<ConvStyleArg> for ConvStyle {
    fn from(c: ConvStyleArg) -> Self {
        match c {
            ConvStyleArg::Conv => ConvStyle::Conv,
            ConvStyleArg::PointwiseMatmul => ConvStyle::PointwiseMatMul,
            ConvStyleArg::TapSum => ConvStyle::TapSum,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A model file (.toml) or a compiled bundle directory.
    pub model: PathBuf,
    /// The ONNX file to write (the inverse goes next to it as `STEM.inverse.onnx`).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// Flows: add the log-det estimate as a second output `logdet` [batch]; the
    /// Hutchinson probes become the input `probes` [batch, P] (layout in STEM.json).
    #[arg(long)]
    pub with_logdet: bool,
    /// Override the model file's log-det estimator (series, or exact for 2-D blocks).
    #[arg(long, value_enum)]
    pub estimator: Option<EstimatorArg>,
    /// Flows: also write `STEM.inverse.onnx`, every block's fixed point unrolled K times.
    #[arg(long, value_name = "K")]
    pub inverse_steps: Option<usize>,
    /// How convolutions are written.
    #[arg(long, value_enum, default_value = "tap-sum")]
    pub conv_style: ConvStyleArg,
    /// Run the written graphs in tract on random input, compare with the f64
    /// reference, print the errors; fail (exit 2, nothing written) above 1e-4 relative.
    #[arg(long)]
    pub validate: bool,
    /// After writing, time tract on the written file at this batch size
    /// (median of --time-samples runs after 2 warm-ups) and print GFLOP/s.
    #[arg(long, value_name = "BATCH")]
    pub time_batch: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub time_samples: usize,
}

/// `dir/STEM{suffix}` for the output path `dir/STEM.onnx`.
pub(crate) fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

fn flat32(xs: &[Vec<f64>]) -> Vec<f32> {
    xs.iter().flatten().map(|&v| v as f32).collect()
}

/// `(max abs error, max abs error / max |reference|)`.
fn errors(reference: &[f64], got: &[f32]) -> (f64, f64) {
    let scale = reference
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-30);
    let abs = reference
        .iter()
        .zip(got)
        .fold(0.0f64, |m, (a, &b)| m.max((a - b as f64).abs()));
    (abs, abs / scale)
}

fn batched(b: usize, s: &[usize]) -> Vec<usize> {
    std::iter::once(b).chain(s.iter().copied()).collect()
}

pub fn run(a: &ExportArgs) -> Result<()> {
    let m = Source::open(&a.model, &a.weights)?.into_model()?;
    let g = &m.graph;
    let style = ConvStyle::from(a.conv_style);
    let flow = g.spec.kind == ModelKind::Flow;
    if (a.with_logdet || a.estimator.is_some()) && !flow {
        bail!(
            "{}: --with-logdet needs a flow (kind = \"flow\")",
            a.model.display()
        );
    }

    let ld_spec = logdet_spec(&g.spec.logdet, a.estimator, None);
    let ld = if a.with_logdet {
        Some(LogDetExport::from_spec(g, &ld_spec)?)
    } else {
        None
    };
    let main = match &ld {
        Some(l) => onnx::forward_logdet(g, l, style)?,
        None => onnx::forward(g, style)?,
    };
    let main_bytes = onnx::encode(&main);
    let inv = match a.inverse_steps {
        Some(k) => {
            let steps = vec![k; g.blocks.len()];
            Some((
                steps.clone(),
                onnx::encode(&onnx::inverse(g, &steps, style)?),
            ))
        }
        None => None,
    };

    if a.validate {
        validate(
            &m,
            &main_bytes,
            ld.as_ref(),
            &ld_spec,
            inv.as_ref().map(|(s, b)| (s[0], b.as_slice())),
        )?;
    }

    let inv_path = sibling(&a.output, ".inverse.onnx");
    let json_path = sibling(&a.output, ".json");
    let mut manifest = onnx::manifest(
        g,
        ld.as_ref(),
        inv.as_ref().map(|(s, _)| s.as_slice()).unwrap_or(&[]),
    );
    let file_name = |p: &Path| {
        p.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    manifest.forward.file = file_name(&a.output);
    if let Some(e) = manifest.forward_logdet.as_mut() {
        // Exported as one file: the forward graph with the log-det output.
        e.file = file_name(&a.output);
        manifest.forward = e.clone();
    }
    match &inv {
        Some(_) => {
            if let Some(e) = manifest.inverse.as_mut() {
                e.file = file_name(&inv_path);
            }
        }
        None => manifest.inverse = None,
    }
    iresnetc::fsutil::write_atomic(&a.output, &main_bytes)?;
    if let Some((_, bytes)) = &inv {
        iresnetc::fsutil::write_atomic(&inv_path, bytes)?;
    }
    iresnetc::fsutil::write_atomic(
        &json_path,
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;

    println!(
        "wrote {} ({} MB; ONNX ir_version {}, opset {}, batch dimension `{}`)",
        a.output.display(),
        main_bytes.len() / 1_000_000,
        onnx::IR_VERSION,
        onnx::OPSET,
        onnx::BATCH
    );
    match &ld {
        Some(l) => {
            let p = l.probe_layout(g);
            println!(
                "  inputs: input {:?}{}; outputs: z [batch, {}], logdet [batch]",
                batched(0, &g.spec.input)[1..].to_vec(),
                if p.total > 0 {
                    format!(
                        ", probes [batch, {}] ({} per block, layout in {})",
                        p.total,
                        if p.rademacher {
                            "Rademacher"
                        } else {
                            "Gaussian"
                        },
                        json_path.display()
                    )
                } else {
                    String::new()
                },
                g.latent_dim()
            );
        }
        None => println!(
            "  input: input [batch, {:?}]; output: {} [batch, {}]",
            g.spec.input,
            if flow { "z" } else { "logits" },
            manifest.output_dim
        ),
    }
    if let Some((steps, bytes)) = &inv {
        println!(
            "wrote {} ({} MB; z [batch, {}] -> x, {} fixed-point steps per block)",
            inv_path.display(),
            bytes.len() / 1_000_000,
            g.latent_dim(),
            steps.first().copied().unwrap_or(0)
        );
    }
    println!("wrote {}", json_path.display());
    if let Some(b) = a.time_batch {
        // The file is still staged under a temporary name until the command succeeds.
        let written = iresnetc::output::current_path(&a.output);
        time_written(&m, &written, ld.as_ref(), b, a.time_samples)?;
    }
    Ok(())
}

/// Times tract on the file just written; FLOPs = 2 x MACs of the forward pass
/// (the log-det graph does more work, so its rate is a lower bound).
fn time_written(
    m: &Model,
    path: &Path,
    ld: Option<&LogDetExport>,
    batch: usize,
    samples: usize,
) -> Result<()> {
    if batch == 0 {
        bail!("--time-batch must be >= 1");
    }
    let g = &m.graph;
    let mut shapes = vec![batched(batch, &g.spec.input)];
    if let Some(p) = ld.map(|l| l.probe_layout(g)).filter(|p| p.total > 0) {
        shapes.push(vec![batch, p.total]);
    }
    let t = iresnetc_runtime::tract::time_onnx_file(path, &shapes, 2, samples)?;
    let flops = 2.0 * g.forward_macs() as f64 * batch as f64;
    println!(
        "tract: {} at batch {batch}: median {:.2} ms, min {:.2} ms over {} runs, {:.1} GFLOP/s (forward FLOPs {:.3} G; load + optimize {:.2} s, threads: {})",
        path.display(),
        t.median_s * 1e3,
        t.min_s * 1e3,
        t.samples,
        t.gflops(flops),
        flops / 1e9,
        t.load_s,
        iresnetc_runtime::tract::threads()
    );
    Ok(())
}

/// The reference inverse with exactly `k` fixed-point steps per block.
fn reference_inverse_k(g: &Graph, zs: &[Vec<f64>], k: usize) -> iresnetc::Result<Vec<Vec<f64>>> {
    let mut g = g.clone();
    g.spec.inverse.max_iters = k;
    g.spec.inverse.tol = 0.0;
    Ok(Reference::new(&g).inverse(zs)?.0)
}

/// `--validate`: tract on the exact bytes to be written vs the f64 reference.
fn validate(
    m: &Model,
    main: &[u8],
    ld: Option<&LogDetExport>,
    ld_spec: &LogDetSpec,
    inv: Option<(usize, &[u8])>,
) -> Result<()> {
    let g = &m.graph;
    let r = Reference::new(g);
    // Two samples (one for the big models, whose f64 reference is slow).
    let n = if g.forward_macs() > 1_000_000_000 {
        1
    } else {
        2
    };
    let mut rng = Rng::new(0x5eed);
    let xs: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            (0..g.input_dim())
                .map(|_| 2.0 * rng.uniform() - 1.0)
                .collect()
        })
        .collect();
    let mut worst = 0.0f64;
    let mut report = |what: &str, (abs, rel): (f64, f64)| {
        println!("validate {what}: max abs error {abs:.3e}, max rel error {rel:.3e}");
        worst = worst.max(rel);
    };
    let x32 = flat32(&xs);
    let mut shapes = vec![batched(n, &g.spec.input)];
    let mut inputs: Vec<Vec<f32>> = vec![x32];
    let method = match ld {
        Some(_) => ld_spec.method(),
        None => LogDetMethod::None,
    };
    if let Some(l) = ld {
        let p = l.probe_layout(g);
        if p.total > 0 {
            shapes.push(vec![n, p.total]);
            inputs.push(p.matrix(ld_spec.seed, 0, n));
        }
    }
    let graph = TractGraph::load(main, &shapes, "export")?;
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let outs = graph.run(&refs)?;
    let want = r.forward(&xs, &method)?;
    report(
        if g.spec.kind == ModelKind::Flow {
            "z"
        } else {
            "logits"
        },
        errors(&want.outputs.concat(), &outs[0].1),
    );
    if ld.is_some() {
        let got = outs.get(1).map(|o| o.1.as_slice()).unwrap_or(&[]);
        report("logdet", errors(&want.logdet, got));
    }
    if let Some((k, bytes)) = inv {
        let zs = match ld {
            Some(_) => r.forward(&xs, &LogDetMethod::None)?.outputs,
            None => want.outputs.clone(),
        };
        let graph = TractGraph::load(bytes, &[vec![n, g.latent_dim()]], "inverse export")?;
        let outs = graph.run(&[&flat32(&zs)])?;
        let reference = reference_inverse_k(g, &zs, k)?;
        report(
            &format!("inverse ({k} steps)"),
            errors(&reference.concat(), &outs[0].1),
        );
    }
    if worst > VALIDATE_TOL {
        bail!("validation failed: max rel error {worst:.3e} > {VALIDATE_TOL:e} (nothing written)");
    }
    Ok(())
}
