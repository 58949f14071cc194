//! Choosing and opening a backend for `run` and `bench`: a model file or a bundle, on the
//! reference, wgpu or tract. Everything after this point goes through the [`Backend`] trait.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::ValueEnum;

use iresnetc::codegen::{self, CodegenOptions, Tiling};
use iresnetc::pipeline::Model;
use iresnetc::reference::ReferenceBackend;
use iresnetc_runtime::backends::{cpu::CpuBackend, tract::TractBackend, wgpu::WgpuBackend};
use iresnetc_runtime::cpu::CpuEngine;
use iresnetc_runtime::tract::TractBundle;
use iresnetc_runtime::{Backend, Bundle, GpuDevice};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// A hardware GPU adapter if there is one, else the native CPU engine.
    Auto,
    /// wgpu on any adapter (lavapipe when forced or nothing else exists).
    Wgpu,
    /// tract running the bundle's ONNX graphs on the CPU.
    Tract,
    /// The f64 reference executor (the oracle of the tests).
    Reference,
    /// The native f32 CPU engine (gemm) — before it existed, `cpu` meant the f64 reference,
    /// now `reference`.
    Cpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TilingArg {
    /// Register-blocked kernels for CPU adapters (lavapipe).
    Cpu,
    /// Smaller register blocks, more workgroups (hardware GPUs).
    Gpu,
}

impl From<TilingArg> for Tiling {
    fn from(t: TilingArg) -> Tiling {
        match t {
            TilingArg::Cpu => Tiling::CPU,
            TilingArg::Gpu => Tiling::GPU,
        }
    }
}

/// `--weights` and `--seed`, shared by every command that loads a model file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WeightArgs {
    /// Weights (.safetensors); default: deterministic init from the seed.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Seed of the weight initialization (default: the model file's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// A model file (compiled in memory when a backend needs a bundle) or a compiled bundle.
pub enum Source {
    ModelFile(Box<Model>),
    Bundle(PathBuf),
}

impl Source {
    /// `path` is a bundle directory (has `plan.json`) or a model file.
    pub fn open(path: &Path, w: &WeightArgs) -> Result<Source> {
        if path.is_dir() {
            if !path.join(iresnetc_runtime::plan::PLAN_FILE).is_file() {
                bail!(
                    "{}: not a bundle (no plan.json); compile one with `iresnetc compile`",
                    path.display()
                );
            }
            if w.weights.is_some() || w.seed.is_some() {
                bail!("{}: --weights/--seed cannot change a compiled bundle; recompile with `iresnetc compile --weights`", path.display());
            }
            // Nothing in a bundle is believed before its hashes and its model.toml check out,
            // whichever backend runs it.
            iresnetc::bundle::verify_bundle(path)?;
            return Ok(Source::Bundle(path.to_path_buf()));
        }
        Ok(Source::ModelFile(Box::new(super::load(
            path,
            w.weights.as_deref(),
            w.seed,
        )?)))
    }

    /// The model as the compiler sees it (the reference runs on it): loaded from a bundle's
    /// own `model.toml` and normalized weights when the source is a bundle.
    pub fn into_model(self) -> Result<Model> {
        match self {
            Source::ModelFile(m) => Ok(*m),
            Source::Bundle(dir) => {
                let pb = super::bar(0, "loading");
                let progress = |done: usize, total: usize| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                };
                let m = iresnetc::pipeline::load_bundle(&dir, &progress)?;
                pb.finish_and_clear();
                Ok(m)
            }
        }
    }
}

/// Opens `source` on the backend asked for. `tiling` overrides the kernel tiling chosen from
/// the adapter when a model file is compiled for wgpu.
pub fn open(
    source: Source,
    which: BackendArg,
    tiling: Option<TilingArg>,
) -> Result<Box<dyn Backend>> {
    let which = match which {
        BackendArg::Auto if iresnetc_runtime::device::has_hardware_gpu() => BackendArg::Wgpu,
        BackendArg::Auto => BackendArg::Cpu,
        other => other,
    };
    Ok(match which {
        BackendArg::Reference => Box::new(ReferenceBackend::new(source.into_model()?)),
        BackendArg::Cpu => match source {
            Source::Bundle(dir) => Box::new(CpuBackend::open_bundle(&dir)?),
            Source::ModelFile(m) => {
                let engine = CpuEngine::from_parts(
                    iresnetc::netdesc::describe(&m)?,
                    &iresnetc::netdesc::weights_f32(&m.graph.params),
                )?;
                Box::new(CpuBackend::new(engine, m.info())?)
            }
        },
        BackendArg::Wgpu => {
            let dev = GpuDevice::new()?;
            let bundle = match source {
                Source::Bundle(dir) => Bundle::load(&dir)?,
                Source::ModelFile(m) => {
                    // Kernels generated for the device they will run on.
                    let tiling = match tiling {
                        Some(t) => Tiling::from(t),
                        None => Tiling::for_adapter(dev.adapter()),
                    };
                    let opts = CodegenOptions {
                        tiling,
                        ..CodegenOptions::default()
                    };
                    codegen::compile_in_memory(&m, &opts)?.0
                }
            };
            Box::new(WgpuBackend::new(&dev, &bundle)?)
        }
        BackendArg::Tract => match source {
            Source::Bundle(dir) => {
                let bundle = Bundle::load(&dir)?;
                Box::new(TractBackend::new(&bundle, TractBundle::open(&dir)?)?)
            }
            Source::ModelFile(m) => {
                let (bundle, _) = codegen::compile_in_memory(&m, &CodegenOptions::default())?;
                let (manifest, files) = iresnetc::onnx::bundle_graphs(&m)?;
                Box::new(TractBackend::new(
                    &bundle,
                    TractBundle::from_memory(manifest, files),
                )?)
            }
        },
        BackendArg::Auto => unreachable!("auto resolved above"),
    })
}
