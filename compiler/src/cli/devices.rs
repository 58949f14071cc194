//! `iresnetc devices`: the adapters wgpu can see.

use anyhow::{bail, Result};

pub fn run() -> Result<()> {
    bail!("devices: not implemented yet")
}
