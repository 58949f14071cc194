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

/// Every 3x3 conv of `models/cifar.toml` (seed 0): the pass's own estimate (same
/// seed, tolerance and iteration cap) agrees within 1e-9 with Lanczos run to the
/// end of its precision, so the normalized layer ends at sigma <= c (1 + 1e-7).
/// (The issue that introduced the Ritz-residual rule saw the old rule stop at
/// sigma_2 on `stage0.block6.conv0` of other weights, sigma_1 = 13.107149 and
/// sigma_2 = 13.106790; `lanczos_resolves_nearly_degenerate_top_pair` in
/// `spectral.rs` reproduces that gap on a constructed operator.)
/// Ignored (minutes): `cargo test --release -p iresnetc --test lipschitz -- --ignored`.
#[test]
#[ignore]
fn cifar_3x3_estimates_reach_sigma_1() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cifar.toml");
    let spec = iresnetc::spec::ModelSpec::from_file(&path).unwrap();
    let g = iresnetc::ir::build(&spec).unwrap();
    let params = iresnetc::weights::init(&g, spec.seed);
    let lip = &spec.lipschitz;
    let (mut worst, mut checked, mut max_iters) = (0.0f64, 0, 0);
    for ix in g.dag.node_indices() {
        let node = g.node(ix);
        let Op::Conv2d { geom } = node.op else {
            continue;
        };
        if geom.k != 3 {
            continue;
        }
        let w = &params[&format!("{}.weight", node.name)].data;
        let seed = iresnetc_runtime::rng::Rng::for_name(spec.seed, &node.name).next_u64();
        let est = iresnetc::spectral::conv_sigma_lanczos(
            &geom,
            w,
            lip.power_tol,
            lip.power_max_iters,
            seed,
        );
        let side = geom.in_len().min(geom.out_len());
        let reference = iresnetc::spectral::conv_sigma_lanczos(&geom, w, 1e-15, side, 99);
        assert!(est.converged, "{}: not converged", node.name);
        let rel = (reference.sigma - est.sigma) / reference.sigma;
        assert!(
            rel.abs() <= 1e-9,
            "{}: estimate {} vs {}",
            node.name,
            est.sigma,
            reference.sigma
        );
        assert!(reference.sigma / (est.sigma / lip.coeff) <= lip.coeff * (1.0 + 1e-7));
        worst = worst.max(rel.abs());
        max_iters = max_iters.max(est.iterations);
        checked += 1;
    }
    eprintln!("{checked} 3x3 convs: worst relative gap to sigma_1 {worst:.1e}, at most {max_iters} iterations");
    assert_eq!(checked, 96);
}
