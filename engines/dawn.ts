/**
 * Dawn, Chrome's WebGPU engine (Tint WGSL compiler), from the npm package `webgpu` (dawn.node),
 * loaded only when chosen. It reaches what Deno's engine hides (subgroup matrices: the tensor
 * cores) and waits for the GPU in tens of microseconds instead of about 11 ms.
 *
 * Quirks of dawn.node 0.6.2 that this file works around (each has a test in tests/engine_test.ts):
 * - `createComputePipelineAsync` segfaults: pipelines are built synchronously in an error scope.
 * - a pending Dawn promise does not keep Deno's event loop alive: {@link Engine.hold} keeps a timer
 *   while wgattn awaits one.
 * - dawn.node's `queue.writeBuffer` copies at about 2.4 GB/s (H200; 0.2 GB/s on lavapipe): uploads go
 *   through pooled, mapped staging buffers and a copy, several times faster, large ones written by
 *   several threads (engines/host_copy.ts).
 * - Dawn hard-codes `shader-f16` off on NVIDIA GPUs: nothing to do here, the kernels read 16-bit
 *   tensors as u32 words where the capability is missing.
 */
import { createPipelineInScope, type Engine, queueWrite } from "./engine.ts";
import { hostCopy } from "./host_copy.ts";

/** The npm package wgattn loads for Dawn unless told where an unpacked copy is. */
export const DAWN_PACKAGE = "npm:webgpu@0.6.2";

/**
 * Benchmark hook: more Dawn toggles to turn on or off when Dawn is loaded (e.g. `disable_robustness`,
 * to measure what Tint's bounds checks cost). Set before the first device.
 */
export const dawnTuning: { enable: string[]; disable: string[] } = { enable: [], disable: [] };

/**
 * Dawn instance flags: subgroup matrices are behind Dawn's unsafe-API toggle; timestamps are
 * quantized by default (to 65.5 µs on the H200, measured), which would blur every kernel timing.
 */
function dawnFlags(): string[] {
  const enable = ["allow_unsafe_apis", ...dawnTuning.enable];
  const disable = ["timestamp_quantization", ...dawnTuning.disable];
  return [`enable-dawn-features=${enable.join(",")}`, `disable-dawn-features=${disable.join(",")}`];
}

/** Why Dawn could not be loaded, in one line for explain() and errors. */
export class DawnUnavailable extends Error {}

interface DawnModule {
  create(flags: string[]): GPU;
}

type DenoLike = {
  permissions?: { querySync?(d: { name: string }): { state: string } };
  cwd?(): string;
};

/** A file path or URL of the package's index.js, as an import specifier. */
function specifierOf(module: string): string {
  if (/^(npm|jsr|https?|file):/.test(module)) return module;
  const deno = (globalThis as { Deno?: DenoLike }).Deno;
  const base = `file://${deno?.cwd?.() ?? ""}/`;
  return new URL(module, base).href;
}

/** Keeps one long timer alive while any held promise is pending (reference-counted). */
function makeHold(): Engine["hold"] {
  let pending = 0;
  let timer: ReturnType<typeof setInterval> | undefined;
  return <T>(work: Promise<T>): Promise<T> => {
    if (pending++ === 0) timer = setInterval(() => {}, 60_000);
    const release = () => {
      if (--pending === 0) clearInterval(timer);
    };
    work.then(release, release);
    return work;
  };
}

/**
 * Loads dawn.node from `module` (the npm package by default) and makes an engine of it. Rejects
 * with {@link DawnUnavailable} saying why: no `--allow-ffi`, the package missing, or no adapter.
 */
export async function loadDawn(module: string = DAWN_PACKAGE): Promise<Engine> {
  const deno = (globalThis as { Deno?: DenoLike }).Deno;
  if (!deno) {
    throw new DawnUnavailable("Dawn loads as a native addon in Deno; a page runs on its browser's WebGPU");
  }
  try {
    if (deno.permissions?.querySync?.({ name: "ffi" }).state !== "granted") {
      throw new DawnUnavailable("--allow-ffi is not granted (dawn.node is a native addon)");
    }
  } catch (e) {
    if (e instanceof DawnUnavailable) throw e;
  }
  let dawn: DawnModule;
  const specifier = specifierOf(module);
  try {
    dawn = await import(specifier) as DawnModule;
    if (typeof dawn.create !== "function") throw new Error("it exports no create()");
  } catch (e) {
    const why = ((e as Error)?.message ?? String(e)).split("\n")[0].slice(0, 240);
    throw new DawnUnavailable(
      `${module} could not be loaded (${why}); offline, point WGATTN_DAWN_MODULE or ` +
        `useEngine("dawn", { module }) at an unpacked copy's index.js`,
    );
  }
  let gpu: GPU;
  try {
    gpu = dawn.create(dawnFlags());
  } catch (e) {
    throw new DawnUnavailable(`dawn.node did not start: ${(e as Error)?.message ?? e}`);
  }
  const hold = makeHold();
  const adapter = await hold(gpu.requestAdapter({ powerPreference: "high-performance" })).catch(() => null);
  if (!adapter) {
    throw new DawnUnavailable(
      "Dawn found no adapter (on Linux it needs Vulkan: a GPU driver, or Mesa 25's lavapipe; " +
        "Mesa 22's lavapipe is refused)",
    );
  }
  const version = module === DAWN_PACKAGE ? "webgpu@0.6.2 (dawn.node)" : `${module} (dawn.node)`;
  return dawnEngine(gpu, adapter, version, hold);
}

/**
 * The Dawn engine of a device the caller made with their own copy of dawn.node (`setDevice`):
 * its quirks are the same; wgattn never acquires a device through it.
 */
export function adoptedDawnEngine(): Engine {
  return dawnEngine(null, null, "dawn.node (the caller's)", makeHold());
}

/**
 * Uploads through a mapped staging buffer and a copy submitted at once (queue order with every
 * later submit is kept). Staging buffers are pooled per device and mapped again once their copy has
 * run (Dawn's map callbacks take tens of microseconds), so a steady stream of calls writes into
 * memory already mapped and touched instead of allocating and faulting in new pages each time.
 */
export function stagedWrite(
  device: GPUDevice,
  buffer: GPUBuffer,
  bytes: Uint8Array<ArrayBuffer>,
): Promise<void> | void {
  const size = Math.ceil(bytes.byteLength / 4) * 4;
  if (size === 0) return;
  // Small writes (uniforms, masks) cost less through Dawn's own ring buffer than a submit of their own.
  if (size < STAGED_MIN) return queueWrite(device, buffer, bytes);
  const staging = takeStaging(device, size);
  const mapped = new Uint8Array(staging.getMappedRange(0, size));
  // A ragged tail's padding: the pooled buffer may hold an earlier upload's bytes there.
  if (size > bytes.byteLength) mapped.fill(0, bytes.byteLength, size);
  const copy = () => {
    staging.unmap();
    const encoder = device.createCommandEncoder();
    encoder.copyBufferToBuffer(staging, 0, buffer, 0, size);
    device.queue.submit([encoder.finish()]);
    returnStaging(device, staging);
  };
  // Large writes are copied by several threads (engines/host_copy.ts); the caller awaits the copy
  // before its own submit, which keeps queue order.
  const copied = hostCopy(mapped, bytes);
  if (!copied) return copy();
  return copied.then(copy, (e) => {
    staging.destroy();
    throw e;
  });
}

/** Writes from this size go through the staging pool. */
const STAGED_MIN = 256 << 10;
/** Staging buffers of an upload pool are powers of two from 64 KiB; larger uploads are not pooled. */
const POOLED_MIN = 64 << 10, POOLED_MAX = 64 << 20;
/** Most bytes of mapped staging memory kept per device. */
const POOL_BYTES = 128 << 20;

interface UploadPool {
  mapped: GPUBuffer[];
  bytes: number;
}
const pools = new WeakMap<GPUDevice, UploadPool>();

function takeStaging(device: GPUDevice, size: number): GPUBuffer {
  const pool = pools.get(device);
  const bucket = size > POOLED_MAX ? size : Math.max(POOLED_MIN, 2 ** Math.ceil(Math.log2(size)));
  const i = pool ? pool.mapped.findIndex((b) => b.size === bucket) : -1;
  if (pool && i >= 0) {
    const [b] = pool.mapped.splice(i, 1);
    pool.bytes -= b.size;
    return b;
  }
  return device.createBuffer({
    size: bucket,
    usage: GPUBufferUsage.MAP_WRITE | GPUBufferUsage.COPY_SRC,
    mappedAtCreation: true,
    label: "wgattn upload",
  });
}

/** Maps `staging` again after its copy and pools it, or frees it once the copy has run. */
function returnStaging(device: GPUDevice, staging: GPUBuffer): void {
  let pool = pools.get(device);
  if (!pool) pools.set(device, pool = { mapped: [], bytes: 0 });
  if (staging.size > POOLED_MAX || pool.bytes + staging.size > POOL_BYTES) {
    staging.destroy();
    return;
  }
  // Reserved now, so that uploads in flight cannot overfill the pool. (No hold: a pending refill
  // must not keep the process alive.)
  pool.bytes += staging.size;
  const target = pool;
  staging.mapAsync(GPUMapMode.WRITE).then(
    () => target.mapped.push(staging),
    () => {
      target.bytes -= staging.size;
      staging.destroy();
    },
  );
}

function dawnEngine(
  gpu: GPU | null,
  adapter: GPUAdapter | null,
  version: string,
  hold: Engine["hold"],
): Engine {
  let first = adapter;
  return {
    name: "dawn",
    compiler: "tint",
    version,
    requestAdapter() {
      // The adapter found while loading serves the first device (an adapter gives one device).
      const a = first;
      first = null;
      if (a) return Promise.resolve(a);
      return gpu ? hold(gpu.requestAdapter({ powerPreference: "high-performance" })) : Promise.resolve(null);
    },
    wgslLanguageFeatures:
      (gpu as { wgslLanguageFeatures?: ReadonlySet<string> } | null)?.wgslLanguageFeatures ??
        new Set(),
    createComputePipeline: (device, descriptor) => hold(createPipelineInScope(device, descriptor)),
    hold,
    writeBuffer: stagedWrite,
    copyOut: hostCopy,
  };
}
