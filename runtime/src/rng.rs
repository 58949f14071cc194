//! A small, portable, seeded random generator (SplitMix64 + Box-Muller).
//!
//! Probes and sampling noise must be bit-identical between the compiler's
//! reference executor, the GPU runtime and any external check, across
//! versions of third-party crates; so the generator is ours and tiny.

#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    /// A generator for one named stream of a seed (e.g. a tensor name or
    /// `(block, sample, probe)`), independent of the order streams are used in.
    pub fn for_stream(seed: u64, stream: &[u64]) -> Self {
        let mut h = seed ^ 0x243F_6A88_85A3_08D3;
        for &s in stream {
            h = mix(h ^ s.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        Self::new(h)
    }

    pub fn for_name(seed: u64, name: &str) -> Self {
        // FNV-1a of the name, then mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self::for_stream(seed, &[h])
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller, both values used).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // 1 - u is in (0, 1], so the log is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }

    /// +1 or -1 with equal probability.
    pub fn rademacher(&mut self) -> f64 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 1/sqrt(n) ~ 0.0022 for the mean, sqrt(2/n) ~ 0.0032 for the variance.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "var {var}");
    }

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a = Rng::for_stream(1, &[2, 3]).next_u64();
        assert_eq!(a, Rng::for_stream(1, &[2, 3]).next_u64());
        assert_ne!(a, Rng::for_stream(1, &[3, 2]).next_u64());
        assert_ne!(a, Rng::for_stream(2, &[2, 3]).next_u64());
    }
}

/// Stream identifiers, so that every consumer derives the same numbers.
pub mod streams {
    pub const PROBE: u64 = 1;
    pub const ROULETTE: u64 = 2;
    pub const PRIOR_SAMPLE: u64 = 3;
    pub const DEQUANTIZE: u64 = 4;
    /// The probe seed of repeat `r` of a stochastic log-det estimate (`r >= 1`; repeat 0
    /// keeps the method's own seed).
    pub const REPEAT: u64 = 5;
}

/// The Hutchinson probe of `(block, sample, probe)` for a seed: Gaussian or
/// Rademacher entries. `sample` is the index within the array being run.
pub fn probe_vector(
    seed: u64,
    block: usize,
    sample: usize,
    probe: usize,
    dim: usize,
    rademacher: bool,
) -> Vec<f64> {
    probe_values(seed, block, sample, probe, rademacher)
        .take(dim)
        .collect()
}

/// The values of [`probe_vector`] as an endless stream, for callers that write them straight
/// into their own layout (no vector allocated per block and sample).
pub fn probe_values(
    seed: u64,
    block: usize,
    sample: usize,
    probe: usize,
    rademacher: bool,
) -> impl Iterator<Item = f64> {
    let mut r = Rng::for_stream(
        seed,
        &[streams::PROBE, block as u64, sample as u64, probe as u64],
    );
    std::iter::repeat_with(move || {
        if rademacher {
            r.rademacher()
        } else {
            r.normal()
        }
    })
}
