//! `iresnetc devices`: the adapters wgpu can see, best first (the one `--backend wgpu` opens
//! unless `IRESNETC_ADAPTER` names another).

use anyhow::{bail, Result};

use iresnetc_runtime::{list_adapters, ADAPTER_ENV, BACKEND_ENV};

pub fn run() -> Result<()> {
    let adapters = list_adapters();
    if adapters.is_empty() {
        bail!(iresnetc_runtime::RuntimeError::NoAdapter);
    }
    for (i, a) in adapters.iter().enumerate() {
        let note = if a.is_software {
            "  [software: for tests, not for timings]"
        } else {
            ""
        };
        println!("{i}: {a}{note}");
    }
    println!(
        "\nselect one with {ADAPTER_ENV}=<part of its name>; restrict APIs with {BACKEND_ENV}=vulkan|gl|..."
    );
    Ok(())
}
