//! The Lipschitz pass against SVDs of explicitly built operator matrices.

mod common;

use common::*;
use iresnetc::kernels::ConvGeom;
use iresnetc::ops::Op;
use nalgebra::DMatrix;

/// For every conv of a small model, after the pass: the certified bound is
/// >= the exact operator norm (SVD of the explicit matrix at the layer's real
/// input shape), and the power-iteration estimate (rescaled) is within 1e-6.
#[test]
fn certified_bounds_and_estimates_against_svd() {
    for toml in [
        SMALL_CONV,
        // Larger images: there the circular (FFT) bound is what certifies 3x3 convs.
        "name = \"m\"\nkind = \"flow\"\ninput = [2, 24, 24]\n[lipschitz]\npower_tol = 1e-12\npower_max_iters = 2000\n[[stages]]\nblocks = 1\nwidth = 3\n",
    ] {
        let m = model_from_toml(toml);
        let g = &m.graph;
        let mut checked = 0;
        for layer in &m.lipschitz.layers {
            let ix = g.dag.node_indices().find(|&i| g.node(i).name == layer.name).unwrap();
            let Op::Conv2d { geom } = g.node(ix).op else { continue };
            let w = &g.params[&format!("{}.weight", layer.name)].data;
            let mat = iresnetc::spectral::conv_operator_matrix(&geom, w);
            let exact = DMatrix::from_row_slice(geom.out_len(), geom.in_len(), &mat).singular_values().max();
            assert!(layer.certified_bound >= exact, "{}: bound {} < exact {exact}", layer.name, layer.certified_bound);
            let est = layer.sigma_estimate / layer.scale;
            assert!((est - exact).abs() <= 1e-6 * exact, "{}: estimate {est} vs exact {exact}", layer.name);
            assert!(exact <= m.graph.spec.lipschitz.coeff * (1.0 + 1e-7));
            checked += 1;
        }
        assert!(checked >= 3);
        let _ = ConvGeom { cin: 1, cout: 1, h: 1, w: 1, k: 1, stride: 1, pad: 0 };
    }
}

/// A coefficient that makes a block non-contractive is refused with a typed error.
#[test]
fn non_contractive_block_is_refused() {
    // 5 layers at c = 0.99 still multiply to < 1, so force it with weights:
    // a certified bound >= 1 can only come from c >= 1, which the spec refuses.
    let err = iresnetc::spec::ModelSpec::from_toml(
        "name = \"m\"\nkind = \"flow\"\ninput = [2]\n[lipschitz]\ncoeff = 1.5\n[[stages]]\nblocks = 1\nhidden = [4]\n",
        std::path::Path::new("c.toml"),
    )
    .unwrap_err();
    assert!(
        matches!(err, iresnetc::Error::SpecInvalid { ref field, .. } if field == "lipschitz.coeff"),
        "{err}"
    );
}

/// The CIFAR layer whose nearly degenerate top pair (sigma_1 = 13.107149,
/// sigma_2 = 13.106790) stopped the old rule at 13.106797, flagged converged:
/// with the Ritz-residual rule the pass's own estimate (same seed, tolerance and
/// iteration cap as `models/cifar.toml`) reaches sigma_1, against Lanczos run to
/// the end of its precision, and the normalized layer ends at sigma <= c (1 + 1e-7).
/// Ignored (about a minute): `cargo test --release -p iresnetc --test lipschitz -- --ignored`.
#[test]
#[ignore]
fn cifar_stage0_block6_conv0_reaches_sigma_1() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cifar.toml");
    let spec = iresnetc::spec::ModelSpec::from_file(&path).unwrap();
    let g = iresnetc::ir::build(&spec).unwrap();
    let params = iresnetc::weights::init(&g, spec.seed);
    let name = "stage0.block6.conv0";
    let ix = g
        .dag
        .node_indices()
        .find(|&i| g.node(i).name == name)
        .unwrap();
    let Op::Conv2d { geom } = g.node(ix).op else {
        panic!("not a conv")
    };
    let w = &params[&format!("{name}.weight")].data;
    let seed = iresnetc_runtime::rng::Rng::for_name(spec.seed, name).next_u64();
    let lip = &spec.lipschitz;
    let t = std::time::Instant::now();
    let est =
        iresnetc::spectral::conv_sigma_lanczos(&geom, w, lip.power_tol, lip.power_max_iters, seed);
    let t_est = t.elapsed().as_secs_f64();
    let reference = iresnetc::spectral::conv_sigma_lanczos(&geom, w, 1e-15, 3072, 99);
    eprintln!(
        "{name}: estimate {:.9} ({} iterations, converged {}, {t_est:.1} s), reference {:.9} ({} iterations)",
        est.sigma, est.iterations, est.converged, reference.sigma, reference.iterations
    );
    assert!(est.converged);
    assert!((reference.sigma - est.sigma).abs() <= 1e-9 * reference.sigma);
    let c = lip.coeff;
    assert!(reference.sigma / (est.sigma / c) <= c * (1.0 + 1e-7));
}
