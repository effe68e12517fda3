/**
 * Serving paths against the float64 reference of reference.ts, built independently of the cpu
 * backend: sinks as `out · σ(lse − sink)` and `lse ⊕ sink` of the dense reference; packed batches
 * as one dense reference call per sequence (sage and sage-mma against SageAttention's bar); paged
 * caches as the reference over the pages gathered in table order. Then appendKvCache, and the
 * refusals of bad offsets, tables and lengths.
 */
import assert from "node:assert/strict";
import { appendKvCache, attentionWithLse, deviceInfo, explain, getDevice, WgattnError } from "../mod.ts";
import type { AttentionOptions } from "../core/types.ts";
import { chooseSplitKvConfig, splitKvPlan, splitKvTuning } from "../backends/splitkv.ts";
import { realMmaReasons, sageMmaTuning } from "../backends/sage_mma.ts";
import { flashMmaTuning } from "../backends/flash_mma.ts";
import { chooseSageConfig, sageBackend, sageTuning } from "../backends/sage.ts";
import { defaultRuntime } from "../core/device.ts";
import { debug } from "../core/gpu.ts";
import { resolveProblem } from "../core/problem.ts";
import type { HostTensor } from "../core/types.ts";
import type { FlashConfig } from "../wgsl/flash.ts";
import type { SplitKvConfig } from "../wgsl/splitkv.ts";
import { similarity } from "../bench/sage_accuracy.ts";
import {
  errorStats,
  fromHostArray,
  type Logical,
  randomLogical,
  referenceAttention,
  type RefOptions,
  rng,
  roundTo,
  toHostArray,
} from "./reference.ts";

const info = await deviceInfo();
const gpuBackends = info ? ["flash", "split-kv", "naive", "flash-subgroup"] : [];
const TOL = { out: 2e-5, lse: 1e-4 };

/** [b, n, s, d] logical → row-major Float32Array in "b s n d" order (packed and paged rows). */
function bsnd(t: Logical, b: number, s0: number, s1: number): Float32Array {
  const { n, s, d } = t.sizes;
  const out = new Float32Array((s1 - s0) * n * d);
  for (let i = s0; i < s1; i++) {
    for (let h = 0; h < n; h++) {
      for (let c = 0; c < d; c++) out[((i - s0) * n + h) * d + c] = t.data[((b * n + h) * s + i) * d + c];
    }
  }
  return out;
}

/** The dense reference with sinks folded in (independent of the backends' formula). */
function withSinks(
  ref: { out: Float64Array; lse: Float64Array },
  sinks: number[],
  n: number,
  sQ: number,
  dV: number,
) {
  const out = Float64Array.from(ref.out), lse = Float64Array.from(ref.lse);
  for (let r = 0; r < lse.length; r++) {
    const sink = sinks[Math.floor(r / sQ) % n];
    if (sink === -Infinity) continue;
    const l = ref.lse[r];
    const m = Math.max(l, sink);
    const total = m + Math.log(Math.exp(l - m) + Math.exp(sink - m));
    const w = l === -Infinity ? 0 : Math.exp(l - total);
    for (let c = 0; c < dV; c++) out[r * dV + c] *= w;
    lse[r] = total;
  }
  return { out, lse };
}

function host(t: Logical) {
  const { b, n, s, d } = t.sizes;
  return { data: Float32Array.from(t.data), shape: [b, n, s, d] };
}

function check(name: string, got: ArrayLike<number>, want: ArrayLike<number>, tol: number) {
  const e = errorStats(got, want);
  assert.ok(e.maxAbs < tol, `${name}: max abs error ${e.maxAbs}`);
}

async function gpuTensor<D extends "f32" | "i32">(
  data: Float32Array | Int32Array,
  shape: number[],
  dtype: D,
) {
  const device = (await getDevice())!;
  const buffer = device.createBuffer({
    size: Math.max(16, Math.ceil(data.byteLength / 16) * 16),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  device.queue.writeBuffer(buffer, 0, data as Float32Array<ArrayBuffer>);
  return { buffer, shape, dtype };
}

async function readF32(t: unknown, count: number): Promise<Float32Array> {
  const device = (await getDevice())!;
  const buffer = (t as { buffer: GPUBuffer }).buffer;
  const staging = device.createBuffer({
    size: count * 4,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  const enc = device.createCommandEncoder();
  enc.copyBufferToBuffer(buffer, 0, staging, 0, count * 4);
  device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const out = new Float32Array(staging.getMappedRange().slice(0));
  staging.unmap();
  return out;
}

// ---- sinks ------------------------------------------------------------------------------------

{
  // s_q > s_kv with a causal band: the first 8 rows see no key, only their sink.
  const [b, n, nKv, sQ, sKv, d] = [2, 4, 2, 24, 16, 32];
  const random = rng(16);
  const q = randomLogical({ b, n, s: sQ, d }, random);
  const k = randomLogical({ b, n: nKv, s: sKv, d }, random);
  const v = randomLogical({ b, n: nKv, s: sKv, d }, random);
  const sinks = [0.5, -Infinity, 3, -2];
  const ref = withSinks(referenceAttention(q, k, v, { isCausal: true }), sinks, n, sQ, d);
  for (const backend of ["cpu", ...gpuBackends]) {
    Deno.test(`sinks on ${backend}: b${b} n${n}/${nKv} s_q${sQ} s_kv${sKv} d${d} causal, empty rows, lse`, async (t) => {
      const reasons = await explain(host(q), host(k), host(v), { isCausal: true, sinks, backend }).catch((
        e,
      ) => e);
      if (reasons instanceof WgattnError) {
        t.step({ name: `not served here: ${reasons.message}`, ignore: true, fn() {} });
        return;
      }
      const { out, lse } = await attentionWithLse(host(q), host(k), host(v), {
        isCausal: true,
        sinks: Float32Array.from(sinks),
        backend,
      });
      check("out", out.data, ref.out, TOL.out);
      check("lse", lse.data, ref.lse, TOL.lse);
    });
  }
  Deno.test(
    "sinks: GPU sinks tensor and GPU q/k/v on split-kv's decode shape",
    { ignore: !info },
    async () => {
      const q1 = randomLogical({ b, n, s: 1, d }, random);
      const r1 = withSinks(referenceAttention(q1, k, v), sinks, n, 1, d);
      const g = async (t: Logical) =>
        await gpuTensor(Float32Array.from(t.data), [t.sizes.b, t.sizes.n, t.sizes.s, t.sizes.d], "f32");
      const sinkT = await gpuTensor(Float32Array.from(sinks), [n], "f32");
      const { out, lse } = await attentionWithLse(await g(q1), await g(k), await g(v), { sinks: sinkT });
      check("out", await readF32(out, b * n * d), r1.out, TOL.out);
      check("lse", await readF32(lse, b * n), r1.lse, TOL.lse);
    },
  );
}

/** The b + 1 offsets of sequences of these lengths. */
function offsetsOf(lens: number[]): Int32Array {
  return Int32Array.from([0, ...lens.map((_, i) => lens.slice(0, i + 1).reduce((a, x) => a + x, 0))]);
}

/**
 * A packed batch of random sequences (q `lensQ[i]` rows of n heads, k and v `lensK[i]` rows of nKv heads,
 * head dim d, values rounded to `dtype`): its offsets, the packed host tensors `[total, heads, d]`, and
 * the float64 expectation from one dense reference call per sequence (sinks folded in when given):
 * out `[total_q, n, d]`, lse `[n, total_q]`.
 */
function packedBatch(
  o: {
    lensQ: number[];
    lensK: number[];
    n: number;
    nKv: number;
    d: number;
    dtype: "f32" | "f16";
    seed: number;
  },
) {
  const { lensQ, lensK, n, nKv, d, dtype } = o;
  const cuQ = offsetsOf(lensQ), cuK = offsetsOf(lensK);
  const totalQ = cuQ[lensQ.length], totalK = cuK[lensK.length];
  const random = rng(o.seed);
  const round = (t: Logical): Logical => ({ data: roundTo(t.data, dtype), sizes: t.sizes });
  const seqs = lensQ.map((sq, i) => ({
    q: round(randomLogical({ b: 1, n, s: sq, d }, random)),
    k: round(randomLogical({ b: 1, n: nKv, s: lensK[i], d }, random)),
    v: round(randomLogical({ b: 1, n: nKv, s: lensK[i], d }, random)),
  }));
  const cat = (which: "q" | "k" | "v", heads: number, total: number) => {
    const all = new Float32Array(total * heads * d);
    let at = 0;
    for (const x of seqs) {
      const part = bsnd(x[which], 0, 0, x[which].sizes.s);
      all.set(part, at);
      at += part.length;
    }
    return { data: toHostArray(all, dtype), shape: [total, heads, d], dtype } as HostTensor;
  };
  const expected = (opts: RefOptions, sinks?: number[]) => {
    const out = new Float64Array(totalQ * n * d), lse = new Float64Array(n * totalQ);
    seqs.forEach((x, i) => {
      let r = referenceAttention(x.q, x.k, x.v, opts);
      if (sinks) r = withSinks(r, sinks, n, lensQ[i], d);
      for (let h = 0; h < n; h++) {
        for (let row = 0; row < lensQ[i]; row++) {
          lse[h * totalQ + cuQ[i] + row] = r.lse[h * lensQ[i] + row];
          for (let c = 0; c < d; c++) {
            out[((cuQ[i] + row) * n + h) * d + c] = r.out[(h * lensQ[i] + row) * d + c];
          }
        }
      }
    });
    return { out, lse };
  };
  return {
    cuQ,
    cuK,
    totalQ,
    totalK,
    q: cat("q", n, totalQ),
    k: cat("k", nKv, totalK),
    v: cat("v", nKv, totalK),
    expected,
  };
}

// ---- packed batches ---------------------------------------------------------------------------

{
  const n = 4, nKv = 2, d = 32;
  const lensQ = [5, 0, 33, 17], lensK = [9, 3, 40, 17];
  const batch = packedBatch({ lensQ, lensK, n, nKv, d, dtype: "f32", seed: 7 });
  const { cuQ, cuK, totalQ, totalK } = batch;
  const [qT, kT, vT] = [batch.q, batch.k, batch.v] as { data: Float32Array; shape: number[] }[];
  const sinks = [0.25, 1, -1, 2];
  const expected = (opts: RefOptions, withSink: boolean) =>
    batch.expected(opts, withSink ? sinks : undefined);
  const cases: { name: string; opts: AttentionOptions; ref: RefOptions; sinks?: boolean; gpu?: boolean }[] = [
    { name: "full", opts: {}, ref: {} },
    {
      name: "causal + window + sinks, GPU offsets and tensors",
      opts: { isCausal: true, windowSize: [6, 0] },
      ref: { isCausal: true, windowSize: [6, 0] },
      sinks: true,
      gpu: true,
    },
  ];
  for (const backend of ["cpu", ...(info ? ["flash", "flash-subgroup"] : [])]) {
    for (const c of cases) {
      Deno.test(`packed batch on ${backend}: lengths q ${lensQ} k ${lensK}, n${n}/${nKv} d${d}, ${c.name}`, async (t) => {
        const gpu = c.gpu && info;
        const base: AttentionOptions = {
          ...c.opts,
          backend,
          cuSeqlensQ: gpu ? await gpuTensor(cuQ, [cuQ.length], "i32") : cuQ,
          cuSeqlensK: gpu ? await gpuTensor(cuK, [cuK.length], "i32") : cuK,
          ...(c.sinks ? { sinks } : {}),
        };
        const why = await explain(qT, kT, vT, base).catch((e) => e);
        if (why instanceof WgattnError) {
          t.step({ name: `not served here: ${why.message}`, ignore: true, fn() {} });
          return;
        }
        const ref = expected(c.ref, c.sinks === true);
        if (gpu) {
          const g = async (x: { data: Float32Array; shape: number[] }) =>
            await gpuTensor(x.data, x.shape, "f32");
          const { out, lse } = await attentionWithLse(await g(qT), await g(kT), await g(vT), base);
          assert.deepEqual(out.shape, [totalQ, n, d]);
          assert.deepEqual(lse.shape, [n, totalQ]);
          check("out", await readF32(out, totalQ * n * d), ref.out, TOL.out);
          check("lse", await readF32(lse, n * totalQ), ref.lse, TOL.lse);
        } else {
          const { out, lse } = await attentionWithLse(qT, kT, vT, base);
          assert.deepEqual(out.shape, [totalQ, n, d]);
          assert.deepEqual(lse.shape, [n, totalQ]);
          check("out", out.data, ref.out, TOL.out);
          check("lse", lse.data, ref.lse, TOL.lse);
        }
      });
    }
  }
  // The matrix-tile backends, on their emulated form where no matrix units exist: sage-mma against
  // SageAttention's bar (approximate), flash-mma against float64 as flash (exact).
  const matrixBackends = [
    {
      name: "sage-mma",
      tuning: sageMmaTuning as { emulate: boolean | null; override: object | null },
      exact: false,
    },
    {
      name: "flash-mma",
      tuning: flashMmaTuning as { emulate: boolean | null; override: object | null },
      exact: true,
    },
  ];
  for (const mb of matrixBackends) {
    Deno.test({
      name:
        `packed batch on ${mb.name}: lengths q ${lensQ} k ${lensK}, n${n}/${nKv} d${d}, full and causal + window`,
      ignore: !info,
      async fn(t) {
        const saved = mb.tuning.emulate;
        const caps = (await defaultRuntime())?.caps;
        // The real form where the device has int8 subgroup matrices, else the emulated one.
        mb.tuning.emulate = caps && realMmaReasons(caps).length === 0 ? saved : true;
        const bandCase = {
          name: "causal + window",
          opts: { isCausal: true, windowSize: [6, 0] } as AttentionOptions,
          ref: { isCausal: true, windowSize: [6, 0] } as RefOptions,
        };
        try {
          // The chosen layout, then one subgroup per workgroup: blocks of 16 rows, some in one sequence.
          for (const override of [null, { warps: 1 }]) {
            mb.tuning.override = override;
            for (const c of [cases[0], bandCase]) {
              const base: AttentionOptions = {
                ...c.opts,
                backend: mb.name,
                cuSeqlensQ: cuQ,
                cuSeqlensK: cuK,
              };
              const why = await explain(qT, kT, vT, base).catch((e) => e);
              if (why instanceof WgattnError) {
                t.step({ name: `not served here: ${why.message}`, ignore: true, fn() {} });
                return;
              }
              const ref = expected(c.ref, false);
              const { out, lse } = await attentionWithLse(qT, kT, vT, base);
              assert.deepEqual(out.shape, [totalQ, n, d]);
              const label = `${mb.name}, ${c.name}${override ? ", 1 subgroup" : ""}`;
              if (mb.exact) {
                check(`${label}: out`, out.data, ref.out, TOL.out);
                check(`${label}: lse`, lse.data, ref.lse, TOL.lse);
                continue;
              }
              const acc = similarity(out.data, ref.out);
              console.log(
                `  packed, ${label}: cosine ${acc.cosine.toFixed(6)}, relative L1 ${acc.relL1.toFixed(5)}`,
              );
              assert.ok(acc.cosine >= 0.999 && acc.relL1 <= 0.03, `${label}: ${JSON.stringify(acc)}`);
              let lseErr = 0;
              ref.lse.forEach((x, i) => (lseErr = Math.max(lseErr, Math.abs(lse.data[i] - x))));
              assert.ok(lseErr <= 0.05, `${label}: lse max abs ${lseErr}`);
            }
          }
        } finally {
          mb.tuning.emulate = saved;
          mb.tuning.override = null;
        }
      },
    });
  }
  Deno.test(
    "packed batch: the router passes over backends unsuited to it, with their reasons",
    { ignore: !info },
    async () => {
      const e = await explain(qT, kT, vT, { cuSeqlensQ: cuQ, cuSeqlensK: cuK });
      assert.ok(e.backend === "flash" || e.backend === "flash-subgroup", e.backend);
      // split-kv serves packed batches, but this one's longest sequence (33 query rows) is flash's.
      const splitKv = e.chain.find((x) => x.backend === "split-kv");
      assert.ok(splitKv && !splitKv.chosen, JSON.stringify(e.chain));
      assert.match(splitKv.reasons.join("; "), /longest sequence's s_q = 33 > 32/);
      const skipped = e.chain.filter((x) => !x.chosen).flatMap((x) => x.reasons).join("; ");
      assert.doesNotMatch(skipped, /does not read packed batches/);
    },
  );
  Deno.test("packed batch: bad offsets refused before any work", async () => {
    const bad: [string, Int32Array, Int32Array, RegExp][] = [
      ["not from 0", Int32Array.from([1, 5, 6, 40, totalQ]), cuK, /start at 0/],
      [
        "decreasing",
        Int32Array.from([0, 30, 20, totalQ]),
        Int32Array.from([0, 1, 2, totalK]),
        /must not decrease/,
      ],
      [
        "short of the tensor",
        Int32Array.from([0, 5, 6, totalQ - 1]),
        Int32Array.from([0, 1, 2, totalK]),
        /must end at q's length/,
      ],
      ["past the tensor", cuQ, Int32Array.from([0, 9, 12, 52, totalK + 1]), /must end at k's length/],
      ["unequal counts", cuQ, Int32Array.from([0, totalK]), /as many offsets/],
    ];
    for (const [why, q, k, message] of bad) {
      await assert.rejects(
        attentionWithLse(qT, kT, vT, { cuSeqlensQ: q, cuSeqlensK: k }),
        (e: unknown) => e instanceof WgattnError && e.code === "INVALID_OPTION" && message.test(e.message),
        why,
      );
    }
    await assert.rejects(
      attentionWithLse(qT, kT, vT, { cuSeqlensQ: cuQ }),
      (e: unknown) => e instanceof WgattnError && e.argument === "options.cuSeqlensK",
    );
    await assert.rejects(
      attentionWithLse(qT, kT, vT, {
        cuSeqlensQ: cuQ,
        cuSeqlensK: cuK,
        keyPaddingMask: { data: new Uint8Array(1), shape: [1, 1] },
      }),
      (e: unknown) => e instanceof WgattnError && e.argument === "options.keyPaddingMask",
    );
  });
}

// ---- packed batches on sage ---------------------------------------------------------------------

{
  // sage quantizes q and k in blocks aligned to each sequence's start (wgsl/sage.ts): lengths
  // shorter than a tile (5, 9, 3), not multiples of it (17, 33, 70, 75), empty (0), and one whose
  // first causal rows see no key (q 20 over k 12). With 64-row tiles every block of the whole
  // tensor would straddle sequences; with the software adapter's 16-row tiles several blocks
  // make one sequence.
  const n = 4, nKv = 2, d = 32;
  const lensQ = [5, 0, 70, 17, 20], lensK = [9, 3, 75, 17, 12];
  const { cuQ, cuK, totalQ } = packedBatch({ lensQ, lensK, n, nKv, d, dtype: "f32", seed: 23 });
  const inputs = (dtype: "f32" | "f16") =>
    packedBatch({ lensQ, lensK, n, nKv, d, dtype, seed: dtype === "f32" ? 23 : 29 });
  const sageCases: {
    name: string;
    dtype: "f32" | "f16";
    causal: boolean;
    gpuOffsets: boolean;
    tiles?: Partial<FlashConfig>;
  }[] = [
    { name: "host offsets", dtype: "f32", causal: false, gpuOffsets: false },
    { name: "GPU offsets", dtype: "f32", causal: true, gpuOffsets: true },
    { name: "host offsets", dtype: "f16", causal: true, gpuOffsets: false },
    { name: "GPU offsets", dtype: "f16", causal: false, gpuOffsets: true },
    // The 64-row tiles GPUs get (the software adapter takes 16): blocks of 64 rows and keys.
    {
      name: "host offsets, 64x64 tiles",
      dtype: "f16",
      causal: true,
      gpuOffsets: false,
      tiles: { br: 64, bc: 64, rt: 16, ct: 16, vc: 4, dk: 32, pointers: false },
    },
    {
      name: "GPU offsets, 64x64 tiles",
      dtype: "f32",
      causal: false,
      gpuOffsets: true,
      tiles: { br: 64, bc: 64, rt: 16, ct: 16, vc: 4, dk: 32, pointers: false },
    },
  ];
  const caps = info ? (await defaultRuntime())?.caps : undefined;
  const sageSkip = !caps ? "no WebGPU adapter" : !caps.packedInt8Dot ? "no dot4I8Packed on this device" : "";
  for (const c of sageCases) {
    const label = `packed batch on sage: lengths q ${lensQ} k ${lensK}, n${n}/${nKv} d${d} ${c.dtype}, ${
      c.causal ? "causal" : "full"
    }, ${c.name}, lse`;
    Deno.test({
      name: `${label}${sageSkip ? ` [skipped: ${sageSkip}]` : ""}`,
      ignore: sageSkip !== "",
      async fn() {
        const { q, k, v, expected } = inputs(c.dtype);
        const options: AttentionOptions = {
          backend: "sage",
          isCausal: c.causal,
          cuSeqlensQ: c.gpuOffsets ? await gpuTensor(cuQ, [cuQ.length], "i32") : cuQ,
          cuSeqlensK: c.gpuOffsets ? await gpuTensor(cuK, [cuK.length], "i32") : cuK,
        };
        assert.equal((await explain(q, k, v, options)).backend, "sage");
        const ref = expected({ isCausal: c.causal });
        sageTuning.override = c.tiles ?? null;
        debug.poisonOutputs = true;
        try {
          if (c.tiles) {
            const p = resolveProblem(q, k, v, options);
            const chosen = chooseSageConfig(p, caps!, true);
            assert.ok(typeof chosen !== "string" && chosen.br === 64 && chosen.varlen, String(chosen));
          }
          const { out, lse } = await attentionWithLse(q, k, v, options);
          assert.deepEqual(out.shape, [totalQ, n, d]);
          assert.deepEqual(lse.shape, [n, totalQ]);
          const got = fromHostArray((out as HostTensor).data, c.dtype);
          const acc = similarity(got, ref.out);
          console.log(`  ${label}: cosine ${acc.cosine.toFixed(6)}, relative L1 ${acc.relL1.toFixed(5)}`);
          assert.ok(acc.cosine >= 0.999 && acc.relL1 <= 0.03, JSON.stringify(acc));
          // Rows that see no key: output 0 and lse -Infinity, as the reference.
          let lseErr = 0;
          ref.lse.forEach((x, i) => {
            const y = (lse as HostTensor).data[i];
            if (x === -Infinity) assert.equal(y, -Infinity, `lse ${i}`);
            else lseErr = Math.max(lseErr, Number.isNaN(y) ? Infinity : Math.abs(y - x));
          });
          console.log(`    lse max abs error ${lseErr.toExponential(2)}`);
          assert.ok(lseErr <= 0.05, `lse max abs error ${lseErr}`);
        } finally {
          sageTuning.override = null;
          debug.poisonOutputs = false;
        }
      },
    });
  }
  Deno.test({
    name: `packed batch: explain() of a long f16 batch gives no packed refusal for sage${
      sageSkip ? ` [skipped: ${sageSkip}]` : ""
    }`,
    ignore: sageSkip !== "",
    async fn() {
      const lens = [2048, 300, 2304], total = lens.reduce((a, x) => a + x, 0);
      const t = {
        data: new Float16Array(total * 2 * 64).fill(0.5),
        shape: [total, 2, 64],
        dtype: "f16" as const,
      };
      const offsets = offsetsOf(lens);
      const options: AttentionOptions = { cuSeqlensQ: offsets, cuSeqlensK: offsets, isCausal: true };
      const e = await explain(t, t, t, options);
      assert.deepEqual(sageBackend.unsupportedReasons(resolveProblem(t, t, t, options), caps!), []);
      // Where the device has int8 matrix units sage-mma comes first, and the chain ends there.
      const entry = e.chain.find((x) => x.backend === "sage");
      if (realMmaReasons(caps!).length === 0) assert.ok(entry || e.backend === "sage-mma", e.backend);
      else {
        assert.equal(e.backend, "sage");
        assert.deepEqual(entry?.reasons, []);
      }
    },
  });
}

// ---- packed batches on split-kv ---------------------------------------------------------------

{
  // Decode-like packed batches (1 to 4 query rows per sequence) over unequal keys: a sequence with
  // no queries (6 keys), one with no keys (its row sees nothing: out 0, lse -Infinity), one whose
  // keys (3) are fewer than a chunk and whose first causal row sees none (q 4 over k 3), and the
  // longest (70 keys) split into several chunks, which the shorter sequences' keys do not reach.
  const n = 4, nKv = 2, d = 32;
  const lensQ = [1, 0, 4, 2, 3, 1, 4], lensK = [37, 6, 3, 70, 1, 0, 12];
  const { cuQ, cuK, totalQ, totalK } = packedBatch({ lensQ, lensK, n, nKv, d, dtype: "f32", seed: 31 });
  const sinks = [0.25, 1, -1, 2];
  const inputs = (dtype: "f32" | "f16") => {
    const batch = packedBatch({ lensQ, lensK, n, nKv, d, dtype, seed: dtype === "f32" ? 31 : 37 });
    const expected = (opts: RefOptions, withSink: boolean) =>
      batch.expected(opts, withSink ? sinks : undefined);
    return { ...batch, expected };
  };
  const skvCases: {
    name: string;
    dtype: "f32" | "f16";
    opts: RefOptions;
    gpuOffsets: boolean;
    sinks?: boolean;
    /** Forced chunk count (splitKvTuning.splits). */
    splits?: number;
    /** Fixed config parts (splitKvTuning.override). */
    override?: Partial<SplitKvConfig>;
  }[] = [
    { name: "full, host offsets", dtype: "f32", opts: {}, gpuOffsets: false },
    { name: "causal, host offsets", dtype: "f32", opts: { isCausal: true }, gpuOffsets: false },
    {
      name: "causal + sinks, GPU offsets",
      dtype: "f32",
      opts: { isCausal: true },
      gpuOffsets: true,
      sinks: true,
    },
    { name: "full, GPU offsets, many chunks", dtype: "f32", opts: {}, gpuOffsets: true, splits: 64 },
    {
      name: "causal + window [5, 0], host offsets, many chunks",
      dtype: "f32",
      opts: { isCausal: true, windowSize: [5, 0] },
      gpuOffsets: false,
      splits: 64,
    },
    { name: "causal, host offsets", dtype: "f16", opts: { isCausal: true }, gpuOffsets: false },
    { name: "full, GPU offsets", dtype: "f16", opts: {}, gpuOffsets: true },
    // Blocks of 3 rows: a sequence's 8 rows (4 positions x group 2) span three, the last partial.
    {
      name: "causal, host offsets, row blocks of 3",
      dtype: "f32",
      opts: { isCausal: true },
      gpuOffsets: false,
      override: { rows: 3 },
    },
  ];
  const caps = info ? (await defaultRuntime())?.caps : undefined;
  for (const c of skvCases) {
    Deno.test({
      name:
        `packed batch on split-kv: lengths q ${lensQ} k ${lensK}, n${n}/${nKv} d${d} ${c.dtype}, ${c.name}, lse`,
      ignore: !info,
      async fn() {
        const { q, k, v, expected } = inputs(c.dtype);
        const options: AttentionOptions = {
          ...(c.opts as AttentionOptions),
          backend: "split-kv",
          cuSeqlensQ: c.gpuOffsets ? await gpuTensor(cuQ, [cuQ.length], "i32") : cuQ,
          cuSeqlensK: c.gpuOffsets ? await gpuTensor(cuK, [cuK.length], "i32") : cuK,
          ...(c.sinks ? { sinks } : {}),
        };
        assert.equal((await explain(q, k, v, options)).backend, "split-kv");
        const ref = expected(c.opts, c.sinks === true);
        splitKvTuning.splits = c.splits ?? null;
        splitKvTuning.override = c.override ?? null;
        debug.poisonOutputs = true;
        try {
          // Several chunks, some past the shorter sequences' keys; rows laid out for the longest
          // sequence (host offsets) or for total_q (GPU offsets: a bound).
          const p = resolveProblem(q, k, v, options);
          const config = chooseSplitKvConfig(p, caps!);
          assert.ok(typeof config !== "string" && config.varlen === true, String(config));
          const plan = splitKvPlan(p, config, caps!);
          assert.ok(plan.splits > 1 && plan.chunk > 3, JSON.stringify(plan));
          assert.equal(plan.rowsAll, (n / nKv) * (c.gpuOffsets ? totalQ : Math.max(...lensQ)));
          if (c.override?.rows) assert.equal(plan.rowBlocks, Math.ceil(plan.rowsAll / c.override.rows));
          const { out, lse } = await attentionWithLse(q, k, v, options);
          assert.deepEqual(out.shape, [totalQ, n, d]);
          assert.deepEqual(lse.shape, [n, totalQ]);
          const got = fromHostArray((out as HostTensor).data, c.dtype);
          check("out", got, ref.out, c.dtype === "f32" ? TOL.out : 4e-3);
          check("lse", (lse as HostTensor).data, ref.lse, TOL.lse);
        } finally {
          splitKvTuning.splits = null;
          splitKvTuning.override = null;
          debug.poisonOutputs = false;
        }
      },
    });
  }
  Deno.test({
    name: "packed batch on split-kv, rows loaded ahead at the depths the default does not take",
    ignore: !info,
    async fn() {
      const { q, k, v, expected } = inputs("f32");
      debug.poisonOutputs = true;
      try {
        for (const prefetch of ([0, 1, 2] as const).filter((x) => x !== splitKvTuning.prefetch)) {
          splitKvTuning.override = { prefetch };
          for (const isCausal of [false, true]) {
            const { out, lse } = await attentionWithLse(q, k, v, {
              backend: "split-kv",
              isCausal,
              cuSeqlensQ: await gpuTensor(cuQ, [cuQ.length], "i32"),
              cuSeqlensK: cuK,
            });
            const ref = expected({ isCausal }, false);
            check(
              `prefetch ${prefetch}, causal ${isCausal}: out`,
              (out as HostTensor).data,
              ref.out,
              TOL.out,
            );
            check(
              `prefetch ${prefetch}, causal ${isCausal}: lse`,
              (lse as HostTensor).data,
              ref.lse,
              TOL.lse,
            );
          }
        }
      } finally {
        splitKvTuning.override = null;
        debug.poisonOutputs = false;
      }
    },
  });
  Deno.test({
    name: "packed batch on split-kv: garbage GPU offsets are clamped into the tensors",
    ignore: !info,
    async fn() {
      const { q, k, v } = inputs("f32");
      const wild = (x: number[]) => gpuTensor(Int32Array.from(x), [x.length], "i32");
      for (
        const [wq, wk] of [
          [[0, 1 << 30, -5, 3, 2, 9, 1 << 30, -1], [0, 5, 1 << 30, -7, 200, 12, 3, 1 << 30]],
          [[-1, -1, 0, 0, 0, 0, 0, totalQ], [totalK, 0, totalK, 0, totalK, 0, totalK, 0]],
        ]
      ) {
        // Results are wrong, reads and writes stay in bounds: the device must not fault.
        await attentionWithLse(q, k, v, {
          backend: "split-kv",
          cuSeqlensQ: await wild(wq),
          cuSeqlensK: await wild(wk),
        });
      }
      // And the device still computes right afterwards.
      const { expected } = inputs("f32");
      const { out } = await attentionWithLse(q, k, v, {
        backend: "split-kv",
        cuSeqlensQ: cuQ,
        cuSeqlensK: cuK,
      });
      check("out after garbage offsets", (out as HostTensor).data, expected({}, false).out, TOL.out);
    },
  });
  Deno.test({
    name: "packed batch: a decode batch (one query row per sequence) is routed to split-kv",
    ignore: !info,
    async fn() {
      const { k, v } = inputs("f32");
      const ones = lensK.map(() => 1);
      const q = { data: new Float32Array(ones.length * n * d).fill(0.5), shape: [ones.length, n, d] };
      const e = await explain(q, k, v, { cuSeqlensQ: offsetsOf(ones), cuSeqlensK: cuK });
      assert.equal(e.backend, "split-kv");
      // This block's batch (up to 4 rows per sequence) is decode-like too.
      const { q: q4 } = inputs("f32");
      assert.equal((await explain(q4, k, v, { cuSeqlensQ: cuQ, cuSeqlensK: cuK })).backend, "split-kv");
    },
  });
}

// ---- paged caches -----------------------------------------------------------------------------

{
  const [b, n, nKv, d, page, numPages, maxPages] = [3, 4, 2, 32, 16, 12, 4];
  const lens = [37, 16, 50];
  const random = rng(11);
  // Dense caches per batch, scattered over shuffled pages.
  const dense = lens.map((s) => ({
    k: randomLogical({ b: 1, n: nKv, s, d }, random),
    v: randomLogical({ b: 1, n: nKv, s, d }, random),
  }));
  const order = [7, 2, 10, 0, 5, 11, 3, 8, 1, 9, 4, 6];
  const table = new Int32Array(b * maxPages).fill(-1); // unused entries: no page
  let next = 0;
  lens.forEach((s, i) => {
    for (let j = 0; j < Math.ceil(s / page); j++) table[i * maxPages + j] = order[next++];
  });
  const pool = (which: "k" | "v") => {
    const data = new Float32Array(numPages * page * nKv * d).fill(NaN); // untouched rows poison a wrong read
    lens.forEach((s, i) => {
      const rows = bsnd(dense[i][which], 0, 0, s);
      for (let j = 0; j < s; j++) {
        const at = (table[i * maxPages + Math.floor(j / page)] * page + (j % page)) * nKv * d;
        data.set(rows.subarray(j * nKv * d, (j + 1) * nKv * d), at);
      }
    });
    return { data, shape: [numPages, page, nKv, d] };
  };
  const kP = pool("k"), vP = pool("v");
  const blockTable = { data: table, shape: [b, maxPages] };
  const cacheSeqlens = Int32Array.from(lens);
  const expected = (q: Logical, opts: RefOptions) => {
    const sQ = q.sizes.s;
    const out = new Float64Array(b * n * sQ * d), lse = new Float64Array(b * n * sQ);
    lens.forEach((_, i) => {
      const qi: Logical = {
        data: q.data.slice(i * n * sQ * d, (i + 1) * n * sQ * d),
        sizes: { ...q.sizes, b: 1 },
      };
      const r = referenceAttention(qi, dense[i].k, dense[i].v, opts);
      out.set(r.out, i * n * sQ * d);
      lse.set(r.lse, i * n * sQ);
    });
    return { out, lse };
  };
  const cases = [
    { name: "decode", sQ: 1, opts: {} },
    { name: "prefill of 5, causal", sQ: 5, opts: { isCausal: true } },
    // The window starts inside a page: a kernel step's keys then cross into the next page.
    {
      name: "decode, window of 23",
      sQ: 1,
      opts: { isCausal: true, windowSize: [23, 0] as [number, number] },
    },
  ];
  for (const backend of ["cpu", ...(info ? ["split-kv", "flash"] : [])]) {
    for (const c of cases) {
      Deno.test(`paged cache on ${backend}: b${b} n${n}/${nKv} d${d} pages of ${page}, lengths ${lens}, ${c.name}`, async () => {
        const q = randomLogical({ b, n, s: c.sQ, d }, rng(c.sQ));
        const ref = expected(q, c.opts);
        const { out, lse } = await attentionWithLse(host(q), kP, vP, {
          ...c.opts,
          blockTable,
          cacheSeqlens,
          backend,
        });
        check("out", out.data, ref.out, TOL.out);
        check("lse", lse.data, ref.lse, TOL.lse);
      });
    }
  }
  Deno.test(
    "paged cache on split-kv, rows and table entries loaded ahead (the depths the default does not take)",
    {
      ignore: !info,
    },
    async () => {
      try {
        for (const prefetch of ([0, 1, 2] as const).filter((x) => x !== splitKvTuning.prefetch)) {
          splitKvTuning.override = { prefetch };
          for (const c of cases) {
            const q = randomLogical({ b, n, s: c.sQ, d }, rng(c.sQ));
            const ref = expected(q, c.opts);
            const { out, lse } = await attentionWithLse(host(q), kP, vP, {
              ...c.opts,
              blockTable,
              cacheSeqlens,
              backend: "split-kv",
            });
            check(`prefetch ${prefetch}, ${c.name}: out`, out.data, ref.out, TOL.out);
            check(`prefetch ${prefetch}, ${c.name}: lse`, lse.data, ref.lse, TOL.lse);
          }
        }
      } finally {
        splitKvTuning.override = null;
      }
    },
  );
  Deno.test("paged cache: GPU table and lengths (bad entries clamped), decode routed to split-kv", {
    ignore: !info,
  }, async () => {
    const q = randomLogical({ b, n, s: 1, d }, rng(3));
    const ref = expected(q, {});
    const options: AttentionOptions = {
      blockTable: await gpuTensor(table, [b, maxPages], "i32"),
      cacheSeqlens: await gpuTensor(cacheSeqlens, [b], "i32"),
    };
    const e = await explain(host(q), kP, vP, options);
    assert.equal(e.backend, "split-kv");
    const { out } = await attentionWithLse(host(q), kP, vP, options);
    check("out", out.data, ref.out, TOL.out);
    // Garbage lengths and entries: clamped into the table and the pool (results wrong, reads in bounds).
    const wild = {
      blockTable: await gpuTensor(Int32Array.from(table, (x) => x < 0 ? 1 << 30 : x), [b, maxPages], "i32"),
      cacheSeqlens: await gpuTensor(Int32Array.from([1 << 30, -5, 64]), [b], "i32"),
    };
    await attentionWithLse(host(q), kP, vP, wild); // must not fault the device
  });
  Deno.test("paged cache: bad tables and lengths refused before any work", async () => {
    const q = host(randomLogical({ b, n, s: 1, d }, rng(4)));
    const bad: [AttentionOptions, RegExp][] = [
      [{
        blockTable: { data: Int32Array.from(table, (x, i) => i === 1 ? 12 : x), shape: [b, maxPages] },
        cacheSeqlens,
      }, /names no page/],
      [{ blockTable, cacheSeqlens: Int32Array.from([37, 16, 65]) }, /outside its block table/],
      [{ blockTable: { data: table, shape: [b + 1, maxPages - 1] }, cacheSeqlens }, /\[b, max_pages\]/],
      [{ blockTable }, /needs both/],
    ];
    for (const [options, message] of bad) {
      await assert.rejects(
        attentionWithLse(q, kP, vP, options),
        (e: unknown) => e instanceof WgattnError && message.test(e.message),
        String(message),
      );
    }
    const odd = { data: new Float32Array(4 * 24 * nKv * d), shape: [4, 24, nKv, d] };
    await assert.rejects(
      attentionWithLse(q, odd, odd, { blockTable, cacheSeqlens }),
      (e: unknown) => e instanceof WgattnError && /multiple of 16/.test(e.message),
    );
  });
  Deno.test(
    "appendKvCache: new rows land through the table, lengths advance on the GPU",
    { ignore: !info },
    async () => {
      const device = (await getDevice())!;
      const sNew = 3;
      const fresh = (p: { data: Float32Array; shape: number[] }) => gpuTensor(p.data, p.shape, "f32");
      const kC = await fresh(kP), vC = await fresh(vP);
      const newK = randomLogical({ b, n: nKv, s: sNew, d }, rng(21));
      const newV = randomLogical({ b, n: nKv, s: sNew, d }, rng(22));
      const rows = (t: Logical) => {
        const out = new Float32Array(b * sNew * nKv * d);
        for (let i = 0; i < b; i++) {
          const one: Logical = {
            data: t.data.slice(i * nKv * sNew * d, (i + 1) * nKv * sNew * d),
            sizes: { ...t.sizes, b: 1 },
          };
          out.set(bsnd(one, 0, 0, sNew), i * sNew * nKv * d);
        }
        return { data: out, shape: [b, sNew, nKv, d] };
      };
      // Batch 1 fills its page exactly: its new rows open the next one.
      const table2 = Int32Array.from(table);
      table2[1 * maxPages + 1] = order[next];
      const lensGpu = await gpuTensor(cacheSeqlens, [b], "i32");
      const tableGpu = await gpuTensor(table2, [b, maxPages], "i32");
      await appendKvCache(rows(newK), rows(newV), kC, vC, {
        blockTable: tableGpu,
        cacheSeqlens: lensGpu,
        advance: true,
      });
      const lensAfter = new Int32Array((await readF32(lensGpu, b)).buffer);
      assert.deepEqual([...lensAfter], lens.map((x) => x + sNew));
      const q = randomLogical({ b, n, s: 1, d }, rng(5));
      const { out } = await attentionWithLse(host(q), kC, vC, {
        blockTable: tableGpu,
        cacheSeqlens: lensGpu,
      });
      // Reference: each dense cache with the new rows appended.
      const sQ = 1;
      const want = new Float64Array(b * n * d);
      lens.forEach((s, i) => {
        const grow = (old: Logical, add: Logical): Logical => {
          const data = new Float64Array(nKv * (s + sNew) * d);
          for (let h = 0; h < nKv; h++) {
            data.set(old.data.subarray(h * s * d, (h + 1) * s * d), h * (s + sNew) * d);
            data.set(
              add.data.subarray((i * nKv + h) * sNew * d, (i * nKv + h + 1) * sNew * d),
              (h * (s + sNew) + s) * d,
            );
          }
          return { data, sizes: { b: 1, n: nKv, s: s + sNew, d } };
        };
        const qi: Logical = {
          data: q.data.slice(i * n * sQ * d, (i + 1) * n * sQ * d),
          sizes: { ...q.sizes, b: 1 },
        };
        want.set(referenceAttention(qi, grow(dense[i].k, newK), grow(dense[i].v, newV)).out, i * n * d);
      });
      check("out after append", out.data, want, TOL.out);
      void device;
    },
  );
}
