/**
 * Flex attention (scoreMod, maskMod, modBuffers, createBlockMask, the ready-made functions) on every
 * backend that serves it, against the float64 reference given the same functions in TypeScript.
 * Few distinct fused kernels (each flex text is a new kernel, 10 to 60 s to compile cold on a
 * software adapter): the fused cases share one pair of texts (alibi + a document mask) over flash,
 * flash-subgroup, split-kv, sage and sage-mma, and the approximate two also soft-capping on K with
 * offset channels (where K's smoothing shifts the scores); the library's functions run on naive and cpu.
 */
import assert from "node:assert/strict";
import {
  alibi,
  attentionForward,
  attentionWithLse,
  type BlockMask,
  createBlockMask,
  deviceInfo,
  documentMask,
  explain,
  getDevice,
  type MaskModBundle,
  prefixLm,
  relativePositionBias,
  type ScoreModBundle,
  slidingWindow,
  softCap,
  stats,
  wanAnimateLogScale,
  WgattnError,
} from "../mod.ts";
import { debug } from "../core/gpu.ts";
import { flashTuning } from "../backends/flash.ts";
import type { TwoPassConfig } from "../wgsl/sage_mma_two_pass.ts";
import { emulatingMma, realMmaReasons, sageMmaTuning } from "../backends/sage_mma.ts";
import { defaultRuntime } from "../core/device.ts";
import { similarity } from "../bench/sage_accuracy.ts";
import {
  errorStats,
  layOut,
  type Logical,
  randomLogical,
  referenceAttention,
  type RefOptions,
  rng,
} from "./reference.ts";

const info = await deviceInfo();
const NO_GPU = info ? "" : " [skipped: no WebGPU adapter]";

interface Sizes {
  b: number;
  n: number;
  nKv: number;
  sQ: number;
  sKv: number;
  d: number;
}

function inputs(z: Sizes, seed: number) {
  const random = rng(seed);
  return {
    q: randomLogical({ b: z.b, n: z.n, s: z.sQ, d: z.d }, random),
    k: randomLogical({ b: z.b, n: z.nKv, s: z.sKv, d: z.d }, random),
    v: randomLogical({ b: z.b, n: z.nKv, s: z.sKv, d: z.d }, random),
  };
}

const host = (x: Logical, pattern = "b n s d") => {
  const { data, shape } = layOut(x, pattern);
  return { data: Float32Array.from(data), shape };
};

type Bundle = Partial<ScoreModBundle & MaskModBundle>;

/** The flex options of bundles merged (their mod buffers together). */
function merge(...bundles: Bundle[]): Bundle {
  const out: Bundle = {};
  for (const x of bundles) {
    if (x.scoreMod) out.scoreMod = x.scoreMod;
    if (x.maskMod) out.maskMod = x.maskMod;
    if (x.modBuffers) out.modBuffers = { ...out.modBuffers, ...x.modBuffers };
  }
  return out;
}

/** The reference's options for a bundle: its TypeScript twins with its host buffers. */
function refFlex(x: Bundle): Pick<RefOptions, "scoreMod" | "maskMod"> {
  const buffers = (x.modBuffers ?? {}) as Record<string, Float32Array | Int32Array | Uint32Array>;
  const score = x.scoreMod?.ts, mask = x.maskMod?.ts;
  return {
    scoreMod: score ? (s, b, h, i, j) => score(s, b, h, i, j, buffers) : undefined,
    maskMod: mask ? (b, h, i, j) => mask(b, h, i, j, buffers) : undefined,
  };
}

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string) {
  const e = errorStats(actual, expected);
  assert.equal(e.bad, 0, `${what}: ${e.bad} NaN or infinite elements`);
  assert.ok(e.maxAbs <= tol, `${what}: max abs error ${e.maxAbs} at ${e.worst} (tolerance ${tol})`);
}

// ---- the ready-made functions on naive and cpu ---------------------------------------------------

const Z: Sizes = { b: 2, n: 4, nKv: 2, sQ: 13, sKv: 19, d: 8 };
const docIds = Int32Array.from({ length: 2 * 19 }, (_, i) => Math.floor((i % 19) / 5) + (i >= 19 ? 1 : 0));
const LIBRARY: { name: string; flex: Bundle; opts?: RefOptions }[] = [
  { name: "alibi, causal", flex: alibi(4), opts: { isCausal: true } },
  { name: "soft cap 0.4", flex: softCap(0.4), opts: { scale: 2 } },
  {
    name: "relative-position bias",
    flex: relativePositionBias(Float32Array.from({ length: 4 * 7 }, (_, i) => Math.sin(i)), 3),
  },
  // Ids of [b, s]: each batch its own documents; s_q 13 reads the first 13 ids of each row.
  {
    name: "document mask per batch",
    flex: documentMask(docIds, docIds, { batchStrideQ: 19, batchStrideKv: 19 }),
  },
  { name: "prefix-LM 4", flex: prefixLm(4) },
  { name: "prefix-LM per batch", flex: prefixLm(Int32Array.from([2, 9])) },
  { name: "sliding window 3, causal", flex: slidingWindow(3) },
  { name: "sliding window 2, both sides", flex: slidingWindow(2, { causal: false }) },
  // DiffSynth's: keys [hw, 2·hw) of the 19 (here 6..11) get logScale.
  { name: "Wan2.2-Animate log-scale", flex: wanAnimateLogScale(6, 1.5) },
  {
    name: "alibi + document mask + window [4, 1]",
    flex: merge(alibi(4), documentMask(docIds, docIds, { batchStrideQ: 19, batchStrideKv: 19 })),
    opts: { windowSize: [4, 1] },
  },
];

for (const c of LIBRARY) {
  for (const backend of ["cpu", "naive"]) {
    Deno.test({
      name: `flex ${c.name}: ${backend}${backend === "naive" ? NO_GPU : ""}`,
      ignore: backend === "naive" && !info,
      async fn() {
        const { q, k, v } = inputs(Z, 11);
        const ref = referenceAttention(q, k, v, { ...c.opts, ...refFlex(c.flex) });
        debug.poisonOutputs = true;
        const { out, lse } = await attentionWithLse(host(q), host(k), host(v), {
          ...(c.opts as object),
          ...c.flex,
          backend,
        });
        assertClose(out.data as Float32Array, ref.out, 2e-5, "output");
        assertClose(
          Float64Array.from(lse.data as Float32Array).map((x, i) => ref.lse[i] === -Infinity ? 0 : x),
          ref.lse.map((x) => (x === -Infinity ? 0 : x)),
          1e-4,
          "lse",
        );
      },
    });
  }
}

Deno.test({
  name: `flex on naive composes with an additive mask and reads a GPU mod buffer${NO_GPU}`,
  ignore: !info,
  async fn() {
    const { q, k, v } = inputs(Z, 12);
    const bias = Float64Array.from({ length: Z.sQ * Z.sKv }, (_, i) => Math.cos(i) / 2);
    const a = alibi(4);
    const ref = referenceAttention(q, k, v, {
      attnMask: { kind: "additive", data: bias, shape: [Z.sQ, Z.sKv] },
      ...refFlex(a),
    });
    const device = (await getDevice())!;
    const slopes = a.modBuffers!.alibi_slopes as Float32Array;
    const buffer = device.createBuffer({
      size: 16,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
    });
    device.queue.writeBuffer(buffer, 0, new Float32Array(slopes));
    try {
      // A GPU mod buffer is checked as q, k and v are.
      const dead = device.createBuffer({ size: 16, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
      dead.destroy();
      await refuses(
        { ...a, modBuffers: { alibi_slopes: { buffer: dead, dtype: "f32" } }, backend: "naive" },
        "INVALID_BUFFER",
        "options.modBuffers.alibi_slopes",
        /destroyed/,
      );
      for (const backend of ["naive", "cpu"]) {
        const out = await attentionForward(host(q), host(k), host(v), {
          attnMask: { data: Float32Array.from(bias), shape: [Z.sQ, Z.sKv] },
          scoreMod: a.scoreMod,
          modBuffers: { alibi_slopes: { buffer, dtype: "f32", length: 4 } },
          backend,
        });
        assertClose(out.data as Float32Array, ref.out, 2e-5, backend);
      }
    } finally {
      buffer.destroy();
    }
  },
});

// ---- fused kernels: flash and flash-subgroup with block maps ---------------------------------------

// Documents over the keys: the queries' ids run 0..3 over 16 rows, the keys' over 80 keys, so some
// key tiles of 16 are empty for every query tile and a query of document 3 finds keys only at the end.
const qIds = Int32Array.from({ length: 16 }, (_, i) => Math.floor(i / 4));
const kvIds = Int32Array.from({ length: 80 }, (_, j) => (j < 20 ? 0 : j < 36 ? 1 : j < 70 ? 5 : 3));
const FUSED = merge(alibi(4), documentMask(qIds, kvIds));
const FZ: Sizes = { b: 2, n: 4, nKv: 2, sQ: 16, sKv: 80, d: 16 };

const FUSED_CASES: {
  backend: string;
  opts: { isCausal?: boolean };
  pattern: string;
  blockSize?: number | [number, number];
}[] = [
  { backend: "flash", opts: { isCausal: true }, pattern: "b n s d" },
  { backend: "flash", opts: { isCausal: true }, pattern: "b s n d", blockSize: [8, 24] },
  { backend: "flash-subgroup", opts: {}, pattern: "b n s d" },
  { backend: "flash-subgroup", opts: {}, pattern: "b n s d", blockSize: 16 },
];

for (const c of FUSED_CASES) {
  const unsupported = !info
    ? "no WebGPU adapter"
    : c.backend === "flash-subgroup" && !info.subgroups
    ? "the device has no subgroups"
    : "";
  Deno.test({
    name: `flex fused ${c.backend}: alibi + document mask, ${JSON.stringify(c.opts)}, ${c.pattern}, ${
      c.blockSize ? `createBlockMask ${JSON.stringify(c.blockSize)}` : "per-call block map"
    }${unsupported ? ` [skipped: ${unsupported}]` : ""}`,
    ignore: unsupported !== "",
    async fn() {
      const { q, k, v } = inputs(FZ, 21);
      const ref = referenceAttention(q, k, v, { ...c.opts, ...refFlex(FUSED) });
      let blockMask: BlockMask | undefined;
      if (c.blockSize) {
        // b and n left out: the mask reads neither, so one map serves every batch and head.
        blockMask = await createBlockMask(FUSED.maskMod!, {
          sQ: FZ.sQ,
          sKv: FZ.sKv,
          modBuffers: FUSED.modBuffers,
          blockSize: c.blockSize,
        });
      }
      debug.poisonOutputs = true;
      try {
        const why = await explain(host(q, c.pattern), host(k, c.pattern), host(v, c.pattern), {
          ...c.opts,
          ...FUSED,
          qPattern: c.pattern,
          kPattern: c.pattern,
          vPattern: c.pattern,
        });
        // A fused kernel serves flex calls (split-kv for these few query rows).
        assert.ok(
          ["split-kv", "flash", "flash-subgroup"].includes(why.backend),
          `the router picked ${why.backend}`,
        );
        const { out, lse } = await attentionWithLse(
          host(q, c.pattern),
          host(k, c.pattern),
          host(v, c.pattern),
          {
            ...c.opts,
            ...FUSED,
            blockMask,
            qPattern: c.pattern,
            kPattern: c.pattern,
            vPattern: c.pattern,
            backend: c.backend,
          },
        );
        assertClose(
          out.data as Float32Array,
          ref.out,
          2e-5,
          "output",
        );
        const l = Float64Array.from(lse.data as Float32Array);
        for (let i = 0; i < l.length; i++) {
          if (ref.lse[i] === -Infinity) assert.equal(l[i], -Infinity, `lse ${i} of an empty row`);
          else assert.ok(Math.abs(l[i] - ref.lse[i]) < 1e-4, `lse ${i}: ${l[i]} vs ${ref.lse[i]}`);
        }
      } finally {
        blockMask?.destroy();
      }
    },
  });
}

Deno.test({
  name:
    `flex fused flash, row-pointer layout (the large tiles' form): alibi + document mask, causal${NO_GPU}`,
  ignore: !info,
  async fn() {
    const { q, k, v } = inputs(FZ, 22);
    const ref = referenceAttention(q, k, v, { isCausal: true, ...refFlex(FUSED) });
    const blockMask = await createBlockMask(FUSED.maskMod!, {
      sQ: FZ.sQ,
      sKv: FZ.sKv,
      modBuffers: FUSED.modBuffers,
      blockSize: [16, 40],
    });
    debug.poisonOutputs = true;
    flashTuning.override = { br: 16, bc: 16, rt: 4, ct: 4, vc: 4, dk: 8, pointers: true };
    try {
      for (const handle of [undefined, blockMask]) {
        const out = await attentionForward(host(q), host(k), host(v), {
          ...FUSED,
          blockMask: handle,
          isCausal: true,
          backend: "flash",
        });
        assertClose(out.data as Float32Array, ref.out, 2e-5, handle ? "with a handle" : "per-call map");
      }
    } finally {
      flashTuning.override = null;
      blockMask.destroy();
    }
  },
});

Deno.test({
  name: `flex split-kv (decode): alibi + document mask, GQA, causal${NO_GPU}`,
  ignore: !info,
  async fn() {
    const z: Sizes = { ...FZ, sQ: 3 };
    const { q, k, v } = inputs(z, 31);
    const ref = referenceAttention(q, k, v, { isCausal: true, ...refFlex(FUSED) });
    debug.poisonOutputs = true;
    const why = await explain(host(q), host(k), host(v), { ...FUSED, isCausal: true });
    assert.equal(why.backend, "split-kv", why.text);
    const { out, lse } = await attentionWithLse(host(q), host(k), host(v), {
      ...FUSED,
      isCausal: true,
      backend: "split-kv",
    });
    assertClose(out.data as Float32Array, ref.out, 2e-5, "output");
    const l = Float64Array.from(lse.data as Float32Array);
    for (let i = 0; i < l.length; i++) {
      if (ref.lse[i] === -Infinity) assert.equal(l[i], -Infinity, `lse ${i} of an empty row`);
      else assert.ok(Math.abs(l[i] - ref.lse[i]) < 1e-4, `lse ${i}: ${l[i]} vs ${ref.lse[i]}`);
    }
  },
});

// ---- sage and sage-mma: int8 Q·Kᵀ (approximate), K smoothing's row shift added back for score_mod -----

// SageAttention's bar for the approximate backends (as tests/sage_test.ts and tests/sage_mma_test.ts).
const MIN_COSINE = 0.999, MAX_REL_L1 = 0.03;

/**
 * K with large per-channel offsets (±3, alternating): smoothing then shifts each row's scores by a
 * scale·q·mean(k) of order 1, which a softmax ignores but a nonlinear score_mod (soft-capping) and
 * the lse do not, so a missing add-back fails these tests.
 */
function offsetK(k: Logical): Logical {
  const d = k.sizes.d;
  return { data: k.data.map((x, i) => x + (i % d % 2 === 0 ? 3 : -3)), sizes: k.sizes };
}

function assertSage(out: ArrayLike<number>, expected: ArrayLike<number>, what: string) {
  const e = errorStats(out, expected);
  assert.equal(e.bad, 0, `${what}: ${e.bad} NaN or infinite elements`);
  const s = similarity(out, expected);
  console.log(`  ${what}: cosine ${s.cosine.toFixed(6)}, relative L1 ${s.relL1.toFixed(5)}`);
  assert.ok(s.cosine >= MIN_COSINE, `${what}: cosine ${s.cosine} < ${MIN_COSINE}`);
  assert.ok(s.relL1 <= MAX_REL_L1, `${what}: relative L1 ${s.relL1} > ${MAX_REL_L1}`);
}

/** Empty rows' lse is -inf exactly; the others within `tol` of float64. */
function assertLse(lse: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string) {
  let worst = 0;
  for (let i = 0; i < expected.length; i++) {
    if (expected[i] === -Infinity) assert.equal(lse[i], -Infinity, `${what}: lse ${i} of an empty row`);
    else worst = Math.max(worst, Math.abs(lse[i] - expected[i]));
  }
  assert.ok(worst < tol, `${what}: lse max abs error ${worst} (tolerance ${tol})`);
}

const runtime = await defaultRuntime();
const SAGE_SKIP = !info ? "no WebGPU adapter" : !info.packedInt8Dot ? "the device has no dot4I8Packed" : "";
// As tests/sage_mma_test.ts: the emulated form with WGATTN_EMULATE_MMA=1 (test:dawn sets it; Mesa 22's
// lavapipe computes that form wrong on long sequences), the real one where the device has the tiles.
const MMA_SKIP = !runtime
  ? "no WebGPU adapter"
  : emulatingMma()
  ? ""
  : realMmaReasons(runtime.caps).join("; ");
const mmaForm = emulatingMma() ? "emulated" : "real";

/** Odd sizes for the soft-cap cases: partial query and key tiles, GQA. */
const OZ: Sizes = { b: 1, n: 2, nKv: 1, sQ: 21, sKv: 45, d: 16 };

/**
 * The approximate backends' cases; sage-mma's two main kernels (two-pass, its default, staged here,
 * and one-pass) each fuse the functions.
 */
const APPROX_CASES: { backend: "sage" | "sage-mma"; skip: string; onePass?: boolean }[] = [
  { backend: "sage", skip: SAGE_SKIP },
  { backend: "sage-mma", skip: MMA_SKIP },
  { backend: "sage-mma", skip: MMA_SKIP, onePass: true },
];

/** sage-mma's two-pass kernel unstaged, with two S regions alternating per tile. */
const UNSTAGED: Partial<TwoPassConfig> = { stage: false, doubleS: true };

/** Runs `fn` with sage-mma's one-pass kernel selected when `onePass`, `tiles` merged over its config. */
async function withKernel<T>(
  onePass: boolean | undefined,
  fn: () => Promise<T>,
  tiles?: Partial<TwoPassConfig>,
): Promise<T> {
  const saved = sageMmaTuning.twoPass;
  sageMmaTuning.twoPass = !onePass;
  sageMmaTuning.override = tiles ?? null;
  try {
    return await fn();
  } finally {
    sageMmaTuning.twoPass = saved;
    sageMmaTuning.override = null;
  }
}

/** A test name's backend part: sage-mma's form and kernel. */
function approxLabel(backend: string, onePass?: boolean, tiles?: Partial<TwoPassConfig>): string {
  if (backend !== "sage-mma") return backend;
  const kernel = onePass ? "one-pass" : tiles === UNSTAGED ? "two-pass unstaged, two S regions" : "two-pass";
  return `${backend} (${mmaForm}, ${kernel})`;
}

for (const { backend, skip, onePass } of APPROX_CASES) {
  const skipped = skip ? ` [skipped: ${skip}]` : "";
  Deno.test({
    name:
      `flex ${
        approxLabel(backend, onePass)
      }: alibi + document mask, causal, lse; per-call map and createBlockMask ` +
      `[8, 24]${skipped}`,
    ignore: skip !== "",
    async fn() {
      const { q, k: k0, v } = inputs(FZ, 41);
      const k = offsetK(k0);
      const ref = referenceAttention(q, k, v, { isCausal: true, ...refFlex(FUSED) });
      const blockMask = await createBlockMask(FUSED.maskMod!, {
        sQ: FZ.sQ,
        sKv: FZ.sKv,
        modBuffers: FUSED.modBuffers,
        blockSize: [8, 24],
      });
      debug.poisonOutputs = true;
      try {
        for (const handle of [undefined, blockMask]) {
          const what = handle ? "with a handle" : "per-call map";
          const { out, lse } = await withKernel(onePass, () =>
            attentionWithLse(host(q), host(k), host(v), {
              ...FUSED,
              blockMask: handle,
              isCausal: true,
              backend,
            }));
          assertSage(out.data as Float32Array, ref.out, what);
          // The smoothing's shift is added back once: to the scores here (a score_mod), not again to the lse.
          assertLse(lse.data as Float32Array, ref.lse, 0.02, what);
        }
      } finally {
        debug.poisonOutputs = false;
        blockMask.destroy();
      }
    },
  });
  Deno.test({
    name: `flex ${approxLabel(backend, onePass)}: soft cap 1 on K with offset channels, odd sizes ${
      JSON.stringify(OZ)
    }${skipped}`,
    ignore: skip !== "",
    async fn() {
      const { q, k: k0, v } = inputs(OZ, 42);
      const k = offsetK(k0);
      const cap = softCap(1);
      const ref = referenceAttention(q, k, v, refFlex(cap));
      // Without the add-back the capped scores would be those of the smoothed K: check that this case
      // tells the two apart.
      const smoothed = referenceAttention(q, k0, v, refFlex(cap));
      assert.ok(
        similarity(smoothed.out, ref.out).relL1 > 0.1,
        "the K offset does not change the capped output",
      );
      debug.poisonOutputs = true;
      try {
        const out = await withKernel(
          onePass,
          () => attentionForward(host(q), host(k), host(v), { ...cap, backend }),
        );
        assertSage(out.data as Float32Array, ref.out, "soft cap");
      } finally {
        debug.poisonOutputs = false;
      }
    },
  });
}

// The fused kernels trust the block map: a handle whose states disagree with the call's own buffers
// (the call's win over the handle's) shows that empty tiles are skipped and full ones skip the
// per-element test. The handle's ids: every query document 0; keys 0..63 document 0 (full tiles),
// 64..127 document 9 (empty), 128..191 mixed (partial), 192..199 document 0 (a full block in a tile cut
// by the sequence's end and the causal band, which still apply). The call's: keys 0..63 and 192..199
// alternate 0 and 1 (the test, were it run, would drop half), 64..127 document 0 (it would attend
// them), 128..191 as the handle's. Same texts, causal and lse as the cases above: no new kernel.
const TZ: Sizes = { b: 1, n: 2, nKv: 1, sQ: 13, sKv: 200, d: 16 };
const trustQ = new Int32Array(TZ.sQ);
const tail = (j: number) => (j % 3 === 0 ? 0 : 1);
const trustKvHandle = Int32Array.from(
  { length: TZ.sKv },
  (_, j) => (j < 64 || j >= 192 ? 0 : j < 128 ? 9 : tail(j)),
);
const trustKvCall = Int32Array.from(
  { length: TZ.sKv },
  (_, j) => (j < 64 || j >= 192 ? j % 2 : j < 128 ? 0 : tail(j)),
);

const TRUST_CASES: {
  backend: string;
  skip: string;
  approximate: boolean;
  onePass?: boolean;
  tiles?: Partial<TwoPassConfig>;
}[] = [
  { backend: "flash", skip: info ? "" : "no WebGPU adapter", approximate: false },
  { backend: "sage", skip: SAGE_SKIP, approximate: true },
  { backend: "sage-mma", skip: MMA_SKIP, approximate: true },
  // The two-pass kernel's unstaged form too (its default here is staged): two S regions, which
  // alternate per visited tile (live tiles need not alternate in parity).
  { backend: "sage-mma", skip: MMA_SKIP, approximate: true, tiles: UNSTAGED },
  { backend: "sage-mma", skip: MMA_SKIP, approximate: true, onePass: true },
];

for (const c of TRUST_CASES) {
  Deno.test({
    name: `flex ${approxLabel(c.backend, c.onePass, c.tiles)}: empty tiles of a block mask ` +
      `are skipped and full ones skip the mask test, odd sizes ${JSON.stringify(TZ)}${
        c.skip ? ` [skipped: ${c.skip}]` : ""
      }`,
    ignore: c.skip !== "",
    async fn() {
      const { q, k, v } = inputs(TZ, 43);
      const flex = merge(alibi(4), documentMask(trustQ, trustKvCall));
      const blockMask = await createBlockMask(flex.maskMod!, {
        sQ: TZ.sQ,
        sKv: TZ.sKv,
        modBuffers: { doc_q: trustQ, doc_kv: trustKvHandle },
        blockSize: [8, 32],
      });
      try {
        assert.deepEqual(await blockMask.counts(), { empty: 4, partial: 4, full: 6 });
        // What the kernels compute: the handle's full and empty blocks, the call's mask elsewhere.
        const call = refFlex(flex);
        const ref = referenceAttention(q, k, v, {
          isCausal: true,
          scoreMod: call.scoreMod,
          maskMod: (b, h, i, j) => (j < 64 || j >= 192 ? true : j < 128 ? false : call.maskMod!(b, h, i, j)),
        });
        debug.poisonOutputs = true;
        const { out, lse } = await withKernel(
          c.onePass,
          () =>
            attentionWithLse(host(q), host(k), host(v), {
              ...flex,
              blockMask,
              isCausal: true,
              backend: c.backend,
            }),
          c.tiles,
        );
        if (c.approximate) {
          assertSage(out.data as Float32Array, ref.out, "output");
          assertLse(lse.data as Float32Array, ref.lse, 0.02, "lse");
        } else {
          assertClose(out.data as Float32Array, ref.out, 2e-5, "output");
          assertLse(lse.data as Float32Array, ref.lse, 1e-4, "lse");
        }
      } finally {
        debug.poisonOutputs = false;
        blockMask.destroy();
      }
    },
  });
}

Deno.test({
  name: `flex createBlockMask: states per block, broadcast and per head${NO_GPU}`,
  ignore: !info,
  async fn() {
    const m = await createBlockMask(FUSED.maskMod!, {
      sQ: 16,
      sKv: 80,
      modBuffers: FUSED.modBuffers,
      blockSize: [4, 20],
    });
    // Query block x is document x; key blocks hold documents 0, 1 (and 5), 5, 5 (and 3).
    const expect = { empty: 0, partial: 0, full: 0 };
    for (let x = 0; x < 4; x++) {
      for (let y = 0; y < 4; y++) {
        const keys = Array.from(kvIds.slice(y * 20, y * 20 + 20));
        const hits = keys.filter((id) => id === x).length;
        if (hits === 0) expect.empty++;
        else if (hits === keys.length) expect.full++;
        else expect.partial++;
      }
    }
    assert.deepEqual(await m.counts(), expect);
    assert.equal(m.queryBlocks, 4);
    assert.equal(m.keyBlocks, 4);
    m.destroy();
    // A mask of the head: evaluated per head when n is given.
    const perHead = await createBlockMask(
      "fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool { return h == 1u; }",
      {
        n: 3,
        sQ: 5,
        sKv: 7,
        blockSize: 4,
      },
    );
    assert.deepEqual(await perHead.counts(), { empty: 8, partial: 0, full: 4 });
    perHead.destroy();
  },
});

// ---- errors: named options, nothing queued or left allocated ---------------------------------------

const T = { data: new Float32Array(2 * 4 * 8).fill(0.25), shape: [1, 2, 4, 8] };

async function refuses(options: Record<string, unknown>, code: string, argument: string, message?: RegExp) {
  const before = stats().liveBuffers;
  await assert.rejects(attentionForward(T, T, T, options as never), (e: unknown) => {
    assert.ok(e instanceof WgattnError, `not a WgattnError: ${e}`);
    assert.equal(e.code, code, e.message);
    assert.equal(e.argument, argument, e.message);
    if (message) assert.match(e.message, message);
    return true;
  });
  assert.equal(stats().liveBuffers, before, "a refused call left buffers allocated");
}

Deno.test("flex options are validated strictly", async () => {
  await refuses({ scoreMod: 3 }, "INVALID_OPTION", "options.scoreMod");
  await refuses({ scoreMod: "fn other() {}" }, "INVALID_OPTION", "options.scoreMod", /score_mod/);
  await refuses(
    { maskMod: { wgsl: "fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool { return true; }", js: 1 } },
    "INVALID_OPTION",
    "options.maskMod",
    /unknown key/,
  );
  await refuses({ modBuffers: { x: new Float32Array(1) } }, "INVALID_OPTION", "options.modBuffers");
  await refuses(
    { ...alibi(2), modBuffers: { "bad-name": new Float32Array(2) } },
    "INVALID_OPTION",
    "options.modBuffers.bad-name",
  );
  await refuses(
    { ...alibi(2), modBuffers: { alibi_slopes: new Float64Array(2) } },
    "INVALID_OPTION",
    "options.modBuffers.alibi_slopes",
  );
  await refuses({ blockMask: {} }, "INVALID_OPTION", "options.blockMask");
  await refuses({ scoremod: "x" }, "INVALID_OPTION", "options.scoremod", /did you mean scoreMod/);
});

Deno.test({
  name: `flex: a function that does not compile names its option and line; nothing is queued${NO_GPU}`,
  ignore: !info,
  async fn() {
    await refuses(
      {
        scoreMod:
          "fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32 {\n  return score * undefined_thing;\n}",
      },
      "INVALID_OPTION",
      "options.scoreMod",
      /line 2:\d+.*undefined_thing/,
    );
    await refuses(
      {
        maskMod: "fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool {\n  return 1u;\n}",
        backend: "flash",
      },
      "INVALID_OPTION",
      "options.maskMod",
      /line 2/,
    );
    // The wrong signature: the error is in the check's call of it.
    await refuses(
      { scoreMod: "fn score_mod(score: f32) -> f32 { return score; }" },
      "INVALID_OPTION",
      "options.scoreMod",
      /signature/,
    );
    // A mod buffer named as a kernel's own binding.
    await refuses(
      {
        scoreMod:
          "fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32 { return score + scores[0]; }",
        modBuffers: { scores: new Float32Array(1) },
        backend: "naive",
      },
      "INVALID_OPTION",
      "options.modBuffers",
      /kernel uses/,
    );
    // The router still serves plain calls: a bad function retires no backend.
    const why = await explain(T, T, T);
    assert.notEqual(why.backend, "cpu");
  },
});

Deno.test({
  name: `flex: cpu needs the TypeScript forms; block masks are checked against the call${NO_GPU}`,
  ignore: !info,
  async fn() {
    const wgslOnly = { scoreMod: alibi(2).scoreMod.wgsl, modBuffers: alibi(2).modBuffers };
    await refuses(
      { ...wgslOnly, backend: "cpu" },
      "BACKEND_UNSUPPORTED",
      "options.backend",
      /TypeScript form/,
    );
    const doc = documentMask(Int32Array.from([0, 0, 1, 1]));
    const m = await createBlockMask(doc.maskMod, { sQ: 4, sKv: 5, modBuffers: doc.modBuffers, blockSize: 2 });
    try {
      await refuses({ ...doc, blockMask: m }, "INVALID_OPTION", "options.blockMask", /another shape/);
      const m2 = await createBlockMask(doc.maskMod, {
        sQ: 4,
        sKv: 4,
        modBuffers: doc.modBuffers,
        blockSize: 2,
      });
      await refuses(
        { maskMod: prefixLm(1).maskMod, blockMask: m2 },
        "INVALID_OPTION",
        "options.maskMod",
        /differs/,
      );
      // The handle carries its mask and buffers: blockMask alone is a masked call.
      const ref = await attentionForward(T, T, T, { ...doc, backend: "cpu" });
      const out = await attentionForward(T, T, T, { blockMask: m2, backend: "naive" });
      assertClose(out.data as Float32Array, ref.data as Float32Array, 2e-6, "blockMask alone");
      m2.destroy();
      await refuses({ blockMask: m2 }, "INVALID_OPTION", "options.blockMask", /destroyed/);
    } finally {
      m.destroy();
    }
  },
});
