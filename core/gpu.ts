import { WgattnError } from "./errors.ts";
import { cachedPipeline, type GpuRuntime } from "./device.ts";
import { type Kernel, packUniforms } from "../wgsl/common.ts";
import { isGpuBuffer, queueWrite } from "../engines/engine.ts";
import { engineFor } from "../engines/select.ts";

/** A GPU timing session: compute passes recorded while it is active get timestamps. */
export class Profiler {
  readonly querySet: GPUQuerySet;
  readonly capacity: number;
  readonly labels: string[] = [];
  private readonly device: GPUDevice;

  constructor(device: GPUDevice, capacity = 4096) {
    this.device = device;
    this.capacity = capacity;
    this.querySet = device.createQuerySet({ type: "timestamp", count: capacity * 2 });
  }

  /** Timestamp writes for the next pass, or undefined when full. */
  next(label: string): GPUComputePassTimestampWrites | undefined {
    const i = this.labels.length;
    if (i >= this.capacity) return undefined;
    this.labels.push(label);
    return { querySet: this.querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 };
  }

  /** Reads every recorded pass's duration in milliseconds (one host wait). */
  async read(): Promise<{ label: string; ms: number }[]> {
    const count = this.labels.length * 2;
    if (count === 0) return [];
    const resolve = this.device.createBuffer({
      size: count * 8,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    const staging = this.device.createBuffer({
      size: count * 8,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const enc = this.device.createCommandEncoder();
    enc.resolveQuerySet(this.querySet, 0, count, resolve, 0);
    enc.copyBufferToBuffer(resolve, 0, staging, 0, count * 8);
    this.device.queue.submit([enc.finish()]);
    await engineFor(this.device).hold(staging.mapAsync(GPUMapMode.READ));
    const t = new BigUint64Array(staging.getMappedRange().slice(0));
    staging.unmap();
    staging.destroy();
    resolve.destroy();
    return this.labels.map((label, i) => ({ label, ms: Number(t[2 * i + 1] - t[2 * i]) / 1e6 }));
  }

  /** Forgets recorded passes (the query set is reused). */
  reset(): void {
    this.labels.length = 0;
  }

  destroy(): void {
    this.querySet.destroy();
  }
}

let activeProfiler: Profiler | null = null;

/** Starts (or with null, stops) timing every call's compute pass. For benchmarks. */
export function setProfiler(p: Profiler | null): void {
  activeProfiler = p;
}

/** Live GPU buffers that wgattn created and still holds, for leak checks. */
export const gpuStats = { liveBuffers: 0, liveBytes: 0, keptBuffers: 0, keptBytes: 0 };

/** Fault-injection and test hooks. Leave them alone outside tests. */
export const debug: {
  /** Fill every output buffer with NaN before the kernels run, so unwritten elements show. */
  poisonOutputs: boolean;
  /**
   * Kernels whose label this matches are compiled from broken WGSL, as a faulty shader compiler
   * would reject them: the backend is then retired on that device (`GpuRuntime.broken`).
   */
  breakKernels: RegExp | null;
  /** Allocations whose label this matches report out-of-memory, as a full device would. */
  failAllocations: RegExp | null;
} = { poisonOutputs: false, breakKernels: null, failAllocations: null };

/** What the device reported while a call was being recorded (see {@link GpuCall.errors}). */
export interface RecordedErrors {
  /** The first out-of-memory error, if any. */
  outOfMemory: GPUError | null;
  /** The first validation (or internal) error, if any. */
  validation: GPUError | null;
}

/**
 * One attention call's GPU work: one command encoder and one compute pass, temporary buffers
 * freed after submit. Nothing here waits for the GPU.
 */
export class GpuCall {
  readonly rt: GpuRuntime;
  readonly device: GPUDevice;
  /** Made at the first pass or submit: a host call's uploads start before it (Dawn takes ~0.05 ms). */
  private encoderMade: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private readonly temporaries: GPUBuffer[] = [];
  /** Temporaries that may be kept for a later call (see {@link recycleBuffer}). */
  private readonly recyclable = new Set<GPUBuffer>();
  private label: string;
  /** Error scopes of each allocation and bind group, popped right away (see {@link capture}). */
  private readonly pending: Promise<[GPUErrorFilter, GPUError | null]>[] = [];
  /** Uniform buffers of this call, pooled for later calls once it is submitted or dropped. */
  private readonly uniforms = new Set<GPUBuffer>();
  /** Uploads still being copied on other threads (their staging copies are submitted when done). */
  private readonly writes: Promise<void>[] = [];
  /** Read-backs whose copies go into this call's own submit ({@link readBack}). */
  private readonly reads: PendingRead[] = [];
  /**
   * Bindings that stand in for whole buffers in {@link dispatch}: the core binds ranges of tensors
   * larger than one storage binding this way, unknown to the backends.
   */
  windows: Map<GPUBuffer, GPUBufferBinding> | null = null;

  constructor(rt: GpuRuntime, label: string) {
    this.rt = rt;
    this.device = rt.device;
    this.label = label;
  }

  /** The call's one command encoder. */
  get encoder(): GPUCommandEncoder {
    return this.encoderMade ??= this.device.createCommandEncoder({ label: this.label });
  }

  /**
   * Names the call's work once its backend is known (a host call's uploads start before that); the
   * name labels its compute pass and its timestamps.
   */
  relabel(label: string): void {
    this.label = label;
  }

  /** A cached pipeline for `kernel`. */
  pipeline(kernel: Kernel): Promise<GPUComputePipeline> {
    if (debug.breakKernels?.test(kernel.label)) {
      const broken = () => kernel.code + "\nfn injected_by_debug_breakKernels( {\n";
      return cachedPipeline(this.rt, `${kernel.key}:broken`, broken, kernel.label);
    }
    return cachedPipeline(this.rt, kernel.key, () => kernel.code, kernel.label);
  }

  /**
   * Runs `f` inside its own out-of-memory and validation error scopes, pushed and popped without
   * an await in between, so that calls recorded concurrently never see each other's errors.
   */
  private capture<T>(f: () => T): T {
    const device = this.device;
    device.pushErrorScope("validation");
    device.pushErrorScope("out-of-memory");
    try {
      return f();
    } finally {
      const oom = device.popErrorScope().catch(() => null);
      const validation = device.popErrorScope().catch(() => null);
      this.pending.push(
        oom.then((e) => ["out-of-memory", e] as [GPUErrorFilter, GPUError | null]),
        validation.then((e) => ["validation", e] as [GPUErrorFilter, GPUError | null]),
      );
    }
  }

  /**
   * What the device reported for this call's allocations and bind groups so far. Awaiting it does
   * not wait for the GPU (error scopes resolve on the device timeline): call it before submit.
   */
  async errors(): Promise<RecordedErrors> {
    const found: RecordedErrors = { outOfMemory: null, validation: null };
    for (const [filter, e] of await this.rt.engine.hold(Promise.all(this.pending))) {
      if (!e) continue;
      if (filter === "out-of-memory") found.outOfMemory ??= e;
      else found.validation ??= e;
    }
    return found;
  }

  /** A buffer that lives until the call is submitted. */
  scratch(bytes: number, label = "wgattn scratch"): GPUBuffer {
    const b = this.createBuffer(
      bytes,
      GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
      label,
    );
    this.temporaries.push(b);
    return b;
  }

  /** A new buffer, counted in {@link gpuStats} until destroyed through {@link releaseBuffer}. */
  createBuffer(bytes: number, usage: number, label: string, contents?: ArrayBufferView): GPUBuffer {
    const size = Math.max(16, Math.ceil(bytes / 16) * 16);
    if (size > this.rt.caps.limits.maxBufferSize) {
      throw new WgattnError("OUT_OF_MEMORY", `${label} needs a buffer larger than the device allows`, {
        argument: label,
        expected: `at most ${this.rt.caps.limits.maxBufferSize} bytes (maxBufferSize)`,
        actual: `${size} bytes`,
      });
    }
    // Contents go the engine's fastest way (Deno's: queue.writeBuffer; a write through a mapped
    // range ran at about 20 MB/s there; Dawn's: a staging buffer mapped at creation).
    const b = this.capture(() => {
      const made = this.device.createBuffer({
        size,
        usage: contents ? usage | GPUBufferUsage.COPY_DST : usage,
        label,
      });
      if (contents) this.write(made, contents);
      return made;
    });
    if (debug.failAllocations?.test(label)) {
      const e = new GPUOutOfMemoryError(`${label}: out of memory (debug.failAllocations)`);
      this.pending.push(Promise.resolve(["out-of-memory", e] as [GPUErrorFilter, GPUError | null]));
    }
    trackBuffer(b);
    return b;
  }

  /** Starts the engine's write of `data` into `buffer`; {@link submit} waits for the writes first. */
  private write(buffer: GPUBuffer, data: ArrayBufferView): void {
    const writing = engineFor(this.device).writeBuffer(this.device, buffer, bytesOf(data));
    if (writing) this.writes.push(writing);
  }

  /** Uploads host data into a temporary storage buffer (one kept from an earlier call when it fits). */
  upload(data: ArrayBufferView, label: string): GPUBuffer {
    const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    const kept = this.reused(data.byteLength, usage, label);
    if (kept) this.capture(() => this.write(kept, data));
    const b = kept ?? this.createBuffer(data.byteLength, usage, label, data);
    this.temporaries.push(b);
    this.recyclable.add(b);
    return b;
  }

  /**
   * A buffer of an earlier call kept by {@link recycleBuffer}, of this size and usage, or null. Its
   * contents are stale: only for buffers the call overwrites whole (uploads, host-call outputs).
   */
  reused(bytes: number, usage: number, label: string): GPUBuffer | null {
    if (debug.failAllocations?.test(label)) return null;
    const b = takeKept(this.device, Math.max(16, Math.ceil(bytes / 16) * 16), usage);
    if (b) trackBuffer(b);
    return b;
  }

  /**
   * A uniform buffer holding `packed`: one of an earlier call when the device has one of that size
   * (creating a buffer costs tens of microseconds on Dawn, and a call makes one per dispatch).
   * Rewriting it is safe: `queue.writeBuffer` runs in queue order, after the earlier call's work.
   */
  private uniformBuffer(packed: Uint8Array<ArrayBuffer>): GPUBuffer {
    const size = Math.max(16, Math.ceil(packed.byteLength / 16) * 16);
    const free = uniformPool.get(this.device);
    const i = free ? free.findIndex((b) => b.size === size) : -1;
    let b: GPUBuffer;
    if (i >= 0 && !debug.failAllocations?.test("wgattn uniforms")) {
      b = free!.splice(i, 1)[0];
      trackBuffer(b);
      this.capture(() => queueWrite(this.device, b, packed));
    } else {
      b = this.createBuffer(
        packed.byteLength,
        GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
        "wgattn uniforms",
        packed,
      );
    }
    this.temporaries.push(b);
    this.uniforms.add(b);
    return b;
  }

  /** Records one dispatch of `groups` workgroups (split over x and y past the per-dimension limit). */
  dispatch(
    pipeline: GPUComputePipeline,
    kernel: Kernel,
    buffers: Record<string, GPUBuffer | GPUBufferBinding>,
    uniforms: Record<string, number>,
    groups: number,
  ): void {
    if (groups <= 0) return;
    const maxDim = this.rt.caps.limits.maxComputeWorkgroupsPerDimension;
    const x = Math.min(groups, maxDim);
    const y = Math.ceil(groups / x);
    if (y > maxDim) {
      throw new WgattnError("GPU_ERROR", `${kernel.label} needs too many workgroups`, {
        expected: `at most ${maxDim * maxDim}`,
        actual: `${groups}`,
      });
    }
    const packed = new Uint8Array(packUniforms(kernel.uniforms, { ...uniforms, groups }));
    const uniformBuffer = this.uniformBuffer(packed);
    const entries: GPUBindGroupEntry[] = [{ binding: 0, resource: { buffer: uniformBuffer } }];
    const limit = this.rt.caps.limits.maxStorageBufferBindingSize;
    kernel.bindings.forEach((name, i) => {
      const b = buffers[name];
      if (!b) throw new Error(`${kernel.label}: binding ${name} has no buffer`);
      const resource = isGpuBuffer(b) ? this.windows?.get(b) ?? { buffer: b } : b;
      const size = resource.size ?? resource.buffer.size - (resource.offset ?? 0);
      if (size > limit) {
        throw new WgattnError("GPU_ERROR", `${kernel.label}: binding ${name} exceeds one storage binding`, {
          expected: `at most ${limit} bytes (maxStorageBufferBindingSize)`,
          actual: `${size} bytes`,
        });
      }
      entries.push({ binding: i + 1, resource });
    });
    const bindGroup = this.capture(() =>
      this.device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries })
    );
    const pass = this.computePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(x, y);
  }

  private computePass(): GPUComputePassEncoder {
    if (!this.pass) {
      const timestampWrites = activeProfiler && this.rt.caps.timestamps
        ? activeProfiler.next(this.label)
        : undefined;
      this.pass = this.encoder.beginComputePass({ label: this.label, timestampWrites });
    }
    return this.pass;
  }

  /** Ends the pass (a copy after it needs this). */
  endPass(): void {
    this.pass?.end();
    this.pass = null;
  }

  /**
   * Submits the work and frees temporaries (the GPU keeps them alive until it is done). The promise
   * says whether the device refused the submission (e.g. a caller's buffer destroyed meanwhile); it
   * does not wait for the GPU.
   */
  async submit(): Promise<GPUError | null> {
    return await (await this.queue()).refused;
  }

  /**
   * {@link submit} in two steps: resolves once the work is on the queue (after the uploads), with
   * the promise of whether the device refused it, so that work queued after it (a read-back) need
   * not wait for that answer first.
   */
  async queue(): Promise<{ refused: Promise<GPUError | null> }> {
    this.endPass();
    // The read-backs' copies follow the work in the same command buffer (a command encoder and a
    // submit of their own cost about 0.07 ms on Dawn, on a host call's critical path).
    for (const r of this.reads) this.encoder.copyBufferToBuffer(r.src, 0, r.staging, 0, r.size);
    const device = this.device;
    // Uploads first: their staging copies go to the queue ahead of this call's work.
    if (this.writes.length > 0) {
      try {
        await this.rt.engine.hold(Promise.all(this.writes));
      } catch (e) {
        this.abandon();
        return {
          refused: Promise.resolve(new GPUValidationError(`an upload failed: ${(e as Error)?.message ?? e}`)),
        };
      }
    }
    let refused: Promise<GPUError | null>;
    let submitted = false;
    device.pushErrorScope("validation");
    try {
      device.queue.submit([this.encoder.finish()]);
      submitted = true;
    } finally {
      refused = this.rt.engine.hold(device.popErrorScope().catch(() => null));
      for (const r of this.reads.splice(0)) {
        if (submitted) mapAndCopy(device, r.staging, r.size, r.bytes, r.into).then(r.resolve, r.reject);
        else {
          r.staging.destroy();
          r.reject(new Error("the call's work could not be submitted"));
        }
      }
      for (const b of this.temporaries) {
        if (this.recyclable.has(b)) recycleBuffer(device, b);
        else if (this.uniforms.has(b)) poolUniform(device, b);
        else releaseBuffer(b);
      }
      this.temporaries.length = 0;
    }
    return { refused };
  }

  /**
   * The first `bytes` of `src` on the host once this call's work has run: the copy is recorded at
   * the end of the call's own submit ({@link queue}), so ask before it. Rejects if the call is
   * abandoned or the read fails.
   */
  readBack(src: GPUBuffer, bytes: number, into?: Uint8Array): Promise<ArrayBuffer> {
    const size = Math.ceil(bytes / 4) * 4;
    const staging = takeStaging(this.device, size);
    return new Promise((resolve, reject) =>
      this.reads.push({ src, size, bytes, staging, into, resolve, reject })
    );
  }

  /**
   * Drops temporaries without submitting (after an error while encoding). Resolves once they are
   * released (an upload still being copied on other threads is waited for first).
   */
  abandon(): Promise<void> {
    for (const r of this.reads.splice(0)) {
      r.staging.destroy();
      r.reject(new Error("the call was abandoned before its work was queued"));
    }
    try {
      this.pass?.end();
    } catch { /* the encoder is being thrown away */ }
    this.pass = null;
    const dropped = this.temporaries.splice(0);
    const release = () => dropped.forEach(releaseBuffer);
    // An upload still being copied submits into its buffer when done: destroy after that.
    if (this.writes.length > 0) return Promise.allSettled(this.writes.splice(0)).then(release);
    release();
    return Promise.resolve();
  }
}

/** The bytes of a typed array or view. */
function bytesOf(view: ArrayBufferView): Uint8Array<ArrayBuffer> {
  return new Uint8Array(view.buffer as ArrayBuffer, view.byteOffset, view.byteLength);
}

const tracked = new WeakSet<GPUBuffer>();

function trackBuffer(b: GPUBuffer): void {
  tracked.add(b);
  gpuStats.liveBuffers++;
  gpuStats.liveBytes += b.size;
}

/** Destroys a buffer wgattn created and updates {@link gpuStats}. */
export function releaseBuffer(b: GPUBuffer): void {
  if (tracked.has(b)) {
    tracked.delete(b);
    gpuStats.liveBuffers--;
    gpuStats.liveBytes -= b.size;
  }
  b.destroy();
}

/**
 * Large temporaries of finished calls, kept per device for the next call of the same sizes (a serving
 * loop's): a buffer of megabytes costs about 0.47 ms to create on Dawn (H200) and is zero-filled on its
 * first use. Reuse is safe because queue order puts the next call's writes after this call's reads.
 * Kept buffers are not live in {@link gpuStats}.
 */
const kept = new WeakMap<GPUDevice, GPUBuffer[]>();
/** Buffers from this size are kept; smaller ones cost little to make. */
const KEPT_MIN_BYTES = 1 << 20;
/** Most buffers and bytes kept per device. */
const KEPT_MAX = 8, KEPT_MAX_BYTES = 256 << 20;

function takeKept(device: GPUDevice, size: number, usage: number): GPUBuffer | null {
  const list = kept.get(device);
  const i = list ? list.findIndex((b) => b.size === size && b.usage === usage) : -1;
  if (i < 0) return null;
  const [b] = list!.splice(i, 1);
  gpuStats.keptBuffers--;
  gpuStats.keptBytes -= b.size;
  return b;
}

/** Uniform buffers of finished calls, per device, by size (see {@link GpuCall.uniformBuffer}). */
const uniformPool = new WeakMap<GPUDevice, GPUBuffer[]>();
/** Most uniform buffers pooled per device (each a few hundred bytes). */
const UNIFORM_POOL_MAX = 64;

function poolUniform(device: GPUDevice, b: GPUBuffer): void {
  let free = uniformPool.get(device);
  if (!free) uniformPool.set(device, free = []);
  if (free.length >= UNIFORM_POOL_MAX) return releaseBuffer(b);
  untrackBuffer(b);
  free.push(b);
}

/** Keeps a temporary for a later call when it is large and the pool has room; destroys it otherwise. */
export function recycleBuffer(device: GPUDevice, b: GPUBuffer): void {
  let list = kept.get(device);
  if (!list) kept.set(device, list = []);
  const bytes = list.reduce((sum, x) => sum + x.size, 0);
  if (b.size < KEPT_MIN_BYTES || list.length >= KEPT_MAX || bytes + b.size > KEPT_MAX_BYTES) {
    releaseBuffer(b);
    return;
  }
  untrackBuffer(b);
  list.push(b);
  gpuStats.keptBuffers++;
  gpuStats.keptBytes += b.size;
}

/** Forgets a buffer handed to the caller (it is theirs to destroy). */
export function untrackBuffer(b: GPUBuffer): void {
  if (tracked.has(b)) {
    tracked.delete(b);
    gpuStats.liveBuffers--;
    gpuStats.liveBytes -= b.size;
  }
}

/**
 * Copies a GPU buffer to host memory (one host wait), into `into` when given (at least `bytes`
 * long: a caller may allocate it while it waits for something else).
 */
export async function readBuffer(
  device: GPUDevice,
  src: GPUBuffer,
  bytes: number,
  into?: Uint8Array,
): Promise<ArrayBuffer> {
  const size = Math.ceil(bytes / 4) * 4;
  const staging = takeStaging(device, size);
  try {
    const enc = device.createCommandEncoder();
    enc.copyBufferToBuffer(src, 0, staging, 0, size);
    device.queue.submit([enc.finish()]);
  } catch (e) {
    staging.destroy();
    throw e;
  }
  return await mapAndCopy(device, staging, size, bytes, into);
}

/** A read-back recorded into a call's submit ({@link GpuCall.readBack}). */
interface PendingRead {
  src: GPUBuffer;
  size: number;
  bytes: number;
  staging: GPUBuffer;
  into?: Uint8Array;
  resolve: (data: ArrayBuffer) => void;
  reject: (e: unknown) => void;
}

/**
 * Maps `staging` once the copy into it (already submitted) has run and copies its first `bytes`
 * out, into `into` when given; the staging buffer is then kept for the next read, or destroyed
 * after a failure.
 */
async function mapAndCopy(
  device: GPUDevice,
  staging: GPUBuffer,
  size: number,
  bytes: number,
  into?: Uint8Array,
): Promise<ArrayBuffer> {
  let reusable = false;
  try {
    const mapped = engineFor(device).hold(staging.mapAsync(GPUMapMode.READ, 0, size));
    // Allocated while the GPU works (a large ArrayBuffer is zero-filled on this thread), then
    // copied into by several threads when large (engines/host_copy.ts).
    const data = into ?? new Uint8Array(bytes);
    await mapped;
    await engineFor(device).copyOut(data, new Uint8Array(staging.getMappedRange(0, size), 0, bytes));
    staging.unmap();
    reusable = true;
    return data.buffer as ArrayBuffer;
  } finally {
    if (reusable) giveStaging(device, staging);
    else staging.destroy();
  }
}

/**
 * Read-back buffers kept per device for the next host call: a new mappable buffer per call cost an
 * allocation each time (the seed call reads 4 MB back). At most {@link STAGING_KEPT} are kept, of at
 * most {@link STAGING_KEPT_BYTES} each; concurrent reads take different ones.
 */
const stagingFree = new WeakMap<GPUDevice, GPUBuffer[]>();
const STAGING_KEPT = 4;
const STAGING_KEPT_BYTES = 64 << 20;

function takeStaging(device: GPUDevice, size: number): GPUBuffer {
  const free = stagingFree.get(device) ?? [];
  const i = free.findIndex((b) => b.size >= size && b.size <= 2 * size + 65536);
  if (i >= 0) return free.splice(i, 1)[0];
  return device.createBuffer({ size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
}

function giveStaging(device: GPUDevice, buffer: GPUBuffer): void {
  let free = stagingFree.get(device);
  if (!free) stagingFree.set(device, free = []);
  if (buffer.size > STAGING_KEPT_BYTES) return buffer.destroy();
  free.push(buffer);
  while (free.length > STAGING_KEPT) free.shift()!.destroy();
}
