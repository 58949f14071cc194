// The browser test: bundles of toy2d and cifar-tiny (both tilings) run in headless Chromium
// on WebGPU through web/iresnetc/, compared with what the CLI's native wgpu and f64
// reference backends write for the same inputs and seeds; then every kernel of every
// shipped model (both tilings, fused and unfused) builds a pipeline on a device with
// WebGPU's default limits. Exit 0 only when everything matched.
//
//   IRESNETC=target/release/iresnetc KERNELS=kernels.json node web/test/run.mjs
//
// IRESNETC: the iresnetc binary (compiles bundles, runs the native backends, serves the
// page). KERNELS: a JSON file of every shipped model's kernels, written by the Rust test
// compiler/tests/browser.rs (optional: without it only the bundles' own kernels are built).
// CHROMIUM: the browser (default /usr/bin/chromium).

import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { compare, readNpy } from './compare.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const bin = process.env.IRESNETC;
const chromiumPath = process.env.CHROMIUM ?? '/usr/bin/chromium';

function fail(message) {
  console.error(`browser test: ${message}`);
  process.exit(1);
}

if (!bin || !fs.existsSync(bin)) fail('set IRESNETC to the iresnetc binary (cargo build --release)');
if (!fs.existsSync(chromiumPath)) fail(`no browser at ${chromiumPath} (apt-get install -y chromium)`);
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch {
  fail('playwright-core is missing (run `npm ci` in web/)');
}

/** Relative tolerance in the max norm (compiler/tests/gpu.rs TOL): f32 kernels vs f64. */
const TOL = 1e-4;
// Samples per bundle: two chunks of the runtimes' 8 (a full one and a short one), except in
// the GPU tiling of toy2d, whose split-K kernels are slow on Chromium's software adapter.
const samplesOf = (name) => (name === 'toy2d-gpu' ? 3 : 10);

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'iresnetc-browser-'));
const iresnetc = (...args) => execFileSync(bin, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });

const cases = [];
for (const model of ['toy2d', 'cifar-tiny']) {
  for (const tiling of ['cpu', 'gpu']) {
    const name = `${model}-${tiling}`;
    const N = samplesOf(name);
    const dir = path.join(work, name);
    iresnetc('compile', `models/${model}.toml`, '-o', dir, '--tiling', tiling);
    const f = (file) => path.join(work, `${name}.${file}.npy`);
    iresnetc('random-input', dir, '--num', String(N), '-o', f('x'), '--seed', '7');
    const native = {};
    for (const backend of ['wgpu', 'reference']) {
      const o = (file) => f(`${backend}.${file}`);
      const run = (...args) => iresnetc('run', dir, '--backend', backend, '--estimator', 'series', ...args);
      run('--mode', 'forward', '--input', f('x'), '--output', o('z'), '--logdet-out', o('logdet'));
      run('--mode', 'inverse', '--input', o('z'), '--output', o('inverse'));
      run('--mode', 'sample', '--num', String(N), '--output', o('sample'));
      run('--mode', 'density', '--input', f('x'), '--output', o('density'));
      native[backend] = Object.fromEntries(
        ['z', 'logdet', 'inverse', 'sample', 'density'].map((k) => [k, readNpy(o(k))]),
      );
    }
    cases.push({ name, dir, n: N, x: readNpy(f('x')), native });
  }
}

const server = spawn(bin, ['serve', ...cases.map((c) => c.dir), '--port', '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
process.on('exit', () => server.kill());
const base = await new Promise((resolve, reject) => {
  let out = '';
  server.stdout.on('data', (d) => {
    out += d;
    const m = out.match(/http:\/\/127\.0\.0\.1:\d+\//);
    if (m) resolve(m[0]);
  });
  server.on('exit', (code) => reject(new Error(`iresnetc serve exited with ${code}`)));
});

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'iresnetc-chromium-'));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: chromiumPath,
  headless: true,
  args: [
    '--headless=new',
    '--no-sandbox',
    '--enable-unsafe-webgpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
  ],
});
let failures = 0;
try {
  const page = await browser.newPage();
  page.on('console', (m) => m.type() === 'error' && console.error(`page: ${m.text()}`));
  // A page of the server's origin: a secure context (localhost) with the runtime importable.
  await page.goto(`${base}bundles.json`);
  for (const c of cases) {
    const bundleName = path.basename(c.dir);
    const t0 = Date.now();
    const got = await page.evaluate(
      async ({ url, x, zNative, n }) => {
        const { Flow, requestDevice } = await import('/iresnetc/index.js');
        const device = await requestDevice();
        const flow = await Flow.load(device, url);
        const density = await flow.density(Float64Array.from(x));
        // Without dequantization, density ran the forward on x itself.
        const fwd = flow.info.dequantize ? await flow.forward(Float64Array.from(x)) : density;
        // Sampling is the inverse of the seed's prior draws (Flow.sample): one inverse run
        // maps the native latents and the draws back together.
        const draws = flow.priorDraws(n, flow.info.logdet.seed);
        const both = await flow.inverse(Float64Array.from([...zNative, ...draws]));
        const split = zNative.length / flow.latentDim;
        const arr = (a) => Array.from(a);
        return {
          z: arr(fwd.z),
          logdet: arr(fwd.logdet),
          inverse: arr(both.subarray(0, split * flow.inputDim)),
          sample: arr(both.subarray(split * flow.inputDim)),
          density: arr(density.logp),
          limit: device.limits.maxStorageBuffersPerShaderStage,
        };
      },
      { url: `/bundles/${bundleName}/`, x: c.x, zNative: c.native.wgpu.z, n: c.n },
    );
    if (got.limit !== 8) fail(`the page's device allows ${got.limit} storage buffers, not WebGPU's default 8`);
    // density.npy holds (log p, bits/dim) per sample: the first column.
    const logp = (d) => d.filter((_, i) => i % 2 === 0);
    const lines = [];
    for (const [backend, tol] of [['wgpu', TOL], ['reference', TOL]]) {
      const nat = c.native[backend];
      for (const [what, a, b, perSample] of [
        ['z', got.z, nat.z, false],
        ['logdet', got.logdet, nat.logdet, true],
        ['inverse', got.inverse, nat.inverse, false],
        ['sample', got.sample, nat.sample, false],
        ['density', got.density, logp(nat.density), true],
      ]) {
        const r = compare(a, b, perSample);
        const ok = r.err <= tol;
        if (!ok) failures++;
        lines.push(`  ${ok ? 'ok  ' : 'FAIL'} ${what.padEnd(8)} vs ${backend.padEnd(9)} rel err ${r.err.toExponential(2)} (max abs ${r.abs.toExponential(2)}) tol ${tol}`);
      }
    }
    console.log(`${c.name}: browser run in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    console.log(lines.join('\n'));
  }

  const kernelsFile = process.env.KERNELS;
  if (kernelsFile) {
    const { kernels } = JSON.parse(fs.readFileSync(kernelsFile, 'utf8'));
    // Every kernel is validated against the default-limits device (WGSL compile info,
    // bind-group and pipeline layouts: the storage-buffer limit) and a full pipeline is built
    // for each (1,589 distinct kernels of the shipped models, both tilings, fused and unfused:
    // about 5.5 minutes on Chromium's software adapter here). ALL_PIPELINES=0 builds full
    // pipelines only for the models in PIPELINE_MODELS (every kernel kind occurs in the
    // default two), for a quicker local run.
    const full = (process.env.PIPELINE_MODELS ?? 'cifar-tiny.toml,toy2d-small.toml').split(',');
    const all = process.env.ALL_PIPELINES !== '0';
    const t0 = Date.now();
    const result = await page.evaluate(
      async ({ kernels, full, all }) => {
        const adapter = await navigator.gpu.requestAdapter();
        const device = await adapter.requestDevice();
        const failed = [];
        let built = 0;
        for (const k of kernels) {
          device.pushErrorScope('validation');
          const module = device.createShaderModule({ code: k.source });
          const info = await module.getCompilationInfo();
          const layout = device.createPipelineLayout({
            bindGroupLayouts: [
              device.createBindGroupLayout({
                entries: k.read_only.map((ro, i) => ({
                  binding: i,
                  visibility: GPUShaderStage.COMPUTE,
                  buffer: { type: ro ? 'read-only-storage' : 'storage' },
                })),
              }),
            ],
          });
          let error = info.messages.find((m) => m.type === 'error')?.message;
          if (!error && (all || full.includes(k.where.split(' ')[0]))) {
            try {
              await device.createComputePipelineAsync({ layout, compute: { module, entryPoint: k.entry } });
              built++;
            } catch (e) {
              error = e.message;
            }
          }
          const scoped = await device.popErrorScope();
          error ??= scoped?.message;
          if (error) failed.push(`${k.where}: ${error.split('\n')[0]}`);
        }
        return { failed, built, limit: device.limits.maxStorageBuffersPerShaderStage };
      },
      { kernels, full, all },
    );
    console.log(
      `kernels: ${kernels.length - result.failed.length} of ${kernels.length} distinct kernels of every shipped model valid on a default-limits device (maxStorageBuffersPerShaderStage ${result.limit}); ${result.built} full pipelines built (${all ? 'all' : full.join(', ')}) in ${((Date.now() - t0) / 1000).toFixed(1)} s`,
    );
    for (const f of result.failed.slice(0, 10)) console.log(`  FAIL ${f}`);
    failures += result.failed.length;
    if (result.limit !== 8) failures++;
  }
} finally {
  await browser.close();
  server.kill();
  fs.rmSync(profile, { recursive: true, force: true });
  fs.rmSync(work, { recursive: true, force: true });
}
if (failures) fail(`${failures} comparison(s) or pipeline(s) failed`);
console.log('browser test: all passed');
