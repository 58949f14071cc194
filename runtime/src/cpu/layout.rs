//! Layout passes on the engine's `[C][B][H*W]` activations: to and from the callers' `[B][C*H*W]`,
//! squeeze and its inverse, channel padding, and the factor-out split.

use rayon::prelude::*;

use super::net::SqueezeOrder;

/// `[B][C][HW] -> [C][B][HW]` (and back with `to_batch_major`).
pub fn to_channel_major(x: &[f32], dst: &mut [f32], imgs: usize, c: usize, hw: usize) {
    dst[..c * imgs * hw]
        .par_chunks_mut(imgs * hw)
        .enumerate()
        .for_each(|(ci, out)| {
            for n in 0..imgs {
                out[n * hw..(n + 1) * hw].copy_from_slice(&x[(n * c + ci) * hw..][..hw]);
            }
        });
}

/// Writes channels `c0..c0+len` of `src` (`[C][B][HW]`) into each sample's row of `dst`
/// (`[B][row]`), at `offset` of the row, in CHW order.
#[allow(clippy::too_many_arguments)]
pub fn to_batch_major(
    src: &[f32],
    dst: &mut [f32],
    imgs: usize,
    c0: usize,
    len: usize,
    hw: usize,
    row: usize,
    offset: usize,
) {
    dst.par_chunks_mut(row)
        .take(imgs)
        .enumerate()
        .for_each(|(n, out)| {
            for ci in 0..len {
                out[offset + ci * hw..][..hw]
                    .copy_from_slice(&src[((c0 + ci) * imgs + n) * hw..][..hw]);
            }
        });
}

/// Inverse of [`to_batch_major`]: reads each sample's `len` channels at `offset` of its row into
/// channels `c0..c0+len` of `dst`.
#[allow(clippy::too_many_arguments)]
pub fn from_batch_major(
    src: &[f32],
    dst: &mut [f32],
    imgs: usize,
    c0: usize,
    len: usize,
    hw: usize,
    row: usize,
    offset: usize,
) {
    dst[c0 * imgs * hw..(c0 + len) * imgs * hw]
        .par_chunks_mut(imgs * hw)
        .enumerate()
        .for_each(|(ci, out)| {
            for n in 0..imgs {
                out[n * hw..(n + 1) * hw].copy_from_slice(&src[n * row + offset + ci * hw..][..hw]);
            }
        });
}

/// 2x2 space-to-depth of `[c][imgs][h][w]` into `[4c][imgs][h/2][w/2]`; with `inverse`, the
/// other way (`src` squeezed, `dst` of shape `[c][imgs][h][w]`).
#[allow(clippy::too_many_arguments)]
pub fn squeeze(
    src: &[f32],
    dst: &mut [f32],
    order: SqueezeOrder,
    c: usize,
    imgs: usize,
    h: usize,
    w: usize,
    inverse: bool,
) {
    let (ho, wo) = (h / 2, w / 2);
    let small = imgs * ho * wo;
    let n = c * imgs * h * w;
    // Parallel over the squeezed channels: each one is a strided gather of one input channel.
    if !inverse {
        dst[..n]
            .par_chunks_mut(small)
            .enumerate()
            .for_each(|(co, out)| {
                let (ci, dy, dx) = unsqueeze_channel(order, c, co);
                for img in 0..imgs {
                    let s = &src[(ci * imgs + img) * h * w..][..h * w];
                    for y in 0..ho {
                        for x in 0..wo {
                            out[(img * ho + y) * wo + x] = s[(2 * y + dy) * w + 2 * x + dx];
                        }
                    }
                }
            });
    } else {
        dst[..n]
            .par_chunks_mut(imgs * h * w)
            .enumerate()
            .for_each(|(ci, out)| {
                for dy in 0..2 {
                    for dx in 0..2 {
                        let co = super::engine::squeeze_channel(order, c, ci, dy, dx);
                        let s = &src[co * small..][..small];
                        for img in 0..imgs {
                            for y in 0..ho {
                                for x in 0..wo {
                                    out[(img * h + 2 * y + dy) * w + 2 * x + dx] =
                                        s[(img * ho + y) * wo + x];
                                }
                            }
                        }
                    }
                }
            });
    }
}

/// `(input channel, dy, dx)` of squeezed channel `co`.
fn unsqueeze_channel(order: SqueezeOrder, c: usize, co: usize) -> (usize, usize, usize) {
    match order {
        SqueezeOrder::SpaceToDepth => (co % c, (co / c) / 2, (co / c) % 2),
        SqueezeOrder::PixelUnshuffle => (co / 4, (co % 4) / 2, co % 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The squeeze maps, written from the definitions, are inverse bijections.
    #[test]
    fn squeeze_orders_round_trip() {
        for order in [SqueezeOrder::SpaceToDepth, SqueezeOrder::PixelUnshuffle] {
            let (c, imgs, h, w) = (3, 2, 4, 6);
            let x: Vec<f32> = (0..c * imgs * h * w).map(|i| i as f32).collect();
            let mut y = vec![0.0; x.len()];
            squeeze(&x, &mut y, order, c, imgs, h, w, false);
            // Every squeezed channel holds input channel ci at cell offset (dy, dx).
            for co in 0..4 * c {
                let (ci, dy, dx) = unsqueeze_channel(order, c, co);
                assert_eq!(
                    super::super::engine::squeeze_channel(order, c, ci, dy, dx),
                    co
                );
                let v = y[(co * imgs + 1) * (h / 2) * (w / 2) + (w / 2) + 2];
                assert_eq!(v, x[(ci * imgs + 1) * h * w + (2 + dy) * w + 4 + dx]);
            }
            let mut back = vec![0.0; x.len()];
            squeeze(&y, &mut back, order, c, imgs, h, w, true);
            assert_eq!(back, x);
        }
    }
}
