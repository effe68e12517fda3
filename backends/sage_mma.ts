/**
 * `sage-mma`: SageAttention's method on matrix units. The `sage` pre-pass (wgsl/sage.ts: K
 * smoothed by its mean, Q and K quantized per block to int8, d padded to 32) plus V centred and
 * quantized per channel (wgsl/sage_mma.ts), then one kernel doing Q·Kᵀ and P·V on int8 subgroup
 * matrices (Dawn's `chromium-experimental-subgroup-matrix`: NVIDIA tensor cores) with the online
 * softmax in f32 (wgsl/sage_mma.ts). All in one compute pass, without waiting.
 *
 * Serves what `flash` serves (causal and window with tiles outside skipped, GQA, key padding,
 * layouts with d contiguous, d up to 256, any s, f32/f16/bf16, lse, flex functions with the empty
 * tiles of a block map skipped, in both main kernels; a score_mod gets each row's smoothing shift
 * added back, as in `sage`) on devices with i8 -> i32 M16 K32 tiles and subgroups of exactly 32;
 * with `WGATTN_EMULATE_MMA=1` it runs the emulated
 * form of the same tiles (plain WGSL) on any adapter, for tests (never picked by the router).
 * Approximate: P and V in int8 add to `sage`'s error (tests/sage_mma_test.ts prints cosine and
 * relative L1 against float64).
 */
import { kernelOf } from "../wgsl/common.ts";
import { flexKernelConfig, type GpuBackend, type GpuIO } from "./backend.ts";
import { flashUnsupportedReasons } from "./flash.ts";
import type { Capabilities } from "../core/device.ts";
import { readEnvIfGranted } from "../core/env.ts";
import type { GpuCall } from "../core/gpu.ts";
import { type AttentionProblem, diagonalOffset, hasBand, servingReasons } from "../core/problem.ts";
import { hasMmaConfig, type MmaShape } from "../wgsl/mma.ts";
import { SAGE_MEAN_COLUMNS, sageQuantKernel } from "../wgsl/sage.ts";
import {
  MMA_ROWS,
  type SageMmaConfig,
  sageMmaConfigProblems,
  sageMmaDims,
  sageMmaKernel,
  sageMmaVKernel,
  V_TILE_ROWS,
} from "../wgsl/sage_mma.ts";
import {
  sageMmaTwoPassKernel,
  type TwoPassConfig,
  twoPassConfigProblems,
  U8_PV_MAX_KEYS,
} from "../wgsl/sage_mma_two_pass.ts";
import {
  encodeColumnStats,
  encodeKMean,
  encodeSageQuantization,
  needsRowBias,
  SAGE_MAX_SHARPNESS,
} from "./sage.ts";
import { blockMapFor } from "../core/flex_gpu.ts";

/** The environment variable that selects the emulated (plain WGSL) matrix steps. */
export const EMULATE_MMA_VARIABLE = "WGATTN_EMULATE_MMA";

/**
 * Test and benchmark hooks: `override` merges over the chosen config; `emulate` forces the form
 * (null: the variable decides); `twoPass` false selects the one-pass kernel (wgsl/sage_mma.ts);
 * `prepassOnly` (a benchmark ablation, wrong results) records the quantization pre-pass alone, and
 * `prepassSkip` leaves parts of it out (`kmean`, `quant` for Q's and K's, `vstat`, `vquant`).
 */
export const sageMmaTuning: {
  override: Partial<TwoPassConfig> | null;
  emulate: boolean | null;
  twoPass: boolean;
  prepassOnly: boolean;
  prepassSkip: readonly ("kmean" | "quant" | "vstat" | "vquant")[];
} = {
  override: null,
  emulate: null,
  twoPass: true,
  prepassOnly: false,
  prepassSkip: [],
};

/** A config of either main kernel. */
export type AnySageMmaConfig = SageMmaConfig | TwoPassConfig;

/** Whether a config is the two-pass kernel's. */
export function isTwoPass(c: AnySageMmaConfig): c is TwoPassConfig {
  return "pv" in c;
}

/** Whether the emulated form is selected. */
export function emulatingMma(): boolean {
  return sageMmaTuning.emulate ?? readEnvIfGranted(EMULATE_MMA_VARIABLE) === "1";
}

/** Tiles tried in order on a device with subgroup matrices. */
const REAL_SHAPES: readonly MmaShape[] = [
  { component: "i8", result: "i32", M: 16, N: 16, K: 32 },
  { component: "i8", result: "i32", M: 16, N: 8, K: 32 },
];

/**
 * The int8 tile the matrix backends (sage-mma, flash-mma) build on for this device (the emulated form
 * takes the first), or null, with the limits their configs must meet.
 */
export function mmaTileFor(
  caps: Capabilities,
  emulate: boolean,
): { shape: MmaShape | null; limits: { storage: number; invocations: number } } {
  return {
    shape: emulate
      ? REAL_SHAPES[0]
      : REAL_SHAPES.find((s) => hasMmaConfig(caps.subgroupMatrixConfigs, s)) ?? null,
    limits: {
      storage: caps.limits.maxComputeWorkgroupStorageSize,
      invocations: caps.limits.maxComputeInvocationsPerWorkgroup,
    },
  };
}

/** Why the real form cannot run on this device (empty when it can). */
export function realMmaReasons(caps: Capabilities): string[] {
  const reasons: string[] = [];
  if (!REAL_SHAPES.some((s) => hasMmaConfig(caps.subgroupMatrixConfigs, s))) {
    reasons.push(
      "the device has no int8 subgroup matrices (i8 -> i32, M16 K32: Dawn's chromium-experimental-subgroup-matrix); " +
        `${EMULATE_MMA_VARIABLE}=1 runs the emulated form`,
    );
  } else if (!caps.subgroups || caps.subgroupMinSize !== 32 || (caps.subgroupMaxSize ?? 0) !== 32) {
    reasons.push(
      `its tiles need subgroups of exactly 32 invocations (this device: ${caps.subgroupMinSize} to ${
        caps.subgroupMaxSize ?? "?"
      })`,
    );
  }
  return reasons;
}

/** The main kernel's config for a call on a device, or the reason there is none. */
export function chooseSageMmaConfig(
  p: AttentionProblem,
  caps: Capabilities,
  lse: boolean,
  emulate = emulatingMma(),
): AnySageMmaConfig | string {
  const { shape, limits } = mmaTileFor(caps, emulate);
  if (!shape) return "no int8 subgroup-matrix tile on this device";
  const small = p.sQ <= MMA_ROWS;
  const bcs = p.sKv <= 32 ? [32] : [64, 32];
  let last = "no tile fits";
  // Most subgroups per workgroup first, 64-key tiles first: on the H200 at the Flux shape 4 subgroups
  // with aliased S and O tiles ran 10.3 ms, 3 subgroups 10.7 to 11.0, 2 subgroups 12.6 to 13.2, and
  // 4 subgroups of 32-key tiles 12.8 to 29.5 (bench/RESULTS.md, runs 11 and 12).
  const layouts = (small ? [1] : [4, 3, 2, 1]).flatMap((warps) => [
    { warps, alias: false },
    { warps, alias: true },
  ]);
  // What both kernels' configs take from the call and the device.
  const common = (bc: number) => ({
    dtype: p.dtype,
    f16: caps.shaderF16,
    d: p.d,
    bc,
    shape,
    band: hasBand(p),
    keyPadding: p.mask !== null,
    lse,
    emulate,
    vTransposed: true,
    flex: flexKernelConfig(p, true),
  });
  if (sageMmaTuning.twoPass) {
    // K and V staged in workgroup memory and 32-key tiles first: on the H200 at the Flux shape that
    // ran 2.39 to 7.71 ms, against 13.0 with 64-key tiles and 15.3 unstaged (bench/RESULTS.md, run 13);
    // with fast math 1.88 to 1.91 ms, 64-key tiles 13.7 (run 15).
    // 8 subgroups for d >= 128 (flux 2.38 ms against 3.44 with 4; long 38.0 against 51.4; causal
    // b4 n32 s2048 1.79 against 2.55), 4 for smaller d (sd3, d 64: 2.77 against 3.63); then fewer,
    // then the unstaged forms (two S regions, then one) where staging does not fit.
    const wide = p.d >= 128 ? [8, 4, 2, 1] : [4, 8, 2, 1];
    const twoPassLayouts = (small ? [1] : wide).flatMap((warps) => [
      { warps, stage: true, doubleS: false },
      { warps, stage: false, doubleS: true },
      { warps, stage: false, doubleS: false },
    ]);
    for (const bc of p.sKv <= 32 ? [32] : [32, 64]) {
      for (const layout of twoPassLayouts) {
        const c: TwoPassConfig = {
          ...common(bc),
          ...layout,
          pv: p.sKv <= U8_PV_MAX_KEYS ? "u8" : "i8",
          // Kept out of the config (and its cache key) unless set.
          ...(p.scale < 0 ? { negativeScale: true } : {}),
          varlen: p.varlen !== null,
          // The maximum pass by pairs of subgroups where no band narrows the key loop: SD3 2.08 ms
          // against 2.25, the long shape 28.4 against 29.6, Flux 1.74 against 1.76; a causal band
          // slows it (b4 n32 s2048: 1.82 against 1.63), so banded calls keep the default pass
          // (bench/RESULTS.md, run 18).
          ...(hasBand(p) ? {} : { maxPairs: true }),
          ...(sageMmaTuning.override ?? {}),
        };
        const problems = twoPassConfigProblems(c, limits);
        if (problems.length === 0) return c;
        last = problems.join("; ");
      }
    }
    return `no int8 matrix tile configuration fits this device (${last})`;
  }
  for (const bc of bcs) {
    for (const layout of layouts) {
      const c: SageMmaConfig = { ...common(bc), ...layout, ...(sageMmaTuning.override ?? {}) };
      const problems = sageMmaConfigProblems(c, limits);
      if (problems.length === 0) return c;
      last = problems.join("; ");
    }
  }
  return `no int8 matrix tile configuration fits this device (${last})`;
}

/** Bytes of the scratch buffers. */
function scratchSizes(p: AttentionProblem, c: AnySageMmaConfig, lse: boolean) {
  const { dQ, dV } = sageMmaDims(p.d);
  const qBlocks = Math.ceil(p.sQ / MMA_ROWS), kBlocks = Math.ceil(p.sKv / c.bc);
  const blocks = Math.ceil(p.sQ / (MMA_ROWS * c.warps));
  return {
    qBlocks,
    kBlocks,
    blocks,
    // The last workgroup's extra subgroups read up to `warps` blocks past the end (rows never stored).
    q8: (p.b * p.n * qBlocks + c.warps) * MMA_ROWS * dQ,
    qScale: (p.b * p.n * qBlocks + c.warps) * 4,
    k8: p.b * p.nKv * kBlocks * c.bc * dQ,
    kScale: p.b * p.nKv * kBlocks * 4,
    mean: p.b * p.nKv * p.d * 4,
    v8: p.b * p.nKv * kBlocks * c.bc * dV,
    vStat: p.b * p.nKv * 2 * dV * 4,
    bias: needsRowBias(p, lse) ? p.b * p.n * p.sQ * 4 : 0,
  };
}

function unsupportedReasons(p: AttentionProblem, caps: Capabilities | null): string[] {
  const reasons = flashUnsupportedReasons(p, caps, false);
  if (!caps) return reasons;
  // Its int8 pre-pass quantizes dense [b, n, s, d] blocks, and K smoothing shifts each row's scores
  // by q·mean(k), which a sink logit would have to follow.
  // Packed batches: the two-pass kernel masks each row to its own sequence's keys.
  reasons.push(...servingReasons(p, { varlen: sageMmaTuning.twoPass }));
  const emulate = emulatingMma();
  if (!emulate) reasons.push(...realMmaReasons(caps));
  // The two-pass kernel sums each row's P bytes with dot4U8Packed.
  if (!caps.packedInt8Dot && sageMmaTuning.twoPass) {
    reasons.push("the device has no dot4U8Packed (WGSL packed_4x8_integer_dot_product)");
  }
  if (reasons.length === 0) {
    const c = chooseSageMmaConfig(p, caps, true, emulate);
    if (typeof c === "string") reasons.push(c);
    else {
      const sizes = scratchSizes(p, c, true);
      const limit = caps.limits.maxStorageBufferBindingSize;
      if (Math.max(sizes.q8, sizes.k8, sizes.v8, sizes.bias) > limit) {
        reasons.push("its int8 copies of q, k and v do not fit one storage binding");
      }
      // With the lse and its bias; flex calls add their mod buffers and the block map.
      const buffers = 7 + (p.mask ? 1 : 0) + 2 + (p.flex?.buffers.length ?? 0) + (c.flex?.blockMap ? 1 : 0);
      if (buffers > caps.limits.maxStorageBuffersPerShaderStage) {
        reasons.push(
          `its kernel binds ${buffers} storage buffers, over maxStorageBuffersPerShaderStage (${caps.limits.maxStorageBuffersPerShaderStage})`,
        );
      }
    }
  }
  return reasons;
}

/**
 * Shortest query and key sequence for which the router picks `sage-mma` by itself. On the H200
 * (bench/RESULTS.md, run 13) it beat `sage` at every length measured, from s = 512 (0.111 against
 * 0.139 ms at b1 n24 d128) to 16384 (2.1x), and ran 51 TFLOP/s at s = 1024, above what the FP32
 * pipes give flash; below 1024 the pre-pass weighs more and it is not measured against flash.
 */
export const SAGE_MMA_MIN_SEQ = 1024;

function unsuitedReasons(p: AttentionProblem): string[] {
  if (emulatingMma()) {
    return [
      `${EMULATE_MMA_VARIABLE}=1 selects its emulated form, for tests (slower than flash): by name only`,
    ];
  }
  if (p.dtype === "f32") {
    return [
      "f32 inputs keep f32 accuracy (int8 Q·Kᵀ and P·V: relative L1 error about 6e-3); choose it with " +
      "backend: 'sage-mma' or WGATTN_IMPLEMENTATION=sage-mma",
    ];
  }
  const sharpness = Math.abs(p.scale) * Math.sqrt(p.d);
  if (sharpness > SAGE_MAX_SHARPNESS) {
    return [
      `scale ${p.scale} is ${sharpness.toFixed(1)}x the default 1/sqrt(d): int8 Q·Kᵀ error grows with ` +
      `the scale (router limit ${SAGE_MAX_SHARPNESS}x)`,
    ];
  }
  if (Math.min(p.sQ, p.sKv) < SAGE_MMA_MIN_SEQ) {
    return [
      `s_q ${p.sQ} / s_kv ${p.sKv} under ${SAGE_MMA_MIN_SEQ}: its quantization pre-pass weighs more than ` +
      "the matrix units save (measured from s = 512 against sage, not against flash below 1024)",
    ];
  }
  return [];
}

async function encode(p: AttentionProblem, io: GpuIO, call: GpuCall): Promise<void> {
  const caps = call.rt.caps;
  const lse = io.lse !== null;
  const c = chooseSageMmaConfig(p, caps, lse);
  if (typeof c === "string") throw new Error(c);
  const input = { dtype: p.dtype, f16: caps.shaderF16, d: p.d };
  const main = isTwoPass(c) ? kernelOf(sageMmaTwoPassKernel, c) : kernelOf(sageMmaKernel, c);
  const quantK = kernelOf(sageQuantKernel, { ...input, rows: c.bc, smooth: true, bias: false, pad: 32 });
  const bias = needsRowBias(p, lse);
  const quantQ = kernelOf(sageQuantKernel, { ...input, rows: MMA_ROWS, smooth: false, bias, pad: 32 });
  const quantV = kernelOf(sageMmaVKernel, {
    ...input,
    bc: c.bc,
    transposed: isTwoPass(c) || c.vTransposed === true,
    offset: isTwoPass(c) && c.pv === "u8",
  });
  const [mainPipe, quantKPipe, quantQPipe, quantVPipe] = await Promise.all(
    [main, quantK, quantQ, quantV].map((k) => call.pipeline(k)),
  );
  const sz = scratchSizes(p, c, lse);
  const q8 = call.scratch(sz.q8, "sage-mma q int8");
  const k8 = call.scratch(sz.k8, "sage-mma k int8");
  const v8 = call.scratch(sz.v8, "sage-mma v int8");
  const qScale = call.scratch(sz.qScale, "sage-mma q scales");
  const kScale = call.scratch(sz.kScale, "sage-mma k scales");
  const mean = call.scratch(sz.mean, "sage-mma k mean");
  const vStat = call.scratch(sz.vStat, "sage-mma v scales and means");
  const rowBias = bias ? call.scratch(sz.bias, "sage-mma row bias") : null;
  const v4 = (x: number) => x / 4;
  const { dV } = sageMmaDims(p.d);

  const skip = sageMmaTuning.prepassSkip;
  if (!skip.includes("kmean")) await encodeKMean(call, p, io.k, mean);
  if (!skip.includes("quant")) {
    encodeSageQuantization(call, p, io, {
      pipes: { quantKPipe, quantK, quantQPipe, quantQ },
      buffers: { q8, k8, qScale, kScale, mean, bias: rowBias },
      blocks: { q: sz.qBlocks, k: sz.kBlocks },
    });
  }
  // 4. V's per-channel mean and absmax, then V - mean to int8 per channel.
  if (!skip.includes("vstat")) await encodeVStat(call, p, io.v, vStat);
  const vgroups = Math.ceil(dV / 4 / SAGE_MEAN_COLUMNS);
  const rows = sz.kBlocks * c.bc, tiles = Math.ceil(rows / V_TILE_ROWS);
  if (!skip.includes("vquant")) {
    call.dispatch(quantVPipe, quantV, { x: io.v, v8, v_stat: vStat }, {
      cgroups: vgroups,
      tiles,
      s: p.sKv,
      rows,
      heads: p.nKv,
      sb: v4(p.v.strides.b),
      sh: v4(p.v.strides.n),
      ss: v4(p.v.strides.s),
    }, p.b * p.nKv * vgroups * tiles);
  }
  if (sageMmaTuning.prepassOnly) return;
  // 5. The matrix kernel.
  const buffers: Record<string, GPUBuffer> = {
    q8,
    k8,
    v8,
    o: io.out,
    q_scale: qScale,
    k_scale: kScale,
    v_stat: vStat,
  };
  if (io.mask) buffers.mask = io.mask;
  if (io.lse) buffers.lse = io.lse;
  if (rowBias) buffers.lse_bias = rowBias;
  if (p.varlen) Object.assign(buffers, { cuq: io.cuQ!, cuk: io.cuK! });
  if (io.flex) Object.assign(buffers, io.flex);
  const map = c.flex?.blockMap ? await blockMapFor(call, p, io, MMA_ROWS * c.warps, c.bc) : null;
  if (map) buffers.flex_blocks = map.buffer;
  call.dispatch(
    mainPipe,
    main,
    buffers,
    { ...(map?.uniforms ?? {}), ...mmaMainUniforms(p, sz), seqs: p.varlen?.seqs ?? 0 },
    p.b * p.n * sz.blocks,
  );
}

/** Records V's per-channel scale and mean into `vStat` (`[b, n_kv, 2, dV]`, as the kernels read it). */
export function encodeVStat(
  call: GpuCall,
  p: AttentionProblem,
  v: GPUBuffer,
  vStat: GPUBuffer,
): Promise<void> {
  return encodeColumnStats(call, p, "v", v, vStat, { extremes: true, width: sageMmaDims(p.d).dV / 4 });
}

/**
 * Uniforms shared by the matrix kernels' main dispatch (sage-mma's and flash-mma's): sizes, the band
 * (unbounded sides as a bound that cannot overflow i32), output and key-padding strides.
 */
export function mmaMainUniforms(
  p: AttentionProblem,
  sz: { blocks: number; qBlocks: number },
): Record<string, number> {
  const v4 = (x: number) => x / 4;
  const ms = p.mask?.strides ?? { b: 0, j: 0 };
  const bound = p.sQ + p.sKv + Math.abs(diagonalOffset(p));
  return {
    n: p.n,
    group: p.n / p.nKv,
    s_q: p.sQ,
    s_kv: p.sKv,
    blocks: sz.blocks,
    q_blocks: sz.qBlocks,
    offset: diagonalOffset(p),
    left: Math.min(p.left, bound),
    right: Math.min(p.right, bound),
    o_sb: v4(p.out.strides.b),
    o_sh: v4(p.out.strides.n),
    o_ss: v4(p.out.strides.s),
    m_sb: ms.b,
    m_sj: ms.j,
  };
}

/** SageAttention on int8 matrix tiles. */
export const sageMmaBackend: GpuBackend = {
  kind: "gpu",
  name: "sage-mma",
  aliases: ["sage_mma", "sageattention_mma"],
  summary: "SageAttention on int8 subgroup matrices: smoothed K, int8 Q·Kᵀ and P·V tiles, f32 online softmax",
  producesLse: true,
  unsupportedReasons,
  unsuitedReasons,
  encode,
};
