//! The Rust API in one page: load a model, certify it, run forward and
//! inverse on the f64 reference executor, compile a GPU bundle, export ONNX.
//!
//! cargo run --release --example library

use std::path::Path;

use iresnetc::pipeline::{load_model, LoadOptions};
use iresnetc::reference::{LogDetMethod, Reference};

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

    // Forward with the model file's log-det estimator, then invert.
    let r = Reference::new(&model.graph);
    let x: Vec<Vec<f64>> = (0..2)
        .map(|s| {
            (0..model.graph.input_dim())
                .map(|i| ((i * 7 + s * 3) % 11) as f64 / 11.0)
                .collect()
        })
        .collect();
    let method = LogDetMethod::from_spec(&model.graph.spec.logdet);
    let fwd = r.forward(&x, &method)?;
    let (back, stats) = r.inverse(&fwd.outputs)?;
    let err = x
        .iter()
        .flatten()
        .zip(back.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!(
        "log-det {:?}; inverse: {} iterations max, |x - inverse(z)| = {err:.2e}",
        fwd.logdet, stats.max_iters
    );

    // A bundle for the GPU runtime (WGSL + plan + normalized weights + ONNX).
    let out = std::env::temp_dir().join("iresnetc-example-bundle");
    iresnetc::bundle::write_bundle(&model, &out, &Default::default())?;
    println!("bundle written to {}", out.display());

    // The forward graph as standard ONNX.
    let proto = iresnetc::onnx::forward(&model.graph, Default::default())?;
    let onnx = std::env::temp_dir().join("iresnetc-example.onnx");
    std::fs::write(&onnx, iresnetc::onnx::encode(&proto))?;
    println!("ONNX written to {}", onnx.display());
    Ok(())
}
