//! Layout ops: squeeze (space-to-depth), injective channel padding, channel slices.
//!
//! Squeeze 2x2 moves input channel `c` at pixel `(2y+dy, 2x+dx)` to pixel `(y, x)`
//! of an output channel that depends on the model's [`SqueezeOrder`]:
//! `(2*dy + dx)*C + c` (`space_to_depth`: the official i-ResNet code, ONNX
//! `SpaceToDepth`) or `4*c + 2*dy + dx` (`pixel_unshuffle`: PyTorch, Residual Flows).

use crate::spec::SqueezeOrder;

pub fn squeeze_shape(s: &[usize]) -> Result<Vec<usize>, String> {
    crate::spec::squeezed(s)
}

pub fn pad_shape(s: &[usize], channels: usize) -> Result<Vec<usize>, String> {
    if s.len() != 3 || channels < s[0] {
        return Err(format!("cannot pad {s:?} to {channels} channels"));
    }
    Ok(vec![channels, s[1], s[2]])
}

pub fn slice_shape(s: &[usize], start: usize, len: usize) -> Result<Vec<usize>, String> {
    if s.is_empty() || start + len > s[0] || len == 0 {
        return Err(format!(
            "channel slice {start}..{} out of {s:?}",
            start + len
        ));
    }
    let mut o = s.to_vec();
    o[0] = len;
    Ok(o)
}

/// Output channel of input channel `c` (of `channels`) at offset `(dy, dx)`.
pub fn squeezed_channel(
    order: SqueezeOrder,
    channels: usize,
    c: usize,
    dy: usize,
    dx: usize,
) -> usize {
    match order {
        SqueezeOrder::SpaceToDepth => (2 * dy + dx) * channels + c,
        SqueezeOrder::PixelUnshuffle => 4 * c + 2 * dy + dx,
    }
}

/// Pairs (index in the unsqueezed `[C, H, W]` tensor `s`, index in the squeezed one).
fn squeeze_pairs(s: &[usize], order: SqueezeOrder) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (c, h, w) = (s[0], s[1], s[2]);
    let (ho, wo) = (h / 2, w / 2);
    (0..c).flat_map(move |ci| {
        (0..h).flat_map(move |yy| {
            (0..w).map(move |xx| {
                let co = squeezed_channel(order, c, ci, yy % 2, xx % 2);
                ((ci * h + yy) * w + xx, (co * ho + yy / 2) * wo + xx / 2)
            })
        })
    })
}

pub fn squeeze(x: &[f64], s: &[usize], order: SqueezeOrder) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (i, o) in squeeze_pairs(s, order) {
        y[o] = x[i];
    }
    y
}

/// Inverse of [`squeeze`]; `s` is the shape *before* squeezing.
pub fn unsqueeze(y: &[f64], s: &[usize], order: SqueezeOrder) -> Vec<f64> {
    let mut x = vec![0.0; y.len()];
    for (i, o) in squeeze_pairs(s, order) {
        x[i] = y[o];
    }
    x
}

pub fn pad_channels(x: &[f64], s: &[usize], channels: usize) -> Vec<f64> {
    let mut y = x.to_vec();
    y.resize(channels * s[1..].iter().product::<usize>(), 0.0);
    y
}

pub fn slice_channels(x: &[f64], s: &[usize], start: usize, len: usize) -> Vec<f64> {
    let per = s[1..].iter().product::<usize>().max(1);
    x[start * per..(start + len) * per].to_vec()
}
