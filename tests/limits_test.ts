/**
 * Calls past the binding limits, on a device whose limits are low: cut over batches, heads, query
 * rows and key ranges (merged by lse), with ranges that start off the 256-byte binding alignment
 * (gathered) and on it (bound in place), every dtype, GQA, layouts, masks, causal and window, host
 * and GPU tensors, and the lse. And calls that cannot fit the device: OUT_OF_MEMORY before any
 * work is queued.
 *
 * Deno's WebGPU raises limits requested below the WebGPU defaults back to the defaults (the
 * device keeps a 128 MiB binding limit when 64 KiB is asked for), so where the request is not
 * honoured the test lowers what wgattn plans with (`restrictLimits`); every binding past the
 * lowered limit is then refused by `GpuCall.dispatch`, so a passing call kept to it.
 */
import { engineAdapter } from "../engines/select.ts";
import assert from "node:assert/strict";
import { defaultRuntime, restrictLimits } from "../core/device.ts";
import { gpuStats, readBuffer } from "../core/gpu.ts";
import {
  attentionForward,
  type AttentionOptions,
  attentionWithLse,
  explain,
  type GpuTensor,
  type HostTensor,
  WgattnError,
} from "../mod.ts";
import {
  errorStats,
  fromHostArray,
  fromLayout,
  layOut,
  randomLogical,
  referenceAttention,
  type RefOptions,
  rng,
  roundTo,
  toHostArray,
} from "./reference.ts";

const runtime = await defaultRuntime();
const ignore = runtime === null;
const BINDING = 1 << 14;

/** A device of its own whose storage bindings are at most `binding` bytes. */
async function smallDevice(limits: { maxStorageBufferBindingSize?: number; maxBufferSize?: number }) {
  const adapter = (await engineAdapter())!;
  const requiredFeatures = [...adapter.features].filter((f) => f === "shader-f16") as GPUFeatureName[];
  let device: GPUDevice;
  try {
    device = await adapter.requestDevice({ requiredFeatures, requiredLimits: limits });
  } catch {
    device = await adapter.requestDevice({ requiredFeatures });
  }
  await restrictLimits(device, limits); // a no-op where the request was honoured
  return device;
}

const device = runtime ? await smallDevice({ maxStorageBufferBindingSize: BINDING }) : null;

type DType = "f32" | "f16" | "bf16";
const TOL: Record<DType, number> = { f32: 2e-5, f16: 4e-3, bf16: 2e-2 };

interface Case {
  dtype?: DType;
  b: number;
  n: number;
  nKv?: number;
  sQ: number;
  sKv: number;
  d: number;
  pattern?: string;
  isCausal?: boolean;
  windowSize?: number | [number, number];
  keyPadding?: number[];
  /** A bool mask of shape [b, 1, s_q, s_kv] or an additive [s_q, s_kv]. */
  mask?: "bool" | "additive";
  gpu?: boolean;
  /** The cut the plan must go down to. */
  level: "batch" | "head" | "query" | "key";
}

async function check(c: Case): Promise<void> {
  const dtype = c.dtype ?? "f32", nKv = c.nKv ?? c.n, pattern = c.pattern ?? "b n s d";
  const random = rng(c.sQ * 7919 + c.sKv * 31 + c.d);
  const round = (t: ReturnType<typeof randomLogical>) => ({ ...t, data: roundTo(t.data, dtype) });
  const q = round(randomLogical({ b: c.b, n: c.n, s: c.sQ, d: c.d }, random));
  const k = round(randomLogical({ b: c.b, n: nKv, s: c.sKv, d: c.d }, random));
  const v = round(randomLogical({ b: c.b, n: nKv, s: c.sKv, d: c.d }, random));
  const ref: RefOptions = { isCausal: c.isCausal, windowSize: c.windowSize };
  const options: AttentionOptions = {
    isCausal: c.isCausal,
    windowSize: c.windowSize,
    qPattern: pattern,
    kPattern: pattern,
    vPattern: pattern,
    outPattern: pattern,
    device: device!,
  };
  if (c.keyPadding) {
    const data = Uint8Array.from(
      { length: c.b * c.sKv },
      (_, x) => (x % c.sKv < c.keyPadding![Math.floor(x / c.sKv)] ? 1 : 0),
    );
    ref.keyPaddingMask = { data, shape: [c.b, c.sKv] };
    options.keyPaddingMask = { data, shape: [c.b, c.sKv] };
  }
  if (c.mask === "bool") {
    const data = Uint8Array.from({ length: c.b * c.sQ * c.sKv }, (_, x) => ((x * 7919) % 5 !== 0 ? 1 : 0));
    ref.attnMask = { kind: "bool", data, shape: [c.b, 1, c.sQ, c.sKv] };
    options.attnMask = { data, shape: [c.b, 1, c.sQ, c.sKv] };
  } else if (c.mask === "additive") {
    const data = Float32Array.from({ length: c.sQ * c.sKv }, (_, x) => ((x * 7919) % 13) / 13 - 0.5);
    ref.attnMask = { kind: "additive", data, shape: [c.sQ, c.sKv] };
    options.attnMask = { data, shape: [c.sQ, c.sKv] };
  }
  const want = referenceAttention(q, k, v, ref);
  const host = (t: typeof q): HostTensor => {
    const laid = layOut(t, pattern);
    return { data: toHostArray(laid.data, dtype), shape: laid.shape, dtype };
  };
  const [hq, hk, hv] = [host(q), host(k), host(v)];
  const plan = await explain(hq, hk, hv, options);
  assert.equal(plan.split?.level, c.level, plan.text);
  let out: Float64Array, lse: Float64Array;
  if (c.gpu) {
    const gpu = (t: HostTensor): GpuTensor => {
      const buffer = device!.createBuffer({
        size: Math.ceil(t.data.byteLength / 16) * 16,
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST,
      });
      const bytes = new Uint8Array(Math.ceil(t.data.byteLength / 4) * 4);
      bytes.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
      device!.queue.writeBuffer(buffer, 0, bytes);
      return { buffer, shape: t.shape, dtype };
    };
    const r = await attentionWithLse(gpu(hq), gpu(hk), gpu(hv), options);
    const count = c.b * c.n * c.sQ * c.d;
    const raw = await readBuffer(device!, r.out.buffer, count * (dtype === "f32" ? 4 : 2));
    const arr = dtype === "f32"
      ? new Float32Array(raw)
      : dtype === "f16"
      ? new Float16Array(raw)
      : new Uint16Array(raw);
    out = fromHostArray(arr, dtype);
    lse = Float64Array.from(new Float32Array(await readBuffer(device!, r.lse.buffer, c.b * c.n * c.sQ * 4)));
  } else {
    const r = await attentionWithLse(hq, hk, hv, options);
    out = fromHostArray(r.out.data, dtype);
    lse = Float64Array.from(r.lse.data);
  }
  const e = errorStats(fromLayout(out, { b: c.b, n: c.n, s: c.sQ, d: c.d }, pattern), want.out);
  assert.equal(e.bad, 0, `NaN outputs (first at ${e.worst})`);
  assert.ok(e.maxAbs <= TOL[dtype], `out max abs error ${e.maxAbs} at ${e.worst} (${plan.text})`);
  const l = errorStats(lse, want.lse);
  assert.equal(l.bad, 0, `lse: NaN or wrong infinity (first at ${l.worst})`);
  assert.ok(l.maxAbs <= 2e-4, `lse max abs error ${l.maxAbs} at ${l.worst}`);
}

function name(c: Case): string {
  const parts = [
    `${c.level}:`,
    c.dtype ?? "f32",
    c.gpu ? "gpu" : "host",
    `b${c.b} n${c.n}${c.nKv ? `/kv${c.nKv}` : ""} s${c.sQ}x${c.sKv} d${c.d}`,
  ];
  if (c.pattern) parts.push(`"${c.pattern}"`);
  if (c.isCausal) parts.push("causal");
  if (c.windowSize !== undefined) parts.push(`window=${JSON.stringify(c.windowSize)}`);
  if (c.keyPadding) parts.push(`keyPadding [${c.keyPadding}]`);
  if (c.mask) parts.push(`${c.mask} mask`);
  return parts.join(" ");
}

// Tensors of 16 KiB bindings: f32 [1, 1, 64, 64] is exactly one binding.
const CASES: Case[] = [
  // Batches; offsets aligned (bound in place) and not (gathered).
  { b: 4, n: 2, sQ: 16, sKv: 16, d: 64, level: "batch" },
  { b: 5, n: 1, sQ: 7, sKv: 77, d: 40, level: "batch", isCausal: true },
  { dtype: "f16", b: 5, n: 2, sQ: 7, sKv: 77, d: 40, level: "batch", gpu: true },
  // K/V heads with their GQA groups.
  { dtype: "bf16", b: 2, n: 8, nKv: 2, sQ: 9, sKv: 130, d: 40, level: "head", isCausal: true },
  { b: 2, n: 4, nKv: 4, sQ: 20, sKv: 50, d: 64, level: "head", keyPadding: [50, 17] },
  { b: 2, n: 4, nKv: 4, sQ: 20, sKv: 50, d: 64, level: "key", pattern: "b s n d", keyPadding: [50, 17] },
  // Query rows of one head.
  { b: 1, n: 2, nKv: 1, sQ: 300, sKv: 16, d: 64, level: "query", isCausal: true },
  { dtype: "f16", b: 1, n: 2, sQ: 150, sKv: 100, d: 40, level: "query", mask: "additive" },
  // Key ranges merged by lse.
  { b: 1, n: 4, nKv: 1, sQ: 16, sKv: 300, d: 64, level: "key" },
  { b: 1, n: 4, nKv: 2, sQ: 2, sKv: 300, d: 64, level: "key", isCausal: true, keyPadding: [290] },
  {
    dtype: "f16",
    b: 2,
    n: 4,
    nKv: 2,
    sQ: 9,
    sKv: 130,
    d: 40,
    level: "key",
    pattern: "b s n d",
    isCausal: true,
  },
  {
    dtype: "bf16",
    b: 1,
    n: 2,
    nKv: 1,
    sQ: 5,
    sKv: 250,
    d: 64,
    level: "key",
    windowSize: [60, 10],
    gpu: true,
  },
  { b: 2, n: 2, nKv: 2, sQ: 5, sKv: 100, d: 40, level: "head", mask: "bool" },
];

for (const c of CASES) Deno.test({ name: `limits: ${name(c)}`, ignore, fn: () => check(c) });

Deno.test({
  name: "limits: a call that does not fit the device is OUT_OF_MEMORY before any work",
  ignore,
  fn: async () => {
    const small = await smallDevice({ maxStorageBufferBindingSize: BINDING, maxBufferSize: 1 << 18 });
    const t = (s: number) => ({ data: new Float32Array(2 * s * 64).fill(0.25), shape: [1, 2, s, 64] });
    const live = gpuStats.liveBuffers;
    for (
      const [q, kv, argument] of [[t(1024), t(16), "q"], [t(16), t(1024), "k"], [
        t(1024),
        t(1024),
        "q",
      ]] as const
    ) {
      // explain() refuses what the call refuses, with the same error, instead of describing a split.
      for (const call of [attentionForward, explain]) {
        await assert.rejects(
          () => call(q, kv, kv, { device: small }),
          (e: unknown) => e instanceof WgattnError && e.code === "OUT_OF_MEMORY" && e.argument === argument,
          call.name,
        );
      }
    }
    assert.equal(gpuStats.liveBuffers, live, "nothing was left allocated");
    // A row that cannot fit one binding: d = 64 f32 is 256 bytes, no room once aligned.
    const tiny = await smallDevice({ maxStorageBufferBindingSize: 256 });
    await assert.rejects(
      () => attentionForward(t(4), t(4), t(4), { device: tiny }),
      (e: unknown) =>
        e instanceof WgattnError && e.code === "OUT_OF_MEMORY" && /one query row/.test(e.message),
    );
    // And the same calls fit a device with room.
    const fine = await attentionForward(t(16), t(16), t(16), { device: small });
    assert.deepEqual(fine.shape, [1, 2, 16, 64]);
  },
});

Deno.test({
  name: "limits: a caller's buffer larger than one binding is bound only as far as its tensor",
  ignore,
  fn: async () => {
    const shape = [1, 2, 8, 64];
    const big = device!.createBuffer({
      size: BINDING * 4,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST,
    });
    device!.queue.writeBuffer(big, 0, new Float32Array(2 * 8 * 64).fill(0.5));
    const t: GpuTensor = { buffer: big, shape, dtype: "f32" };
    const out = await attentionForward(t, t, t, { device: device! });
    const values = new Float32Array(await readBuffer(device!, out.buffer, 2 * 8 * 64 * 4));
    assert.ok(values.every((x) => Math.abs(x - 0.5) < 1e-6));
    assert.equal((await explain(t, t, t, { device: device! })).split, undefined);
  },
});
