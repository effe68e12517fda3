/**
 * `sage-mma` (int8 Q·Kᵀ and P·V on matrix tiles) against the float64 reference: cosine similarity
 * at least 0.999 and relative L1 under 0.03 per call, printed, on random inputs, K with outlier
 * channels and causal calls; window, GQA, key padding, lse, the three dtypes, d up to 256, the
 * N8 tile and smaller workgroups. Runs the emulated form (`WGATTN_EMULATE_MMA=1`) on any adapter,
 * or the real one where the device has int8 subgroup matrices; also the generator's text (the
 * real form's directives and builtins, compiled on Dawn where the device can) and when the router
 * picks it.
 */
import assert from "node:assert/strict";
import { BACKENDS } from "../backends/registry.ts";
import {
  chooseSageMmaConfig,
  EMULATE_MMA_VARIABLE,
  emulatingMma,
  encodeVStat,
  realMmaReasons,
  SAGE_MMA_MIN_SEQ,
  sageMmaBackend,
  sageMmaTuning,
} from "../backends/sage_mma.ts";
import { defaultRuntime } from "../core/device.ts";
import { debug, GpuCall, readBuffer, releaseBuffer } from "../core/gpu.ts";
import { encodeKMean } from "../backends/sage.ts";
import { resolveProblem } from "../core/problem.ts";
import { decide } from "../core/router.ts";
import { FAKE_MMA_DEVICE } from "./fake_mma_device.ts";
import type { AttentionOptions, DType, HostTensor } from "../core/types.ts";
import { attentionWithLse } from "../mod.ts";
import { type SageMmaConfig, sageMmaDims, sageMmaKernel, sageMmaVKernel } from "../wgsl/sage_mma.ts";
import { sageMmaTwoPassKernel, type TwoPassConfig } from "../wgsl/sage_mma_two_pass.ts";
import { OUTLIER_OFFSET, outlierChannels, type Similarity, similarity } from "../bench/sage_accuracy.ts";
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
const skip = !caps ? "no WebGPU adapter" : emulatingMma() ? "" : realMmaReasons(caps).join("; ") || "";
const form = emulatingMma() ? "emulated" : "real";

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
  keyPadding?: number[];
  lse?: boolean;
  /** Softmax scale (default 1/√d). */
  scale?: number;
  tiles?: Partial<TwoPassConfig>;
  /** The one-pass kernel (wgsl/sage_mma.ts) instead of the two-pass one. */
  onePass?: boolean;
}

const N8 = { component: "i8", result: "i32", M: 16, N: 8, K: 32 } as const;

/**
 * Cases share kernels where they can (dtype, d and flags pick the kernel): a new kernel takes
 * seconds to build on a software adapter. The shared suite (tests/conformance.ts) covers the other
 * dtypes, head dims (d 256 included), layouts and tile edges.
 */
const CASES: Case[] = [
  { name: "random", b: 1, n: 2, sQ: 100, d: 64, dtype: "f16", outliers: false, isCausal: true, lse: true },
  {
    name: "K outliers",
    b: 1,
    n: 2,
    sQ: 96,
    sKv: 130,
    d: 64,
    dtype: "f16",
    outliers: true,
    isCausal: true,
    lse: true,
  },
  {
    name: "random, GQA, window",
    b: 1,
    n: 4,
    nKv: 2,
    sQ: 50,
    sKv: 90,
    d: 64,
    dtype: "f16",
    outliers: false,
    windowSize: [16, 4],
    lse: true,
  },
  {
    name: "K outliers, key padding, causal, S tiles column-major",
    b: 2,
    n: 1,
    sQ: 33,
    sKv: 70,
    d: 64,
    dtype: "f16",
    outliers: true,
    isCausal: true,
    keyPadding: [70, 25],
    lse: true,
    tiles: { stage: true, sColMajor: true },
  },
  {
    name: "random, N8 tile, 1 subgroup, 32-key tiles, V as [keys, channels]",
    b: 1,
    n: 1,
    sQ: 45,
    sKv: 70,
    d: 64,
    dtype: "f16",
    outliers: false,
    isCausal: true,
    lse: true,
    tiles: { shape: N8, warps: 1, bc: 32, vTransposed: false },
  },
  {
    name: "K outliers, K and V staged in workgroup memory, GQA, causal",
    b: 1,
    n: 2,
    nKv: 1,
    sQ: 70,
    sKv: 200,
    d: 64,
    dtype: "f16",
    outliers: true,
    isCausal: true,
    lse: true,
    tiles: { stage: true },
  },
  {
    name: "random, conversions by I2F/F2I (fastMath off), staged, causal",
    b: 1,
    n: 2,
    sQ: 70,
    sKv: 200,
    d: 64,
    dtype: "f16",
    outliers: false,
    isCausal: true,
    lse: true,
    tiles: { stage: true, fastMath: false },
  },
  {
    name: "K outliers, negative softmax scale (the largest score is the smallest integer), staged, causal",
    b: 1,
    n: 2,
    sQ: 70,
    sKv: 200,
    d: 64,
    dtype: "f16",
    outliers: true,
    isCausal: true,
    lse: true,
    scale: -0.125,
    tiles: { stage: true },
  },
  {
    name: "random, both passes skewed (two halves one phase apart), GQA, window, key padding",
    b: 2,
    n: 2,
    nKv: 1,
    sQ: 150,
    sKv: 110,
    d: 64,
    dtype: "f16",
    outliers: false,
    windowSize: [60, 30],
    keyPadding: [110, 47],
    lse: true,
    tiles: { stage: true, skew: true, skewMax: true },
  },
  {
    name: "random, the one-pass kernel, window",
    b: 1,
    n: 2,
    sQ: 60,
    sKv: 150,
    d: 64,
    dtype: "f16",
    outliers: false,
    windowSize: [20, 10],
    lse: true,
    onePass: true,
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
  if (c.scale !== undefined) parts.push(`scale ${c.scale}`);
  if (c.lse) parts.push("lse");
  return parts.join(" ");
}

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

function hostOf(t: Logical, dtype: Case["dtype"]): HostTensor {
  return { data: toHostArray(t.data, dtype), shape: [t.sizes.b, t.sizes.n, t.sizes.s, t.sizes.d], dtype };
}

async function run(c: Case): Promise<Similarity & { lseErr: number }> {
  const { q, k, v } = inputs(c);
  const host = (t: Logical) => hostOf(t, c.dtype);
  const options: AttentionOptions = { backend: "sage-mma" };
  const ref: RefOptions = {};
  if (c.isCausal) options.isCausal = ref.isCausal = true;
  if (c.windowSize !== undefined) options.windowSize = ref.windowSize = c.windowSize;
  if (c.scale !== undefined) options.scale = ref.scale = c.scale;
  if (c.keyPadding) {
    const sKv = c.sKv ?? c.sQ;
    const data = new Uint8Array(c.b * sKv);
    c.keyPadding.forEach((len, r) => data.fill(1, r * sKv, r * sKv + len));
    options.keyPaddingMask = ref.keyPaddingMask = { data, shape: [c.b, sKv] };
  }
  const expected = referenceAttention(q, k, v, ref);
  sageMmaTuning.override = c.tiles ?? null;
  sageMmaTuning.twoPass = c.onePass !== true;
  debug.poisonOutputs = true;
  try {
    const { out, lse } = await attentionWithLse(host(q), host(k), host(v), options);
    const s = similarity(fromHostArray((out as HostTensor).data, c.dtype), expected.out);
    const lseErr = errorStats((lse as HostTensor).data, expected.lse).maxAbs;
    return { ...s, lseErr };
  } finally {
    sageMmaTuning.override = null;
    sageMmaTuning.twoPass = true;
    debug.poisonOutputs = false;
  }
}

for (const c of CASES) {
  Deno.test({
    name: `sage-mma (${form}) accuracy: ${label(c)}${skip ? ` [skipped: ${skip}]` : ""}`,
    ignore: skip !== "",
    async fn() {
      const r = await run(c);
      console.log(
        `  ${label(c)}: cosine ${r.cosine.toFixed(6)}, relative L1 ${r.relL1.toFixed(5)}, lse max abs ${
          r.lseErr.toExponential(2)
        }`,
      );
      assert.ok(r.cosine >= MIN_COSINE, `cosine ${r.cosine} < ${MIN_COSINE}`);
      assert.ok(r.relL1 < MAX_REL_L1, `relative L1 ${r.relL1} >= ${MAX_REL_L1}`);
      if (c.lse) assert.ok(r.lseErr < 0.02, `lse max abs error ${r.lseErr}`);
    },
  });
}

// The maximum pass by pairs of subgroups (TwoPassConfig.maxPairs) and the skewed passes (skew,
// skewMax) take the same integer maxima in the same product order as the default pass and the same integer
// P·V, so the whole output is the same, bit for bit: a wrong maximum (a tile or a half row left out,
// the wrong block's scale) would change P's rounding, a tile multiplied from the wrong slot the sums.
Deno.test({
  name:
    `sage-mma (${form}): the maximum pass by pairs of subgroups and the skewed passes give the default passes' output bit for bit${
      skip ? ` [skipped: ${skip}]` : ""
    }`,
  ignore: skip !== "",
  async fn() {
    // The staged GQA case above, whose default kernel is built already.
    const c = CASES.find((x) => x.name.startsWith("K outliers, K and V staged"))!;
    const { q, k, v } = inputs(c);
    const host = (t: Logical) => hostOf(t, c.dtype);
    const options: AttentionOptions = { backend: "sage-mma", isCausal: true };
    const outputs: Uint16Array[] = [];
    debug.poisonOutputs = true;
    try {
      for (const variant of [{}, { maxPairs: true }, { skew: true }, { skewMax: true }]) {
        sageMmaTuning.override = { stage: true, ...variant };
        const { out } = await attentionWithLse(host(q), host(k), host(v), options);
        const data = (out as HostTensor).data;
        outputs.push(new Uint16Array(data.buffer, data.byteOffset, data.length));
      }
    } finally {
      sageMmaTuning.override = null;
      debug.poisonOutputs = false;
    }
    assert.deepEqual(outputs[1], outputs[0], "maxPairs");
    assert.deepEqual(outputs[2], outputs[0], "skew");
    assert.deepEqual(outputs[3], outputs[0], "skewMax");
  },
});

const baseConfig: SageMmaConfig = {
  dtype: "f16",
  f16: false,
  d: 128,
  warps: 4,
  bc: 64,
  shape: { component: "i8", result: "i32", M: 16, N: 16, K: 32 },
  band: true,
  keyPadding: true,
  lse: true,
  emulate: false,
};

Deno.test("sage-mma: the real form uses the subgroup-matrix builtins, the emulated one none", () => {
  const real = sageMmaKernel(baseConfig).code;
  assert.match(real, /enable chromium_experimental_subgroup_matrix;/);
  assert.match(real, /diagnostic\(off, chromium\.subgroup_matrix_uniformity\);/);
  assert.match(real, /subgroupMatrixMultiplyAccumulate\(/);
  assert.match(real, /subgroupMatrixStore\(&ss/);
  const emulated = sageMmaKernel({ ...baseConfig, emulate: true }).code;
  assert.doesNotMatch(emulated, /subgroup_matrix|subgroupMatrix|enable subgroups/);
  assert.notEqual(sageMmaKernel(baseConfig).key, sageMmaKernel({ ...baseConfig, emulate: true }).key);
});

Deno.test("sage-mma: the router picks it for long 16-bit calls with the real form, and says why not otherwise (short; f32; emulated form)", () => {
  const shape = [1, 2, 2048, 64];
  const count = shape.reduce((a, b) => a * b, 1);
  const t = (dtype: DType): HostTensor => ({
    data: dtype === "f32"
      ? new Float32Array(count)
      : dtype === "f16"
      ? new Float16Array(count)
      : new Uint16Array(count),
    shape,
    dtype,
  });
  const fake = FAKE_MMA_DEVICE;
  const saved = sageMmaTuning.emulate;
  sageMmaTuning.emulate = false;
  try {
    const problem = (dtype: DType) => {
      const x = t(dtype);
      return resolveProblem(x, x, x, {});
    };
    // Long 16-bit calls on a device with the real form: the router's first choice, and the sage
    // family's member for DiffSynth's name.
    assert.deepEqual(sageMmaBackend.unsupportedReasons(problem("f16"), fake), []);
    const f16 = decide(problem("f16"), fake, BACKENDS);
    assert.equal(f16.backend.name, "sage-mma");
    assert.equal(
      decide(problem("f16"), fake, BACKENDS, { requested: "sage_attention" }).backend.name,
      "sage-mma",
    );
    // Short calls: passed over with the length bound.
    const shortShape = [1, 2, SAGE_MMA_MIN_SEQ / 2, 64];
    const s16 = {
      data: new Float16Array(shortShape.reduce((a, b) => a * b, 1)),
      shape: shortShape,
      dtype: "f16" as const,
    };
    const short = decide(resolveProblem(s16, s16, s16, {}), fake, BACKENDS);
    assert.notEqual(short.backend.name, "sage-mma");
    assert.match(
      short.chain.find((e) => e.backend === "sage-mma")!.reasons.join(),
      new RegExp(`under ${SAGE_MMA_MIN_SEQ}`),
    );
    const f32 = decide(problem("f32"), fake, BACKENDS);
    assert.notEqual(f32.backend.name, "sage-mma");
    assert.match(f32.chain.find((e) => e.backend === "sage-mma")!.reasons.join(), /f32 inputs/);
    const none = decide(problem("f16"), { ...fake, subgroupMatrixConfigs: [] }, BACKENDS);
    assert.equal(none.backend.name, "sage");
    assert.match(none.chain[1].reasons.join(), /no int8 subgroup matrices.*WGATTN_EMULATE_MMA/);
    const c = chooseSageMmaConfig(problem("f16"), fake, false, false);
    assert.ok(typeof c !== "string" && c.shape.N === 16 && !c.emulate);
    sageMmaTuning.emulate = true;
    const emulated = decide(problem("f16"), fake, BACKENDS);
    assert.notEqual(emulated.backend.name, "sage-mma");
    assert.match(emulated.chain[1].reasons.join(), new RegExp(`${EMULATE_MMA_VARIABLE}=1`));
    assert.equal(sageMmaBackend.name, "sage-mma");
  } finally {
    sageMmaTuning.emulate = saved;
  }
});

const scoreModText = (body: string) =>
  `fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32 { return ${body}; }`;
const MASK_MOD = "fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool { return kv <= q; }";

/** Two kernels with different text never share a cache key (`variants[i]` made `kernels[i]`). */
function assertKeysFollowCode(kernels: { key: string; code: string }[], variants: unknown[]): void {
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
}

Deno.test("sage-mma: every option that changes the kernel text changes its cache key", () => {
  const variants: Partial<SageMmaConfig>[] = [
    {},
    { emulate: true },
    { oneTile: true },
    { shuffle: true },
    { vTransposed: true },
    { alias: true },
    { warps: 2 },
    { bc: 32 },
    { shape: N8 },
    { band: false },
    { keyPadding: false },
    { lse: false },
    { dtype: "bf16" },
    // Flex: each function's text, and the block map, is in the key.
    { flex: { scoreMod: scoreModText("score"), maskMod: null, buffers: [], blockMap: false } },
    { flex: { scoreMod: scoreModText("2.0 * score"), maskMod: null, buffers: [], blockMap: false } },
    { flex: { scoreMod: null, maskMod: MASK_MOD, buffers: [], blockMap: false } },
    { flex: { scoreMod: null, maskMod: MASK_MOD, buffers: [], blockMap: true } },
  ];
  const kernels = variants.map((v) => sageMmaKernel({ ...baseConfig, ...v }));
  assertKeysFollowCode(kernels, variants);
  const t = (transposed: boolean) => sageMmaVKernel({ dtype: "f16", f16: false, d: 64, bc: 64, transposed });
  assert.notEqual(t(true).key, t(false).key);
});

Deno.test("sage-mma two-pass: every option that changes the kernel text changes its cache key", () => {
  const base: TwoPassConfig = { ...baseConfig, pv: "u8", doubleS: true };
  const variants: Partial<TwoPassConfig>[] = [
    {},
    { emulate: true },
    { pv: "i8" },
    { doubleS: false },
    { stage: true },
    { stage: true, sColMajor: true },
    { sColMajor: true },
    { sPad: 8 },
    { stage: true, maxPairs: true },
    { skipMaxPass: true },
    { fastMath: false },
    { negativeScale: true },
    { fastMath: false, negativeScale: true },
    { warps: 2 },
    { bc: 32 },
    { shape: N8 },
    { band: false },
    { keyPadding: false },
    { lse: false },
    { dtype: "bf16" },
    { d: 80 },
    // Flex: each function's text, and the block map (also with staged tiles), is in the key.
    { flex: { scoreMod: scoreModText("score"), maskMod: null, buffers: [], blockMap: false } },
    { flex: { scoreMod: scoreModText("2.0 * score"), maskMod: null, buffers: [], blockMap: false } },
    { flex: { scoreMod: null, maskMod: MASK_MOD, buffers: [], blockMap: false } },
    { flex: { scoreMod: null, maskMod: MASK_MOD, buffers: [], blockMap: true } },
    { stage: true, flex: { scoreMod: null, maskMod: MASK_MOD, buffers: [], blockMap: true } },
  ];
  const kernels = variants.map((v) => sageMmaTwoPassKernel({ ...base, ...v }));
  assertKeysFollowCode(kernels, variants);
  // The real form keeps every matrix step in the builtins; the staged form reads K and V from
  // workgroup memory, never matrix-loading them from storage.
  const staged = sageMmaTwoPassKernel({ ...base, stage: true }).code;
  assert.match(staged, /subgroupMatrixLoad<subgroup_matrix_right<i8, 16, 32>>\(&ks,/);
  assert.match(staged, /subgroupMatrixLoad<subgroup_matrix_right<u8, 16, 32>>\(&vs,/);
  assert.doesNotMatch(staged, /&k8|&v8/);
  assert.doesNotMatch(sageMmaTwoPassKernel({ ...base, emulate: true }).code, /subgroupMatrix/);
  const v = (offset: boolean) =>
    sageMmaVKernel({ dtype: "f16", f16: false, d: 64, bc: 32, transposed: true, offset });
  assert.notEqual(v(true).key, v(false).key);
  assert.match(v(true).code, /0x80808080u/);
});

// The pre-pass's column statistics (K's mean for sage and sage-mma, V's scale and mean for sage-mma)
// are gathered per chunk of keys side by side, then combined: checked over one chunk, a ragged second
// one, and the most chunks a head gets (32, each wider than the 256-row minimum), against float64
// means and the absmax of the centred values, with a NaN and an Inf in two channels and head dims
// whose padding to dV leaves channels without values.
for (const [b, nKv, s, d] of [[1, 2, 200, 20], [2, 1, 300, 64], [1, 3, 9000, 20]]) {
  Deno.test(`sage pre-pass: column statistics over chunks of keys, b${b} n${nKv} s${s} d${d}`, {
    ignore: !rt,
  }, async () => {
    const shape = [b, nKv, s, d], count = b * nKv * s * d;
    const next = rng(s + d);
    // Channel 3 sits far from zero (an outlier channel): its mean must come out of the sums, not 0.
    const x = Float32Array.from({ length: count }, (_, i) => next() * 2 - 1 + (i % d === 3 ? 40 : 0));
    const at = (bb: number, h: number, r: number, ch: number) => ((bb * nKv + h) * s + r) * d + ch;
    x[at(0, nKv - 1, s - 1, 7)] = NaN;
    x[at(b - 1, 0, Math.floor(s / 2), 0)] = Infinity;
    const tensor = { data: x, shape };
    const q = { data: new Float32Array(b * nKv * d).fill(0.5), shape: [b, nKv, 1, d] };
    const p = resolveProblem(q, tensor, tensor);
    const { dV } = sageMmaDims(d);
    const call = new GpuCall(rt!, "test column statistics");
    const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    const input = call.upload(x, "test v");
    const mean = call.createBuffer(b * nKv * d * 4, usage, "test mean");
    const vStat = call.createBuffer(b * nKv * 2 * dV * 4, usage, "test v stat");
    await encodeKMean(call, p, input, mean);
    await encodeVStat(call, p, input, vStat);
    assert.equal(await call.submit(), null);
    const kMean = new Float32Array(await readBuffer(rt!.device, mean, b * nKv * d * 4));
    const stat = new Float32Array(await readBuffer(rt!.device, vStat, b * nKv * 2 * dV * 4));
    releaseBuffer(mean);
    releaseBuffer(vStat);
    for (let bh = 0; bh < b * nKv; bh++) {
      for (let ch = 0; ch < dV; ch++) {
        const scale = stat[bh * 2 * dV + ch], vMean = stat[bh * 2 * dV + dV + ch];
        if (ch >= d) {
          assert.deepEqual([scale, vMean], [0, 0], `padding channel ${ch} of head ${bh}`);
          continue;
        }
        let sum = 0, finite = true;
        for (let r = 0; r < s; r++) {
          const v = x[(bh * s + r) * d + ch];
          if (Number.isFinite(v)) sum += v;
          else finite = false;
        }
        const m = kMean[bh * d + ch];
        const want = sum / s;
        assert.ok(Math.abs(m - want) <= 1e-5 * (1 + Math.abs(want)), `K mean ${bh}/${ch}: ${m} vs ${want}`);
        // The same sums in the same order: V's mean is K's to the bit.
        assert.equal(vMean, m, `V mean ${bh}/${ch}`);
        let amax = 0;
        for (let r = 0; r < s && finite; r++) {
          amax = Math.max(amax, Math.abs(Math.fround(x[(bh * s + r) * d + ch] - m)));
        }
        const wantScale = finite ? amax / 127 : Infinity;
        assert.ok(
          finite ? Math.abs(scale - wantScale) <= 1e-6 * wantScale : scale === Infinity,
          `V scale ${bh}/${ch}: ${scale} vs ${wantScale}`,
        );
      }
    }
  });
}
