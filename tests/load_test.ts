/**
 * Load and time: 200 concurrent calls of mixed shapes, options and backends, each bit-identical to
 * the same call run alone; the same call twice gives the same bits on every backend; a soak of
 * 10,000 chained calls on GPU tensors after which wgattn holds no GPU buffers; the pipeline cache
 * stays within its bound (LRU).
 *
 * Shapes are tiny and kernel configurations few (head dim 16, f32 and f16): the software adapter is
 * slow and compiles each new flash configuration in about a second.
 */
import { engineAdapter } from "../engines/select.ts";
import assert from "node:assert/strict";
import { BACKENDS } from "../backends/registry.ts";
import { cachedPipeline, defaultRuntime, PIPELINE_CACHE_LIMIT, runtimeFor } from "../core/device.ts";
import { readBuffer } from "../core/gpu.ts";
import { resolveProblem } from "../core/problem.ts";
import {
  attentionForward,
  type AttentionOptions,
  attentionWithLse,
  type GpuTensor,
  type HostTensor,
  stats,
} from "../mod.ts";
import { rng, toHostArray } from "./reference.ts";

const runtime = await defaultRuntime();
const ignore = runtime === null;
const skip = ignore ? " [skipped: no WebGPU adapter]" : "";

type DType = "f32" | "f16";
const BYTES = { f32: 4, f16: 2 } as const;

interface Spec {
  b: number;
  n: number;
  nKv: number;
  sQ: number;
  sKv: number;
  d: number;
  dtype: DType;
  gpu: boolean;
  lse: boolean;
  backend?: string;
  options: AttentionOptions;
  seed: number;
}

/** A tensor's bytes, host or GPU (one wait for a GPU tensor). */
async function bytesOf(t: HostTensor | GpuTensor, count: number, bytes: number): Promise<Uint8Array> {
  if ("data" in t) return new Uint8Array(t.data.buffer, t.data.byteOffset, count * bytes).slice();
  const raw = new Uint8Array(await readBuffer(runtime!.device, t.buffer, count * bytes));
  t.buffer.destroy();
  return raw;
}

function upload(data: ArrayBufferView): GPUBuffer {
  const device = runtime!.device;
  const buffer = device.createBuffer({
    size: Math.max(16, Math.ceil(data.byteLength / 16) * 16),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  const padded = new Uint8Array(Math.ceil(data.byteLength / 4) * 4);
  padded.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  device.queue.writeBuffer(buffer, 0, padded);
  return buffer;
}

/** The tensors of a spec, made anew for each run (GPU inputs are released by `release`). */
function inputs(s: Spec) {
  const random = rng(s.seed);
  const make = (n: number, seq: number): HostTensor => {
    const values = Array.from({ length: s.b * n * seq * s.d }, () => random() * 2 - 1);
    return {
      data: toHostArray(values, s.dtype) as HostTensor["data"],
      shape: [s.b, n, seq, s.d],
      dtype: s.dtype,
    };
  };
  const host = { q: make(s.n, s.sQ), k: make(s.nKv, s.sKv), v: make(s.nKv, s.sKv) };
  const buffers: GPUBuffer[] = [];
  const gpu = (t: HostTensor): GpuTensor => {
    const buffer = upload(t.data);
    buffers.push(buffer);
    return { buffer, shape: t.shape, dtype: s.dtype };
  };
  const t = s.gpu ? { q: gpu(host.q), k: gpu(host.k), v: gpu(host.v) } : host;
  return { ...t, release: () => buffers.forEach((b) => b.destroy()) };
}

/** Starts one call of a spec; resolves to the bytes of its output (and lse). */
function run(s: Spec): Promise<Uint8Array[]> {
  const { q, k, v, release } = inputs(s);
  const options = { ...s.options, backend: s.backend };
  const outCount = s.b * s.n * s.sQ * s.d;
  const call = s.lse
    ? attentionWithLse(q, k, v, options).then((r) => [r.out, r.lse] as const)
    : attentionForward(q, k, v, options).then((o) => [o, null] as const);
  return call.then(async ([out, lse]) => {
    const parts = [await bytesOf(out, outCount, BYTES[s.dtype])];
    if (lse) parts.push(await bytesOf(lse, s.b * s.n * s.sQ, 4));
    release();
    return parts;
  }, (e) => {
    release();
    throw e;
  });
}

/** 200 calls: forced naive, flash, split-kv and cpu, and the router's choice, over mixed options. */
function specs(): Spec[] {
  const random = rng(20261106);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)];
  const out: Spec[] = [];
  while (out.length < 200) {
    const n = pick([1, 2, 4]);
    const s: Spec = {
      b: pick([1, 2]),
      n,
      nKv: pick([1, 2, 4].filter((x) => n % x === 0)),
      sQ: 1 + Math.floor(random() * 40),
      sKv: 1 + Math.floor(random() * 40),
      d: 16,
      dtype: "f32",
      gpu: random() < 0.5,
      lse: false,
      backend: pick(["naive", "naive", "cpu", "flash", "split-kv", undefined]),
      options: {},
      seed: out.length + 1,
    };
    if (s.backend === "naive" || s.backend === "cpu") {
      // Everything goes: f16, lse, masks, windows.
      s.dtype = pick(["f32", "f16"]);
      s.lse = random() < 0.3;
      const o = s.options;
      if (random() < 0.4) o.isCausal = true;
      if (random() < 0.3) o.windowSize = [Math.floor(random() * 8), Math.floor(random() * 8)];
      if (random() < 0.3) {
        o.attnMask = {
          data: Float32Array.from(
            { length: s.sQ * s.sKv },
            () => (random() < 0.2 ? -Infinity : random() - 0.5),
          ),
          shape: [s.sQ, s.sKv],
        };
      }
      if (random() < 0.3) o.scale = 0.1 + random();
    } else {
      // flash, split-kv and the router: two kernel configurations each (plain and causal), as a
      // new one costs a second to compile here. split-kv's depends on its query rows per K/V head:
      // one; the router then picks split-kv for one query row, flash past 16.
      if (random() < 0.5) s.options.isCausal = true;
      if (s.backend !== "flash" && (s.backend === "split-kv" || random() < 0.5)) {
        s.sQ = 1;
        s.nKv = s.n;
      } else if (s.backend === undefined) s.sQ = 17 + Math.floor(random() * 24);
    }
    if (s.backend) {
      const backend = BACKENDS.find((b) => b.name === s.backend)!;
      const { q, k, v, release } = s.gpu ? inputs({ ...s, gpu: false }) : inputs(s);
      const reasons = backend.unsupportedReasons(resolveProblem(q, k, v, s.options), runtime!.caps);
      release();
      if (reasons.length > 0) continue;
    }
    out.push(s);
  }
  return out;
}

const same = (a: Uint8Array[], b: Uint8Array[]) =>
  a.length === b.length && a.every((x, i) => x.length === b[i].length && x.every((y, j) => y === b[i][j]));

Deno.test({
  name:
    `load: 200 concurrent calls of mixed shapes, options and backends equal their serial results bit for bit${skip}`,
  ignore,
  fn: async () => {
    const all = specs();
    const serial: Uint8Array[][] = [];
    for (const s of all) serial.push(await run(s));
    const base = stats();
    const concurrent = await Promise.all(all.map((s) => run(s)));
    const differ = all.filter((_, i) => !same(serial[i], concurrent[i]));
    assert.equal(
      differ.length,
      0,
      `calls that differ when run concurrently: ${
        differ.slice(0, 5).map((s) => JSON.stringify(s)).join("\n")
      }`,
    );
    // Run again concurrently: the same bits a third time.
    const third = await Promise.all(all.map((s) => run(s)));
    assert.ok(all.every((_, i) => same(serial[i], third[i])), "a third run gives the same bits");
    assert.equal(stats().liveBuffers, base.liveBuffers, "no buffers left behind");
    const used = new Map<string, number>();
    for (const s of all) used.set(s.backend ?? "router", (used.get(s.backend ?? "router") ?? 0) + 1);
    console.log(`  ${[...used].map(([b, n]) => `${b} ${n}`).join(", ")}`);
  },
});

Deno.test({
  name: `load: the same call twice gives identical bits, on every backend that can run it${skip}`,
  ignore,
  fn: async () => {
    const s: Spec = {
      b: 1,
      n: 2,
      nKv: 2,
      sQ: 1,
      sKv: 37,
      d: 16,
      dtype: "f32",
      gpu: false,
      lse: false,
      options: { isCausal: true },
      seed: 99,
    };
    let ran = 0;
    for (const backend of BACKENDS) {
      const { q, k, v } = inputs(s);
      if (backend.unsupportedReasons(resolveProblem(q, k, v, s.options), runtime!.caps).length > 0) continue;
      const spec = { ...s, backend: backend.name };
      const [a, b] = [await run(spec), await run(spec)];
      assert.ok(same(a, b), `${backend.name}: two runs differ`);
      const c = await run({ ...spec, gpu: true });
      assert.ok(same(a, c), `${backend.name}: GPU tensors give other bits than host tensors`);
      ran++;
    }
    assert.ok(ran >= 3, `${ran} backends ran`);
  },
});

/** Soak length and kinds of calls: tiny shapes, GPU tensors, waits only every 1000 calls. */
const SOAK_CALLS = 10_000;

Deno.test({
  name: `load: a soak of ${SOAK_CALLS} chained calls on GPU tensors leaves no GPU buffers behind${skip}`,
  ignore,
  fn: async () => {
    const device = runtime!.device;
    const shape = [1, 2, 4, 16];
    const count = 2 * 4 * 16;
    const random = rng(5);
    const host = () => Float32Array.from({ length: count }, () => random() * 2 - 1);
    const kHost = host(), vHost = host();
    const k: GpuTensor = { buffer: upload(kHost), shape, dtype: "f32" };
    const v: GpuTensor = { buffer: upload(vHost), shape, dtype: "f32" };
    const padding = { buffer: upload(new Uint8Array([1, 1, 0, 1])), shape: [1, 4], dtype: "bool" as const };
    const kinds: [string, AttentionOptions][] = [
      ["naive", {}],
      ["naive", { isCausal: true }],
      ["naive", { keyPaddingMask: padding }],
      ["naive", {}],
      ["naive", { isCausal: true }],
      ["flash", {}],
    ];
    let q: GpuTensor = { buffer: upload(host()), shape, dtype: "f32" };
    const base = stats();
    const heapBefore = Deno.memoryUsage().heapUsed;
    const t0 = performance.now();
    for (let i = 0; i < SOAK_CALLS; i++) {
      const [backend, options] = kinds[i % kinds.length];
      const check = i % 1000 === 999;
      // Every 1000 calls: the input as it stands, to check the output against the cpu backend.
      const qHost = check ? new Float32Array(await readBuffer(device, q.buffer, count * 4)) : null;
      let out: GpuTensor;
      if (i % 7 === 3) {
        const r = await attentionWithLse(q, k, v, { ...options, backend });
        r.lse.buffer.destroy();
        out = r.out;
      } else out = await attentionForward(q, k, v, { ...options, backend });
      q.buffer.destroy(); // the caller's to free; the GPU keeps it until the queued work is done
      q = out;
      if (qHost) {
        const got = new Float32Array(await readBuffer(device, out.buffer, count * 4));
        const opts = { ...options, backend: "cpu" };
        if (opts.keyPaddingMask) opts.keyPaddingMask = { data: new Uint8Array([1, 1, 0, 1]), shape: [1, 4] };
        const want = await attentionForward({ data: qHost, shape }, { data: kHost, shape }, {
          data: vHost,
          shape,
        }, opts);
        for (let e = 0; e < count; e++) {
          assert.ok(
            Math.abs(got[e] - want.data[e]) < 2e-5,
            `call ${i}: element ${e} ${got[e]} vs ${want.data[e]}`,
          );
        }
        assert.ok(stats().liveBuffers <= base.liveBuffers, `call ${i}: ${stats().liveBuffers} live buffers`);
      }
    }
    await device.queue.onSubmittedWorkDone();
    const ms = performance.now() - t0;
    q.buffer.destroy();
    const after = stats();
    assert.equal(after.liveBuffers, base.liveBuffers, "live GPU buffers back to the baseline");
    assert.equal(after.liveBytes, base.liveBytes, "live GPU bytes back to the baseline");
    assert.ok(after.cachedPipelines <= after.pipelineCacheLimit);
    const heapMB = (Deno.memoryUsage().heapUsed - heapBefore) / 1e6;
    console.log(
      `  ${SOAK_CALLS} calls in ${(ms / 1000).toFixed(1)} s (${(ms / SOAK_CALLS).toFixed(2)} ms each), ` +
        `${after.liveBuffers} live buffers, ${after.cachedPipelines} pipelines, JS heap ${
          heapMB >= 0 ? "+" : ""
        }${heapMB.toFixed(1)} MB`,
    );
    for (const t of [k, v, padding]) t.buffer.destroy();
  },
});

Deno.test({
  name:
    `load: the pipeline cache keeps at most PIPELINE_CACHE_LIMIT pipelines, dropping the least recently used${skip}`,
  ignore,
  fn: async () => {
    const device = await (await engineAdapter())!.requestDevice();
    try {
      const rt = await runtimeFor(device);
      const code = (i: number) => () =>
        `@group(0) @binding(0) var<storage, read_write> o: array<f32>;
@compute @workgroup_size(1) fn main() { o[0] = ${i}.0; }`;
      const make = (i: number) => cachedPipeline(rt, `trivial ${i}`, code(i), `trivial ${i}`);
      for (let i = 0; i < PIPELINE_CACHE_LIMIT; i++) await make(i);
      assert.equal(rt.pipelines.size, PIPELINE_CACHE_LIMIT);
      await make(0); // used again: now the most recent
      for (let i = PIPELINE_CACHE_LIMIT; i < PIPELINE_CACHE_LIMIT + 10; i++) await make(i);
      assert.equal(rt.pipelines.size, PIPELINE_CACHE_LIMIT, "bounded");
      assert.ok(rt.pipelines.has("trivial 0"), "the recently used one stays");
      assert.ok(!rt.pipelines.has("trivial 1"), "the least recently used ones go");
      assert.equal(stats({ device }).cachedPipelines, PIPELINE_CACHE_LIMIT);
      assert.equal(stats({ device }).pipelineCacheLimit, PIPELINE_CACHE_LIMIT);
    } finally {
      device.destroy();
    }
  },
});

Deno.test({
  name: `load: large uploads and host outputs are kept for the next call of the same sizes, bounded${skip}`,
  ignore,
  async fn() {
    // [1, 16, 256, 64] f32: 1 MiB per tensor, the smallest size kept.
    const shape = [1, 16, 256, 64];
    const random = rng(11);
    const t = () => ({ data: Float32Array.from({ length: 16 * 256 * 64 }, () => random() * 2 - 1), shape });
    const [q, k, v] = [t(), t(), t()];
    const first = await attentionForward(q, k, v, { backend: "naive" });
    const kept = stats();
    assert.ok(kept.keptBuffers >= 4, `q, k, v and the output kept (${kept.keptBuffers})`);
    for (let i = 0; i < 3; i++) {
      const again = await attentionForward(q, k, v, { backend: "naive" });
      assert.deepEqual(again.data, first.data, "a kept buffer's old contents never show");
    }
    const after = stats();
    assert.equal(after.keptBuffers, kept.keptBuffers, "calls of the same sizes reuse, not add");
    assert.ok(after.keptBuffers <= 8 && after.keptBytes <= 256 << 20, "bounded per device");
  },
});
