// Running a bundle's entry points on a WebGPU device, as the native executor does
// (runtime/src/executor/): one pipeline per kernel with an explicit bind-group layout, the
// weights uploaded once, buffers and bind groups per batch size, every step of an entry point
// (`repeat` unrolled) recorded into one command encoder and submitted once.

import { dispatchAt, exceededLimit, maxBatchForLimits } from './plan.js';

const FILL_WGSL = `
@group(0) @binding(0) var<storage, read_write> dst: array<f32>;
@group(0) @binding(1) var<storage, read> fill_value: array<f32>;

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let i = (wg.y * groups.x + wg.x) * 256u + lane;
    if (i < arrayLength(&dst)) {
        dst[i] = fill_value[0];
    }
}
`;

/** The device refused something (a limit, a pipeline, a run); the message says what. */
export class GpuError extends Error {
  constructor(message) {
    super(message);
    this.name = 'GpuError';
  }
}

const USAGE = () => GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** A weight tensor in a buffer's layout (plan.rs `WeightLayout::arrange`). */
function arrange(data, layout) {
  if (!layout || layout.kind === 'stored') return data;
  const { cout, k } = layout;
  const taps = k * k;
  const cin = data.length / (cout * taps);
  const out = new Float32Array(data.length);
  for (let o = 0; o < cout; o++) {
    for (let i = 0; i < cin; i++) {
      for (let t = 0; t < taps; t++) out[(i * cout + o) * taps + (taps - 1 - t)] = data[(o * cin + i) * taps + t];
    }
  }
  return out;
}

async function scoped(device, what, fn) {
  device.pushErrorScope('out-of-memory');
  device.pushErrorScope('validation');
  const value = fn();
  const validation = await device.popErrorScope();
  const oom = await device.popErrorScope();
  const e = validation ?? oom;
  if (e) throw new GpuError(`${what}: ${e.message.split('\n')[0]}`);
  return value;
}

export class Executor {
  /**
   * Builds every pipeline of `bundle` on `device` and uploads its weights. Refuses a device
   * whose limits are below plan.json's `limits` (naming the limit) before building anything.
   * @param {GPUDevice} device
   * @param {{plan: object, shaders: Map<string,string>, weights: Map<string,{data: Float32Array}>}} bundle
   */
  static async create(device, bundle) {
    const { plan } = bundle;
    const over = exceededLimit(plan, device.limits);
    if (over) {
      throw new GpuError(`the bundle needs ${over.limit} = ${over.requested}, but the device's is ${over.max}`);
    }
    const ex = new Executor();
    ex.device = device;
    ex.plan = plan;
    ex.maxBatch = maxBatchForLimits(plan, device.limits);
    if (ex.maxBatch === 0) throw new GpuError('one sample of this bundle does not fit the device limits');
    ex.bufferIndex = new Map(plan.buffers.map((b, i) => [b.name, i]));
    ex.kernelIndex = new Map(plan.kernels.map((k, i) => [k.name, i]));

    // Kernels that differ only in the buffers they bind share a pipeline. The batch-folded
    // alternatives are built when a run first reaches their `min_batch` (they are the
    // slowest to compile, and many plans never run batches that large).
    const folded = new Set();
    for (const ep of Object.values(plan.entry_points)) ex.#foldedKernels(ep.steps, folded);
    ex.pipelines = new Map();
    ex.kernels = plan.kernels.map((k) => (folded.has(k.name) ? null : ex.#kernel(k, bundle.shaders)));
    ex.fill = ex.#pipeline('builtin.fill', device.createShaderModule({ code: FILL_WGSL }), 'fill', [false, true]);
    ex.kernels = await Promise.all(ex.kernels);
    ex.fill = await ex.fill;
    ex.shaders = bundle.shaders;

    ex.weights = plan.buffers.map((b) => {
      let data;
      if (b.init.kind === 'weight') data = arrange(bundle.weights.get(b.init.tensor).data, b.init.layout);
      else if (b.init.kind === 'packed') {
        data = new Float32Array(b.elems);
        let at = 0;
        for (const t of b.init.parts) {
          const part = bundle.weights.get(t).data;
          data.set(part, at);
          at += part.length;
        }
      } else return null;
      const buf = device.createBuffer({ label: b.name, size: data.byteLength, usage: USAGE() });
      device.queue.writeBuffer(buf, 0, data);
      return buf;
    });
    ex.programs = new Map();
    for (const [name, ep] of Object.entries(plan.entry_points)) {
      const ops = [];
      ex.#flatten(ep.steps, ops);
      ex.programs.set(name, { name, ep, ops });
    }
    ex.fillValues = new Map();
    ex.cache = new Map();
    return ex;
  }

  #foldedKernels(steps, out) {
    for (const s of steps) {
      if (s.dispatch?.large_batch) out.add(s.dispatch.large_batch.kernel);
      else if (s.repeat) this.#foldedKernels(s.repeat.steps, out);
    }
  }

  /** The pipeline of kernel declaration `k` (a promise), shared by equal kernels. */
  #kernel(k, shaders = this.shaders) {
    const key = JSON.stringify([k.file, k.entry, k.read_only]);
    if (!this.pipelines.has(key)) {
      const module = this.device.createShaderModule({ label: k.file, code: shaders.get(k.file) });
      this.pipelines.set(key, this.#pipeline(k.name, module, k.entry, k.read_only));
    }
    return this.pipelines.get(key);
  }

  async #pipeline(name, module, entry, readOnly) {
    const device = this.device;
    const layout = device.createBindGroupLayout({
      label: name,
      entries: readOnly.map((ro, i) => ({
        binding: i,
        visibility: GPUShaderStage.COMPUTE,
        buffer: { type: ro ? 'read-only-storage' : 'storage' },
      })),
    });
    device.pushErrorScope('validation');
    let pipeline;
    try {
      pipeline = await device.createComputePipelineAsync({
        label: name,
        layout: device.createPipelineLayout({ bindGroupLayouts: [layout] }),
        compute: { module, entryPoint: entry },
      });
    } catch (e) {
      await device.popErrorScope();
      throw new GpuError(`kernel ${name}: ${e.message.split('\n')[0]}`);
    }
    const e = await device.popErrorScope();
    if (e) throw new GpuError(`kernel ${name}: ${e.message.split('\n')[0]}`);
    return { pipeline, layout };
  }

  #flatten(steps, ops) {
    for (const s of steps) {
      if (s.dispatch) ops.push({ op: 'dispatch', d: s.dispatch });
      else if (s.repeat) {
        const body = [];
        this.#flatten(s.repeat.steps, body);
        for (let t = 0; t < s.repeat.times; t++) ops.push(...body);
      } else if (s.copy) ops.push({ op: 'copy', src: this.bufferIndex.get(s.copy.src), dst: this.bufferIndex.get(s.copy.dst) });
      else if (Object.is(s.fill.value, 0)) ops.push({ op: 'clear', buffer: this.bufferIndex.get(s.fill.buffer) });
      else ops.push({ op: 'fill', buffer: this.bufferIndex.get(s.fill.buffer), value: s.fill.value });
    }
  }

  /** Entry point names. */
  get entryPoints() {
    return [...this.programs.keys()];
  }

  #resources(batch) {
    let r = this.cache.get(batch);
    if (r) return r;
    if (this.cache.size >= 3) {
      const [oldest, old] = this.cache.entries().next().value;
      for (const b of old.owned) b.destroy();
      this.cache.delete(oldest);
    }
    const device = this.device;
    const owned = [];
    const buffers = this.plan.buffers.map((b, i) => {
      if (this.weights[i]) return this.weights[i];
      const size = b.elems * 4 * (b.per_sample ? batch : 1);
      const buf = device.createBuffer({ label: b.name, size, usage: USAGE() });
      if (b.init.kind === 'batch') device.queue.writeBuffer(buf, 0, new Float32Array([batch]));
      owned.push(buf);
      return buf;
    });
    r = { buffers, groups: new Map(), owned, fillGroups: new Map() };
    this.cache.set(batch, r);
    return r;
  }

  /** The bind group of kernel `k` over this batch's buffers, made on first use. */
  #group(res, k) {
    if (!res.groups.has(k)) {
      const buffers = this.plan.kernels[k].bindings.map((n) => res.buffers[this.bufferIndex.get(n)]);
      res.groups.set(
        k,
        this.device.createBindGroup({
          layout: this.kernels[k].layout,
          entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })),
        }),
      );
    }
    return res.groups.get(k);
  }

  #fillGroup(res, buffer, value) {
    const key = `${buffer}:${value}`;
    if (!res.fillGroups.has(key)) {
      if (!this.fillValues.has(value)) {
        const v = this.device.createBuffer({ size: 4, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
        this.device.queue.writeBuffer(v, 0, new Float32Array([value]));
        this.fillValues.set(value, v);
      }
      res.fillGroups.set(
        key,
        this.device.createBindGroup({
          layout: this.fill.layout,
          entries: [
            { binding: 0, resource: { buffer: res.buffers[buffer] } },
            { binding: 1, resource: { buffer: this.fillValues.get(value) } },
          ],
        }),
      );
    }
    return res.fillGroups.get(key);
  }

  /**
   * Runs entry point `entry` on `batch` samples. `inputs` maps each input name of the entry
   * point to its values (`batch * prod(shape)` for per-sample buffers); batches beyond the
   * device's limits run in chunks. Resolves to every output, `batch * prod(shape)` values.
   * @param {string} entry
   * @param {number} batch
   * @param {Record<string, Float32Array>} inputs
   * @returns {Promise<Record<string, Float32Array>>}
   */
  async run(entry, batch, inputs) {
    const program = this.programs.get(entry);
    if (!program) throw new GpuError(`bundle has no entry point ${entry}; it has: ${this.entryPoints.join(', ')}`);
    if (!(Number.isInteger(batch) && batch >= 1)) throw new GpuError(`batch must be a positive integer, not ${batch}`);
    const { ep } = program;
    for (const name of Object.keys(inputs)) {
      if (!ep.inputs.some((io) => io.name === name)) throw new GpuError(`entry point ${entry} has no input ${name}`);
    }
    const perSample = (io) => this.plan.buffers[this.bufferIndex.get(io.buffer)].per_sample;
    const elems = (io) => io.shape.reduce((a, d) => a * d, 1);
    for (const io of ep.inputs) {
      const v = inputs[io.name];
      const want = elems(io) * (perSample(io) ? batch : 1);
      if (!v) throw new GpuError(`input ${io.name}: missing (entry point ${entry} needs it)`);
      if (v.length !== want) throw new GpuError(`input ${io.name}: has ${v.length} values, expected ${want}`);
    }
    const outputs = Object.fromEntries(ep.outputs.map((io) => [io.name, new Float32Array(batch * elems(io))]));
    for (let start = 0; start < batch; start += this.maxBatch) {
      const n = Math.min(this.maxBatch, batch - start);
      const chunkInputs = ep.inputs.map((io) => {
        const v = Float32Array.from(inputs[io.name]);
        return perSample(io) ? v.subarray(start * elems(io), (start + n) * elems(io)) : v;
      });
      const out = await this.#runChunk(program, n, chunkInputs);
      ep.outputs.forEach((io, k) => outputs[io.name].set(out[k], start * elems(io)));
    }
    return outputs;
  }

  async #runChunk(program, batch, inputs) {
    const device = this.device;
    for (const op of program.ops) {
      const f = op.op === 'dispatch' && op.d.large_batch;
      if (f && batch >= f.min_batch) {
        const k = this.kernelIndex.get(f.kernel);
        if (!this.kernels[k]) this.kernels[k] = await this.#kernel(this.plan.kernels[k]);
      }
    }
    const res = this.#resources(batch);
    const { ep, ops } = program;
    const maxPerDim = device.limits.maxComputeWorkgroupsPerDimension;
    const staging = [];
    await scoped(device, `entry point ${program.name}`, () => {
      ep.inputs.forEach((io, k) => device.queue.writeBuffer(res.buffers[this.bufferIndex.get(io.buffer)], 0, inputs[k]));
      const encoder = device.createCommandEncoder();
      this.plan.buffers.forEach((b, i) => {
        if (b.init.kind === 'zero') encoder.clearBuffer(res.buffers[i]);
      });
      let pass = null;
      for (const op of ops) {
        const inPass = op.op === 'dispatch' || op.op === 'fill';
        if (!inPass && pass) {
          pass.end();
          pass = null;
        }
        if (inPass && !pass) pass = encoder.beginComputePass();
        if (op.op === 'dispatch') {
          const { kernel, grid } = dispatchAt(op.d, batch, maxPerDim);
          const k = this.kernelIndex.get(kernel);
          pass.setPipeline(this.kernels[k].pipeline);
          pass.setBindGroup(0, this.#group(res, k));
          pass.dispatchWorkgroups(grid[0], grid[1], grid[2]);
        } else if (op.op === 'fill') {
          pass.setPipeline(this.fill.pipeline);
          pass.setBindGroup(0, this.#fillGroup(res, op.buffer, op.value));
          const groups = Math.max(1, Math.ceil(res.buffers[op.buffer].size / 4 / 256));
          const x = Math.min(groups, maxPerDim);
          pass.dispatchWorkgroups(x, Math.ceil(groups / x), 1);
        } else if (op.op === 'clear') {
          encoder.clearBuffer(res.buffers[op.buffer]);
        } else {
          encoder.copyBufferToBuffer(res.buffers[op.src], 0, res.buffers[op.dst], 0, res.buffers[op.src].size);
        }
      }
      if (pass) pass.end();
      for (const io of ep.outputs) {
        const src = res.buffers[this.bufferIndex.get(io.buffer)];
        const dst = device.createBuffer({ size: src.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
        encoder.copyBufferToBuffer(src, 0, dst, 0, src.size);
        staging.push(dst);
      }
      device.queue.submit([encoder.finish()]);
    });
    return Promise.all(
      staging.map(async (buf) => {
        await buf.mapAsync(GPUMapMode.READ);
        const values = new Float32Array(buf.getMappedRange().slice(0));
        buf.unmap();
        buf.destroy();
        return values;
      }),
    );
  }
}
