//! The execution API: one bundle opened through the library on every backend (the f64
//! reference, tract, wgpu on lavapipe), encode / decode / density compared with each other.
//! The reference is the oracle; the f32 backends must agree with it within the tolerances
//! the README states: z and x within 1e-5 relative (max norm), log-det and log p(x) within
//! 1e-4 relative, with the same probes.

mod common;

use common::{device, gpu_lock, model_file, rel_max};
use iresnetc::pipeline::load_bundle;
use iresnetc::reference::ReferenceBackend;
use iresnetc_runtime::backends::{tract::TractBackend, wgpu::WgpuBackend};
use iresnetc_runtime::logdet::LogDetMethod;
use iresnetc_runtime::modes::{self, DEFAULT_CHUNK};
use iresnetc_runtime::rng::Rng;
use iresnetc_runtime::tract::TractBundle;
use iresnetc_runtime::{Backend, Batch, Bundle};

const Z_TOL: f64 = 1e-5;
const LD_TOL: f64 = 1e-4;

/// What one backend computed on the shared inputs.
struct Run {
    name: String,
    z: Vec<f64>,
    logdet: Vec<f64>,
    x_back: Vec<f64>,
    logp: Vec<f64>,
    /// How decoding went per block, as the backend reports it.
    blocks: Vec<iresnetc_runtime::BlockInversion>,
}

fn run_all(be: &mut dyn Backend, x: &Batch, z_ref: Option<&Batch>, method: &LogDetMethod) -> Run {
    let method = method.clone();
    let t = std::time::Instant::now();
    let e = modes::encode(be, x, &method, DEFAULT_CHUNK, &mut |_| {}).expect("encode");
    // Decode the reference's z, so every backend inverts the same latents.
    let z_in = z_ref.unwrap_or(&e.z).clone();
    let t_enc = t.elapsed().as_secs_f64();
    let d = modes::decode(be, &z_in, DEFAULT_CHUNK, &mut |_| {}).expect("decode");
    let t_dec = t.elapsed().as_secs_f64() - t_enc;
    let dens = modes::density(be, x, &method, 7, DEFAULT_CHUNK, &mut |_| {}).expect("density");
    eprintln!(
        "{}: encode {t_enc:.2} s, decode {t_dec:.2} s, density {:.2} s",
        be.info().name,
        t.elapsed().as_secs_f64() - t_enc - t_dec
    );
    Run {
        name: be.info().to_string(),
        z: e.z.data,
        logdet: e.logdet.expect("a log-det"),
        x_back: d.x.data,
        blocks: d.blocks,
        logp: dens.iter().map(|d| d.logp).collect(),
    }
}

fn compare(reference: &Run, other: &Run) {
    let rel_each = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0.0, f64::max)
    };
    let (ez, ex) = (
        rel_max(&other.z, &reference.z),
        rel_max(&other.x_back, &reference.x_back),
    );
    let (eld, elp) = (
        rel_each(&other.logdet, &reference.logdet),
        rel_each(&other.logp, &reference.logp),
    );
    eprintln!(
        "{} vs {}: z {ez:.1e}, logdet {eld:.1e}, inverse {ex:.1e}, log p {elp:.1e}",
        other.name, reference.name
    );
    assert!(ez < Z_TOL, "{}: z {ez}", other.name);
    assert!(ex < Z_TOL, "{}: inverse {ex}", other.name);
    assert!(eld < LD_TOL, "{}: logdet {eld}", other.name);
    assert!(elp < LD_TOL, "{}: log p {elp}", other.name);
}

fn check_bundle(model: &str, batch: usize) {
    let m = model_file(model);
    let dir = std::env::temp_dir().join(format!(
        "iresnetc-backends-{}-{}",
        model,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    iresnetc::bundle::write_bundle(&m, &dir, &Default::default()).expect("bundle");

    // Inputs in [0, 1] (image models dequantize them for the density).
    let dim = m.graph.input_dim();
    let mut r = Rng::new(5);
    let x = Batch::new((0..batch * dim).map(|_| r.uniform()).collect(), dim).expect("batch");

    // Every backend opened from the bundle directory alone.
    let mut reference =
        ReferenceBackend::new(load_bundle(&dir, &|_, _| {}).expect("bundle for the reference"));
    // The model file's estimator (what the bundle's ONNX log-det graph computes), and the
    // series the GPU plan runs (the exact 2-D log-det has no GPU entry point).
    let model_method = reference.model().logdet.method();
    let series = LogDetMethod::Series {
        terms: m.graph.spec.logdet.terms,
        probes: m.graph.spec.logdet.probes,
        kind: m.graph.spec.logdet.probe,
        seed: 3,
    };
    let ref_run = run_all(&mut reference, &x, None, &model_method);
    let ref_series = run_all(&mut reference, &x, None, &series);
    let z_ref = Batch::new(ref_run.z.clone(), m.graph.latent_dim()).expect("z");
    // The reference inverts its own z back to x.
    assert!(
        rel_max(&ref_run.x_back, &x.data) < 1e-6,
        "reference round trip"
    );

    let bundle = Bundle::load(&dir).expect("bundle loads");
    let mut tract =
        TractBackend::new(&bundle, TractBundle::open(&dir).expect("onnx")).expect("tract");
    let tract_run = run_all(&mut tract, &x, Some(&z_ref), &model_method);
    compare(&ref_run, &tract_run);
    // tract iterates each block's step graph: it reports every block, within the certified cap.
    let info = tract.model().clone();
    assert_eq!(tract_run.blocks.len(), info.blocks.len());
    for (b, cap) in tract_run.blocks.iter().zip(&info.inverse_iters) {
        assert!(b.iters >= 1 && b.iters <= *cap, "{b:?} (cap {cap})");
    }

    let _l = gpu_lock();
    if let Some(dev) = device() {
        let mut wgpu = WgpuBackend::new(dev, &bundle).expect("wgpu");
        compare(&ref_series, &run_all(&mut wgpu, &x, Some(&z_ref), &series));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn toy2d_bundle_on_every_backend() {
    check_bundle("toy2d.toml", 5);
}

#[test]
fn cifar_tiny_bundle_on_every_backend() {
    check_bundle("cifar-tiny.toml", 3);
}
