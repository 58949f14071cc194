//! The execution API: one bundle opened through the library on every backend (the f64
//! reference, tract, wgpu on lavapipe), encode / decode / density compared with each other;
//! and every mode (forward, log-det, density, sampling) run over several chunks on each of
//! the four backends (the native cpu engine too) against one call per sample.
//! The reference is the oracle; the f32 backends must agree with it within the tolerances
//! the README states: z and x within 1e-5 relative (max norm), log-det and log p(x) within
//! 1e-4 relative, with the same probes.

mod common;

use common::{device, gpu_lock, model_file, rel_max};
use iresnetc::pipeline::load_bundle;
use iresnetc::reference::ReferenceBackend;
use iresnetc_runtime::backends::{cpu::CpuBackend, tract::TractBackend, wgpu::WgpuBackend};
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

/// Two full chunks and a partial one: every mode crosses two chunk boundaries.
const SPAN: usize = 2 * DEFAULT_CHUNK + 3;
/// The dequantization and prior-draw seed of the chunked runs.
const MODE_SEED: u64 = 11;

/// `row` of `b` as a batch of one.
fn one(b: &Batch, row: usize) -> Batch {
    let per = b.per_sample();
    Batch::new(b.data[row * per..(row + 1) * per].to_vec(), per).expect("row")
}

/// Largest `|a - b| / max(1, |b|)` over one pair of rows.
fn rel_row(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// `log N(z; mean, exp(log_std))` written out here (not `modes::prior_logp`).
fn log_normal(z: &[f64], mean: &[f64], log_std: &[f64]) -> f64 {
    let mut acc = 0.0;
    for i in 0..z.len() {
        let t = (z[i] - mean[i]) / log_std[i].exp();
        acc += -0.5 * t * t - log_std[i] - 0.5 * (2.0 * std::f64::consts::PI).ln();
    }
    acc
}

/// Sample `index` of an array dequantized by hand: `(255 x + u) / 256 - 0.5` with `u` the
/// uniforms of that sample's stream of the seed.
fn dequantized_by_hand(x: &Batch, index: usize, seed: u64) -> Batch {
    let mut r = Rng::for_stream(
        seed,
        &[iresnetc_runtime::rng::streams::DEQUANTIZE, index as u64],
    );
    let row = one(x, index);
    let data = row
        .data
        .iter()
        .map(|v| (255.0 * v + r.uniform()) / 256.0 - 0.5)
        .collect();
    Batch::new(data, row.per_sample()).expect("row")
}

/// Draw `index` of `--mode sample`, reproduced from its seeded stream: one standard normal per
/// latent element, scaled and shifted by the prior.
fn prior_draw_by_hand(mean: &[f64], log_std: &[f64], seed: u64, index: usize) -> Vec<f64> {
    let mut r = Rng::for_stream(
        seed,
        &[iresnetc_runtime::rng::streams::PRIOR_SAMPLE, index as u64],
    );
    (0..mean.len())
        .map(|i| mean[i] + log_std[i].exp() * r.normal())
        .collect()
}

/// Tolerances of one backend against itself: chunked vs one call per sample (the same
/// arithmetic on a different batch size) and the inverse (iterated to the model's tolerance).
struct SelfTol {
    same: f64,
    inverse: f64,
}

/// Forward, log-det, density and sampling over `SPAN` samples in chunks of `DEFAULT_CHUNK`,
/// each sample against one call of the backend on that sample alone (with its index in the
/// array, so it gets the same probes, dequantization noise and prior draw).
fn chunked_equals_one_call_per_sample(be: &mut dyn Backend, x: &Batch, tol: &SelfTol) {
    let name = be.info().to_string();
    let method = be.model().logdet.method();
    // A probe-based estimator, or the log-det would not depend on the sample's index.
    assert!(
        matches!(method, LogDetMethod::Series { probes, .. } if probes > 0),
        "{method:?}"
    );
    assert!(be.model().dequantize, "the density must dequantize");
    let enc = modes::encode(be, x, &method, DEFAULT_CHUNK, &mut |_| {}).expect("encode");
    let lds = enc.logdet.expect("log-det");
    let dens =
        modes::density(be, x, &method, MODE_SEED, DEFAULT_CHUNK, &mut |_| {}).expect("density");
    let prior = be.prior().expect("prior");
    let (mut ez, mut eld, mut elp) = (0.0f64, 0.0f64, 0.0f64);
    let zs: Vec<&[f64]> = enc.z.rows().collect();
    assert_eq!((zs.len(), lds.len(), dens.len()), (SPAN, SPAN, SPAN));
    for i in 0..SPAN {
        let e = be.encode(&one(x, i), &method, i).expect("one sample");
        ez = ez.max(rel_row(zs[i], &e.z.data));
        let ld = e.logdet.expect("log-det")[0];
        eld = eld.max((lds[i] - ld).abs() / ld.abs().max(1.0));
        let d = be
            .encode(&dequantized_by_hand(x, i, MODE_SEED), &method, i)
            .expect("one dequantized sample");
        let logp = log_normal(&d.z.data, &prior.mean, &prior.log_std) + d.logdet.expect("ld")[0];
        elp = elp.max((dens[i].logp - logp).abs() / logp.abs().max(1.0));
    }
    eprintln!(
        "{name}: chunked vs one call per sample: z {ez:.1e}, logdet {eld:.1e}, log p {elp:.1e}"
    );
    assert!(ez <= tol.same, "{name}: z {ez:e}");
    assert!(eld <= tol.same, "{name}: logdet {eld:e}");
    assert!(elp <= tol.same, "{name}: log p {elp:e}");

    // Sampling: the prior draws are the ones reproduced here from their streams, and each
    // sample is the inverse of its draw (decoded alone, and encoded back to the draw).
    let draws = modes::prior_draws(&prior, SPAN, MODE_SEED);
    let s = modes::sample(be, SPAN, MODE_SEED, DEFAULT_CHUNK, &mut |_| {}).expect("sample");
    let xs: Vec<&[f64]> = s.x.rows().collect();
    assert_eq!(xs.len(), SPAN);
    let (mut edraw, mut edec, mut eround) = (0.0f64, 0.0f64, 0.0f64);
    for (i, x_i) in xs.iter().enumerate() {
        let z = prior_draw_by_hand(&prior.mean, &prior.log_std, MODE_SEED, i);
        edraw = edraw.max(rel_row(one(&draws, i).data.as_slice(), &z));
        let zb = Batch::new(z.clone(), z.len()).expect("draw");
        let alone = be.decode(&zb).expect("decode one");
        edec = edec.max(rel_row(x_i, &alone.x.data[..z.len()]));
        let back = be
            .encode(&one(&s.x, i), &LogDetMethod::None, i)
            .expect("encode a sample");
        eround = eround.max(rel_row(&back.z.data, &z));
    }
    eprintln!(
        "{name}: sampling: draws {edraw:.1e}, vs decode alone {edec:.1e}, forward(sample) vs draw {eround:.1e}"
    );
    assert_eq!(edraw, 0.0, "{name}: prior draws");
    assert!(
        edec <= tol.inverse,
        "{name}: sample vs decode alone {edec:e}"
    );
    assert!(
        eround <= tol.inverse,
        "{name}: forward(sample) vs its draw {eround:e}"
    );
}

/// `chunked_equals_one_call_per_sample` on the reference, the native cpu engine, tract and
/// wgpu, all opened from one cifar-tiny bundle (dequantized 8-bit input, series log-det).
#[test]
fn modes_over_several_chunks_match_one_call_per_sample_on_every_backend() {
    let m = model_file("cifar-tiny.toml");
    let dir = std::env::temp_dir().join(format!("iresnetc-chunks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    iresnetc::bundle::write_bundle(&m, &dir, &Default::default()).expect("bundle");
    let dim = m.graph.input_dim();
    let mut r = Rng::new(23);
    let x = Batch::new((0..SPAN * dim).map(|_| r.uniform()).collect(), dim).expect("batch");

    // f64: the same operations whatever the batch, so equal to rounding; the inverse stops at
    // the model's tolerance (1e-9) per batch.
    let f64_tol = SelfTol {
        same: 1e-12,
        inverse: 1e-7,
    };
    // f32: a batch of one may take other kernel paths (a few ulps); the inverse converges to
    // f32 precision.
    let f32_tol = SelfTol {
        same: 1e-5,
        inverse: 1e-4,
    };
    let mut reference =
        ReferenceBackend::new(load_bundle(&dir, &|_, _| {}).expect("bundle for the reference"));
    chunked_equals_one_call_per_sample(&mut reference, &x, &f64_tol);
    let mut cpu = CpuBackend::open_bundle(&dir).expect("cpu backend");
    chunked_equals_one_call_per_sample(&mut cpu, &x, &f32_tol);
    let bundle = Bundle::load(&dir).expect("bundle loads");
    let mut tract =
        TractBackend::new(&bundle, TractBundle::open(&dir).expect("onnx")).expect("tract");
    chunked_equals_one_call_per_sample(&mut tract, &x, &f32_tol);
    let _l = gpu_lock();
    if let Some(dev) = device() {
        let mut wgpu = WgpuBackend::new(dev, &bundle).expect("wgpu");
        chunked_equals_one_call_per_sample(&mut wgpu, &x, &f32_tol);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Found by the test above: tract 0.23 computed `y - conv(x)` wrongly at batch 1 when the conv
/// is a 3x3 "same" conv on a 1x1 image (the inverse step of a scale squeezed to 1x1). The ONNX
/// export now writes such a conv as the 1x1 conv of its centre tap (`onnx/build/mod.rs`).
#[test]
fn tract_inverse_of_one_sample_matches_the_reference() {
    let m = common::model_from_toml(
        "name = \"two-squeezes\"\nkind = \"flow\"\ninput = [3, 4, 4]\nsqueeze = true\n[[stages]]\nblocks = 1\nwidth = 16\n[[stages]]\nblocks = 1\nwidth = 16\nsqueeze = true\n",
    );
    let dir = std::env::temp_dir().join(format!("iresnetc-tract-b1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    iresnetc::bundle::write_bundle(&m, &dir, &Default::default()).expect("bundle");
    let mut reference =
        ReferenceBackend::new(load_bundle(&dir, &|_, _| {}).expect("bundle for the reference"));
    let bundle = Bundle::load(&dir).expect("bundle loads");
    let mut tract =
        TractBackend::new(&bundle, TractBundle::open(&dir).expect("onnx")).expect("tract");
    let prior = reference.prior().expect("prior");
    for batch in [2, 1] {
        let z = modes::prior_draws(&prior, batch, MODE_SEED);
        let want = reference.decode(&z).expect("reference").x;
        let got = tract.decode(&z).expect("tract").x;
        let e = rel_max(&got.data, &want.data);
        eprintln!("tract inverse at batch {batch}: {e:.1e}");
        assert!(e < 1e-5, "tract inverse at batch {batch}: {e:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
