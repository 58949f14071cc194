// plan.json, the contract with the compiler (runtime/src/plan.rs): a structural check of
// what the executor relies on, the grid arithmetic of dispatches, and the limits a plan needs.

export const BUNDLE_FORMAT = 'iresnetc-bundle';
export const BUNDLE_VERSION = 3;

/** plan.json's `limits` field names (wgpu's) -> WebGPU's `GPUSupportedLimits` names. */
export const LIMIT_NAMES = Object.freeze({
  max_bind_groups: 'maxBindGroups',
  max_storage_buffers_per_shader_stage: 'maxStorageBuffersPerShaderStage',
  max_compute_invocations_per_workgroup: 'maxComputeInvocationsPerWorkgroup',
  max_compute_workgroup_size_x: 'maxComputeWorkgroupSizeX',
  max_compute_workgroup_size_y: 'maxComputeWorkgroupSizeY',
  max_compute_workgroup_size_z: 'maxComputeWorkgroupSizeZ',
  max_compute_workgroup_storage_size: 'maxComputeWorkgroupStorageSize',
  max_compute_workgroups_per_dimension: 'maxComputeWorkgroupsPerDimension',
  max_storage_buffer_binding_size: 'maxStorageBufferBindingSize',
  max_buffer_size: 'maxBufferSize',
});

/** A plan that does not hold together; the message names the field. */
export class PlanError extends Error {
  constructor(reason) {
    super(`bundle file plan.json is damaged: ${reason}`);
    this.name = 'PlanError';
  }
}

/** Throws a PlanError unless every name the plan uses resolves and every count is positive. */
export function validatePlan(plan) {
  const bad = (reason) => {
    throw new PlanError(reason);
  };
  if (plan?.format !== BUNDLE_FORMAT) bad(`format is ${JSON.stringify(plan?.format)}, expected ${BUNDLE_FORMAT}`);
  if (plan.version !== BUNDLE_VERSION) bad(`version ${plan.version}; this runtime reads version ${BUNDLE_VERSION}`);
  const buffers = new Map();
  for (const b of plan.buffers ?? []) {
    if (buffers.has(b.name)) bad(`buffer ${b.name} is declared twice`);
    if (!(Number.isSafeInteger(b.elems) && b.elems > 0)) bad(`buffer ${b.name} has elems ${b.elems}`);
    buffers.set(b.name, b);
  }
  const kernels = new Set();
  for (const k of plan.kernels ?? []) {
    if (kernels.has(k.name)) bad(`kernel ${k.name} is declared twice`);
    kernels.add(k.name);
    if (!k.bindings?.length) bad(`kernel ${k.name} binds no buffer`);
    if (new Set(k.bindings).size !== k.bindings.length) bad(`kernel ${k.name} binds a buffer twice`);
    for (const n of k.bindings) if (!buffers.has(n)) bad(`kernel ${k.name} binds unknown buffer ${n}`);
    if (k.read_only?.length !== k.bindings.length) bad(`kernel ${k.name}: read_only must list every binding`);
    if (/[/\\]|^\.\.?$/.test(k.file)) bad(`kernel ${k.name}: file ${k.file} must be a name inside the bundle`);
  }
  const walk = (ep, steps) => {
    for (const s of steps) {
      if (s.dispatch) {
        if (!kernels.has(s.dispatch.kernel)) bad(`entry point ${ep} dispatches unknown kernel ${s.dispatch.kernel}`);
        const f = s.dispatch.large_batch;
        if (f && !kernels.has(f.kernel)) bad(`entry point ${ep} folds unknown kernel ${f.kernel}`);
      } else if (s.repeat) {
        if (!(s.repeat.times >= 1)) bad(`entry point ${ep} has a repeat of ${s.repeat.times}`);
        walk(ep, s.repeat.steps);
      } else if (s.copy) {
        for (const n of [s.copy.src, s.copy.dst]) if (!buffers.has(n)) bad(`entry point ${ep} copies unknown buffer ${n}`);
      } else if (s.fill) {
        if (!buffers.has(s.fill.buffer)) bad(`entry point ${ep} fills unknown buffer ${s.fill.buffer}`);
      } else {
        bad(`entry point ${ep} has an unknown step ${JSON.stringify(s)}`);
      }
    }
  };
  const eps = Object.entries(plan.entry_points ?? {});
  if (!eps.length) bad('no entry point');
  for (const [name, ep] of eps) {
    for (const io of [...ep.inputs, ...ep.outputs]) {
      const b = buffers.get(io.buffer);
      if (!b) bad(`entry point ${name} uses unknown buffer ${io.buffer}`);
      if (io.shape.reduce((a, d) => a * d, 1) !== b.elems) bad(`entry point ${name}: ${io.name} does not fit buffer ${b.name}`);
    }
    walk(name, ep.steps);
  }
}

/** Workgroups of a batch-folded kernel at `batch` (plan.rs `folded_grid`); null on overflow. */
export function foldedGrid(fold, batch, maxPerDim) {
  const [rows, perGroup, groupsY] = fold;
  const tiles = Math.max(1, Math.ceil((rows * batch) / Math.max(1, perGroup)));
  const x = Math.min(tiles, Math.max(1, maxPerDim));
  const z = Math.ceil(tiles / x);
  return z <= maxPerDim ? [x, groupsY, z] : null;
}

/** The kernel and grid a dispatch step records at `batch` (plan.rs `dispatch_at`). */
export function dispatchAt(d, batch, maxPerDim) {
  const f = d.large_batch;
  if (f && batch >= f.min_batch) {
    const grid = foldedGrid([f.rows, f.rows_per_group, f.groups_y], batch, maxPerDim);
    return grid && { kernel: f.kernel, grid };
  }
  return { kernel: d.kernel, grid: [d.workgroups[0], d.workgroups[1], d.workgroups[2] * batch] };
}

function* dispatches(steps) {
  for (const s of steps) {
    if (s.dispatch) yield s.dispatch;
    else if (s.repeat) yield* dispatches(s.repeat.steps);
  }
}

/**
 * The largest batch whose buffers and grids fit `limits` (buffers.rs
 * `max_batch_for_limits`); 0 when one sample does not.
 */
export function maxBatchForLimits(plan, limits) {
  let max = Number.MAX_SAFE_INTEGER;
  const perBuffer = Math.min(limits.maxBufferSize, limits.maxStorageBufferBindingSize);
  for (const b of plan.buffers) {
    const bytes = b.elems * 4;
    if (b.per_sample) max = Math.min(max, Math.floor(perBuffer / bytes));
    else if (bytes > perBuffer) return 0;
  }
  const groups = limits.maxComputeWorkgroupsPerDimension;
  for (const ep of Object.values(plan.entry_points)) {
    for (const d of dispatches(ep.steps)) {
      if (d.workgroups[0] > groups || d.workgroups[1] > groups) return 0;
      max = Math.min(max, Math.floor(groups / Math.max(1, d.workgroups[2])));
      const f = d.large_batch;
      if (f) {
        max = Math.min(max, Math.floor((groups * groups * f.rows_per_group) / Math.max(1, f.rows)));
        if (f.groups_y > groups) return 0;
      }
    }
  }
  return max;
}

/**
 * The first limit of plan.json's `limits` above the device's, as `{limit, requested, max}`
 * (WebGPU's name), or null when the device has them all.
 */
export function exceededLimit(plan, deviceLimits) {
  for (const [name, requested] of Object.entries(plan.limits ?? {})) {
    const webgpu = LIMIT_NAMES[name];
    if (webgpu && requested > deviceLimits[webgpu]) return { limit: webgpu, requested, max: deviceLimits[webgpu] };
  }
  return null;
}
