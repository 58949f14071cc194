//! Tests of the plan's grid arithmetic and weight layouts.

use super::*;

/// Tiles counted apart from `folded_grid`: every row of every sample lies in exactly one
/// tile `z * x_count + x`, and no tile past the last row is launched beyond one grid row.
#[test]
fn folded_grid_covers_every_row_once() {
    for (rows, per, batch, max) in [
        (16, 64, 1, 65_535),
        (16, 64, 5, 65_535),
        (256, 64, 64, 65_535),
        (49, 64, 3, 2),
        (7, 2, 9, 6),
    ] {
        let [x, y, z] = folded_grid([rows, per, 4], batch, max).unwrap();
        assert_eq!(y, 4);
        assert!(x <= max && z <= max);
        let total = rows as u64 * batch as u64;
        let needed = total.div_ceil(per as u64);
        let launched = x as u64 * z as u64;
        assert!(
            launched >= needed && launched < needed + x as u64,
            "{rows} {per} {batch}: {x}x{z} for {needed}"
        );
    }
    // 32 tiles do not fit 3 x 3; 2^40 rows do not fit 65,535^2 tiles of one.
    assert_eq!(folded_grid([7, 2, 4], 9, 3), None);
    assert_eq!(folded_grid([1 << 20, 1, 1], 1 << 20, 65_535), None);
}

/// The adjoint layout against its definition, index by index: out[i][o][ky][kx] =
/// w[o][i][k-1-ky][k-1-kx].
#[test]
fn adjoint_layout_transposes_and_flips() {
    let (cout, cin, k) = (3usize, 5usize, 3usize);
    let w: Vec<f32> = (0..cout * cin * k * k).map(|v| v as f32).collect();
    let layout = WeightLayout::Adjoint {
        cout: cout as u32,
        k: k as u32,
    };
    let a = layout.arrange(&w).expect("fits");
    for o in 0..cout {
        for i in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    let src = ((o * cin + i) * k + (k - 1 - ky)) * k + (k - 1 - kx);
                    let dst = ((i * cout + o) * k + ky) * k + kx;
                    assert_eq!(a[dst], w[src]);
                }
            }
        }
    }
    assert!(WeightLayout::Adjoint { cout: 4, k: 3 }
        .arrange(&w)
        .is_none());
    assert!(WeightLayout::Adjoint { cout: 0, k: 3 }
        .arrange(&w)
        .is_none());
}
