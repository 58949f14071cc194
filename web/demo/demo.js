// The demo: every bundle the server lists, on this browser's WebGPU device. A 2-D flow shows
// its density as a heat map with samples on top; an image flow a grid of samples.

import { Flow, requestDevice } from '/iresnetc/index.js';

const status = document.getElementById('status');
const panels = document.getElementById('panels');

async function timed(label, lines, fn) {
  const t0 = performance.now();
  const value = await fn();
  lines.push(`${label.padEnd(22)} ${(performance.now() - t0).toFixed(0).padStart(6)} ms`);
  return value;
}

function panel(title) {
  const div = document.createElement('div');
  div.className = 'panel';
  div.innerHTML = `<h2></h2><canvas></canvas><div class="timing"></div>`;
  div.querySelector('h2').textContent = title;
  panels.append(div);
  return { canvas: div.querySelector('canvas'), timing: div.querySelector('.timing') };
}

/** Viridis-like ramp from t in [0, 1]. */
function color(t) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  return stops[i].map((c, k) => Math.round(c + f * (stops[i + 1][k] - c)));
}

async function density2d(flow, name) {
  const { canvas, timing } = panel(`${name}: density and samples`);
  const n = 48;
  const extent = 4;
  const scale = 6;
  canvas.width = canvas.height = n * scale;
  const lines = [];
  const x = new Float32Array(n * n * 2);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      x[2 * (i * n + j)] = -extent + (2 * extent * (j + 0.5)) / n;
      x[2 * (i * n + j) + 1] = extent - (2 * extent * (i + 0.5)) / n;
    }
  }
  const { logp } = await timed(`density (${n * n} pts)`, lines, () => flow.density(x, { chunk: n * n }));
  const samples = await timed('sample (500)', lines, () => flow.sample(500, { seed: 1, chunk: 500 }));
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(n, n);
  const p = Array.from(logp, Math.exp);
  const max = Math.max(...p);
  p.forEach((v, k) => {
    img.data.set([...color(v / max), 255], 4 * k);
  });
  const tmp = new OffscreenCanvas(n, n);
  tmp.getContext('2d').putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, n * scale, n * scale);
  ctx.fillStyle = 'rgba(255, 255, 255, 0.8)';
  const px = (v) => ((v + extent) / (2 * extent)) * n * scale;
  for (let k = 0; k < samples.x.length; k += 2) {
    ctx.fillRect(px(samples.x[k]) - 1, n * scale - px(samples.x[k + 1]) - 1, 2, 2);
  }
  timing.textContent = lines.join('\n');
}

async function imageGrid(flow, name) {
  const { canvas, timing } = panel(`${name}: samples`);
  const [c, h, w] = flow.info.input_shape;
  const side = 6;
  const scale = Math.max(1, Math.floor(192 / (side * w)));
  const lines = [];
  const { x } = await timed(`sample (${side * side})`, lines, () => flow.sample(side * side, { seed: 1, chunk: side * side }));
  canvas.width = side * w * scale;
  canvas.height = side * h * scale;
  const img = new ImageData(side * w, side * h);
  const offset = flow.info.dequantize ? 0.5 : 0;
  for (let s = 0; s < side * side; s++) {
    const [gy, gx] = [Math.floor(s / side), s % side];
    for (let y = 0; y < h; y++) {
      for (let xx = 0; xx < w; xx++) {
        const at = 4 * ((gy * h + y) * side * w + gx * w + xx);
        for (let k = 0; k < 3; k++) {
          const v = x[s * c * h * w + Math.min(k, c - 1) * h * w + y * w + xx] + offset;
          img.data[at + k] = Math.round(255 * Math.min(Math.max(v, 0), 1));
        }
        img.data[at + 3] = 255;
      }
    }
  }
  const tmp = new OffscreenCanvas(side * w, side * h);
  tmp.getContext('2d').putImageData(img, 0, 0);
  const ctx = canvas.getContext('2d');
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
  timing.textContent = lines.join('\n');
}

async function main() {
  const device = await requestDevice();
  const names = await (await fetch('/bundles.json')).json();
  for (const name of names) {
    const lines = [];
    const flow = await timed('load + pipelines', lines, () => Flow.load(device, `/bundles/${name}/`));
    const shape = flow.info.input_shape;
    if (shape.length === 1 && shape[0] === 2) await density2d(flow, name);
    else if (shape.length === 3) await imageGrid(flow, name);
    panels.lastChild.querySelector('.timing').textContent = `${lines[0]}\n${panels.lastChild.querySelector('.timing').textContent}`;
  }
  status.textContent = `${names.length} bundle(s) on WebGPU`;
  document.body.dataset.done = 'true';
}

main().catch((e) => {
  status.textContent = `error: ${e.message}`;
  status.className = 'error';
  document.body.dataset.done = 'error';
});
