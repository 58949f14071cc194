//! The Rust API in one page: load and certify a model, compile a bundle, open it on a backend
//! (the f64 reference and tract here; wgpu the same way with a `GpuDevice`), then the density
//! and samples of a batch through the one `Backend` trait.
//!
//! cargo run --release --example library

use std::path::Path;

use iresnetc::pipeline::{load_model, LoadOptions};
use iresnetc::reference::ReferenceBackend;
use iresnetc_runtime::backends::tract::TractBackend;
use iresnetc_runtime::modes::{self, DEFAULT_CHUNK};
use iresnetc_runtime::tract::TractBundle;
use iresnetc_runtime::{Backend, Batch, Bundle};

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Parse, build the IR, initialize weights from the seed, normalize and certify.
    let model = load_model(
        &root.join("models/cifar-tiny.toml"),
        &LoadOptions::default(),
        &|_, _| {},
    )?;
    println!(
        "{}: {} parameters, largest certified block Lipschitz bound {:.4}",
        model.graph.spec.name,
        model.graph.param_count(),
        model.lipschitz.max_block_bound
    );

    // A bundle: WGSL + plan + normalized weights + ONNX graphs; the runtime needs nothing else.
    let dir = std::env::temp_dir().join("iresnetc-example-bundle");
    iresnetc::bundle::write_bundle(&model, &dir, &Default::default())?;
    let bundle = Bundle::load(&dir)?;
    let mut backends: Vec<Box<dyn Backend>> = vec![
        Box::new(ReferenceBackend::new(model.clone())),
        Box::new(TractBackend::new(&bundle, TractBundle::open(&dir)?)?),
    ];

    // A batch of two images in [0, 1] (the model dequantizes them for the density).
    let dim = model.graph.input_dim();
    let x = Batch::new(
        (0..2 * dim).map(|i| ((i * 7) % 11) as f64 / 11.0).collect(),
        dim,
    )?;
    for be in backends.iter_mut() {
        let method = be.model().logdet.method();
        let seed = be.model().logdet.seed;
        let d = modes::density(be.as_mut(), &x, &method, seed, DEFAULT_CHUNK, &mut |_| {})?;
        let s = modes::sample(be.as_mut(), 4, seed, DEFAULT_CHUNK, &mut |_| {})?;
        println!(
            "{:<40} bits/dim {:.4} {:.4}; 4 samples, first pixel {:+.4}",
            be.info().to_string(),
            d[0].bits_per_dim,
            d[1].bits_per_dim,
            s.x.data[0]
        );
    }
    Ok(())
}
