/**
 * `flash-mma` (exact attention on int8 matrix tiles, Ozaki-style slices) against the float64
 * reference, side by side with `flash`: each case prints both backends' max abs and relative L2
 * error and holds flash-mma within 2x of flash's (plus 2^-24 of slack for calls where both are at a
 * few roundings) and never above 1e-6 max abs for inputs in [-1, 1]. Odd sizes, GQA, causal,
 * window, key padding, lse, layouts, a padded head dim, a decode step, f16 (two slices), four slices
 * and a maximum pass on fewer products (the proven margin). Runs the emulated form on any adapter
 * (forced here, so that CI covers it without WGATTN_EMULATE_MMA), or the real one where the device
 * has int8 subgroup matrices; also the generator's text, cache keys, the overflow bound and when the
 * router picks it.
 */
import assert from "node:assert/strict";
import { BACKENDS } from "../backends/registry.ts";
import {
  chooseFlashMmaConfig,
  FLASH_MMA_MIN_SEQ,
  flashMmaBackend,
  flashMmaTuning,
  maxKernelConfig,
} from "../backends/flash_mma.ts";
import { realMmaReasons } from "../backends/sage_mma.ts";
import type { Capabilities } from "../core/device.ts";
import { defaultRuntime } from "../core/device.ts";
import { debug } from "../core/gpu.ts";
import { resolveProblem } from "../core/problem.ts";
import { decide } from "../core/router.ts";
import { FAKE_MMA_DEVICE } from "./fake_mma_device.ts";
import type { AttentionOptions, DType, HostTensor } from "../core/types.ts";
import { attentionWithLse, explain } from "../mod.ts";
import {
  type FlashMmaConfig,
  flashMmaKernel,
  flashMmaMaxKeys,
  maxPassMargin,
  sliceOrderGroups,
  sliceProducts,
} from "../wgsl/flash_mma.ts";
import {
  errorStats,
  fromHostArray,
  fromLayout,
  layOut,
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
// The real form where the device has it, else the emulated one (plain WGSL, any adapter).
const real = caps !== null && realMmaReasons(caps).length === 0 && flashMmaTuning.emulate !== true;
const form = real ? "real" : "emulated";
const skip = caps ? "" : "no WebGPU adapter";

interface Case {
  name: string;
  b: number;
  n: number;
  nKv?: number;
  sQ: number;
  sKv?: number;
  d: number;
  dtype?: DType;
  isCausal?: boolean;
  windowSize?: number | [number, number];
  keyPadding?: number[];
  layout?: string;
  scale?: number;
  /** Inputs times this (default 1: values in [-1, 1]). */
  amplitude?: number;
  tiles?: Partial<FlashMmaConfig>;
  /** Why the case does not run on Deno's own engine (wgpu/Naga), if it does not. */
  notOnDeno?: string;
}

/**
 * Mesa 22's lavapipe (where CI runs Deno's engine) computes the emulated form wrong past a few key
 * tiles, as it does sage-mma's (README, Tests): at d 64 from the fourth 32-key tile on at order 2
 * (b1 n1 s16x128: relative L2 1.0), from the third at order 3 (s16x65); Dawn on Mesa 25 gets both
 * right (max abs 3.5e-8 and 5.4e-8), and so does Deno's engine (Naga) on Mesa 25's lavapipe (the
 * five-tile and order-3 cases below: max abs 3.4e-8 and 4.7e-8), so the fault is Mesa 22's, not
 * Naga's or the kernel's. The cases here stay within three tiles; the order-3 one runs on Dawn only.
 */
const ORDER3_ON_DENO =
  "order-3 kernels give wrong results on Deno's engine with Mesa 22 lavapipe (right on Dawn)";
/**
 * The limit above, for the case that goes past three tiles: wrong on Deno's engine from s_kv 97 on
 * for every layout (staged or not, one or two subgroups a block), right on Dawn and on the H200's
 * real form.
 */
const PAST_THREE_TILES_ON_DENO =
  "the emulated kernel past three key tiles gives wrong results on Deno's engine with Mesa 22 lavapipe (right on Dawn)";

/**
 * Kernels are shared where cases can (dtype, d and the band/key-padding flags pick the kernel): a
 * new kernel takes seconds to build on a software adapter. The shared suite (conformance/cases.ts)
 * runs the other shapes with WGATTN_EMULATE_MMA=1.
 */
const CASES: Case[] = [
  { name: "odd sizes", b: 1, n: 2, sQ: 37, sKv: 70, d: 64 },
  {
    name: "b s n d layout, GQA, scale -0.3",
    b: 2,
    n: 2,
    nKv: 1,
    sQ: 33,
    sKv: 40,
    d: 64,
    layout: "b s n d",
    scale: -0.3,
  },
  { name: "inputs in [-8, 8]", b: 1, n: 2, sQ: 37, sKv: 70, d: 64, amplitude: 8 },
  {
    name: "the maximum pass as a kernel of its own (eight blocks a workgroup), GQA, causal",
    b: 1,
    n: 4,
    nKv: 2,
    sQ: 70,
    sKv: 77,
    d: 64,
    isCausal: true,
    tiles: { maxPass: "read" },
  },
  {
    name: "five key tiles, the last ragged",
    b: 1,
    n: 2,
    sQ: 40,
    sKv: 150,
    d: 64,
    notOnDeno: PAST_THREE_TILES_ON_DENO,
  },
  { name: "GQA, causal", b: 1, n: 4, nKv: 2, sQ: 33, sKv: 47, d: 64, isCausal: true },
  { name: "window", b: 1, n: 2, sQ: 50, sKv: 77, d: 64, windowSize: [16, 4] },
  { name: "key padding, causal", b: 2, n: 1, sQ: 20, sKv: 45, d: 64, keyPadding: [45, 13], isCausal: true },
  { name: "padded head dim", b: 1, n: 2, sQ: 17, sKv: 30, d: 40 },
  { name: "decode step", b: 1, n: 2, sQ: 1, sKv: 77, d: 64 },
  { name: "f16, two slices", b: 1, n: 2, sQ: 33, sKv: 40, d: 64, dtype: "f16" },
  {
    name: "four slices, products to order 3",
    b: 1,
    n: 2,
    sQ: 37,
    sKv: 70,
    d: 64,
    tiles: { slices: 4, order: 3, maxOrder: 3 },
    notOnDeno: ORDER3_ON_DENO,
  },
  {
    name: "K and V staged in workgroup memory, two subgroups a block, GQA, causal",
    b: 1,
    n: 4,
    nKv: 2,
    sQ: 33,
    sKv: 47,
    d: 64,
    isCausal: true,
    tiles: { stage: "kv", split: 2, warps: 2 },
  },
  {
    name: "two subgroups a block (split 2), unstaged, key padding",
    b: 2,
    n: 1,
    sQ: 37,
    sKv: 70,
    d: 64,
    keyPadding: [70, 29],
    tiles: { split: 2, warps: 4, stage: undefined },
  },
  {
    name: "four subgroups a block (split 4, 64-key tiles), GQA, causal",
    b: 1,
    n: 4,
    nKv: 2,
    sQ: 33,
    sKv: 47,
    d: 64,
    isCausal: true,
    tiles: { split: 4, warps: 4, bc: 64 },
  },
  {
    name: "exact maximum pass (every product)",
    b: 1,
    n: 2,
    sQ: 37,
    sKv: 70,
    d: 64,
    tiles: { maxOrder: 2 },
  },
  {
    name: "maximum pass on order 0 only (with its margin)",
    b: 1,
    n: 2,
    sQ: 37,
    sKv: 70,
    d: 64,
    tiles: { maxOrder: 0 },
  },
];

function label(c: Case): string {
  const parts = [
    c.name,
    c.dtype ?? "f32",
    `b${c.b} n${c.n}${c.nKv ? `/kv${c.nKv}` : ""} s${c.sQ}${c.sKv ? `x${c.sKv}` : ""} d${c.d}`,
  ];
  if (c.isCausal) parts.push("causal");
  if (c.windowSize !== undefined) parts.push(`window=${JSON.stringify(c.windowSize)}`);
  if (c.keyPadding) parts.push(`keyPadding [${c.keyPadding}]`);
  return parts.join(" ");
}

interface Errors {
  maxAbs: number;
  rel: number;
  lse: number;
}

async function run(c: Case): Promise<{ flash: Errors; mma: Errors }> {
  const dtype = c.dtype ?? "f32";
  const random = rng(c.sQ * 131 + c.d * 7 + (c.sKv ?? 0));
  const nKv = c.nKv ?? c.n, sKv = c.sKv ?? c.sQ;
  const amp = c.amplitude ?? 1;
  const make = (n: number, s: number): Logical => {
    const t = randomLogical({ b: c.b, n, s, d: c.d }, random);
    return { data: roundTo(t.data.map((x) => x * amp), dtype), sizes: t.sizes };
  };
  const q = make(c.n, c.sQ), k = make(nKv, sKv), v = make(nKv, sKv);
  const pattern = c.layout ?? "b n s d";
  const host = (t: Logical): HostTensor => {
    const laid = layOut(t, pattern);
    return { data: toHostArray(laid.data, dtype), shape: laid.shape, dtype };
  };
  const options: AttentionOptions = {};
  const ref: RefOptions = {};
  if (c.layout) {
    options.qPattern =
      options.kPattern =
      options.vPattern =
      options.outPattern =
        c.layout;
  }
  if (c.isCausal) options.isCausal = ref.isCausal = true;
  if (c.windowSize !== undefined) options.windowSize = ref.windowSize = c.windowSize;
  if (c.scale !== undefined) options.scale = ref.scale = c.scale;
  if (c.keyPadding) {
    const data = new Uint8Array(c.b * sKv);
    c.keyPadding.forEach((len, r) => data.fill(1, r * sKv, r * sKv + len));
    options.keyPaddingMask = ref.keyPaddingMask = { data, shape: [c.b, sKv] };
  }
  const expected = referenceAttention(q, k, v, ref);
  const outSizes = { b: c.b, n: c.n, s: c.sQ, d: c.d };
  const errors = async (backend: string): Promise<Errors> => {
    const { out, lse } = await attentionWithLse(host(q), host(k), host(v), { ...options, backend });
    const got = fromLayout(fromHostArray((out as HostTensor).data, dtype), outSizes, pattern);
    const e = errorStats(got, expected.out);
    return { maxAbs: e.maxAbs, rel: e.rel, lse: errorStats((lse as HostTensor).data, expected.lse).maxAbs };
  };
  const flash = await errors("flash");
  flashMmaTuning.override = c.tiles ?? null;
  const saved = flashMmaTuning.emulate;
  flashMmaTuning.emulate = !real;
  debug.poisonOutputs = true;
  try {
    return { flash, mma: await errors("flash-mma") };
  } finally {
    flashMmaTuning.override = null;
    flashMmaTuning.emulate = saved;
    debug.poisonOutputs = false;
  }
}

const fmt = (x: number) => x.toExponential(2);
const SLACK = 2 ** -24;

for (const c of CASES) {
  const why = skip || (caps?.engine === "deno" && c.notOnDeno) || "";
  Deno.test({
    name: `flash-mma (${form}) accuracy vs flash: ${label(c)}${why ? ` [skipped: ${why}]` : ""}`,
    ignore: why !== "",
    async fn() {
      const { flash, mma } = await run(c);
      console.log(
        `  ${label(c)}: max abs flash ${fmt(flash.maxAbs)} flash-mma ${fmt(mma.maxAbs)} | rel L2 flash ${
          fmt(flash.rel)
        } flash-mma ${fmt(mma.rel)} | lse flash ${fmt(flash.lse)} flash-mma ${fmt(mma.lse)}`,
      );
      const amp = c.amplitude ?? 1;
      if ((c.dtype ?? "f32") === "f32") {
        assert.ok(
          mma.maxAbs <= 2 * flash.maxAbs + SLACK * amp,
          `max abs ${mma.maxAbs} vs flash ${flash.maxAbs}`,
        );
        assert.ok(mma.rel <= 2 * flash.rel + SLACK, `rel L2 ${mma.rel} vs flash ${flash.rel}`);
        if (amp === 1) assert.ok(mma.maxAbs <= 1e-6, `max abs ${mma.maxAbs} > 1e-6`);
        assert.ok(mma.lse <= 2 * flash.lse + 4 * SLACK * amp * amp, `lse ${mma.lse} vs flash ${flash.lse}`);
      } else {
        // 16-bit outputs: both are within an output rounding.
        assert.ok(
          mma.maxAbs <= 2 * flash.maxAbs + 2 ** -11,
          `max abs ${mma.maxAbs} vs flash ${flash.maxAbs}`,
        );
        assert.ok(mma.rel <= 2 * flash.rel + 2 ** -11, `rel L2 ${mma.rel} vs flash ${flash.rel}`);
      }
    },
  });
}

// The maximum kernel in two halves one phase apart (FlashMmaConfig.skewMax) takes the same maxima
// (exact: a maximum does not depend on the order), so the output is the default's bit for bit; a tile
// read from the wrong K slot or left out would change the maximum and P's slices.
Deno.test({
  name: `flash-mma (${form}): the skewed maximum kernel gives the default's output bit for bit${
    skip ? ` [skipped: ${skip}]` : ""
  }`,
  ignore: skip !== "",
  async fn() {
    // Three key tiles, GQA, causal, rows over two of the maximum kernel's workgroups.
    const random = rng(9);
    const make = (n: number, s: number): HostTensor => {
      const t = randomLogical({ b: 1, n, s, d: 64 }, random);
      return { data: toHostArray(t.data, "f32"), shape: [1, n, s, 64], dtype: "f32" };
    };
    const q = make(4, 150), k = make(2, 96), v = make(2, 96);
    const outputs: Float32Array[] = [];
    const saved = flashMmaTuning.emulate;
    flashMmaTuning.emulate = !real;
    debug.poisonOutputs = true;
    try {
      for (const skewMax of [false, true]) {
        flashMmaTuning.override = { maxPass: "read", skewMax };
        const { out } = await attentionWithLse(q, k, v, { backend: "flash-mma", isCausal: true });
        outputs.push((out as HostTensor).data as Float32Array);
      }
    } finally {
      flashMmaTuning.override = null;
      flashMmaTuning.emulate = saved;
      debug.poisonOutputs = false;
    }
    assert.ok(outputs[0].every(Number.isFinite));
    assert.deepEqual(outputs[1], outputs[0]);
  },
});

const baseConfig: FlashMmaConfig = {
  dtype: "f32",
  f16: false,
  d: 128,
  warps: 4,
  bc: 32,
  shape: { component: "i8", result: "i32", M: 16, N: 16, K: 32 },
  band: true,
  keyPadding: true,
  lse: true,
  emulate: false,
  slices: 3,
  order: 2,
  maxOrder: 2,
  qRegisters: true,
};

Deno.test("flash-mma: slice products by order, the overflow bound and the maximum pass's margin", () => {
  // Three slices to order 2: the six products (0,0); (0,1), (1,0); (0,2), (1,1), (2,0).
  assert.deepEqual(
    sliceProducts(3, 2).map((p) => `${p.a}${p.b}`),
    ["00", "01", "10", "02", "11", "20"],
  );
  assert.equal(sliceProducts(2, 1).length, 3);
  // 127² · 3 · keys < 2^31.
  assert.equal(flashMmaMaxKeys({ slices: 3, order: 2 }), Math.floor((2 ** 31 - 1) / (127 * 127 * 3)));
  assert.equal(maxPassMargin({ slices: 3, order: 2, maxOrder: 2, d: 64 }), 0);
  // S tiles: orders 0 and 1 share one by Horner's rule (127² · dQ · (F + 2) < 2^31 up to d 256),
  // order 2 would overflow it (F² + 2F + 3).
  assert.deepEqual(sliceOrderGroups(3, 2, 128), [{ lo: 0, hi: 1 }, { lo: 2, hi: 2 }]);
  assert.deepEqual(sliceOrderGroups(3, 2, 256), [{ lo: 0, hi: 1 }, { lo: 2, hi: 2 }]);
  assert.ok(127 * 127 * 256 * (254 + 2) < 2 ** 31 && 127 * 127 * 32 * (254 ** 2 + 2 * 254 + 3) > 2 ** 31);
  assert.deepEqual(sliceOrderGroups(2, 1, 64), [{ lo: 0, hi: 1 }]);
  assert.deepEqual(sliceOrderGroups(4, 3, 64), [{ lo: 0, hi: 1 }, { lo: 2, hi: 3 }]);
  // Order 2's three products, 127² each per term, over F² = 254².
  const m = maxPassMargin({ slices: 3, order: 2, maxOrder: 1, d: 64 });
  assert.ok(Math.abs(m / ((3 * 127 * 127 * 64) / 254 ** 2) - 1) < 1e-4);
});

Deno.test("flash-mma: the real form uses the subgroup-matrix builtins, the emulated one none", () => {
  const realCode = flashMmaKernel(baseConfig).code;
  assert.match(realCode, /enable chromium_experimental_subgroup_matrix;/);
  assert.match(realCode, /subgroupMatrixMultiplyAccumulate\(/);
  assert.match(realCode, /subgroupMatrixLoad<subgroup_matrix_left<i8, 32, 16>>\(&q8,/);
  // Six Q·Kᵀ products per d chunk and key tile: one pass keeps all of them.
  const emulated = flashMmaKernel({ ...baseConfig, emulate: true }).code;
  assert.doesNotMatch(emulated, /subgroup_matrix|subgroupMatrix|enable subgroups/);
});

Deno.test("flash-mma: every option that changes the kernel text changes its cache key", () => {
  const variants: Partial<FlashMmaConfig>[] = [
    {},
    { emulate: true },
    { qRegisters: false },
    { slices: 2, order: 1, maxOrder: 1 },
    { slices: 4, order: 3, maxOrder: 3 },
    { order: 1, maxOrder: 1 },
    { maxOrder: 1 },
    { maxOrder: 0 },
    { skipMaxPass: true },
    { stage: "kv" },
    { stage: "k" },
    { stage: "v" },
    { split: 2 },
    { split: 2, warps: 2 },
    { warps: 2 },
    { bc: 64 },
    { shape: { component: "i8", result: "i32", M: 16, N: 8, K: 32 } },
    { band: false },
    { keyPadding: false },
    { lse: false },
    { dtype: "bf16" },
    { d: 80 },
    { maxPass: "read" },
    { maxPass: "only", split: 1, warps: 8, stage: "k", lse: false },
  ];
  const kernels = variants.map((v) => flashMmaKernel({ ...baseConfig, ...v }));
  for (let i = 0; i < kernels.length; i++) {
    for (let j = i + 1; j < kernels.length; j++) {
      if (kernels[i].code !== kernels[j].code) {
        assert.notEqual(
          kernels[i].key,
          kernels[j].key,
          `${JSON.stringify(variants[i])} / ${JSON.stringify(variants[j])}`,
        );
      }
    }
  }
});

/** A device with the real form's tiles (for router checks; nothing runs on it). */
const fake = FAKE_MMA_DEVICE;

function problemOf(dtype: DType, s: number, sKv = s, d = 128) {
  const t = (len: number): HostTensor => {
    const count = 2 * len * d;
    const data = dtype === "f32"
      ? new Float32Array(count)
      : dtype === "f16"
      ? new Float16Array(count)
      : new Uint16Array(count);
    return { data, shape: [1, 2, len, d], dtype };
  };
  return resolveProblem(t(s), t(sKv), t(sKv), {});
}

Deno.test("flash-mma: the router takes it ahead of flash-subgroup for f32 calls with d 64 to 128 from FLASH_MMA_MIN_SEQ on", () => {
  const saved = { ...flashMmaTuning };
  flashMmaTuning.emulate = false;
  try {
    const p = problemOf("f32", FLASH_MMA_MIN_SEQ);
    assert.deepEqual(flashMmaBackend.unsupportedReasons(p, fake), []);
    const c = chooseFlashMmaConfig(p, fake, false, false);
    // Three slices to order 2, two subgroups a block, K and V staged (2 blocks fit 48 KB at d 128).
    assert.ok(typeof c !== "string" && c.slices === 3 && c.order === 2 && c.maxOrder === 1 && !c.emulate);
    assert.equal(c.split, 2);
    assert.equal(c.stage, "kv");
    assert.equal(c.warps, 4);
    // The maximum pass as a kernel of its own, with eight blocks a workgroup.
    assert.equal(c.maxPass, "read");
    const max = maxKernelConfig(c, { storage: 49152, invocations: 1024 });
    assert.ok(max && max.maxPass === "only" && max.warps === 8 && max.split === 1 && max.stage === "k");
    assert.equal(FLASH_MMA_MIN_SEQ, 2048);
    assert.equal(decide(p, fake, BACKENDS).backend.name, "flash-mma");
    // d 64 (SD3: 7.46 ms against 9.01) too.
    assert.equal(decide(problemOf("f32", 4096, 4096, 64), fake, BACKENDS).backend.name, "flash-mma");
    // Shorter calls and d outside 64..128 (not measured faster): flash-subgroup, saying why.
    const short = decide(problemOf("f32", 1024), fake, BACKENDS);
    assert.equal(short.backend.name, "flash-subgroup");
    assert.match(short.chain.find((e) => e.backend === "flash-mma")!.reasons.join(), /under 2048/);
    const d32 = decide(problemOf("f32", 4096, 4096, 32), fake, BACKENDS);
    assert.equal(d32.backend.name, "flash-subgroup");
    assert.match(d32.chain.find((e) => e.backend === "flash-mma")!.reasons.join(), /d 32: measured faster/);
    // The crossover is a parameter (tests may lower it).
    flashMmaTuning.minSeq = 512;
    assert.equal(decide(problemOf("f32", 1024), fake, BACKENDS).backend.name, "flash-mma");
    // 16-bit calls (which sage-mma takes first here anyway): passed over, saying why.
    assert.match(flashMmaBackend.unsuitedReasons!(problemOf("f16", 2048), fake).join(), /16-bit inputs/);
    // By name it serves them.
    assert.equal(
      decide(problemOf("f16", 512), fake, BACKENDS, { requested: "flash-mma" }).backend.name,
      "flash-mma",
    );
    // No matrix configs: unsupported, naming the emulation variable; the emulated form: by name only.
    const none = decide(p, { ...fake, subgroupMatrixConfigs: [] } as Capabilities, BACKENDS);
    assert.match(none.chain.find((e) => e.backend === "flash-mma")!.reasons.join(), /WGATTN_EMULATE_MMA/);
    flashMmaTuning.emulate = true;
    const emulated = decide(p, fake, BACKENDS);
    assert.notEqual(emulated.backend.name, "flash-mma");
    assert.match(emulated.chain.find((e) => e.backend === "flash-mma")!.reasons.join(), /by name only/);
  } finally {
    Object.assign(flashMmaTuning, saved);
  }
});

Deno.test("flash-mma: refuses key counts past its i32 accumulators' bound, and flex functions", () => {
  const saved = flashMmaTuning.emulate;
  flashMmaTuning.emulate = false;
  try {
    const max = flashMmaMaxKeys({ slices: 3, order: 2 });
    const long = problemOf("f32", 16, max + 1);
    assert.match(
      flashMmaBackend.unsupportedReasons(long, fake).join(),
      /i32 P·V accumulators could overflow/,
    );
    assert.deepEqual(flashMmaBackend.unsupportedReasons(problemOf("f32", 16, max), fake), []);
  } finally {
    flashMmaTuning.emulate = saved;
  }
});

Deno.test({
  name: `flash-mma: explain() says why the router passes it over${skip ? ` [skipped: ${skip}]` : ""}`,
  ignore: skip !== "",
  async fn() {
    // 64 query rows: split-kv passes them on, so the chain reaches flash-mma.
    const t: HostTensor = { data: new Float32Array(2 * 64 * 64), shape: [1, 2, 64, 64] };
    const e = await explain(t, t, t);
    const entry = e.chain.find((x) => x.backend === "flash-mma");
    assert.ok(entry && !entry.chosen && entry.reasons.length > 0, JSON.stringify(e.chain));
    // Here: no matrix configs (the variable unset), the emulated form (by name only), or the real
    // form, not measured faster than flash-subgroup for 64 rows.
    assert.match(e.text, /flash-mma: .*(WGATTN_EMULATE_MMA|by name only|under \d+)/);
  },
});
