/**
 * `sage` (int8 Q·Kᵀ with smoothed K) against the float64 reference: cosine similarity at least
 * 0.999 and relative L1 under 0.03 per call, printed, on random inputs and on inputs whose K has
 * outlier channels (the case smoothing exists for); causal, window, GQA, key padding, lse, the
 * three dtypes and forced tile shapes; NaN and Inf reach their quantization block and no more.
 * Also: when the router picks it by itself (long 16-bit calls), and that the flash kernel's f32
 * text does not change with the int8 mode.
 */
import { engineAdapter } from "../engines/select.ts";
import assert from "node:assert/strict";
import { BACKENDS } from "../backends/registry.ts";
import { emulatingMma, sageMmaBackend } from "../backends/sage_mma.ts";
import {
  chooseSageConfig,
  SAGE_MIN_SEQ,
  SAGE_UNSUITED_F32,
  sageBackend,
  sageTuning,
} from "../backends/sage.ts";
import { defaultRuntime, restrictLimits } from "../core/device.ts";
import { debug } from "../core/gpu.ts";
import { resolveProblem } from "../core/problem.ts";
import { BACKEND_FAMILIES, decide, lookupBackend } from "../core/router.ts";
import type { AttentionOptions, DType, HostTensor } from "../core/types.ts";
import { attentionWithLse, explain } from "../mod.ts";
import { type FlashConfig, flashKernel } from "../wgsl/flash.ts";
import { sageQuantKernel } from "../wgsl/sage.ts";
import {
  OUTLIER_OFFSET,
  outlierChannels,
  sageAccuracy,
  type Similarity,
  similarity,
} from "../bench/sage_accuracy.ts";
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

const rt = await defaultRuntime();
const caps = rt?.caps ?? null;
const skip = !caps ? "no WebGPU adapter" : !caps.packedInt8Dot ? "no dot4I8Packed on this device" : "";

const MIN_COSINE = 0.999, MAX_REL_L1 = 0.03;

interface Case {
  name: string;
  b: number;
  n: number;
  nKv?: number;
  sQ: number;
  sKv?: number;
  d: number;
  dtype: DType;
  outliers: boolean;
  isCausal?: boolean;
  windowSize?: number | [number, number];
  /** Valid keys per batch. */
  keyPadding?: number[];
  lse?: boolean;
  /** Forced tile parameters. */
  tiles?: Partial<FlashConfig>;
}

const CASES: Case[] = [
  { name: "random", b: 2, n: 2, sQ: 77, d: 64, dtype: "f32", outliers: false },
  { name: "random", b: 1, n: 2, sQ: 100, d: 128, dtype: "f16", outliers: false, isCausal: true },
  {
    name: "random",
    b: 1,
    n: 4,
    nKv: 2,
    sQ: 50,
    sKv: 90,
    d: 64,
    dtype: "bf16",
    outliers: false,
    windowSize: [16, 4],
  },
  { name: "K outliers", b: 1, n: 2, sQ: 96, d: 64, dtype: "f32", outliers: true },
  {
    name: "K outliers",
    b: 1,
    n: 2,
    sQ: 40,
    sKv: 90,
    d: 128,
    dtype: "f16",
    outliers: true,
    isCausal: true,
    lse: true,
  },
  { name: "K outliers", b: 1, n: 4, nKv: 2, sQ: 77, d: 64, dtype: "bf16", outliers: true, windowSize: 8 },
  {
    name: "K outliers",
    b: 2,
    n: 2,
    sQ: 33,
    sKv: 70,
    d: 64,
    dtype: "f32",
    outliers: true,
    keyPadding: [70, 25],
    lse: true,
  },
  {
    name: "K outliers, tiles 16x16, dk 16 (3 K stages)",
    b: 1,
    n: 2,
    sQ: 45,
    d: 40,
    dtype: "f32",
    outliers: true,
    isCausal: true,
    lse: true,
    tiles: { br: 16, bc: 16, rt: 4, ct: 4, vc: 4, dk: 16 },
  },
  {
    name: "K outliers, tiles 16x32, dk 32 (4 K stages), 8x4 warps",
    b: 1,
    n: 2,
    sQ: 40,
    sKv: 70,
    d: 128,
    dtype: "f16",
    outliers: true,
    windowSize: [6, 2],
    tiles: { br: 16, bc: 32, rt: 4, ct: 16, vc: 8, dk: 32, swizzle: true },
  },
  {
    name: "K outliers, subgroup row max",
    b: 1,
    n: 2,
    sQ: 50,
    d: 64,
    dtype: "f32",
    outliers: true,
    isCausal: true,
    lse: true,
    tiles: { br: 32, bc: 32, rt: 8, ct: 8, vc: 16, subgroups: caps?.subgroupDirective ?? "" },
  },
];

function label(c: Case): string {
  const parts = [
    c.name,
    c.dtype,
    `b${c.b} n${c.n}${c.nKv ? `/kv${c.nKv}` : ""} s${c.sQ}${c.sKv ? `x${c.sKv}` : ""} d${c.d}`,
  ];
  if (c.isCausal) parts.push("causal");
  if (c.windowSize !== undefined) parts.push(`window=${JSON.stringify(c.windowSize)}`);
  if (c.keyPadding) parts.push(`keyPadding [${c.keyPadding}]`);
  if (c.lse) parts.push("lse");
  return parts.join(" ");
}

/** Random inputs (K with ±OUTLIER_OFFSET on a few channels), rounded to the dtype. */
function inputs(c: Case) {
  const random = rng(c.sQ * 131 + c.d * 7 + (c.outliers ? 1 : 0));
  const nKv = c.nKv ?? c.n, sKv = c.sKv ?? c.sQ;
  const q = randomLogical({ b: c.b, n: c.n, s: c.sQ, d: c.d }, random);
  const k = randomLogical({ b: c.b, n: nKv, s: sKv, d: c.d }, random);
  const v = randomLogical({ b: c.b, n: nKv, s: sKv, d: c.d }, random);
  if (c.outliers) {
    outlierChannels(c.d).forEach((ch, i) => {
      const offset = i % 2 === 0 ? OUTLIER_OFFSET : -OUTLIER_OFFSET;
      for (let r = 0; r < k.data.length / c.d; r++) k.data[r * c.d + ch] += offset;
    });
  }
  const round = (t: Logical): Logical => ({ data: roundTo(t.data, c.dtype), sizes: t.sizes });
  return { q: round(q), k: round(k), v: round(v) };
}

/** Runs a case on sage; returns output similarity and the lse's largest error. */
async function run(c: Case): Promise<Similarity & { lseErr: number }> {
  const { q, k, v } = inputs(c);
  const host = (t: Logical): HostTensor => ({
    data: toHostArray(t.data, c.dtype),
    shape: [t.sizes.b, t.sizes.n, t.sizes.s, t.sizes.d],
    dtype: c.dtype,
  });
  const options: AttentionOptions = { backend: "sage" };
  const ref: RefOptions = {};
  if (c.isCausal) options.isCausal = ref.isCausal = true;
  if (c.windowSize !== undefined) options.windowSize = ref.windowSize = c.windowSize;
  if (c.keyPadding) {
    const sKv = c.sKv ?? c.sQ;
    const data = new Uint8Array(c.b * sKv);
    c.keyPadding.forEach((len, r) => data.fill(1, r * sKv, r * sKv + len));
    options.keyPaddingMask = ref.keyPaddingMask = { data, shape: [c.b, sKv] };
  }
  const expected = referenceAttention(q, k, v, ref);
  sageTuning.override = c.tiles ?? null;
  debug.poisonOutputs = true;
  try {
    const { out, lse } = await attentionWithLse(host(q), host(k), host(v), options);
    const s = similarity(fromHostArray((out as HostTensor).data, c.dtype), expected.out);
    const lseErr = errorStats((lse as HostTensor).data, expected.lse).maxAbs;
    return { ...s, lseErr };
  } finally {
    sageTuning.override = null;
    debug.poisonOutputs = false;
  }
}

const report = (what: string, s: Similarity) =>
  console.log(`  ${what}: cosine ${s.cosine.toFixed(6)}, relative L1 ${s.relL1.toFixed(5)}`);

for (const c of CASES) {
  Deno.test({
    name: `sage accuracy: ${label(c)}${skip ? ` [skipped: ${skip}]` : ""}`,
    ignore: skip !== "",
    async fn() {
      const r = await run(c);
      report(label(c), r);
      assert.ok(r.cosine >= MIN_COSINE, `cosine ${r.cosine} < ${MIN_COSINE}`);
      assert.ok(r.relL1 < MAX_REL_L1, `relative L1 ${r.relL1} >= ${MAX_REL_L1}`);
      // The smoothing shifts the lse by scale * q . mean(k); the kernel adds it back.
      if (c.lse) assert.ok(r.lseErr < 0.02, `lse max abs error ${r.lseErr}`);
    },
  });
}

Deno.test({
  name: `sage: smoothing is what keeps K outliers accurate${skip ? ` [skipped: ${skip}]` : ""}`,
  ignore: skip !== "",
  async fn() {
    const c = CASES[3];
    const smoothed = await run(c);
    sageTuning.smooth = false;
    let raw: Similarity;
    try {
      raw = await run(c);
    } finally {
      sageTuning.smooth = true;
    }
    report(`${label(c)}, smoothed`, smoothed);
    report(`${label(c)}, not smoothed`, raw);
    assert.ok(raw.relL1 > 5 * smoothed.relL1, "without smoothing the outlier channels should cost accuracy");
  },
});

Deno.test({
  name: `sage: a call past the binding limit, cut into key ranges merged by lse${
    skip ? ` [skipped: ${skip}]` : ""
  }`,
  ignore: skip !== "",
  async fn() {
    // Each key range is smoothed by its own mean: its lse must be right for the merge.
    const adapter = (await engineAdapter())!;
    const device = await adapter.requestDevice();
    await restrictLimits(device, { maxStorageBufferBindingSize: 1 << 14 });
    try {
      const c: Case = {
        name: "K outliers",
        b: 1,
        n: 2,
        sQ: 40,
        sKv: 200,
        d: 64,
        dtype: "f32",
        outliers: true,
      };
      const { q, k, v } = inputs(c);
      const host = (t: Logical): HostTensor => ({
        data: Float32Array.from(t.data),
        shape: [t.sizes.b, t.sizes.n, t.sizes.s, t.sizes.d],
      });
      const options: AttentionOptions = { backend: "sage", device, isCausal: true };
      assert.equal((await explain(host(q), host(k), host(v), options)).split?.level, "key");
      const { out, lse } = await attentionWithLse(host(q), host(k), host(v), options);
      const expected = referenceAttention(q, k, v, { isCausal: true });
      const r = similarity((out as HostTensor).data, expected.out);
      report(`${label(c)} causal, cut into key ranges`, r);
      assert.ok(r.cosine >= MIN_COSINE && r.relL1 < MAX_REL_L1);
      assert.ok(errorStats((lse as HostTensor).data, expected.lse).maxAbs < 0.02);
    } finally {
      device.destroy();
    }
  },
});

Deno.test({
  name: `sage: bench/sage_accuracy.ts on a small shape${skip ? ` [skipped: ${skip}]` : ""}`,
  ignore: skip !== "",
  async fn() {
    for (const dtype of ["f32", "f16"] as const) {
      const r = await sageAccuracy({ s: 128, d: 64, dtype, causal: true, outliers: true, rows: 64 });
      report(`sageAccuracy ${dtype} s128 d64 causal K outliers (${r.rowsChecked} rows)`, r);
      assert.ok(r.cosine >= MIN_COSINE && r.relL1 < MAX_REL_L1);
    }
  },
});

interface PoisonCase {
  name: string;
  tensor: "q" | "k";
  head: number;
  row: number;
  value: number;
  isCausal: boolean;
}

const POISON: PoisonCase[] = [
  { name: "NaN in k, causal", tensor: "k", head: 0, row: 70, value: NaN, isCausal: true },
  { name: "+Inf in k, causal", tensor: "k", head: 1, row: 100, value: Infinity, isCausal: true },
  { name: "NaN in k", tensor: "k", head: 0, row: 3, value: NaN, isCausal: false },
  { name: "-Inf in q", tensor: "q", head: 1, row: 40, value: -Infinity, isCausal: true },
];

for (const c of POISON) {
  Deno.test({
    name: `sage NaN/Inf: ${c.name} reaches the rows of its quantization block, the others stay right${
      skip ? ` [skipped: ${skip}]` : ""
    }`,
    ignore: skip !== "",
    async fn() {
      const B = 1, N = 2, S = 150, D = 64;
      const random = rng(c.row * 17 + D);
      const q = randomLogical({ b: B, n: N, s: S, d: D }, random);
      const k = randomLogical({ b: B, n: N, s: S, d: D }, random);
      const v = randomLogical({ b: B, n: N, s: S, d: D }, random);
      ({ q, k })[c.tensor].data[(c.head * S + c.row) * D + 5] = c.value;
      const host = (t: Logical): HostTensor => ({ data: Float32Array.from(t.data), shape: [B, N, S, D] });
      const hq = host(q), hk = host(k), hv = host(v);
      const config = chooseSageConfig(resolveProblem(hq, hk, hv, { isCausal: c.isCausal }), caps!, false);
      assert.ok(typeof config !== "string", String(config));
      // The block the bad value was quantized with: br query rows of q, bc keys of k.
      const size = c.tensor === "q" ? config.br : config.bc;
      const start = Math.floor(c.row / size) * size, end = Math.min(start + size, S);
      const reached = (i: number) =>
        c.tensor === "q" ? i >= start && i < end : c.isCausal ? i >= start : true; // causal: keys j <= i
      debug.poisonOutputs = true;
      let out: Float32Array;
      try {
        out = (await attentionWithLse(hq, hk, hv, { backend: "sage", isCausal: c.isCausal })).out
          .data as Float32Array;
      } finally {
        debug.poisonOutputs = false;
      }
      const expected = referenceAttention(q, k, v, { isCausal: c.isCausal }).out;
      const clean: number[] = [], cleanExpected: number[] = [];
      for (let h = 0; h < N; h++) {
        for (let i = 0; i < S; i++) {
          const row = out.subarray((h * S + i) * D, (h * S + i + 1) * D);
          if (h === c.head && reached(i)) {
            assert.ok(row.every(Number.isNaN), `head ${h} row ${i}: expected NaN, got ${row.slice(0, 4)}`);
          } else {
            assert.ok(
              row.every(Number.isFinite),
              `head ${h} row ${i}: expected finite, got ${row.slice(0, 4)}`,
            );
            clean.push(...row);
            cleanExpected.push(...expected.subarray((h * S + i) * D, (h * S + i + 1) * D));
          }
        }
      }
      const sim = similarity(clean, cleanExpected);
      report(`${c.name}: ${clean.length / D} clean rows (block of ${size} from ${start})`, sim);
      assert.ok(sim.cosine >= MIN_COSINE && sim.relL1 < MAX_REL_L1);
    },
  });
}

Deno.test("sage: the router picks it for long 16-bit calls, by name otherwise", async () => {
  const t = (dtype: "f32" | "f16", s: number) =>
    dtype === "f32"
      ? { data: new Float32Array(2 * s * 64), shape: [1, 2, s, 64] }
      : { data: new Float16Array(2 * s * 64), shape: [1, 2, s, 64] };
  const problem = (dtype: "f32" | "f16", s: number) => resolveProblem(t(dtype, s), t(dtype, s), t(dtype, s));
  // DiffSynth's names stand for the family: the best member this device has (sage-mma needs int8
  // subgroup matrices; tests/sage_mma_test.ts checks the choice on a device that has them).
  assert.deepEqual(BACKEND_FAMILIES.sage_attention, ["sage-mma", "sage"]);
  assert.deepEqual(BACKEND_FAMILIES.sageattention, ["sage-mma", "sage"]);
  assert.equal(lookupBackend(BACKENDS, "sage_int8", "x"), sageBackend);
  const names = BACKENDS.map((b) => b.name);
  assert.ok(names.indexOf("sage") < Math.min(names.indexOf("flash"), names.indexOf("flash-subgroup")));
  if (!caps) return;
  const f32 = problem("f32", 64), short = problem("f16", 64), long = problem("f16", SAGE_MIN_SEQ);
  assert.deepEqual(sageBackend.unsuitedReasons!(f32, caps), [SAGE_UNSUITED_F32]);
  assert.match(sageBackend.unsuitedReasons!(short, caps).join(), /pre-pass does not pay off/);
  assert.deepEqual(sageBackend.unsuitedReasons!(long, caps), []);
  if (!emulatingMma() && caps.subgroupMatrixConfigs.length === 0) {
    const named = decide(long, caps, BACKENDS, { requested: "sage_attention" });
    assert.equal(named.backend.name, "sage");
    assert.match(named.chain[0].reasons.join(), /no int8 subgroup matrices/);
  }
  const sharp = resolveProblem(t("f16", SAGE_MIN_SEQ), t("f16", SAGE_MIN_SEQ), t("f16", SAGE_MIN_SEQ), {
    scale: -0.5, // 4x the default 1/8 at d = 64
  });
  assert.match(sageBackend.unsuitedReasons!(sharp, caps).join(), /4\.0x the default/);
  assert.notEqual(decide(f32, caps, BACKENDS).backend.name, "sage");
  assert.notEqual(decide(short, caps, BACKENDS).backend.name, "sage");
  // Every other GPU backend unable: the router still passes sage over for f32.
  const others = BACKENDS.filter((b) => b.kind === "cpu" || b === sageBackend);
  const d = decide(f32, caps, others);
  assert.equal(d.backend.name, "cpu");
  if (skip) return;
  // sage-mma comes first where the device has int8 subgroup matrices and takes the call (the H200).
  const mmaTakes = sageMmaBackend.unsupportedReasons(long, caps).length === 0 &&
    (sageMmaBackend.unsuitedReasons?.(long, caps) ?? []).length === 0;
  assert.equal(decide(long, caps, BACKENDS).backend.name, mmaTakes ? "sage-mma" : "sage");
  assert.deepEqual(d.chain[0], { backend: "sage", chosen: false, reasons: [SAGE_UNSUITED_F32] });
  assert.equal(decide(f32, caps, BACKENDS, { variable: "sage" }).backend.name, "sage");
  assert.equal(decide(f32, caps, BACKENDS, { requested: "sage" }).backend.name, "sage");
  await Promise.resolve();
});

/** A flash config the kernel-text tests below vary. */
const TEXT_BASE: FlashConfig = {
  dtype: "f16",
  f16: false,
  d: 64,
  br: 32,
  bc: 64,
  rt: 8,
  ct: 16,
  dk: 32,
  vc: 16,
  band: true,
  keyPadding: true,
  lse: true,
  subgroups: false,
  swizzle: true,
};

Deno.test("sage: flash's f32 kernel text is the same with qk f32 or unset; int8 has its own key", () => {
  const base = TEXT_BASE;
  const plain = flashKernel(base), f32 = flashKernel({ ...base, qk: "f32" });
  const int8 = flashKernel({ ...base, qk: "int8" });
  assert.equal(f32.code, plain.code);
  assert.equal(f32.key, plain.key);
  assert.deepEqual(f32.bindings, plain.bindings);
  assert.notEqual(int8.key, plain.key);
  assert.match(int8.code, /dot4I8Packed/);
  assert.deepEqual(int8.bindings, ["q8", "k8", "v", "o", "mask", "lse", "q_scale", "k_scale", "lse_bias"]);
});

Deno.test("sage: a packed batch's kernels bind the offsets and work lists; paged caches stay refused", () => {
  const base: FlashConfig = { ...TEXT_BASE, keyPadding: false, qk: "int8" };
  const packed = flashKernel({ ...base, varlen: true });
  // backends/sage.ts counts these against maxStorageBuffersPerShaderStage.
  assert.deepEqual(packed.bindings, [
    "q8",
    "k8",
    "v",
    "o",
    "lse",
    "q_scale",
    "k_scale",
    "lse_bias",
    "cuq",
    "cuk",
    "wl",
    "wlk",
  ]);
  assert.ok(packed.uniforms.some(([name]) => name === "k_items"));
  assert.ok(!flashKernel(base).uniforms.some(([name]) => name === "k_items"));
  assert.throws(() => flashKernel({ ...base, page: 16 }), /paged caches no int8 scores/);
  assert.throws(() => flashKernel({ ...base, varlen: true, keyPadding: true }), /no masks/);
  const quant = sageQuantKernel({
    dtype: "f16",
    f16: false,
    d: 64,
    rows: 32,
    smooth: false,
    bias: true,
    varlen: true,
  });
  assert.deepEqual(quant.bindings, ["x", "x8", "x_scale", "mean", "bias", "cu", "wl"]);
  assert.match(quant.key, /:vl$/);
});
