/**
 * The one interface every WebGPU engine implements: how to reach an adapter, which WGSL compiler
 * its shaders meet, and the workarounds its quirks need. The core talks to engines only through
 * this; backends never see an engine, only the capabilities probed on its device.
 */

/** The WebGPU engines wgattn runs on: Deno's own (wgpu, Naga) and Dawn (Chrome's, Tint), from npm. */
export type EngineName = "deno" | "dawn";

/** One WebGPU engine. */
export interface Engine {
  readonly name: EngineName;
  /** The WGSL compiler its shaders meet: "naga" (wgpu), "tint" (Dawn) or "browser" (a page's own). */
  readonly compiler: "naga" | "tint" | "browser";
  /** What runs it, e.g. `deno 2.9.6` or `webgpu@0.6.2 (dawn.node)`. */
  readonly version: string;
  /** The high-performance adapter, or null when the engine has none. */
  requestAdapter(): Promise<GPUAdapter | null>;
  /** WGSL language features the engine's compiler accepts. */
  readonly wgslLanguageFeatures: ReadonlySet<string>;
  /**
   * Builds a compute pipeline; rejects with the compiler's message. (Dawn's asynchronous creation
   * segfaults in dawn.node 0.6.2, so that engine builds synchronously inside an error scope.)
   */
  createComputePipeline(
    device: GPUDevice,
    descriptor: GPUComputePipelineDescriptor,
  ): Promise<GPUComputePipeline>;
  /**
   * Keeps the process alive while `work` is pending: a pending dawn.node promise does not hold
   * Deno's event loop, so the process could exit inside an `await`.
   */
  hold<T>(work: Promise<T>): Promise<T>;
  /**
   * Copies host bytes to offset 0 of `buffer` (which has COPY_DST), ahead of every later submit;
   * when it returns a promise, ahead of every submit made after the promise resolves (a large write
   * may be copied by other threads first). A ragged tail (not a whole 4-byte word) is padded with
   * zeros. `bytes` must not change until the write is done.
   */
  writeBuffer(device: GPUDevice, buffer: GPUBuffer, bytes: Uint8Array<ArrayBuffer>): Promise<void> | void;
  /**
   * Copies host bytes `src` into the start of `dst` (a read-back out of a mapped buffer). Dawn's
   * splits large copies over threads (engines/host_copy.ts); Deno's engine, whose every read-back
   * waits about 11 ms anyway, copies on this thread.
   */
  copyOut(dst: Uint8Array, src: Uint8Array): Promise<void> | void;
}

/** {@link Engine.copyOut} on this thread. */
export function plainCopy(dst: Uint8Array, src: Uint8Array): void {
  dst.set(src);
}

/** `queue.writeBuffer` of whole 4-byte words (it takes no other), the ragged tail padded. */
export function queueWrite(device: GPUDevice, buffer: GPUBuffer, bytes: Uint8Array<ArrayBuffer>): void {
  const whole = bytes.byteLength & ~3;
  if (whole > 0) device.queue.writeBuffer(buffer, 0, bytes, 0, whole);
  if (whole < bytes.byteLength) {
    const tail = new Uint8Array(4);
    tail.set(bytes.subarray(whole));
    device.queue.writeBuffer(buffer, whole, tail);
  }
}

/**
 * Whether `x` is a GPU buffer of any engine. `instanceof GPUBuffer` would test against the global
 * class of one engine only (Deno's, unless a caller replaced the globals with Dawn's).
 */
export function isGpuBuffer(x: unknown): x is GPUBuffer {
  if (x === null || typeof x !== "object") return false;
  const b = x as Partial<GPUBuffer>;
  return typeof b.mapAsync === "function" && typeof b.getMappedRange === "function" &&
    typeof b.size === "number" && typeof b.usage === "number";
}

/** Whether `x` is a GPU device of any engine (duck-typed, for the reason {@link isGpuBuffer} is). */
export function isGpuDevice(x: unknown): x is GPUDevice {
  if (x === null || typeof x !== "object") return false;
  const d = x as Partial<GPUDevice>;
  return typeof d.createBuffer === "function" && typeof d.createComputePipeline === "function" &&
    typeof d.queue === "object";
}

/**
 * The marker the npm package `webgpu` (dawn.node) puts on its `GPUDevice` prototype: a device from
 * any copy of the package carries it, also one wgattn did not load itself.
 */
export const DAWN_DEVICE_MARK: symbol = Symbol.for("webgpu.deviceDestroyUnmapsBuffers");

/** Which engine made `device`. */
export function engineOfDevice(device: GPUDevice): EngineName {
  const proto = Object.getPrototypeOf(device) as Record<symbol, unknown> | null;
  return proto && proto[DAWN_DEVICE_MARK] ? "dawn" : "deno";
}

/**
 * A pipeline built synchronously, its validation errors caught by an error scope. For engines
 * whose asynchronous creation is unsafe.
 */
export function createPipelineInScope(
  device: GPUDevice,
  descriptor: GPUComputePipelineDescriptor,
): Promise<GPUComputePipeline> {
  device.pushErrorScope("validation");
  device.pushErrorScope("internal");
  let pipeline: GPUComputePipeline;
  try {
    pipeline = device.createComputePipeline(descriptor);
  } catch (e) {
    device.popErrorScope().catch(() => null);
    device.popErrorScope().catch(() => null);
    return Promise.reject(e);
  }
  const internal = device.popErrorScope().catch(() => null);
  const validation = device.popErrorScope().catch(() => null);
  return Promise.all([internal, validation]).then(([i, v]) => {
    const error = v ?? i;
    if (error) throw new Error(error.message);
    return pipeline;
  });
}
