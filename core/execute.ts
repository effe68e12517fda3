import { WgattnError } from "./errors.ts";
import { confirmLost, type GpuRuntime } from "./device.ts";
import { debug, GpuCall, readBuffer, recycleBuffer, releaseBuffer, untrackBuffer } from "./gpu.ts";
import { type AttentionProblem, lseShape } from "./problem.ts";
import type { IndexView, SinkView } from "./serving.ts";
import { engineFor } from "../engines/select.ts";
import {
  DTYPE_BYTES,
  elementCount,
  float64ToHost,
  hostFromBytes,
  hostToFloat64,
  type MaskOperand,
  type Operand,
} from "./tensor.ts";
import type { GpuTensor, HostTensor } from "./types.ts";
import type { Backend, CpuBackend, GpuBackend, GpuIO, HostIO } from "../backends/backend.ts";
import { checkFlexCall, type FlexView, type ModBufferData } from "./flex.ts";
import { encodeSplit, firstPiece, pieceCount, planSplit, type SplitPlan } from "./split.ts";

/** Output and optional log-sum-exp of one call. */
export interface RawResult {
  out: HostTensor | GpuTensor;
  lse: HostTensor | GpuTensor | null;
}

/**
 * A host call's q, k and v, their uploads started as soon as the router has chosen a GPU backend: on
 * Dawn a host call's time is mostly these copies (the seed call: 25 MB through the BAR, about 2 ms),
 * and the checks, the command encoder and the encoding then run beside them instead of ahead of them.
 */
export interface EarlyUploads {
  call: GpuCall;
  q: GPUBuffer;
  k: GPUBuffer;
  v: GPUBuffer;
  /** Set once a GPU run takes them over; otherwise the caller abandons them. */
  taken: boolean;
}

/** Host calls from this many bytes of q, k and v start their uploads before their encoding. */
const EARLY_UPLOAD_BYTES = 1 << 20;

/**
 * Whether a call starts its uploads before it is routed and encoded ({@link EarlyUploads}): a host
 * call of at least 1 MiB of q, k and v on a device, not split past the binding limits, no flex call.
 */
export function earlyUploadsApply(p: AttentionProblem, rt: GpuRuntime | null, wantLse: boolean): boolean {
  if (!rt || rt.lost || p.flex) return false;
  const ops = [p.q.operand, p.k.operand, p.v.operand];
  let bytes = 0;
  for (const o of ops) {
    if (o.residency !== "host") return false;
    bytes += o.data.byteLength;
  }
  return bytes >= EARLY_UPLOAD_BYTES && splitFor(p, rt, wantLse) === null;
}

/**
 * Starts the uploads of a host call's q, k and v (see {@link EarlyUploads}) that
 * {@link earlyUploadsApply} admits and the router has sent to a GPU backend. Refuses first, as the
 * call would, tensors that cannot exist on the device (checkMemory).
 */
export function startUploads(p: AttentionProblem, rt: GpuRuntime, wantLse: boolean): EarlyUploads {
  checkMemory(p, rt, wantLse);
  const call = new GpuCall(rt, "wgattn");
  // earlyUploadsApply admitted host tensors only.
  const up = (o: Operand, name: string) =>
    call.upload(o.residency === "host" ? o.data : new Uint8Array(0), `wgattn ${name}`);
  return { call, q: up(p.q.operand, "q"), k: up(p.k.operand, "k"), v: up(p.v.operand, "v"), taken: false };
}

/** Picks the backend for a call, or a piece of one, that does or does not need the lse. */
export type Chooser = (p: AttentionProblem, wantLse: boolean) => Backend;

/**
 * The pieces a call runs as on this device (null when it fits each storage binding whole).
 * Throws OUT_OF_MEMORY when one row cannot fit a binding.
 */
export function splitFor(p: AttentionProblem, rt: GpuRuntime | null, wantLse: boolean): SplitPlan | null {
  if (!rt) return null;
  const align = rt.device.limits.minStorageBufferOffsetAlignment ?? 256;
  return planSplit(p, rt.caps.limits.maxStorageBufferBindingSize, align, wantLse);
}

/**
 * Runs a call. GPU tensors in: nothing waits; host tensors in: one readback. A call past the
 * binding limits runs as pieces (core/split.ts), each on the backend `choose` picks for it.
 */
export function execute(
  p: AttentionProblem,
  choose: Chooser,
  rt: GpuRuntime | null,
  wantLse: boolean,
  early: EarlyUploads | null = null,
): Promise<RawResult> {
  const plan = splitFor(p, rt, wantLse);
  if (plan && (p.varlen || p.paged || p.sinks)) {
    // Pieces renumber heads, rows and keys: offsets, tables and lengths would point elsewhere, and
    // pieces over keys would each count the sink.
    throw new WgattnError(
      "OUT_OF_MEMORY",
      "a call with sinks, offsets or pages must fit one storage binding per tensor",
      {
        argument: p.varlen ? "options.cuSeqlensQ" : p.paged ? "options.blockTable" : "options.sinks",
        expected: `q, k, v and the output within maxStorageBufferBindingSize (${
          rt!.caps.limits.maxStorageBufferBindingSize
        } bytes)`,
        actual: `${p.b}x${p.n}x${p.sQ}x${p.sKv}, d ${p.d}, ${p.dtype}: the call would be split`,
      },
    );
  }
  if (plan && p.flex) {
    // Pieces renumber batches, heads, rows and keys: the functions would see other positions.
    throw new WgattnError("OUT_OF_MEMORY", "a flex call must fit one storage binding per tensor", {
      argument: "options.scoreMod",
      expected: `q, k, v and the output within maxStorageBufferBindingSize (${
        rt!.caps.limits.maxStorageBufferBindingSize
      } bytes)`,
      actual: `${p.b}x${p.n}x${p.sQ}x${p.sKv}, d ${p.d}, ${p.dtype}: the call would be split`,
    });
  }
  const backend = choose(plan ? firstPiece(p, plan) : p, wantLse);
  // A call with early uploads was routed to a GPU backend first (core/api.ts): `choose` returns it.
  if (backend.kind === "cpu") return executeCpu(p, backend, rt, wantLse);
  if (!rt) throw new WgattnError("NO_BACKEND", `backend ${backend.name} needs a GPU`);
  return executeGpu(p, plan ? null : backend, plan, choose, rt, wantLse, early);
}

/**
 * Refuses, before anything is created or queued, a call whose buffers cannot exist on the device
 * (OUT_OF_MEMORY). `explain()` runs it too, so it refuses what the call would.
 */
export function checkMemory(p: AttentionProblem, rt: GpuRuntime, wantLse: boolean): void {
  const max = rt.caps.limits.maxBufferSize;
  const bytes = DTYPE_BYTES[p.dtype];
  const needs: [string, number][] = [];
  for (const [name, o] of [["q", p.q.operand], ["k", p.k.operand], ["v", p.v.operand]] as const) {
    if (o.residency === "host") needs.push([name, o.data.byteLength]);
  }
  if (p.mask?.operand.residency === "host") needs.push(["mask", p.mask.operand.data.byteLength]);
  needs.push(["output", elementCount(p.out.shape) * bytes]);
  if (wantLse) needs.push(["lse", p.b * p.n * p.sQ * 4]);
  const total = needs.reduce((x, [, b]) => x + b, 0);
  for (const [name, size] of needs) {
    if (Math.ceil(size / 16) * 16 > max) {
      throw new WgattnError("OUT_OF_MEMORY", `${name} does not fit one buffer of this device`, {
        argument: ["q", "k", "v"].includes(name) ? name : undefined,
        expected: `at most ${max} bytes per buffer (maxBufferSize)`,
        actual: `${size} bytes (${p.b}x${p.n}x${p.sQ}x${p.sKv}, d ${p.d}, ${p.dtype}; ${total} bytes in all)`,
      });
    }
  }
}

function lostError(when: string, cause?: unknown): WgattnError {
  return new WgattnError(
    "DEVICE_LOST",
    `the GPU device was lost ${when}${cause ? `: ${(cause as Error).message ?? cause}` : ""}`,
    {
      expected: "a live device (the next call acquires a new one, unless the device is yours)",
      actual: "lost",
    },
  );
}

function checkDevice(rt: GpuRuntime, p: AttentionProblem): void {
  if (rt.lost) throw lostError("before the call");
  void p;
}

/** The GPU backend `choose` picks for a piece (a piece cannot run on the host). */
function gpuChooser(choose: Chooser) {
  return (piece: AttentionProblem, wantLse: boolean): GpuBackend => {
    const b = choose(piece, wantLse);
    if (b.kind !== "gpu") {
      throw new WgattnError("NO_BACKEND", "no GPU backend can serve a piece of this split call", {
        expected: "a GPU backend for each piece of a call past the binding limits",
        actual: `${b.name} for a piece of ${piece.b}x${piece.n}x${piece.sQ}x${piece.sKv}`,
      });
    }
    return b;
  };
}

/** Binds only the tensor's own bytes of a caller's buffer larger than one storage binding. */
function fitWindows(call: GpuCall, p: AttentionProblem, io: GpuIO): void {
  const limit = call.rt.caps.limits.maxStorageBufferBindingSize;
  const windows = new Map<GPUBuffer, GPUBufferBinding>();
  const bytes = DTYPE_BYTES[p.dtype];
  const tensors: [GPUBuffer | null, number][] = [
    [io.q, elementCount(p.q.operand.shape) * bytes],
    [io.k, elementCount(p.k.operand.shape) * bytes],
    [io.v, elementCount(p.v.operand.shape) * bytes],
  ];
  if (p.mask && io.mask) {
    const m = p.mask.operand;
    tensors.push([io.mask, elementCount(m.shape) * (m.dtype === "bool" ? 1 : 4)]);
  }
  for (const [buffer, size] of tensors) {
    if (!buffer || buffer.size <= limit) continue;
    const had = windows.get(buffer)?.size ?? 0;
    windows.set(buffer, {
      buffer,
      offset: 0,
      size: Math.max(had, Math.min(buffer.size, Math.ceil(size / 4) * 4)),
    });
  }
  call.windows = windows.size > 0 ? windows : null;
}

async function executeGpu(
  p: AttentionProblem,
  backend: GpuBackend | null,
  plan: SplitPlan | null,
  choose: Chooser,
  rt: GpuRuntime,
  wantLse: boolean,
  early: EarlyUploads | null,
): Promise<RawResult> {
  checkDevice(rt, p);
  checkMemory(p, rt, wantLse);
  if (p.flex) await checkFlexCall(rt, p.flex);
  const label = `wgattn ${backend?.name ?? `split (${pieceCount(plan!)} pieces)`}`;
  if (early) early.taken = true;
  const call = early?.call ?? new GpuCall(rt, label);
  call.relabel(label);
  const outCount = elementCount(p.out.shape);
  const outBytes = outCount * DTYPE_BYTES[p.dtype];
  let out: GPUBuffer | null = null;
  let lse: GPUBuffer | null = null;
  try {
    const bind = (o: Operand, name: "q" | "k" | "v") =>
      early ? early[name] : o.residency === "gpu" ? o.buffer : call.upload(o.data, `wgattn ${name}`);
    const io: GpuIO = {
      q: bind(p.q.operand, "q"),
      k: bind(p.k.operand, "k"),
      v: bind(p.v.operand, "v"),
      mask: p.mask ? bindMask(call, p.mask.operand) : null,
      // A host call's output is read back and dropped: it may be a kept buffer of an earlier call.
      out: out = (p.residency === "host" ? call.reused(outBytes, OUT_USAGE, "wgattn output") : null) ??
        call.createBuffer(outBytes, OUT_USAGE, "wgattn output"),
      flex: p.flex ? bindFlex(call, p.flex) : undefined,
      ...bindServing(call, p),
      lse: wantLse
        ? (lse = call.createBuffer(
          p.b * p.n * p.sQ * 4,
          GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
          "wgattn lse",
        ))
        : null,
    };
    if (debug.poisonOutputs) {
      rt.device.queue.writeBuffer(out, 0, new Uint8Array(out.size).fill(0xff));
      if (lse) rt.device.queue.writeBuffer(lse, 0, new Uint8Array(lse.size).fill(0xff));
    }
    if (plan) await encodeSplit(p, plan, io, call, gpuChooser(choose));
    else {
      fitWindows(call, p, io);
      await backend!.encode(p, io, call);
      call.windows = null;
    }
  } catch (e) {
    call.abandon();
    if (out) releaseBuffer(out);
    if (lse) releaseBuffer(lse);
    if (await confirmLost(rt)) {
      throw e instanceof WgattnError && e.code === "DEVICE_LOST" ? e : lostError("during the call", e);
    }
    if (e instanceof WgattnError) throw e;
    throw new WgattnError(
      "GPU_ERROR",
      `backend ${backend?.name ?? "of a piece"} failed: ${(e as Error).message}`,
    );
  }
  // Buffers that could not be allocated and bindings the device refused show here, before anything
  // is queued (error scopes resolve without waiting for the GPU).
  // A host call's result, allocated now: a large ArrayBuffer is zero-filled on this thread, which
  // here overlaps the uploads' copies on other threads (0.8 ms for the seed call's 8.4 MB on the H200).
  // With options.out the bytes go straight into the caller's array.
  const resultBytes = p.residency !== "host"
    ? undefined
    : p.into
    ? new Uint8Array(p.into.buffer, p.into.byteOffset, p.into.byteLength)
    : new Uint8Array(outBytes);
  const { outOfMemory, validation } = await call.errors();
  const problem = rt.lost || ((outOfMemory || validation) && await confirmLost(rt))
    ? lostError("before its work was queued")
    : outOfMemory
    ? new WgattnError("OUT_OF_MEMORY", `the GPU ran out of memory: ${outOfMemory.message}`, {
      expected: "buffers that fit in device memory",
      actual: `${p.b}x${p.n}x${p.sQ}x${p.sKv} attention`,
    })
    : validation
    ? new WgattnError("GPU_ERROR", `the device refused the call's bindings: ${validation.message}`)
    : null;
  if (problem) {
    call.abandon();
    releaseBuffer(out!);
    if (lse) releaseBuffer(lse);
    throw problem;
  }
  // A host call's read-backs go into its own submit, behind its work: whether the device refused
  // that work is answered meanwhile (waiting for the answer first cost about 0.1 ms on Dawn).
  const reads = p.residency === "host"
    ? [
      call.readBack(out!, outBytes, resultBytes),
      lse ? call.readBack(lse, p.b * p.n * p.sQ * 4) : null,
    ] as const
    : null;
  // Handled here, so that a read failing while the call is queued is no unhandled rejection.
  reads?.forEach((r) => r?.catch(() => {}));
  const { refused: refusal } = await call.queue();
  const refused = await refusal;
  if (refused || rt.lost) {
    if (reads) await Promise.allSettled(reads);
    releaseBuffer(out!);
    if (lse) releaseBuffer(lse);
    throw await confirmLost(rt)
      ? lostError("as its work was queued")
      : new WgattnError("GPU_ERROR", `the device refused the call's work: ${refused!.message}`);
  }
  if (!reads) {
    untrackBuffer(out!);
    if (lse) untrackBuffer(lse);
    return {
      out: { buffer: out!, shape: p.out.shape, dtype: p.dtype },
      lse: lse ? { buffer: lse, shape: lseShape(p), dtype: "f32" } : null,
    };
  }
  try {
    const [read, readLse] = await Promise.all(reads);
    const outHost = p.into ?? hostFromBytes(read, p.dtype, outCount);
    return {
      out: { data: outHost, shape: p.out.shape, dtype: p.dtype },
      lse: readLse ? { data: new Float32Array(readLse), shape: lseShape(p), dtype: "f32" } : null,
    };
  } catch (e) {
    await Promise.allSettled(reads);
    if (await confirmLost(rt)) throw lostError("while its result was read back", e);
    throw e;
  } finally {
    recycleBuffer(rt.device, out!);
    if (lse) releaseBuffer(lse);
  }
}

/** Usage of output buffers: bound as storage, read back, poisoned by tests. */
const OUT_USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** The sinks, offsets, table and lengths of a serving call: GPU ones as given, host ones uploaded. */
function bindServing(call: GpuCall, p: AttentionProblem): Partial<GpuIO> {
  const bind = (x: IndexView | SinkView, label: string) =>
    x.residency === "gpu" ? x.buffer : call.upload(x.data, `wgattn ${label}`);
  const io: Partial<GpuIO> = {};
  if (p.sinks) io.sinks = bind(p.sinks, "sinks");
  if (p.varlen) [io.cuQ, io.cuK] = [bind(p.varlen.cuQ, "cuSeqlensQ"), bind(p.varlen.cuK, "cuSeqlensK")];
  if (p.paged) {
    [io.table, io.seqlens] = [bind(p.paged.table, "blockTable"), bind(p.paged.seqlens, "cacheSeqlens")];
  }
  return io;
}

/** Host copies of a serving call's index arrays and sinks (read back when on the GPU). */
async function servingToHost(p: AttentionProblem, rt: GpuRuntime | null): Promise<Partial<HostIO>> {
  const read = async (x: IndexView): Promise<Int32Array> => {
    if (x.residency === "host") return x.data;
    if (!rt) throw new WgattnError("INVALID_BUFFER", "a GPU index tensor but no device is in use");
    return new Int32Array(await readBuffer(rt.device, x.buffer, Math.max(4, x.length * 4)), 0, x.length);
  };
  const io: Partial<HostIO> = {};
  if (p.sinks) {
    io.sinks = p.sinks.residency === "host"
      ? p.sinks.data
      : new Float32Array(await readBuffer(rt!.device, p.sinks.buffer, p.n * 4), 0, p.n);
  }
  if (p.varlen) [io.cuQ, io.cuK] = await Promise.all([read(p.varlen.cuQ), read(p.varlen.cuK)]);
  if (p.paged) [io.table, io.seqlens] = await Promise.all([read(p.paged.table), read(p.paged.seqlens)]);
  return io;
}

/** The mod buffers of a flex call by name: GPU ones as given, host ones uploaded. */
function bindFlex(call: GpuCall, f: FlexView): Record<string, GPUBuffer> {
  const out: Record<string, GPUBuffer> = {};
  for (const x of f.buffers) {
    out[x.name] = x.residency === "gpu" ? x.buffer : call.upload(x.data, `wgattn mod buffer ${x.name}`);
  }
  return out;
}

function bindMask(call: GpuCall, m: MaskOperand): GPUBuffer {
  if (m.residency === "gpu") return m.buffer;
  return call.upload(m.data, "wgattn mask");
}

async function operandToFloat64(
  o: Operand | MaskOperand,
  rt: GpuRuntime | null,
  name: string,
): Promise<Float64Array> {
  if (o.residency === "host") {
    if (o.dtype === "bool") return Float64Array.from(o.data as Uint8Array);
    return o.data instanceof Float32Array && o.dtype === "f32"
      ? Float64Array.from(o.data)
      : hostToFloat64(o.data as never, o.dtype as never);
  }
  if (!rt) {
    throw new WgattnError("INVALID_BUFFER", `${name} is a GPU tensor but no device is in use`, {
      argument: name,
    });
  }
  const count = elementCount(o.shape);
  const bytes = count * (o.dtype === "bool" ? 1 : o.dtype === "f32" ? 4 : 2);
  const raw = await readBuffer(rt.device, o.buffer, bytes);
  if (o.dtype === "bool") return Float64Array.from(new Uint8Array(raw));
  return hostToFloat64(hostFromBytes(raw, o.dtype, count), o.dtype);
}

async function executeCpu(
  p: AttentionProblem,
  backend: CpuBackend,
  rt: GpuRuntime | null,
  wantLse: boolean,
): Promise<RawResult> {
  let q: Float64Array, k: Float64Array, v: Float64Array, mask: Float64Array | null;
  try {
    [q, k, v, mask] = await Promise.all([
      operandToFloat64(p.q.operand, rt, "q"),
      operandToFloat64(p.k.operand, rt, "k"),
      operandToFloat64(p.v.operand, rt, "v"),
      p.mask ? operandToFloat64(p.mask.operand, rt, p.mask.argument ?? "options.attnMask") : null,
    ]);
  } catch (e) {
    if (rt && await confirmLost(rt)) throw lostError("while GPU tensors were read for the cpu backend", e);
    throw e;
  }
  let flex: ModBufferData | undefined;
  if (p.flex) {
    const entries = await Promise.all(p.flex.buffers.map(async (x) => {
      if (x.residency === "host") return [x.name, x.data] as const;
      if (!rt) {
        throw new WgattnError(
          "INVALID_BUFFER",
          `options.modBuffers.${x.name} is a GPU buffer but no device is in use`,
          {
            argument: `options.modBuffers.${x.name}`,
          },
        );
      }
      const raw = await readBuffer(rt.device, x.buffer, x.length * 4);
      const view = x.dtype === "f32"
        ? new Float32Array(raw)
        : x.dtype === "i32"
        ? new Int32Array(raw)
        : new Uint32Array(raw);
      return [x.name, view] as const;
    }));
    flex = Object.fromEntries(entries);
  }
  const serving = await servingToHost(p, rt);
  const out = new Float64Array(elementCount(p.out.shape));
  const lse = wantLse ? new Float64Array(p.b * p.n * p.sQ) : null;
  backend.compute(p, { q, k, v, mask, out, lse, flex, ...serving });
  const outHost = float64ToHost(out, p.dtype);
  const lseHost = lse ? Float32Array.from(lse) : null;
  if (p.residency === "host") {
    return {
      out: { data: outHost, shape: p.out.shape, dtype: p.dtype },
      lse: lseHost ? { data: lseHost, shape: lseShape(p), dtype: "f32" } : null,
    };
  }
  if (rt!.lost) throw lostError("before the cpu backend's result was uploaded");
  const device = rt!.device;
  const toGpu = async (
    data: ArrayBufferView,
    dtype: "f32" | "f16" | "bf16",
    shape: number[],
  ): Promise<GpuTensor> => {
    const buffer = device.createBuffer({
      size: Math.max(16, Math.ceil(data.byteLength / 16) * 16),
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    });
    // Awaited: the caller's next submit must find the data there.
    await engineFor(device).writeBuffer(
      device,
      buffer,
      new Uint8Array(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength),
    );
    return { buffer, shape, dtype };
  };
  return {
    out: await toGpu(outHost, p.dtype, p.out.shape),
    lse: lseHost ? await toGpu(lseHost, "f32", lseShape(p)) : null,
  };
}
