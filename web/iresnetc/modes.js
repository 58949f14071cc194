// What users run, as runtime/src/modes.rs and the wgpu backend do it: forward with the
// log-det (probes and series coefficients from the same seeded streams), inverse, density
// (dequantization noise, the prior's log-density) and sampling from the prior, over arrays of
// any length in chunks of `chunk` samples (8 by default, as the CLI: a chunk's size picks
// the kernels, so equal chunks mean equal numbers).

import { loadBundle } from './bundle.js';
import { Executor } from './executor.js';
import { Rng, STREAMS, rouletteDraw, rouletteSurvival, writeProbe } from './rng.js';

export const DEFAULT_CHUNK = 8;

/** Something the bundle cannot do (a classifier asked for a density, the exact log-det). */
export class UnsupportedError extends Error {
  constructor(message) {
    super(message);
    this.name = 'UnsupportedError';
  }
}

/** The log-det method of plan.json's `info.logdet`, with `overrides` (`estimator`, `seed`, ...). */
function logdetMethod(info, overrides = {}) {
  const m = { ...info.logdet, ...overrides };
  // The exact log-det has no GPU kernels; the series of the plan is the browser's default.
  if (m.estimator === 'exact') m.estimator = 'series';
  return m;
}

export class Flow {
  /**
   * Loads the bundle at `url` and builds it on `device`.
   * @param {GPUDevice} device
   * @param {string|URL} url
   * @returns {Promise<Flow>}
   */
  static async load(device, url) {
    const bundle = await loadBundle(url);
    const flow = new Flow();
    flow.bundle = bundle;
    flow.plan = bundle.plan;
    flow.info = bundle.plan.info;
    if (flow.plan.kind !== 'flow') throw new UnsupportedError(`${flow.info.name} is a ${flow.plan.kind}, not a flow`);
    flow.layout = bundle.plan.logdet;
    flow.prior = { mean: bundle.weights.get('prior.mean').data, logStd: bundle.weights.get('prior.log_std').data };
    flow.executor = await Executor.create(device, bundle);
    return flow;
  }

  /** Values per input sample. */
  get inputDim() {
    return this.info.input_shape.reduce((a, d) => a * d, 1);
  }

  /** Values per latent sample. */
  get latentDim() {
    return this.info.output_dim;
  }

  async #chunked(total, chunk, fn) {
    for (let first = 0; first < total; first += chunk) await fn(first, Math.min(chunk, total - first));
  }

  /** The `probes` input of samples `first..first+batch` (logdet.rs `probes_for`). */
  probesFor(method, first, batch) {
    const { block_dims: dims, probes } = this.layout;
    const per = dims.reduce((a, d) => a + d, 0) * probes;
    const out = new Float32Array(batch * per);
    let at = 0;
    for (let s = first; s < first + batch; s++) {
      dims.forEach((dim, b) => {
        for (let p = 0; p < probes; p++, at += dim) writeProbe(out, at, BigInt(method.seed), b, s, p, dim, method.probe === 'rademacher');
      });
    }
    return out;
  }

  /** The entry point and `coef` input of samples `first..first+batch` (logdet.rs `coefs_for`). */
  coefsFor(method, first, batch) {
    const l = this.layout;
    const series = method.estimator === 'series' && method.terms <= l.terms;
    const [entry, maxTerms] = series ? ['forward', l.terms] : ['forward_roulette', l.coef_stride];
    if (method.probes !== l.probes) throw new UnsupportedError(`${method.probes} probes per block: the plan was compiled for ${l.probes}`);
    const per = l.block_dims.length * l.coef_stride;
    const out = new Float32Array(batch * per);
    for (let i = 0; i < batch; i++) {
      for (let b = 0; b < l.block_dims.length; b++) {
        let w;
        if (method.estimator === 'series') w = new Array(method.terms).fill(1.0);
        else {
          const rng = Rng.forStream(BigInt(method.seed), [STREAMS.ROULETTE, b, first + i]);
          const extra = rouletteDraw(method.roulette, method.roulette_param, rng);
          w = Array.from({ length: method.terms + extra }, (_, k) =>
            k < method.terms ? 1.0 : 1.0 / rouletteSurvival(method.roulette, method.roulette_param, k + 1 - method.terms),
          );
        }
        if (w.length > maxTerms) throw new UnsupportedError(`a log-det of ${w.length} terms: the plan runs at most ${maxTerms}`);
        w.forEach((wk, k0) => {
          const k1 = k0 + 1;
          out[i * per + b * l.coef_stride + k0] = ((k1 % 2 === 1 ? 1.0 : -1.0) * wk) / (k1 * l.probes);
        });
      }
    }
    return { entry, coef: out };
  }

  /**
   * `x -> z` with the log-det per sample.
   * @param {Float32Array|Float64Array} x `batch * inputDim` values
   * @param {{estimator?: string, seed?: number, terms?: number, chunk?: number}} [opts]
   * @returns {Promise<{z: Float32Array, logdet: Float64Array}>}
   */
  async forward(x, opts = {}) {
    const { chunk = DEFAULT_CHUNK, ...overrides } = opts;
    const method = logdetMethod(this.info, overrides);
    const batch = x.length / this.inputDim;
    const z = new Float32Array(batch * this.latentDim);
    const logdet = new Float64Array(batch);
    await this.#chunked(batch, chunk, async (first, n) => {
      const { entry, coef } = this.coefsFor(method, first, n);
      const out = await this.executor.run(entry, n, {
        x: Float32Array.from(x.subarray(first * this.inputDim, (first + n) * this.inputDim)),
        probes: this.probesFor(method, first, n),
        coef,
      });
      z.set(out.z, first * this.latentDim);
      logdet.set(out.logdet, first);
    });
    return { z, logdet };
  }

  /** `x -> z` without the log-det. */
  async encode(x, { chunk = DEFAULT_CHUNK } = {}) {
    return this.#map('encode', 'x', 'z', x, this.inputDim, this.latentDim, chunk);
  }

  /** `z -> x` (the certified number of fixed-point iterations per block). */
  async inverse(z, { chunk = DEFAULT_CHUNK } = {}) {
    return this.#map('inverse', 'z', 'x', z, this.latentDim, this.inputDim, chunk);
  }

  async #map(entry, input, output, v, inDim, outDim, chunk) {
    const batch = v.length / inDim;
    const out = new Float32Array(batch * outDim);
    await this.#chunked(batch, chunk, async (first, n) => {
      const r = await this.executor.run(entry, n, { [input]: Float32Array.from(v.subarray(first * inDim, (first + n) * inDim)) });
      out.set(r[output], first * outDim);
    });
    return out;
  }

  /** The log-det per sample. */
  async logdet(x, opts = {}) {
    return (await this.forward(x, opts)).logdet;
  }

  /** `log N(z; mean, exp(log_std))` of one latent sample (modes.rs `prior_logp`). */
  priorLogp(z) {
    const c = 0.5 * Math.log(2.0 * Math.PI);
    let sum = 0;
    for (let i = 0; i < z.length; i++) {
      const s = this.prior.logStd[i];
      const t = (z[i] - this.prior.mean[i]) * Math.exp(-s);
      sum += -0.5 * t * t - s - c;
    }
    return sum;
  }

  /**
   * `log p(x)` in nats and bits/dim per sample, with the latents and log-dets behind them;
   * image models dequantize with the seed's noise.
   * @returns {Promise<{logp: Float64Array, bitsPerDim: Float64Array, z: Float32Array, logdet: Float64Array}>}
   */
  async density(x, opts = {}) {
    const method = logdetMethod(this.info, opts);
    const d = this.inputDim;
    let input = x;
    if (this.info.dequantize) {
      input = new Float64Array(x.length);
      for (let i = 0; i < x.length / d; i++) {
        const r = Rng.forStream(BigInt(method.seed), [STREAMS.DEQUANTIZE, i]);
        for (let j = i * d; j < (i + 1) * d; j++) input[j] = (255.0 * x[j] + r.uniform()) / 256.0 - 0.5;
      }
    }
    const { z, logdet } = await this.forward(input, opts);
    const batch = logdet.length;
    const logp = new Float64Array(batch);
    const bitsPerDim = new Float64Array(batch);
    for (let i = 0; i < batch; i++) {
      logp[i] = this.priorLogp(z.subarray(i * this.latentDim, (i + 1) * this.latentDim)) + logdet[i];
      bitsPerDim[i] = -logp[i] / (d * Math.LN2) + (this.info.dequantize ? 8.0 : 0.0);
    }
    return { logp, bitsPerDim, z, logdet };
  }

  /** `num` prior draws `mean + exp(log_std) * N(0, 1)`, one stream per draw (modes.rs `prior_draws`). */
  priorDraws(num, seed) {
    const k = this.latentDim;
    const z = new Float64Array(num * k);
    for (let i = 0; i < num; i++) {
      const r = Rng.forStream(BigInt(seed), [STREAMS.PRIOR_SAMPLE, i]);
      for (let j = 0; j < k; j++) z[i * k + j] = this.prior.mean[j] + Math.exp(this.prior.logStd[j]) * r.normal();
    }
    return z;
  }

  /**
   * `num` samples: prior draws mapped through the inverse.
   * @returns {Promise<{x: Float32Array, z: Float64Array}>}
   */
  async sample(num, { seed = this.info.logdet.seed, chunk = DEFAULT_CHUNK } = {}) {
    const z = this.priorDraws(num, seed);
    return { x: await this.inverse(z, { chunk }), z };
  }
}
