// The iresnetc browser runtime: load a compiled bundle and run it on WebGPU.
//
//   import { Flow, requestDevice } from './iresnetc/index.js';
//   const flow = await Flow.load(await requestDevice(), 'bundles/toy2d/');
//   const { z, logdet } = await flow.forward(new Float32Array([0.1, -0.3]));

export { BundleError, loadBundle, parseSafetensors } from './bundle.js';
export { Executor, GpuError } from './executor.js';
export { DEFAULT_CHUNK, Flow, UnsupportedError } from './modes.js';
export { PlanError, validatePlan } from './plan.js';
export { Rng } from './rng.js';

/**
 * A WebGPU device with the default limits (every compiled bundle fits them).
 * @returns {Promise<GPUDevice>}
 */
export async function requestDevice() {
  if (!globalThis.navigator?.gpu) throw new Error('this browser has no WebGPU (navigator.gpu is missing)');
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new Error('WebGPU has no adapter here');
  return adapter.requestDevice();
}
