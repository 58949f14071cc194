// .npy reading and the error measure of compiler/tests/gpu.rs, for the browser test.

import fs from 'node:fs';

/** The values of a little-endian f32 or f64 .npy file, flattened. */
export function readNpy(file) {
  const bytes = fs.readFileSync(file);
  if (bytes.toString('latin1', 1, 6) !== 'NUMPY') throw new Error(`${file}: not an .npy file`);
  const major = bytes[6];
  const headerLen = major === 1 ? bytes.readUInt16LE(8) : bytes.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12) + headerLen;
  const header = bytes.toString('latin1', major === 1 ? 10 : 12, start);
  const descr = header.match(/'descr':\s*'([^']+)'/)?.[1];
  const data = bytes.subarray(start);
  const copy = new Uint8Array(data).buffer; // aligned
  if (descr === '<f8') return Array.from(new Float64Array(copy));
  if (descr === '<f4') return Array.from(new Float32Array(copy));
  throw new Error(`${file}: dtype ${descr}, expected <f4 or <f8`);
}

/**
 * `max |a - b| / max(1, max |b|)` for arrays, `max_i |a_i - b_i| / max(1, |b_i|)` for
 * per-sample scalars (log-dets, densities), and the largest absolute difference.
 */
export function compare(a, b, perSample) {
  if (a.length !== b.length) return { err: Infinity, abs: Infinity };
  let abs = 0;
  let err = 0;
  const scale = b.reduce((m, v) => Math.max(m, Math.abs(v)), 1);
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= Infinity)) return { err: Infinity, abs: Infinity }; // NaN
    abs = Math.max(abs, d);
    err = Math.max(err, perSample ? d / Math.max(1, Math.abs(b[i])) : d / scale);
  }
  return { err, abs };
}
