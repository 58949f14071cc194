//! `iresnetc bench`: per model and entry point, every backend, fused vs unfused.

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    pub model: Vec<std::path::PathBuf>,
}

pub fn run(_a: &BenchArgs) -> Result<()> {
    bail!("bench: not implemented yet")
}
