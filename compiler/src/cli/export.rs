//! `iresnetc export-onnx` and the tract backend of `iresnetc run`.

use anyhow::{bail, Result};

use super::run::RunArgs;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    pub model: std::path::PathBuf,
}

pub fn run(_a: &ExportArgs) -> Result<()> {
    bail!("export-onnx: not implemented yet")
}

pub fn run_tract(_a: &RunArgs) -> Result<()> {
    bail!("the tract backend is not implemented yet; use --backend cpu")
}
