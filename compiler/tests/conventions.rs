//! Squeeze order and factor-out half, both conventions of each, on every backend (the f64
//! reference, tract on the ONNX export, wgpu, the native cpu engine),
//! against index arithmetic written here (not the code under test).
//!
//! The model's blocks are made the identity (every weight, bias, ActNorm scale
//! and shift zero), so that z is a pure rearrangement of x: squeeze 2x2, factor
//! out half, squeeze again, z = [factored-out part, last part]. The expected z is
//! built by reading, for each z position, the x position it must come from.

mod common;

use std::path::Path;

use iresnetc::codegen::{self, entries, CodegenOptions};
use iresnetc::onnx::{self, ConvStyle};
use iresnetc::pipeline::{load_spec, LoadOptions, Model};
use iresnetc::reference::{LogDetMethod, Reference};
use iresnetc::spec::{FactorOutHalf, ModelSpec, SqueezeOrder};
use iresnetc_runtime::tract::TractGraph;
use iresnetc_runtime::GpuExecutor;

const C: usize = 2;
const H: usize = 4;
const W: usize = 4;

fn identity_model(order: SqueezeOrder, half: FactorOutHalf) -> Model {
    let order = match order {
        SqueezeOrder::SpaceToDepth => "space_to_depth",
        SqueezeOrder::PixelUnshuffle => "pixel_unshuffle",
    };
    let half = match half {
        FactorOutHalf::First => "first",
        FactorOutHalf::Second => "second",
    };
    let text = format!(
        r#"
name = "layout-{order}-{half}"
kind = "flow"
input = [{C}, {H}, {W}]
squeeze = true
squeeze_order = "{order}"
factor_out_half = "{half}"
[[stages]]
blocks = 1
width = 3
factor_out = true
[[stages]]
blocks = 1
width = 3
squeeze = true
"#
    );
    let spec = ModelSpec::from_toml(&text, Path::new("inline.toml")).expect("valid spec");
    let mut m = load_spec(spec, &LoadOptions::default(), &|_, _| {}).expect("model builds");
    for t in m.graph.params.values_mut() {
        t.data.iter_mut().for_each(|v| *v = 0.0);
    }
    m
}

/// Where squeezed channel `co` (of `4c` channels) takes its values from:
/// (input channel, row offset, column offset).
fn source_of(order: SqueezeOrder, c: usize, co: usize) -> (usize, usize, usize) {
    match order {
        // Blocks of c channels, one per offset, offsets in row-major order.
        SqueezeOrder::SpaceToDepth => (co % c, co / c / 2, co / c % 2),
        // Groups of 4 channels, one group per input channel.
        SqueezeOrder::PixelUnshuffle => (co / 4, co % 4 / 2, co % 2),
    }
}

/// `x` is `[c, h, w]` flattened; returns the squeezed `[4c, h/2, w/2]`.
fn squeeze_by_hand(x: &[f64], order: SqueezeOrder, c: usize, h: usize, w: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for co in 0..4 * c {
        let (ci, dy, dx) = source_of(order, c, co);
        for i in 0..h / 2 {
            for j in 0..w / 2 {
                y.push(x[ci * h * w + (2 * i + dy) * w + 2 * j + dx]);
            }
        }
    }
    y
}

fn expected_z(x: &[f64], order: SqueezeOrder, half: FactorOutHalf) -> Vec<f64> {
    let a = squeeze_by_hand(x, order, C, H, W); // [8, 2, 2]
    let n = a.len() / 2;
    let (out, keep) = match half {
        FactorOutHalf::First => (&a[..n], &a[n..]),
        FactorOutHalf::Second => (&a[n..], &a[..n]),
    };
    let b = squeeze_by_hand(keep, order, 4 * C / 2, H / 2, W / 2); // [16, 1, 1]
    out.iter().chain(&b).copied().collect()
}

fn cases() -> Vec<(SqueezeOrder, FactorOutHalf)> {
    let mut v = vec![];
    for o in [SqueezeOrder::SpaceToDepth, SqueezeOrder::PixelUnshuffle] {
        for h in [FactorOutHalf::First, FactorOutHalf::Second] {
            v.push((o, h));
        }
    }
    v
}

/// Distinct values, so that any misplaced element shows.
fn xs(batch: usize) -> Vec<Vec<f64>> {
    (0..batch)
        .map(|b| {
            (0..C * H * W)
                .map(|i| (b * 1000 + i) as f64 + 0.25)
                .collect()
        })
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn f32s(v: &[Vec<f64>]) -> Vec<f32> {
    v.iter().flatten().map(|&x| x as f32).collect()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

#[test]
fn defaults_are_the_official_conventions() {
    let spec = ModelSpec::from_toml(
        "name = \"d\"\nkind = \"flow\"\ninput = [2, 4, 4]\n[[stages]]\nblocks = 1\nwidth = 2\n",
        Path::new("d.toml"),
    )
    .expect("valid");
    assert_eq!(spec.squeeze_order, SqueezeOrder::SpaceToDepth);
    assert_eq!(spec.factor_out_half, FactorOutHalf::First);
    let err = ModelSpec::from_toml(
        "name = \"d\"\nkind = \"flow\"\ninput = [2, 4, 4]\nsqueeze_order = \"dcr\"\n[[stages]]\nblocks = 1\nwidth = 2\n",
        Path::new("d.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("d.toml") && err.contains("pixel_unshuffle"),
        "{err}"
    );
}

#[test]
fn reference_follows_both_conventions() {
    for (order, half) in cases() {
        let m = identity_model(order, half);
        let x = xs(2);
        let r = Reference::new(&m.graph);
        let z = r.forward(&x, &LogDetMethod::None).expect("forward").outputs;
        for (xi, zi) in x.iter().zip(&z) {
            assert_eq!(zi, &expected_z(xi, order, half), "{order:?} {half:?}");
        }
        let (back, _) = r.inverse(&z).expect("inverse");
        assert_eq!(back, x, "{order:?} {half:?}: inverse");
    }
}

#[test]
fn onnx_export_follows_both_conventions() {
    for (order, half) in cases() {
        let m = identity_model(order, half);
        let g = &m.graph;
        let x = xs(2);
        let want: Vec<f64> = x
            .iter()
            .flat_map(|xi| expected_z(xi, order, half))
            .collect();
        let proto = onnx::forward(g, ConvStyle::default()).expect("export");
        // The official order is the standard op.
        let ops: Vec<&str> = proto
            .graph
            .as_ref()
            .map(|gr| gr.node.iter().map(|n| n.op_type.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            ops.contains(&"SpaceToDepth"),
            order == SqueezeOrder::SpaceToDepth,
            "{order:?}: {ops:?}"
        );
        let t = TractGraph::load(&onnx::encode(&proto), &[vec![2, C, H, W]], "fwd")
            .expect("tract loads");
        let z = t.run(&[&f32s(&x)]).expect("tract runs").remove(0).1;
        assert_eq!(
            max_diff(&widen(&z), &want),
            0.0,
            "{order:?} {half:?}: tract forward"
        );
        let inv = onnx::inverse(g, &vec![2; g.blocks.len()], ConvStyle::default()).expect("export");
        let inv_ops: Vec<&str> = inv
            .graph
            .as_ref()
            .map(|gr| gr.node.iter().map(|n| n.op_type.as_str()).collect())
            .unwrap_or_default();
        assert!(inv_ops.contains(&"DepthToSpace"), "{inv_ops:?}");
        let t = TractGraph::load(&onnx::encode(&inv), &[vec![2, C * H * W]], "inv")
            .expect("tract loads");
        let zin: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let back = t.run(&[&zin]).expect("tract runs").remove(0).1;
        assert_eq!(
            max_diff(&widen(&back), &x.concat()),
            0.0,
            "{order:?} {half:?}: tract inverse"
        );
    }
}

#[test]
fn wgpu_follows_both_conventions() {
    let Some(dev) = common::device() else {
        return;
    };
    for (order, half) in cases() {
        let m = identity_model(order, half);
        let x = xs(2);
        let want: Vec<f64> = x
            .iter()
            .flat_map(|xi| expected_z(xi, order, half))
            .collect();
        let (bundle, _) =
            codegen::compile_in_memory(&m, &CodegenOptions::default()).expect("codegen");
        let mut ex = GpuExecutor::new(dev, &bundle).expect("executor");
        let z = ex
            .run(entries::ENCODE, 2, &[("x", &f32s(&x))])
            .expect("encode")
            .remove("z")
            .expect("z");
        assert_eq!(
            max_diff(&widen(&z), &want),
            0.0,
            "{order:?} {half:?}: wgpu forward"
        );
        let zin: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let back = ex
            .run(entries::INVERSE, 2, &[("z", &zin)])
            .expect("inverse")
            .remove("x")
            .expect("x");
        assert_eq!(
            max_diff(&widen(&back), &x.concat()),
            0.0,
            "{order:?} {half:?}: wgpu inverse"
        );
    }
}

#[test]
fn cpu_engine_follows_both_conventions() {
    use iresnetc::netdesc;
    use iresnetc_runtime::cpu::CpuEngine;
    for (order, half) in cases() {
        let m = identity_model(order, half);
        let x = xs(2);
        let want: Vec<f64> = x
            .iter()
            .flat_map(|xi| expected_z(xi, order, half))
            .collect();
        let net = netdesc::describe(&m).expect("describable");
        let mut e = CpuEngine::with_threads(net, &netdesc::weights_f32(&m.graph.params), 2)
            .expect("engine builds");
        let (z, _) = e.encode(&f32s(&x), 2, None).expect("encode");
        assert_eq!(
            max_diff(&widen(&z), &want),
            0.0,
            "{order:?} {half:?}: cpu forward"
        );
        let zin: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let (back, _) = e.decode(&zin, 2).expect("decode");
        assert_eq!(
            max_diff(&widen(&back), &x.concat()),
            0.0,
            "{order:?} {half:?}: cpu inverse"
        );
    }
}
