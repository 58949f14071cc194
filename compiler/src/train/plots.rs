//! Pictures of a run, as PNG (drawn pixel by pixel: no fonts or system
//! libraries needed): the 2-D density as a heat map next to the data and the
//! model's samples, a grid of images, and the loss curve.

use std::path::Path;

use crate::error::{Error, Result};

/// An RGB canvas.
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<[u8; 3]>,
}

impl Canvas {
    pub fn new(w: usize, h: usize, bg: [u8; 3]) -> Self {
        Self {
            w,
            h,
            px: vec![bg; w * h],
        }
    }

    pub fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            self.set(
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
                c,
            );
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let err = |e: png::EncodingError| Error::Codegen {
                context: path.display().to_string(),
                message: e.to_string(),
            };
            let mut wr = enc.write_header().map_err(err)?;
            let flat: Vec<u8> = self.px.iter().flatten().copied().collect();
            wr.write_image_data(&flat).map_err(err)?;
        }
        crate::fsutil::write_atomic(path, &bytes)
    }
}

/// A perceptually ordered dark-to-bright colour ramp (t in [0, 1]).
fn ramp(t: f64) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let stops = [
        [0.0, 0.0, 4.0],
        [87.0, 16.0, 110.0],
        [188.0, 55.0, 84.0],
        [249.0, 142.0, 9.0],
        [252.0, 255.0, 164.0],
    ];
    let s = t * (stops.len() - 1) as f64;
    let i = (s.floor() as usize).min(stops.len() - 2);
    let f = s - i as f64;
    let mut c = [0u8; 3];
    for k in 0..3 {
        c[k] = (stops[i][k] * (1.0 - f) + stops[i + 1][k] * f).round() as u8;
    }
    c
}

/// Side of each panel of [`density_panels`], and the square `[-R, R]^2` shown.
pub const PANEL: usize = 256;
pub const RANGE: f64 = 4.0;

/// Grid points (row-major, top row first) at which to evaluate the density.
pub fn grid(n: usize) -> Vec<Vec<f64>> {
    let mut pts = Vec::with_capacity(n * n);
    for r in 0..n {
        for c in 0..n {
            let x = -RANGE + 2.0 * RANGE * (c as f64 + 0.5) / n as f64;
            let y = RANGE - 2.0 * RANGE * (r as f64 + 0.5) / n as f64;
            pts.push(vec![x, y]);
        }
    }
    pts
}

fn scatter(cv: &mut Canvas, x0: usize, pts: &[Vec<f64>]) {
    let n = PANEL as f64;
    let mut counts = vec![0u32; PANEL * PANEL];
    for p in pts {
        let c = ((p[0] + RANGE) / (2.0 * RANGE) * n).floor();
        let r = ((RANGE - p[1]) / (2.0 * RANGE) * n).floor();
        if c >= 0.0 && r >= 0.0 && c < n && r < n {
            counts[r as usize * PANEL + c as usize] += 1;
        }
    }
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    for r in 0..PANEL {
        for c in 0..PANEL {
            let t = (1.0 + counts[r * PANEL + c] as f64).ln() / (1.0 + max).ln();
            cv.set((x0 + c) as i64, r as i64, ramp(t));
        }
    }
}

/// Data | learned density (log p on a `n x n` grid from [`grid`]) | model samples.
pub fn density_panels(
    path: &Path,
    data: &[Vec<f64>],
    logp: &[f64],
    n: usize,
    samples: &[Vec<f64>],
) -> Result<()> {
    let gap = 4;
    let mut cv = Canvas::new(3 * PANEL + 2 * gap, PANEL, [255, 255, 255]);
    scatter(&mut cv, 0, data);
    let p: Vec<f64> = logp.iter().map(|l| l.exp()).collect();
    let max = p.iter().cloned().fold(0.0, f64::max).max(1e-300);
    for r in 0..PANEL {
        for c in 0..PANEL {
            let v = p[(r * n / PANEL) * n + c * n / PANEL] / max;
            cv.set((PANEL + gap + c) as i64, r as i64, ramp(v));
        }
    }
    scatter(&mut cv, 2 * (PANEL + gap), samples);
    cv.save(path)
}

/// Images `[C, H, W]` in [0, 1] (C = 1 or 3) in a grid of `cols` columns.
pub fn image_grid(path: &Path, imgs: &[Vec<f64>], shape: &[usize], cols: usize) -> Result<()> {
    let (c, h, w) = (shape[0], shape[1], shape[2]);
    let cols = cols.max(1);
    let rows = imgs.len().div_ceil(cols).max(1);
    let mut cv = Canvas::new(cols * (w + 1) + 1, rows * (h + 1) + 1, [128, 128, 128]);
    for (k, img) in imgs.iter().enumerate() {
        let (gx, gy) = (1 + (k % cols) * (w + 1), 1 + (k / cols) * (h + 1));
        for y in 0..h {
            for x in 0..w {
                let ch = |i: usize| {
                    (img[(i.min(c - 1) * h + y) * w + x].clamp(0.0, 1.0) * 255.0).round() as u8
                };
                cv.set((gx + x) as i64, (gy + y) as i64, [ch(0), ch(1), ch(2)]);
            }
        }
    }
    cv.save(path)
}

/// Training loss per step (grey) and its running mean (blue), with the
/// held-out losses (red dots); axes from the data's range.
pub fn loss_curve(path: &Path, train: &[(u64, f64)], heldout: &[(u64, f64)]) -> Result<()> {
    let (w, h, m) = (640usize, 360usize, 20.0);
    let mut cv = Canvas::new(w, h, [255, 255, 255]);
    let all = train
        .iter()
        .chain(heldout)
        .map(|p| p.1)
        .filter(|v| v.is_finite());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let smax = train
        .iter()
        .chain(heldout)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    if !lo.is_finite() {
        return cv.save(path);
    }
    let span = (hi - lo).max(1e-12);
    let px = |s: u64, v: f64| {
        (
            m + (w as f64 - 2.0 * m) * s as f64 / smax,
            m + (h as f64 - 2.0 * m) * (hi - v) / span,
        )
    };
    cv.line((m, m), (m, h as f64 - m), [0, 0, 0]);
    cv.line((m, h as f64 - m), (w as f64 - m, h as f64 - m), [0, 0, 0]);
    for pair in train.windows(2) {
        cv.line(
            px(pair[0].0, pair[0].1),
            px(pair[1].0, pair[1].1),
            [190, 190, 190],
        );
    }
    let k = (train.len() / 50).max(1);
    let smooth: Vec<(u64, f64)> = train
        .windows(k)
        .map(|w| {
            (
                w[w.len() - 1].0,
                w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
            )
        })
        .collect();
    for pair in smooth.windows(2) {
        cv.line(
            px(pair[0].0, pair[0].1),
            px(pair[1].0, pair[1].1),
            [30, 80, 200],
        );
    }
    for &(s, v) in heldout {
        let (x, y) = px(s, v);
        for dy in -2..=2 {
            for dx in -2..=2 {
                cv.set(x as i64 + dx, y as i64 + dy, [210, 30, 30]);
            }
        }
    }
    cv.save(path)
}
