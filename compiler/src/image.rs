//! Pictures of batches: a grid of image samples as a PNG (the `png` crate encodes).

use std::path::Path;

use crate::error::{Error, Result};

/// Writes samples `x` (`[N, C, H, W]` flattened, C = 1 or 3; other channel counts show their
/// first three) as a grid of tiles separated by one-pixel lines; a pixel is
/// `clamp(x + offset, 0, 1) * 255` (offset 0.5 undoes the dequantization shift).
pub fn write_grid(path: &Path, x: &[f64], shape: &[usize], offset: f64) -> Result<()> {
    let bad = |reason: String| Error::Unsupported {
        what: format!("picture {}", path.display()),
        reason,
    };
    let &[c, h, w] = shape else {
        return Err(bad(format!(
            "needs an image shape [C, H, W], got {shape:?}"
        )));
    };
    let per = c * h * w;
    if per == 0 || !x.len().is_multiple_of(per) {
        return Err(bad(format!(
            "{} values are not whole images of {shape:?}",
            x.len()
        )));
    }
    let n = x.len() / per;
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    let rows = n.div_ceil(cols).max(1);
    let (gw, gh) = (cols * (w + 1) + 1, rows * (h + 1) + 1);
    if gw > u32::MAX as usize / 2 || gh > u32::MAX as usize / 2 {
        return Err(bad(format!(
            "a {gw}x{gh} grid is too large for a PNG; draw fewer samples"
        )));
    }
    // The pixels and the encoded copy must fit in memory before anything is allocated.
    let bytes = iresnetc_runtime::fsread::checked_bytes("PNG grid", &[gw as u64, gh as u64, 3])
        .map_err(|e| bad(e.to_string()))?;
    iresnetc_runtime::fsread::check_budget("PNG grid", bytes.saturating_mul(2))
        .map_err(|e| bad(e.to_string()))?;
    let mut rgb = vec![0u8; gw * gh * 3];
    for (i, s) in x.chunks(per).enumerate() {
        let (ox, oy) = (1 + (i % cols) * (w + 1), 1 + (i / cols) * (h + 1));
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..3 {
                    let v = s[(ch.min(c - 1) * h + y) * w + xx] + offset;
                    rgb[((oy + y) * gw + ox + xx) * 3 + ch] =
                        (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, gw as u32, gh as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| bad(e.to_string()))?;
        wr.write_image_data(&rgb).map_err(|e| bad(e.to_string()))?;
    }
    crate::fsutil::write_atomic(path, &bytes)
}
