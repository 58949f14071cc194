// Loading a compiled bundle over HTTP: plan.json, the WGSL files its kernels name and
// weights.safetensors, each file checked against the SHA-256 that plan.json's `integrity`
// records for it (a bundle edited after compiling is refused, as by the native runtime).

import { validatePlan } from './plan.js';

/** A bundle file that is missing, damaged or does not match its hash. */
export class BundleError extends Error {
  constructor(file, reason) {
    super(`bundle file ${file}: ${reason}`);
    this.name = 'BundleError';
    this.file = file;
  }
}

const MAX_HEADER_BYTES = 16 << 20;

async function fetchBytes(base, file, fetchFn) {
  const url = new URL(file, base);
  let res;
  try {
    res = await fetchFn(url);
  } catch (e) {
    throw new BundleError(file, `could not fetch ${url}: ${e.message}`);
  }
  if (!res.ok) throw new BundleError(file, `HTTP ${res.status} for ${url}`);
  return new Uint8Array(await res.arrayBuffer());
}

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function checked(plan, file, bytes) {
  const want = plan.integrity?.[file];
  if (!want) throw new BundleError(file, 'plan.json records no hash for it');
  const got = await sha256Hex(bytes);
  if (got !== want) throw new BundleError(file, `SHA-256 is ${got}, plan.json says ${want}`);
  return bytes;
}

/**
 * Parses a safetensors file of f32 tensors.
 * @param {Uint8Array} bytes
 * @returns {Map<string, {shape: number[], data: Float32Array}>}
 */
export function parseSafetensors(bytes, file = 'weights.safetensors') {
  const bad = (reason) => new BundleError(file, reason);
  if (bytes.length < 8) throw bad('shorter than its 8-byte header length');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > bytes.length) {
    throw bad(`header length ${headerLen} does not fit the file`);
  }
  let header;
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLen)));
  } catch (e) {
    throw bad(`header is not JSON: ${e.message}`);
  }
  const data = bytes.subarray(8 + headerLen);
  const tensors = new Map();
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    if (t.dtype !== 'F32') throw bad(`tensor ${name}: dtype ${t.dtype}, expected F32`);
    const [begin, end] = t.data_offsets;
    const count = t.shape.reduce((a, d) => a * d, 1);
    if (!(begin <= end && end <= data.length && end - begin === 4 * count)) {
      throw bad(`tensor ${name}: offsets ${begin}..${end} do not hold shape [${t.shape}]`);
    }
    // Copied: the slice may not be 4-byte aligned inside the file.
    const values = new Float32Array(count);
    new Uint8Array(values.buffer).set(data.subarray(begin, end));
    tensors.set(name, { shape: t.shape, data: values });
  }
  return tensors;
}

/**
 * Loads the bundle at `url` (a directory URL; a trailing slash is added).
 * @param {string|URL} url
 * @param {{fetch?: typeof fetch}} [options]
 * @returns {Promise<{url: URL, plan: object, shaders: Map<string,string>,
 *   weights: Map<string, {shape: number[], data: Float32Array}>}>}
 */
export async function loadBundle(url, options = {}) {
  const fetchFn = options.fetch ?? fetch;
  const base = new URL(String(url).endsWith('/') ? String(url) : `${url}/`, globalThis.location?.href);
  const planBytes = await fetchBytes(base, 'plan.json', fetchFn);
  let plan;
  try {
    plan = JSON.parse(new TextDecoder().decode(planBytes));
  } catch (e) {
    throw new BundleError('plan.json', `not JSON: ${e.message}`);
  }
  validatePlan(plan);
  const files = [...new Set(plan.kernels.map((k) => k.file))];
  const [shaderBytes, weightBytes] = await Promise.all([
    Promise.all(files.map(async (f) => checked(plan, f, await fetchBytes(base, f, fetchFn)))),
    fetchBytes(base, 'weights.safetensors', fetchFn).then((b) => checked(plan, 'weights.safetensors', b)),
  ]);
  const shaders = new Map(files.map((f, i) => [f, new TextDecoder().decode(shaderBytes[i])]));
  const weights = parseSafetensors(weightBytes);
  for (const b of plan.buffers) {
    const parts = b.init.kind === 'weight' ? [b.init.tensor] : b.init.kind === 'packed' ? b.init.parts : [];
    let total = 0;
    for (const t of parts) {
      const w = weights.get(t);
      if (!w) throw new BundleError('weights.safetensors', `no tensor ${t} (for buffer ${b.name})`);
      total += w.data.length;
    }
    if (parts.length && total !== b.elems) {
      throw new BundleError('weights.safetensors', `buffer ${b.name} needs ${b.elems} values, its tensors hold ${total}`);
    }
  }
  return { url: base, plan, shaders, weights };
}
