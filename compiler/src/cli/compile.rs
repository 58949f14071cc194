//! `iresnetc compile`: model file -> bundle directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;

use super::backend::{TilingArg, WeightArgs};
use super::load;
use iresnetc::bundle::{write_bundle, BundleOptions};
use iresnetc::codegen::{CodegenOptions, Tiling};
use iresnetc_runtime::GpuDevice;

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    /// Model file (.toml).
    pub model: PathBuf,
    /// Bundle directory (default: build/<model name>).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// One kernel per op (the reference for the fused plan).
    #[arg(long)]
    pub no_fuse: bool,
    /// Kernel tiling (default: from this machine's adapter: `gpu` when a hardware GPU is
    /// present, else `cpu`, the fast form on software adapters such as lavapipe).
    #[arg(long, value_enum)]
    pub tiling: Option<TilingArg>,
}

pub fn run(a: &CompileArgs) -> Result<()> {
    let start = Instant::now();
    let m = load(&a.model, a.weights.weights.as_deref(), a.weights.seed)?;
    let dir = a
        .output
        .clone()
        .unwrap_or_else(|| Path::new("build").join(&m.graph.spec.name));
    let opts = BundleOptions {
        codegen: CodegenOptions {
            fuse: !a.no_fuse,
            tiling: match a.tiling {
                Some(t) => t.into(),
                None => GpuDevice::new()
                    .map(|d| Tiling::for_adapter(d.adapter()))
                    .unwrap_or(Tiling::CPU),
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
