//! Layout ops: squeeze (space-to-depth), injective channel padding, channel slices.
//!
//! Squeeze convention (the one PyTorch's `pixel_unshuffle(2)` uses, so weights
//! and latents line up with PyTorch code): output channel `c*4 + dy*2 + dx`
//! holds input channel `c` at pixel `(2y+dy, 2x+dx)`.

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

pub fn squeeze(x: &[f64], s: &[usize]) -> Vec<f64> {
    let (c, h, w) = (s[0], s[1], s[2]);
    let (ho, wo) = (h / 2, w / 2);
    let mut y = vec![0.0; x.len()];
    for ci in 0..c {
        for yy in 0..h {
            for xx in 0..w {
                let co = ci * 4 + (yy % 2) * 2 + (xx % 2);
                y[(co * ho + yy / 2) * wo + xx / 2] = x[(ci * h + yy) * w + xx];
            }
        }
    }
    y
}

/// Inverse of [`squeeze`]; `s` is the shape *before* squeezing.
pub fn unsqueeze(y: &[f64], s: &[usize]) -> Vec<f64> {
    let (c, h, w) = (s[0], s[1], s[2]);
    let (ho, wo) = (h / 2, w / 2);
    let mut x = vec![0.0; y.len()];
    for ci in 0..c {
        for yy in 0..h {
            for xx in 0..w {
                let co = ci * 4 + (yy % 2) * 2 + (xx % 2);
                x[(ci * h + yy) * w + xx] = y[(co * ho + yy / 2) * wo + xx / 2];
            }
        }
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
