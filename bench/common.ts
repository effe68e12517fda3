/** Shared pieces of the benchmarks: the shape suite, GPU inputs, and GPU-timed runs. */
import { attentionForward, type AttentionOptions, deviceInfo, getDevice, type GpuTensor } from "../mod.ts";
import { heat } from "./heater.ts";
import { readEnvIfGranted } from "../core/api.ts";
import { Profiler, setProfiler } from "../core/gpu.ts";
import { flopCount } from "../core/problem.ts";

/** One benchmark shape. */
export interface BenchShape {
  name: string;
  b: number;
  n: number;
  s: number;
  d: number;
  sKv?: number;
  nKv?: number;
  causal?: boolean;
}

/** The suite of issue 3 (and the decode shape of issue 4). */
export const SHAPES: readonly BenchShape[] = [
  { name: "seed", b: 32, n: 8, s: 128, d: 64 },
  { name: "flux", b: 1, n: 24, s: 4608, d: 128 },
  { name: "sd3", b: 2, n: 24, s: 4250, d: 64 },
  { name: "long", b: 1, n: 40, s: 16384, d: 128 },
  { name: "causal", b: 4, n: 32, s: 2048, d: 128, causal: true },
  { name: "causal-as-full", b: 4, n: 32, s: 2048, d: 128 },
  // Decoding with a KV cache (issue 4): reading K and V is the floor.
  { name: "decode", b: 1, n: 32, s: 1, d: 128, sKv: 32768, nKv: 8 },
];

/** Bytes of K and V, the floor of a decode step. */
export function kvBytes(s: BenchShape, dtype: "f32" | "f16"): number {
  return 2 * s.b * (s.nKv ?? s.n) * (s.sKv ?? s.s) * s.d * (dtype === "f32" ? 4 : 2);
}

/** FLOPs as attention benchmarks count them (4·b·n·s_q·s_kv·d, halved for causal). */
export function shapeFlops(s: BenchShape): number {
  return flopCount({ b: s.b, n: s.n, sQ: s.s, sKv: s.sKv ?? s.s, d: s.d, isCausal: s.causal });
}

/**
 * Fills `buffer` (size a multiple of 4) with `block` repeated: one upload, then GPU copies.
 * Writing through a mapped range of a large buffer ran at about 20 MB/s in Deno on the H200 (98 s
 * for three 670 MB tensors); copies on the GPU take milliseconds.
 */
export function fillRepeating(device: GPUDevice, buffer: GPUBuffer, block: Uint8Array<ArrayBuffer>): void {
  if (block.byteLength % 4 !== 0) throw new Error("block must be a whole number of 4-byte words");
  const src = device.createBuffer({
    size: block.byteLength,
    usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  device.queue.writeBuffer(src, 0, block);
  const enc = device.createCommandEncoder();
  for (let off = 0; off < buffer.size; off += block.byteLength) {
    enc.copyBufferToBuffer(src, 0, buffer, off, Math.min(block.byteLength, buffer.size - off));
  }
  device.queue.submit([enc.finish()]);
  src.destroy();
}

/** The xorshift values in [-1, 1) that the benchmarks' tensors repeat. */
export function randomBlock(length: number, seed: number): Float32Array {
  const block = new Float32Array(length);
  let x = seed * 2654435761 >>> 0 || 1;
  for (let i = 0; i < block.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    block[i] = (x / 4294967296) * 2 - 1;
  }
  return block;
}

/** A GPU tensor of random values in [-1, 1) (a repeating pseudo-random block; never zeros). */
export function randomGpuTensor(
  device: GPUDevice,
  shape: number[],
  dtype: "f32" | "f16",
  seed = 1,
): GpuTensor {
  const count = shape.reduce((a, b) => a * b, 1);
  const bytes = count * (dtype === "f32" ? 4 : 2);
  const buffer = device.createBuffer({
    size: Math.ceil(bytes / 16) * 16,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  // An even period keeps f16 blocks a whole number of 4-byte words.
  const block = randomBlock(Math.min(count, 1_000_004), seed);
  const typed = dtype === "f32" ? block : Float16Array.from(block);
  const words = new Uint8Array(Math.ceil(typed.byteLength / 4) * 4);
  words.set(new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength));
  fillRepeating(device, buffer, words);
  return { buffer, shape, dtype };
}

/** Inputs of one shape on the GPU. */
export function shapeInputs(device: GPUDevice, s: BenchShape, dtype: "f32" | "f16") {
  const kvShape = [s.b, s.nKv ?? s.n, s.sKv ?? s.s, s.d];
  return {
    q: randomGpuTensor(device, [s.b, s.n, s.s, s.d], dtype, 1),
    k: randomGpuTensor(device, kvShape, dtype, 2),
    v: randomGpuTensor(device, kvShape, dtype, 3),
  };
}

/**
 * GPU time queued before each timed region to bring the chip to its working clocks
 * (`WGATTN_BENCH_HEAT_MS`, default 150; 0 on software adapters, which have no clocks to raise).
 */
export const HEAT_MS = Number(readEnvIfGranted("WGATTN_BENCH_HEAT_MS") ?? 150);

/**
 * Median GPU time of one call's compute pass in ms, from timestamp queries, over `reps` chained
 * calls queued right after {@link heat}ing the GPU. `all` holds every pass in order (calls that
 * record several passes give several entries each).
 */
export async function timeOnGpu(
  inputs: { q: GpuTensor; k: GpuTensor; v: GpuTensor },
  options: AttentionOptions,
  reps: number,
  heatMs = HEAT_MS,
): Promise<{ ms: number; all: number[] }> {
  const device = (await getDevice())!;
  const info = await deviceInfo();
  // One untimed call first: it builds the pipelines, and a GPU left idle through a build of a
  // second or more is back at idle clocks when the timed calls start, however hot it was before.
  (await attentionForward(inputs.q, inputs.k, inputs.v, options)).buffer.destroy();
  await heat(device, info?.isFallbackAdapter ? 0 : heatMs);
  const profiler = new Profiler(device, reps * 4);
  setProfiler(profiler);
  const outs: GpuTensor[] = [];
  try {
    for (let i = 0; i < reps; i++) {
      outs.push(await attentionForward(inputs.q, inputs.k, inputs.v, options));
      if (outs.length > 2) outs.shift()!.buffer.destroy();
    }
  } finally {
    setProfiler(null);
  }
  const times = (await profiler.read()).map((t) => t.ms);
  profiler.destroy();
  for (const o of outs) o.buffer.destroy();
  const sorted = [...times].sort((a, b) => a - b);
  return { ms: sorted[Math.floor(sorted.length / 2)], all: times };
}
