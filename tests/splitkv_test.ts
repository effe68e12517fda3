/**
 * `split-kv` (flash-decoding) against the float64 reference: dtypes, GQA, causal with s_q < s_kv,
 * window, key padding, odd sizes, GPU tensors, the code paths the tuning hook forces (no
 * subgroups, 4-wide and f16 loads, one chunk or many), and the router's crossover.
 */
import assert from "node:assert/strict";
import { chooseSplitKvConfig, SPLITKV_MAX_ROWS, splitKvPlan, splitKvTuning } from "../backends/splitkv.ts";
import { defaultRuntime } from "../core/device.ts";
import { readBuffer } from "../core/gpu.ts";
import { resolveProblem } from "../core/problem.ts";
import { attentionWithLse, explain, type GpuTensor, type HostTensor } from "../mod.ts";
import {
  errorStats,
  fromHostArray,
  randomLogical,
  referenceAttention,
  type RefOptions,
  rng,
  roundTo,
  toHostArray,
} from "./reference.ts";

const runtime = await defaultRuntime();
const ignore = runtime === null;
const TOL = { f32: 2e-5, f16: 4e-3, bf16: 2e-2 } as const;

interface Case {
  dtype?: "f32" | "f16" | "bf16";
  b: number;
  n: number;
  nKv: number;
  sQ: number;
  sKv: number;
  d: number;
  isCausal?: boolean;
  windowSize?: number | [number, number];
  /** Valid keys per batch. */
  keyPadding?: number[];
  gpu?: boolean;
}

function upload(device: GPUDevice, data: ArrayBufferView): GPUBuffer {
  const buffer = device.createBuffer({
    size: Math.max(16, Math.ceil(data.byteLength / 16) * 16),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  const padded = new Uint8Array(Math.ceil(data.byteLength / 4) * 4);
  padded.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  device.queue.writeBuffer(buffer, 0, padded);
  return buffer;
}

/** Runs one case on split-kv and checks out and lse against the reference. */
async function check(c: Case): Promise<void> {
  const dtype = c.dtype ?? "f32";
  const random = rng(c.b * 1000003 + c.sKv * 101 + c.d * 7 + c.sQ);
  const round = (t: ReturnType<typeof randomLogical>) => ({ ...t, data: roundTo(t.data, dtype) });
  const q = round(randomLogical({ b: c.b, n: c.n, s: c.sQ, d: c.d }, random));
  const k = round(randomLogical({ b: c.b, n: c.nKv, s: c.sKv, d: c.d }, random));
  const v = round(randomLogical({ b: c.b, n: c.nKv, s: c.sKv, d: c.d }, random));
  const pad = c.keyPadding
    ? Uint8Array.from(
      { length: c.b * c.sKv },
      (_, x) => (x % c.sKv < c.keyPadding![Math.floor(x / c.sKv)] ? 1 : 0),
    )
    : undefined;
  const refOptions: RefOptions = {
    isCausal: c.isCausal,
    windowSize: c.windowSize,
    keyPaddingMask: pad ? { data: pad, shape: [c.b, c.sKv] } : undefined,
  };
  const ref = referenceAttention(q, k, v, refOptions);
  const host = (t: typeof q): HostTensor => ({
    data: toHostArray(t.data, dtype),
    shape: [t.sizes.b, t.sizes.n, t.sizes.s, t.sizes.d],
    dtype,
  });
  const options = {
    backend: "split-kv",
    isCausal: c.isCausal,
    windowSize: c.windowSize,
    keyPaddingMask: pad ? { data: pad, shape: [c.b, c.sKv] } : undefined,
  };
  let out: Float64Array, lse: Float64Array;
  if (c.gpu) {
    const device = runtime!.device;
    const gpu = (t: typeof q): GpuTensor => {
      const h = host(t);
      return { buffer: upload(device, h.data), shape: h.shape, dtype };
    };
    const r = await attentionWithLse(gpu(q), gpu(k), gpu(v), options);
    const count = c.b * c.n * c.sQ * c.d;
    const bytes = count * (dtype === "f32" ? 4 : 2);
    const raw = await readBuffer(device, r.out.buffer, bytes);
    const arr = dtype === "f32"
      ? new Float32Array(raw)
      : dtype === "f16"
      ? new Float16Array(raw)
      : new Uint16Array(raw);
    out = fromHostArray(arr, dtype);
    lse = Float64Array.from(new Float32Array(await readBuffer(device, r.lse.buffer, c.b * c.n * c.sQ * 4)));
    r.out.buffer.destroy();
    r.lse.buffer.destroy();
  } else {
    const r = await attentionWithLse(host(q), host(k), host(v), options);
    out = fromHostArray(r.out.data, dtype);
    lse = Float64Array.from(r.lse.data);
  }
  const e = errorStats(out, ref.out);
  assert.equal(e.bad, 0, `NaN or infinite outputs (first at ${e.worst})`);
  assert.ok(e.maxAbs <= TOL[dtype], `out max abs error ${e.maxAbs} at ${e.worst} > ${TOL[dtype]}`);
  const l = errorStats(lse, ref.lse);
  assert.equal(l.bad, 0, `lse: NaN or infinite where finite (first at ${l.worst}: ${lse[l.worst]})`);
  assert.ok(l.maxAbs <= 1e-4 * Math.max(1, c.d / 64), `lse max abs error ${l.maxAbs} at ${l.worst}`);
}

function name(c: Case): string {
  const parts = [
    c.dtype ?? "f32",
    c.gpu ? "gpu" : "host",
    `b${c.b} n${c.n}/kv${c.nKv} s${c.sQ}x${c.sKv} d${c.d}`,
  ];
  if (c.isCausal) parts.push("causal");
  if (c.windowSize !== undefined) parts.push(`window=${JSON.stringify(c.windowSize)}`);
  if (c.keyPadding) parts.push(`keyPadding [${c.keyPadding}]`);
  return parts.join(" ");
}

const CASES: Case[] = [
  // Decode steps with GQA, one per dtype, over several chunks.
  { b: 1, n: 8, nKv: 2, sQ: 1, sKv: 1000, d: 128 },
  { dtype: "f16", b: 1, n: 8, nKv: 2, sQ: 1, sKv: 1000, d: 128 },
  { dtype: "bf16", b: 2, n: 4, nKv: 2, sQ: 1, sKv: 77, d: 64 },
  // Odd sizes.
  { b: 1, n: 4, nKv: 4, sQ: 1, sKv: 1, d: 64 },
  { dtype: "f16", b: 2, n: 4, nKv: 1, sQ: 3, sKv: 77, d: 40, isCausal: true },
  { dtype: "bf16", b: 1, n: 2, nKv: 1, sQ: 2, sKv: 1000, d: 40 },
  // Causal with s_q < s_kv (bottom-right), more query rows than one workgroup holds.
  { b: 1, n: 8, nKv: 2, sQ: 4, sKv: 1000, d: 64, isCausal: true },
  { dtype: "f16", b: 1, n: 4, nKv: 2, sQ: 9, sKv: 77, d: 64, isCausal: true },
  // Windows.
  { dtype: "bf16", b: 1, n: 4, nKv: 2, sQ: 2, sKv: 1000, d: 128, windowSize: 50 },
  { b: 1, n: 2, nKv: 1, sQ: 5, sKv: 300, d: 64, windowSize: [40, 3] },
  { b: 1, n: 2, nKv: 2, sQ: 3, sKv: 77, d: 64, isCausal: true, windowSize: 10 },
  // Key padding (a batch with no key at all gives zeros and -inf).
  { dtype: "f16", b: 2, n: 4, nKv: 2, sQ: 2, sKv: 1000, d: 64, keyPadding: [1000, 333], isCausal: true },
  { b: 3, n: 2, nKv: 1, sQ: 1, sKv: 77, d: 40, keyPadding: [77, 0, 5] },
  // GPU tensors in and out.
  { dtype: "f16", b: 1, n: 8, nKv: 2, sQ: 1, sKv: 300, d: 128, gpu: true },
  { b: 1, n: 4, nKv: 1, sQ: 2, sKv: 77, d: 64, gpu: true, isCausal: true },
];

for (const c of CASES) {
  Deno.test({ name: `split-kv: ${name(c)}`, ignore, fn: () => check(c) });
}

/** Runs `fn` with tuning forced, restoring the defaults after. */
async function tuned(
  override: typeof splitKvTuning.override,
  splits: number | null,
  fn: () => Promise<void>,
) {
  splitKvTuning.override = override;
  splitKvTuning.splits = splits;
  try {
    await fn();
  } finally {
    splitKvTuning.override = null;
    splitKvTuning.splits = null;
  }
}

Deno.test({
  name: "split-kv: lane sums in workgroup memory (no subgroups)",
  ignore,
  fn: () =>
    tuned({ subgroups: false }, null, async () => {
      await check({ b: 1, n: 4, nKv: 2, sQ: 1, sKv: 300, d: 64, keyPadding: [200] });
      await check({ dtype: "bf16", b: 1, n: 2, nKv: 1, sQ: 2, sKv: 77, d: 40, isCausal: true });
    }),
});

Deno.test({
  name: "split-kv: rows of the next steps loaded ahead (the depths the default does not take)",
  ignore,
  fn: async () => {
    for (const prefetch of ([0, 1, 2] as const).filter((x) => x !== splitKvTuning.prefetch)) {
      await tuned({ prefetch }, null, async () => {
        await check({ dtype: "f16", b: 1, n: 8, nKv: 2, sQ: 1, sKv: 1000, d: 128 });
        await check({ b: 1, n: 2, nKv: 1, sQ: 5, sKv: 300, d: 64, windowSize: [40, 3] });
        await check({
          dtype: "f16",
          b: 2,
          n: 4,
          nKv: 2,
          sQ: 2,
          sKv: 1000,
          d: 64,
          keyPadding: [1000, 333],
          isCausal: true,
        });
        await check({ b: 1, n: 4, nKv: 4, sQ: 1, sKv: 1, d: 64 });
      });
    }
  },
});

Deno.test({
  name: "split-kv: 4-wide packed loads and f16 storage loads",
  ignore,
  fn: async () => {
    await tuned({ vw: 4 }, null, () => check({ dtype: "f16", b: 1, n: 4, nKv: 2, sQ: 1, sKv: 200, d: 64 }));
    if (runtime?.caps.shaderF16) {
      await tuned(
        { vw: 4, f16: true },
        null,
        () => check({ dtype: "f16", b: 1, n: 4, nKv: 2, sQ: 2, sKv: 200, d: 64, windowSize: 30 }),
      );
    }
  },
});

Deno.test({
  name: "split-kv: one chunk, many chunks, small workgroups",
  ignore,
  fn: async () => {
    const c: Case = { b: 1, n: 4, nKv: 2, sQ: 2, sKv: 500, d: 64, isCausal: true };
    await tuned(null, 1, () => check(c));
    await tuned(null, 1024, () => check(c));
    await tuned({ threads: 16, unroll: 1, rows: 1 }, null, () => check(c));
    // One key per chunk: 500 chunks, so each combine thread merges many rounds of loads (and a
    // partial last round); d 256 leaves two merging threads per output column, and key padding
    // leaves chunks with no key.
    await tuned({ threads: 16, unroll: 1, rows: 1 }, 1024, () => check(c));
    await tuned(
      { threads: 16, unroll: 1, rows: 1 },
      1024,
      () => check({ b: 1, n: 2, nKv: 1, sQ: 1, sKv: 70, d: 256, keyPadding: [30] }),
    );
  },
});

Deno.test({
  name: "split-kv: the decode shape fills a big GPU with chunks; scratch stays small",
  ignore,
  fn: () => {
    const caps = {
      ...runtime!.caps,
      subgroups: true,
      subgroupMinSize: 32,
      limits: { ...runtime!.caps.limits, maxComputeWorkgroupStorageSize: 49152 },
    };
    const t = (n: number, s: number) => ({ data: new Float16Array(n * s * 128), shape: [1, n, s, 128] });
    const p = resolveProblem(t(32, 1), t(8, 32768), t(8, 32768));
    const c = chooseSplitKvConfig(p, caps);
    assert.ok(typeof c !== "string", String(c));
    assert.equal(c.rows, 4, "the 4 query heads of a GQA group in one workgroup");
    assert.equal(c.vw, 8, "16-byte loads");
    const plan = splitKvPlan(p, c, caps);
    assert.ok(plan.workgroups >= 396, `${plan.workgroups} workgroups: at least 3 per SM of an H200`);
    assert.ok(plan.totalRows * plan.splits * 128 * 4 <= 8 << 20, "partials under 8 MiB");
    // Eight sequences: 64 (batch, kv head) pairs; chunks fill one wave, never a few workgroups past
    // it (9 chunks in 576 workgroups measured 1.33x slower than 8 in 512 on the H200).
    const batched = resolveProblem(
      { data: new Float16Array(8 * 32 * 128), shape: [8, 32, 1, 128] },
      { data: new Float16Array(8 * 8 * 8192 * 128), shape: [8, 8, 8192, 128] },
      { data: new Float16Array(8 * 8 * 8192 * 128), shape: [8, 8, 8192, 128] },
    );
    const c8 = chooseSplitKvConfig(batched, caps);
    assert.ok(typeof c8 !== "string", String(c8));
    const plan8 = splitKvPlan(batched, c8, caps);
    assert.deepEqual([plan8.splits, plan8.workgroups], [8, 512]);
    assert.ok(plan8.workgroups <= splitKvTuning.targetWorkgroups);
  },
});

Deno.test({
  name: `split-kv: the router takes it for s_q x group <= ${SPLITKV_MAX_ROWS}, flash past that`,
  ignore,
  fn: async () => {
    const t = (n: number, s: number) => ({
      data: new Float32Array(n * s * 64).fill(0.1),
      shape: [1, n, s, 64],
    });
    const decode = await explain(t(8, 1), t(2, 500), t(2, 500));
    assert.equal(decode.backend, "split-kv", decode.text);
    const prefill = await explain(t(8, 64), t(2, 500), t(2, 500));
    assert.notEqual(prefill.backend, "split-kv", prefill.text);
    const entry = prefill.chain.find((e) => e.backend === "split-kv");
    assert.match(entry?.reasons.join(" ") ?? "", /query rows per K\/V head/);
  },
});
