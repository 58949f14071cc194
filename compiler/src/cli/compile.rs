//! `iresnetc compile` and the wgpu backend of `iresnetc run`.

use anyhow::{bail, Result};

use super::run::RunArgs;

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    pub model: std::path::PathBuf,
}

pub fn run(_a: &CompileArgs) -> Result<()> {
    bail!("compile: not implemented yet")
}

pub fn run_wgpu(_a: &RunArgs) -> Result<()> {
    bail!("the wgpu backend is not implemented yet; use --backend cpu")
}
