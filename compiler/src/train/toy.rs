//! The 2-D toy densities of the FFJORD / Residual Flows experiments, drawn
//! from our seeded generator (the shapes and scales follow those papers'
//! generators; the random streams are ours).

use std::f64::consts::PI;

use iresnetc_runtime::rng::Rng;

pub const NAMES: [&str; 8] = [
    "8gaussians",
    "checkerboard",
    "2spirals",
    "pinwheel",
    "moons",
    "rings",
    "circles",
    "swissroll",
];

pub fn is_toy(name: &str) -> bool {
    NAMES.contains(&name)
}

/// `n` points of the named density, or None for an unknown name.
pub fn sample(name: &str, n: usize, rng: &mut Rng) -> Option<Vec<[f64; 2]>> {
    let mut pts = Vec::with_capacity(n);
    for i in 0..n {
        pts.push(point(name, i, n, rng)?);
    }
    Some(pts)
}

fn point(name: &str, i: usize, n: usize, r: &mut Rng) -> Option<[f64; 2]> {
    Some(match name {
        "8gaussians" => {
            let k = (r.uniform() * 8.0).floor().min(7.0);
            let a = k * PI / 4.0;
            let (cx, cy) = (4.0 * a.cos(), 4.0 * a.sin());
            [
                (cx + 0.5 * r.normal()) / 1.414,
                (cy + 0.5 * r.normal()) / 1.414,
            ]
        }
        "checkerboard" => {
            let x1 = r.uniform() * 4.0 - 2.0;
            let x2 = r.uniform() - 2.0 * (r.uniform() * 2.0).floor().min(1.0);
            let x2 = x2 + (x1.floor().rem_euclid(2.0));
            [2.0 * x1, 2.0 * x2]
        }
        "2spirals" => {
            let t = r.uniform().sqrt() * 540.0 * 2.0 * PI / 360.0;
            let sign = if i.is_multiple_of(2) { 1.0 } else { -1.0 };
            let x = sign * (-t.cos() * t + 0.5 * r.uniform());
            let y = sign * (t.sin() * t + 0.5 * r.uniform());
            [x / 3.0 + 0.1 * r.normal(), y / 3.0 + 0.1 * r.normal()]
        }
        "pinwheel" => {
            let class = (i * 5 / n.max(1)).min(4) as f64;
            let f0 = 0.3 * r.normal() + 1.0;
            let f1 = 0.1 * r.normal();
            let angle = class * 2.0 * PI / 5.0 + 0.25 * f0.exp();
            let (c, s) = (angle.cos(), angle.sin());
            [2.0 * (f0 * c - f1 * s), 2.0 * (f0 * s + f1 * c)]
        }
        "moons" => {
            let t = r.uniform() * PI;
            let (x, y) = if i.is_multiple_of(2) {
                (t.cos(), t.sin())
            } else {
                (1.0 - t.cos(), 0.5 - t.sin())
            };
            [
                2.0 * (x + 0.1 * r.normal()) - 1.0,
                2.0 * (y + 0.1 * r.normal()) - 0.2,
            ]
        }
        "rings" => {
            let ring = (i % 4) as f64 + 1.0;
            let a = r.uniform() * 2.0 * PI;
            [
                3.0 * 0.25 * ring * a.cos() + 0.08 * r.normal(),
                3.0 * 0.25 * ring * a.sin() + 0.08 * r.normal(),
            ]
        }
        "circles" => {
            let rad = if i.is_multiple_of(2) { 1.0 } else { 0.5 };
            let a = r.uniform() * 2.0 * PI;
            [
                3.0 * (rad * a.cos() + 0.08 * r.normal()),
                3.0 * (rad * a.sin() + 0.08 * r.normal()),
            ]
        }
        "swissroll" => {
            let t = 1.5 * PI * (1.0 + 2.0 * r.uniform());
            [
                (t * t.cos() + r.normal()) / 5.0,
                (t * t.sin() + r.normal()) / 5.0,
            ]
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every generator gives finite points with the spread of its density, and
    /// different streams give different points.
    #[test]
    fn generators_give_finite_points_of_the_right_scale() {
        for name in NAMES {
            let pts = sample(name, 2000, &mut Rng::new(1)).unwrap();
            let other = sample(name, 2000, &mut Rng::new(2)).unwrap();
            assert_ne!(pts, other, "{name}");
            let m = pts
                .iter()
                .flat_map(|p| p.iter())
                .fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(pts.iter().flatten().all(|v| v.is_finite()), "{name}");
            assert!(m > 1.0 && m < 8.0, "{name}: largest |coordinate| {m}");
        }
        // 8gaussians: every point near one of the 8 centres of radius 4/1.414.
        let pts = sample("8gaussians", 1000, &mut Rng::new(3)).unwrap();
        let mean_r = pts
            .iter()
            .map(|p| (p[0] * p[0] + p[1] * p[1]).sqrt())
            .sum::<f64>()
            / 1000.0;
        assert!((mean_r - 4.0 / 1.414).abs() < 0.1, "mean radius {mean_r}");
    }
}
