/**
 * Calls with no score to compute: b, n, s_q or s_kv of 0 (PyTorch takes such shapes too). Every
 * output row, if there is any, saw no key: zeros, log-sum-exp `-Infinity`, wgattn's rule for a
 * fully masked row. Nothing is dispatched: host calls never touch the GPU, GPU calls get new
 * buffers of the output's size (WebGPU allows size 0; such a buffer is never bound, since a binding
 * cannot be empty) and at most one queue write, the lse's `-Infinity`.
 */
import { WgattnError } from "./errors.ts";
import type { GpuRuntime } from "./device.ts";
import { checkMemory, type RawResult } from "./execute.ts";
import { type AttentionProblem, lseShape } from "./problem.ts";
import { DTYPE_BYTES, elementCount } from "./tensor.ts";
import type { HostData } from "./types.ts";

/** True when the call has no (query, key) pair: b, n, s_q or s_kv is 0. */
export function isEmptyWork(p: { b: number; n: number; sQ: number; sKv: number }): boolean {
  return p.b * p.n * p.sQ * p.sKv === 0;
}

/** Which axes are 0, and what that means for the output, in a few words (explain()). */
export function describeEmptyWork(p: AttentionProblem): string {
  const zero = ([["b", p.b], ["n", p.n], ["s_q", p.sQ], ["s_kv", p.sKv]] as const)
    .filter(([, x]) => x === 0).map(([name]) => `${name} = 0`).join(", ");
  const outCount = elementCount(p.out.shape);
  const result = outCount === 0
    ? `the output [${p.out.shape}] is empty`
    : `no query row has a key to attend: the output [${p.out.shape}] is zeros, its log-sum-exp -Infinity`;
  return `empty call, ${zero}: ${result}; no kernel runs`;
}

function zeros(dtype: AttentionProblem["dtype"], count: number): HostData {
  // bf16 and f16 zero are both the bits 0x0000.
  return dtype === "f32"
    ? new Float32Array(count)
    : dtype === "f16"
    ? new Float16Array(count)
    : new Uint16Array(count);
}

/**
 * The lse of an empty call: `-Infinity`, or with host sinks each head's sink (a row that sees no
 * key still has its sink in the denominator). GPU sinks are not read back for this: `-Infinity`.
 */
function emptyLse(p: AttentionProblem, rows: number): Float32Array {
  const lse = new Float32Array(rows).fill(-Infinity);
  const sinks = p.sinks?.residency === "host" ? p.sinks.data : null;
  if (sinks && p.sQ > 0) {
    for (let r = 0; r < rows; r++) {
      lse[r] = sinks[p.varlen ? Math.floor(r / p.sQ) : Math.floor(r / p.sQ) % p.n];
    }
  }
  return lse;
}

/** The result of an empty call, on the host. */
export function emptyResultOnHost(p: AttentionProblem, wantLse: boolean): RawResult {
  const rows = p.b * p.n * p.sQ;
  return {
    out: { data: zeros(p.dtype, elementCount(p.out.shape)), shape: p.out.shape, dtype: p.dtype },
    lse: wantLse ? { data: emptyLse(p, rows), shape: lseShape(p), dtype: "f32" } : null,
  };
}

/**
 * The result of an empty call on GPU tensors: new buffers (zero-filled, as WebGPU creates every
 * buffer), the lse written `-Infinity`. Sizes are rounded up to 16 bytes as every wgattn output,
 * except that an empty tensor gets an empty buffer.
 */
export async function emptyResultOnGpu(
  p: AttentionProblem,
  rt: GpuRuntime,
  wantLse: boolean,
): Promise<RawResult> {
  if (rt.lost) {
    throw new WgattnError("DEVICE_LOST", "the GPU device was lost before the call", {
      expected: "a live device (the next call acquires a new one, unless the device is yours)",
      actual: "lost",
    });
  }
  checkMemory(p, rt, wantLse);
  const rows = p.b * p.n * p.sQ;
  const device = rt.device;
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  const sized = (bytes: number) => (bytes === 0 ? 0 : Math.max(16, Math.ceil(bytes / 16) * 16));
  device.pushErrorScope("out-of-memory");
  const out = device.createBuffer({
    size: sized(elementCount(p.out.shape) * DTYPE_BYTES[p.dtype]),
    usage,
    label: "wgattn output (empty call)",
  });
  const lse = wantLse
    ? device.createBuffer({ size: sized(rows * 4), usage, label: "wgattn lse (empty call)" })
    : null;
  const oom = await rt.engine.hold(device.popErrorScope().catch(() => null));
  if (oom) {
    out.destroy();
    lse?.destroy();
    throw new WgattnError("OUT_OF_MEMORY", `the GPU ran out of memory: ${oom.message}`, {
      expected: "buffers that fit in device memory",
      actual: `${p.b}x${p.n}x${p.sQ}x${p.sKv} attention (empty call)`,
    });
  }
  // Deno's engine panics on an empty writeBuffer: write only when there are rows.
  if (lse && rows > 0) device.queue.writeBuffer(lse, 0, emptyLse(p, rows) as Float32Array<ArrayBuffer>);
  return {
    out: { buffer: out, shape: p.out.shape, dtype: p.dtype },
    lse: lse ? { buffer: lse, shape: lseShape(p), dtype: "f32" } : null,
  };
}
