// The seeded random streams of the native runtimes (runtime/src/rng.rs, logdet.rs,
// modes.rs), so that a seed gives the browser the same probes, roulette draws,
// dequantization noise and prior draws. 64-bit state in BigInt; the f64 results go through
// the same operations in the same order as the Rust code.

const M64 = (1n << 64n) - 1n;
const GOLDEN = 0x9e3779b97f4a7c15n;

/** Stream identifiers of runtime/src/rng.rs `streams`. */
export const STREAMS = Object.freeze({ PROBE: 1n, ROULETTE: 2n, PRIOR_SAMPLE: 3n, DEQUANTIZE: 4n });

function mix(z) {
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M64;
  return z ^ (z >> 31n);
}

/** SplitMix64 with Box-Muller normals (both values used), as the native `Rng`. */
export class Rng {
  /** @param {bigint} seed */
  constructor(seed) {
    this.state = BigInt.asUintN(64, BigInt(seed));
    this.spare = null;
  }

  /**
   * The generator of one named stream of a seed.
   * @param {bigint|number} seed
   * @param {Array<bigint|number>} stream
   */
  static forStream(seed, stream) {
    let h = BigInt.asUintN(64, BigInt(seed)) ^ 0x243f6a8885a308d3n;
    for (const s of stream) h = mix(h ^ ((BigInt(s) * GOLDEN) & M64));
    return new Rng(h);
  }

  /** @returns {bigint} */
  nextU64() {
    this.state = (this.state + GOLDEN) & M64;
    return mix(this.state);
  }

  /** Uniform in [0, 1) with 53 random bits. */
  uniform() {
    return Number(this.nextU64() >> 11n) * (1 / 2 ** 53);
  }

  /** Standard normal. */
  normal() {
    if (this.spare !== null) {
      const z = this.spare;
      this.spare = null;
      return z;
    }
    const u1 = 1.0 - this.uniform();
    const u2 = this.uniform();
    const r = Math.sqrt(-2.0 * Math.log(u1));
    const t = 2 * Math.PI * u2;
    this.spare = r * Math.sin(t);
    return r * Math.cos(t);
  }

  /** +1 or -1. */
  rademacher() {
    return this.nextU64() >> 63n === 0n ? 1.0 : -1.0;
  }
}

/**
 * Writes the first `dim` values of the Hutchinson probe of `(block, sample, probe)` into
 * `out` at `offset` (as f32).
 */
export function writeProbe(out, offset, seed, block, sample, probe, dim, rademacher) {
  const r = Rng.forStream(seed, [STREAMS.PROBE, block, sample, probe]);
  for (let i = 0; i < dim; i++) out[offset + i] = rademacher ? r.rademacher() : r.normal();
}

/** Extra roulette terms (runtime/src/logdet.rs `draw`). */
export function rouletteDraw(dist, param, rng) {
  if (dist === 'geometric') {
    let n = 0;
    while (rng.uniform() >= param && n < 10000) n++;
    return n;
  }
  const l = Math.exp(-param);
  let k = 0;
  let prod = rng.uniform();
  while (prod > l && k < 10000) {
    k++;
    prod *= rng.uniform();
  }
  return k;
}

/** P(extra terms >= m) (runtime/src/logdet.rs `survival`). */
export function rouletteSurvival(dist, param, m) {
  if (dist === 'geometric') return (1.0 - param) ** m;
  let pmf = Math.exp(-param);
  let cdf = 0.0;
  for (let j = 0; j < m; j++) {
    if (j > 0) pmf *= param / j;
    cdf += pmf;
  }
  return Math.max(1.0 - cdf, 2.2250738585072014e-308); // f64::MIN_POSITIVE
}
