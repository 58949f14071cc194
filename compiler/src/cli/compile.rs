//! `iresnetc compile` (model -> bundle directory) and the wgpu backend of `iresnetc run`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use super::load;
use super::run::{model_and_weights, Mode, RunArgs};
use iresnetc::bundle::{write_bundle, BundleOptions};
use iresnetc::codegen::{self, entries, inputs as ld_inputs, CodegenOptions, LogDetLayout, Tiling};
use iresnetc::npy;
use iresnetc::reference::LogDetMethod;
use iresnetc::spec::{ModelKind, ModelSpec};
use iresnetc_runtime::rng::{streams, Rng};
use iresnetc_runtime::{Bundle, GpuDevice, GpuExecutor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TilingArg {
    /// Register-blocked kernels for CPU adapters (lavapipe).
    Cpu,
    /// Smaller register blocks, more workgroups (hardware GPUs).
    Gpu,
}

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    /// Model file (.toml).
    pub model: PathBuf,
    /// Bundle directory (default: build/<model name>).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Weights (.safetensors); default: deterministic init from the seed.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed of the weight initialization (default: the model file's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// One kernel per op (the reference for the fused plan).
    #[arg(long)]
    pub no_fuse: bool,
    /// Kernel tiling strategy.
    #[arg(long, value_enum, default_value = "cpu")]
    pub tiling: TilingArg,
}

pub fn run(a: &CompileArgs) -> Result<()> {
    let start = Instant::now();
    let m = load(&a.model, a.weights.as_deref(), a.seed)?;
    let dir = a
        .output
        .clone()
        .unwrap_or_else(|| Path::new("build").join(&m.graph.spec.name));
    let opts = BundleOptions {
        codegen: CodegenOptions {
            fuse: !a.no_fuse,
            tiling: match a.tiling {
                TilingArg::Cpu => Tiling::CPU,
                TilingArg::Gpu => Tiling::GPU,
            },
        },
    };
    let report = write_bundle(&m, &dir, &opts)?;
    println!(
        "compiled {} -> {} in {:.1} s: {} kernels in {} WGSL files, {} buffers ({})",
        m.graph.spec.name,
        dir.display(),
        start.elapsed().as_secs_f64(),
        report.kernels,
        report.wgsl_files,
        report.buffers,
        if report.fused { "fused" } else { "unfused" }
    );
    for (name, cost) in &report.entry_points {
        println!(
            "  {name:<18} {:>7} dispatches  {:>10.3} GFLOP/sample",
            cost.dispatches,
            cost.flops_per_sample as f64 / 1e9
        );
    }
    Ok(())
}

/// A runnable bundle: from a bundle directory (no compiler work) or compiled in memory from a
/// model file.
fn open(a: &RunArgs) -> Result<(Bundle, ModelSpec)> {
    if a.model.is_dir() {
        if a.weights.is_some() {
            bail!("--weights cannot replace a compiled bundle's weights; recompile with `iresnetc compile --weights`");
        }
        let bundle = Bundle::load(&a.model)?;
        iresnetc_runtime::bundle::require_integrity(&a.model, &bundle.plan)?;
        let spec = iresnetc::bundle::read_spec(&a.model, &bundle.plan)?;
        return Ok((bundle, spec));
    }
    let (model, weights) = model_and_weights(a)?;
    let m = load(&model, weights.as_deref(), a.seed)?;
    let (bundle, _) = codegen::compile_in_memory(&m, &CodegenOptions::default())?;
    Ok((bundle, m.graph.spec.clone()))
}

fn weight<'b>(bundle: &'b Bundle, name: &str) -> Result<&'b [f32]> {
    bundle
        .weights
        .get(name)
        .map(|t| t.data.as_slice())
        .with_context(|| format!("bundle weights have no tensor {name:?}"))
}

/// `log N(z; mean, exp(log_std))` summed, as the reference's `prior_logp`.
fn prior_logp(z: &[f32], mean: &[f32], log_std: &[f32]) -> f64 {
    let c = 0.5 * (2.0 * std::f64::consts::PI).ln();
    z.iter()
        .zip(mean)
        .zip(log_std)
        .map(|((&z, &m), &s)| {
            let t = (f64::from(z) - f64::from(m)) * (-f64::from(s)).exp();
            -0.5 * t * t - f64::from(s) - c
        })
        .sum()
}

fn rows(flat: &[f32], per: usize) -> Vec<Vec<f64>> {
    flat.chunks(per.max(1))
        .map(|c| c.iter().map(|&v| f64::from(v)).collect())
        .collect()
}

/// The wgpu backend: same modes and files as the reference backend.
pub fn run_wgpu(a: &RunArgs) -> Result<()> {
    let (bundle, spec) = open(a)?;
    let dev = GpuDevice::new()?;
    let mut ex = GpuExecutor::new(&dev, &bundle)?;
    let adapter = dev.adapter().to_string();
    let flow = spec.kind == ModelKind::Flow;
    let probe_seed = a.probe_seed.unwrap_or(spec.logdet.seed);
    let ld_spec = a.logdet_spec(&spec);
    let method = LogDetMethod::from_spec(&ld_spec);
    let need_flow = |what: &str| -> Result<()> {
        if !flow {
            bail!(
                "{}: --mode {what} needs a flow (kind = \"flow\")",
                a.model.display()
            );
        }
        Ok(())
    };
    let input = |per_sample: &[usize], array: &str| -> Result<Vec<f32>> {
        let b = a.read_input(per_sample, array)?;
        Ok(b.samples.iter().flatten().map(|&v| v as f32).collect())
    };
    let in_dim: usize = spec.input.iter().product();
    let latent_dim = bundle
        .plan
        .entry_points
        .get(entries::INVERSE)
        .and_then(|e| e.inputs.first())
        .map(|io| io.elems() as usize)
        .unwrap_or(0);
    let layout = || -> Result<LogDetLayout> {
        let l: LogDetLayout = serde_json::from_value(bundle.plan.meta["logdet"].clone())
            .context("plan.json meta has no log-det layout (bundle from an older compiler?)")?;
        // plan.json is not covered by the file hashes: its sizes drive loops and allocations
        // here, so they are bounded like the model file's.
        use iresnetc::limits;
        let probe_elems = l
            .block_dims
            .iter()
            .try_fold(0u64, |a, &d| a.checked_add(d as u64))
            .and_then(|s| s.checked_mul(l.probes as u64));
        if l.probes == 0
            || l.probes > limits::MAX_PROBES
            || l.terms > limits::MAX_TERMS
            || l.coef_stride > 2 * limits::MAX_TERMS
            || l.block_dims.contains(&0)
            || probe_elems.is_none_or(|n| n > limits::MAX_SAMPLE_ELEMS)
        {
            bail!(
                "{}: meta.logdet is out of range (probes {}, terms {}, {} blocks): the bundle is damaged; recompile it",
                a.model.join("plan.json").display(),
                l.probes,
                l.terms,
                l.block_dims.len()
            );
        }
        Ok(l)
    };
    // Entry point, probes and term weights of a log-det forward on `batch` samples.
    let logdet_run = |batch: usize| -> Result<(&'static str, Vec<f32>, Vec<f32>)> {
        let layout = layout()?;
        let Some((entry, coef, seed, kind)) = ld_inputs::coefs_for(&layout, &method, batch)? else {
            bail!(
                "the {:?} log-det estimator does not run on the wgpu backend; use --estimator series or roulette (or --backend cpu)",
                ld_spec.estimator
            );
        };
        Ok((entry, ld_inputs::probes(&layout, seed, kind, batch), coef))
    };
    let start = Instant::now();
    let summary: String;
    match a.mode {
        Mode::Forward | Mode::Logdet | Mode::Density => {
            if a.mode != Mode::Forward {
                need_flow("logdet / density")?;
            }
            let mut x = input(&spec.input, "input")?;
            let batch = x.len() / in_dim.max(1);
            if a.mode == Mode::Density && spec.data.dequantize {
                // As the reference's `dequantize`: (255 x + u) / 256 - 0.5, u seeded per sample.
                for (i, s) in x.chunks_mut(in_dim).enumerate() {
                    let mut r = Rng::for_stream(probe_seed, &[streams::DEQUANTIZE, i as u64]);
                    for v in s {
                        *v = ((255.0 * f64::from(*v) + r.uniform()) / 256.0 - 0.5) as f32;
                    }
                }
            }
            if !flow {
                let out = ex.run(entries::CLASSIFY, batch, &[("x", &x)])?;
                let l = &out["logits"];
                npy::write(
                    &a.output,
                    &rows(l, l.len() / batch.max(1)),
                    &[l.len() / batch.max(1)],
                    false,
                )?;
                summary = format!("logits of {batch} samples");
            } else if a.mode == Mode::Forward && a.logdet_out.is_none() {
                let out = ex.run(entries::ENCODE, batch, &[("x", &x)])?;
                npy::write(
                    &a.output,
                    &rows(&out["z"], latent_dim),
                    &[latent_dim],
                    false,
                )?;
                summary = format!("forward of {batch} samples");
            } else {
                let (entry, probes, coef) = logdet_run(batch)?;
                let out = ex.run(
                    entry,
                    batch,
                    &[("x", &x), ("probes", &probes), ("coef", &coef)],
                )?;
                let ld = &out["logdet"];
                match a.mode {
                    Mode::Forward => {
                        npy::write(
                            &a.output,
                            &rows(&out["z"], latent_dim),
                            &[latent_dim],
                            false,
                        )?;
                        if let Some(p) = &a.logdet_out {
                            npy::write(p, &rows(ld, 1), &[], false)?;
                        }
                        summary = format!(
                            "forward + log-det ({:?}) of {batch} samples",
                            ld_spec.estimator
                        );
                    }
                    Mode::Logdet => {
                        npy::write(&a.output, &rows(ld, 1), &[], false)?;
                        summary = format!("log-det ({:?}) of {batch} samples", ld_spec.estimator);
                    }
                    _ => {
                        let (mean, log_std) = (
                            weight(&bundle, "prior.mean")?,
                            weight(&bundle, "prior.log_std")?,
                        );
                        let deq = spec.data.dequantize;
                        let d = in_dim as f64;
                        let out_rows: Vec<Vec<f64>> = out["z"]
                            .chunks(latent_dim)
                            .zip(ld)
                            .map(|(z, &l)| {
                                let logp = prior_logp(z, mean, log_std) + f64::from(l);
                                let bpd = -logp / (d * std::f64::consts::LN_2)
                                    + if deq { 8.0 } else { 0.0 };
                                vec![logp, bpd]
                            })
                            .collect();
                        let mean_bpd = out_rows.iter().map(|r| r[1]).sum::<f64>()
                            / out_rows.len().max(1) as f64;
                        npy::write(&a.output, &out_rows, &[2], false)?;
                        summary = format!("columns (log p(x) nats, bits/dim) of {batch} samples; mean bits/dim {mean_bpd:.4}");
                    }
                }
            }
        }
        Mode::Inverse | Mode::Sample => {
            need_flow("inverse / sample")?;
            let z = if a.mode == Mode::Inverse {
                input(&[latent_dim], "z")?
            } else {
                if a.num == 0 {
                    bail!("--num must be >= 1");
                }
                // The reference's `sample`: z = mean + exp(log_std) * N(0, 1), one stream per sample.
                let (mean, log_std) = (
                    weight(&bundle, "prior.mean")?,
                    weight(&bundle, "prior.log_std")?,
                );
                (0..a.num)
                    .flat_map(|i| {
                        let mut r = Rng::for_stream(probe_seed, &[streams::PRIOR_SAMPLE, i as u64]);
                        mean.iter()
                            .zip(log_std)
                            .map(|(&m, &s)| (f64::from(m) + f64::from(s).exp() * r.normal()) as f32)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let batch = z.len() / latent_dim.max(1);
            let out = ex.run(entries::INVERSE, batch, &[("z", &z)])?;
            let x = &out["x"];
            npy::write(&a.output, &rows(x, in_dim), &spec.input, false)?;
            summary = format!("inverse of {batch} samples");
        }
        Mode::Classify => {
            if flow {
                bail!(
                    "{}: --mode classify needs a classifier (kind = \"classifier\")",
                    a.model.display()
                );
            }
            let x = input(&spec.input, "input")?;
            let batch = x.len() / in_dim.max(1);
            let out = ex.run(entries::CLASSIFY, batch, &[("x", &x)])?;
            let l = &out["logits"];
            let classes = l.len() / batch.max(1);
            npy::write(&a.output, &rows(l, classes), &[classes], false)?;
            summary = format!("logits of {batch} samples");
        }
    }
    eprintln!(
        "backend wgpu ({adapter}): {summary} -> {} in {:.3} s",
        a.output.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(crate) use image::write_grid;

/// The PNG grid of `iresnetc run --mode sample --png PATH` for image models.
mod image {
    use std::path::Path;

    use anyhow::Result;

    /// Writes samples `x` ([N, C, H, W] flattened, C = 1 or 3) as a grid of tiles; pixel value
    /// `clamp(x + offset, 0, 1) * 255` (offset 0.5 undoes the dequantization shift).
    pub fn write_grid(path: &Path, x: &[f32], shape: &[usize], offset: f32) -> Result<()> {
        let (c, h, w) = (shape[0], shape[1], shape[2]);
        let per = c * h * w;
        let n = x.len() / per.max(1);
        let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
        let rows = n.div_ceil(cols).max(1);
        let (gw, gh) = (cols * (w + 1) + 1, rows * (h + 1) + 1);
        // A grid of many large samples can exceed what a PNG (u32 sides) or memory holds.
        let bytes =
            iresnetc_runtime::fsread::checked_bytes("--png grid", &[gw as u64, gh as u64, 3])?;
        if gw > u32::MAX as usize / 2 || gh > u32::MAX as usize / 2 {
            anyhow::bail!("--png: a {gw} x {gh} grid is too large for a PNG; sample fewer");
        }
        iresnetc_runtime::fsread::check_budget("--png grid", bytes.saturating_mul(2))?;
        let mut rgb = vec![0u8; gw * gh * 3];
        for (i, s) in x.chunks(per).enumerate() {
            let (ox, oy) = (1 + (i % cols) * (w + 1), 1 + (i / cols) * (h + 1));
            for y in 0..h {
                for xx in 0..w {
                    for ch in 0..3 {
                        let v = s[(ch.min(c - 1) * h + y) * w + xx] + offset;
                        rgb[((oy + y) * gw + ox + xx) * 3 + ch] =
                            (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                }
            }
        }
        iresnetc::fsutil::write_atomic(path, &encode_rgb(&rgb, gw, gh))?;
        Ok(())
    }

    /// A PNG (8-bit RGB) with stored (uncompressed) deflate blocks: sample grids are small,
    /// and this avoids a dependency for one picture.
    fn encode_rgb(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
        let mut raw = Vec::with_capacity(height * (width * 3 + 1));
        for row in rgb.chunks(width * 3) {
            raw.push(0); // filter type None
            raw.extend_from_slice(row);
        }
        let mut zlib = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
        for (i, block) in blocks.iter().enumerate() {
            zlib.push(u8::from(i + 1 == blocks.len()));
            let len = block.len() as u16;
            zlib.extend_from_slice(&len.to_le_bytes());
            zlib.extend_from_slice(&(!len).to_le_bytes());
            zlib.extend_from_slice(block);
        }
        zlib.extend_from_slice(&adler32(&raw).to_be_bytes());
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &zlib), (b"IEND", &Vec::new())] {
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = png.len();
            png.extend_from_slice(kind);
            png.extend_from_slice(data);
            let crc = crc32(&png[start..]);
            png.extend_from_slice(&crc.to_be_bytes());
        }
        png
    }

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &d in data {
            a = (a + u32::from(d)) % 65_521;
            b = (b + a) % 65_521;
        }
        (b << 16) | a
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &d in data {
            crc ^= u32::from(d);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
