/**
 * `flash-mma`: exact attention on int8 matrix tiles. A pre-pass splits q and k per row, and v per
 * channel, into int8 slices under one scale each (three slices for f32, two for f16 and bf16;
 * wgsl/flash_mma.ts), then two passes (each row's maximum, in a kernel of its own for 128 query rows
 * and more; then P·V) compute Q·Kᵀ and P·V as sums of slice products,
 * each exact in i32 on the matrix units (Dawn's `chromium-experimental-subgroup-matrix`: NVIDIA
 * tensor cores), the products of one order sharing an accumulator, the orders combined in f32 (the
 * scheme after Ozaki by which FP64 and FP32 products are emulated on integer tensor cores). Its
 * error is within a few f32 roundings of `flash`'s (tests/flash_mma_test.ts prints both against
 * float64).
 *
 * Serves what `flash` serves but flex functions and serving layouts (causal and window with the
 * tiles outside skipped, GQA, key padding, layouts with d contiguous, d up to 256, any s up to
 * {@link flashMmaMaxKeys} keys, f32/f16/bf16, lse) on devices with i8 -> i32 M16 K32 tiles and
 * subgroups of exactly 32; with `WGATTN_EMULATE_MMA=1` (or {@link flashMmaTuning}.emulate) the
 * emulated form of the same tiles (plain WGSL) runs on any adapter, for tests (never picked by the
 * router). The router puts it ahead of `flash-subgroup` for f32 calls with d 64 to 128
 * from {@link FLASH_MMA_MIN_SEQ} on.
 */
import { kernelOf } from "../wgsl/common.ts";
import type { GpuBackend, GpuIO } from "./backend.ts";
import { flashUnsupportedReasons } from "./flash.ts";
import type { Capabilities } from "../core/device.ts";
import { readEnvIfGranted } from "../core/env.ts";
import type { GpuCall } from "../core/gpu.ts";
import { type AttentionProblem, hasBand, servingReasons } from "../core/problem.ts";
import { MMA_ROWS, sageMmaDims } from "../wgsl/sage_mma.ts";
import {
  type FlashMmaConfig,
  flashMmaConfigProblems,
  flashMmaKernel,
  flashMmaMaxKeys,
  flashMmaSliceKernel,
  flashMmaVKernel,
  sliceRowsPerGroup,
  V_COLUMNS,
  V_TILE,
} from "../wgsl/flash_mma.ts";
import { SAGE_MEAN_COLUMNS, sageStatsChunks, sageStatsKernel } from "../wgsl/sage.ts";
import { EMULATE_MMA_VARIABLE, mmaMainUniforms, mmaTileFor, realMmaReasons } from "./sage_mma.ts";

/**
 * Test and benchmark hooks: `override` merges over the chosen config (slices, order, maxOrder,
 * warps, bc, shape, qRegisters, skipMaxPass); `emulate` forces the form (null: the variable
 * decides); `minSeq` replaces {@link FLASH_MMA_MIN_SEQ} (router tests); `prepassOnly` (a benchmark
 * ablation, wrong results) records the slicing pre-pass alone.
 */
export const flashMmaTuning: {
  override: Partial<FlashMmaConfig> | null;
  emulate: boolean | null;
  minSeq: number | null;
  prepassOnly: boolean;
} = { override: null, emulate: null, minSeq: null, prepassOnly: false };

/** Whether the emulated form is selected. */
export function emulatingFlashMma(): boolean {
  return flashMmaTuning.emulate ?? readEnvIfGranted(EMULATE_MMA_VARIABLE) === "1";
}

/**
 * Shortest query and key sequence for which the router picks `flash-mma` for f32 calls (d 64 to
 * 128), ahead of `flash-subgroup`. On the H200 at b1 n24 d128 (bench/flash_mma_bench.ts --crossover,
 * run 19, the maximum pass as a kernel of its own) flash-mma took 1.66 ms against 1.82 at s 2048,
 * 3.55 against 4.07 at 3072 and 7.77 against 9.02 at 4608 (Flux), and lost at 1024 (0.565 against
 * 0.492); at d 64 (SD3, s 4250) 7.46 against 9.01. d past 128 is not measured.
 */
export const FLASH_MMA_MIN_SEQ = 2048;

/** Head dims (lowest and highest) for which the router may pick `flash-mma` by itself. */
const ROUTED_D: [number, number] = [64, 128];

/** Slices per operand for a dtype: f32 needs three (about 23 bits), f16 and bf16 two (15). */
export function slicesFor(dtype: AttentionProblem["dtype"]): number {
  return dtype === "f32" ? 3 : 2;
}

/**
 * Products the maximum pass keeps. f32 (three slices): orders 0 and 1, the three products of
 * order 2 bounded instead (a margin of 3·dQ/254² · |q_sc·k_sc|, 0.05 log2 units at d 128 for inputs
 * in [-8, 8], so P's largest value stays above 0.96): half the pass's matrix work for no measurable
 * error. Two slices keep both orders: order 1's margin (127·dQ·|q_sc·k_sc|) would cost P bits.
 */
export function maxOrderFor(slices: number): number {
  return slices >= 3 ? slices - 2 : slices - 1;
}

/**
 * Subgroups per block of 16 rows: P·V's accumulators (one 16x16 i32 tile per order and 16
 * channels, eight registers a lane each) are shared out until a subgroup holds at most 12 tiles
 * (96 registers): three orders at d 128 are 24 tiles, which spilled (bench/RESULTS.md, run 14).
 */
export function splitFor(orders: number, d: number): number {
  const tiles = orders * (sageMmaDims(d).dV / 16);
  return tiles <= 12 ? 1 : tiles <= 24 ? 2 : 4;
}

/** The main kernel's config for a call on a device, or the reason there is none. */
export function chooseFlashMmaConfig(
  p: AttentionProblem,
  caps: Capabilities,
  lse: boolean,
  emulate = emulatingFlashMma(),
): FlashMmaConfig | string {
  const { shape, limits } = mmaTileFor(caps, emulate);
  if (!shape) return "no int8 subgroup-matrix tile on this device";
  const slices = slicesFor(p.dtype);
  // Products up to order slices - 1: one accumulator per order, `slices` of them.
  const split = splitFor(slices, p.d);
  // K and V staged in workgroup memory first (Flux f32: 9.26 ms against 32.0 unstaged; SD3 9.48
  // against 25.2; bench/RESULTS.md, run 18), with as many blocks of 16 rows as fit (staged at d 128:
  // 2 blocks in 48 KB), then K alone, then neither.
  const warpsList = (p.sQ <= MMA_ROWS ? [1] : [4, 2, 1]).map((x) => x * split);
  const layouts = (["kv", "k", undefined] as const).flatMap((stage) =>
    warpsList.map((warps) => ({ stage, warps }))
  );
  let last = "no tile fits";
  for (const bc of [Math.max(32, 16 * split), 64]) {
    for (const { stage, warps } of layouts) {
      const c: FlashMmaConfig = {
        dtype: p.dtype,
        f16: caps.shaderF16,
        d: p.d,
        warps,
        bc,
        shape,
        band: hasBand(p),
        keyPadding: p.mask !== null,
        lse,
        emulate,
        varlen: p.varlen !== null,
        slices,
        order: slices - 1,
        maxOrder: maxOrderFor(slices),
        qRegisters: true,
        split,
        ...(stage ? { stage } : {}),
        // The maximum pass as a kernel of its own where a query block fills its eight blocks of 16
        // rows: Flux f32 8.76 -> 7.79 ms, SD3 9.07 -> 7.43 (bench/RESULTS.md, run 19).
        ...(p.sQ >= 8 * MMA_ROWS && !p.varlen ? { maxPass: "read" as const } : {}),
        ...(flashMmaTuning.override ?? {}),
      };
      const problems = flashMmaConfigProblems(c, limits);
      if (c.maxPass === "read" && !maxKernelConfig(c, limits)) problems.push("no maximum kernel fits");
      if (problems.length === 0) return c;
      last = problems.join("; ");
    }
  }
  return `no int8 matrix tile configuration fits this device (${last})`;
}

/**
 * The maximum kernel's config for a main kernel with `maxPass: "read"` (see FlashMmaConfig.maxPass):
 * one subgroup a block, K's slices up to maxOrder staged, as many blocks as fit (8 first), or null.
 */
export function maxKernelConfig(
  c: FlashMmaConfig,
  limits: { storage: number; invocations: number },
): FlashMmaConfig | null {
  for (const warps of [8, 4, 2, 1]) {
    const m: FlashMmaConfig = { ...c, warps, split: 1, stage: "k", maxPass: "only", lse: false };
    if (flashMmaConfigProblems(m, limits).length === 0) return m;
  }
  return null;
}

/** Blocks of 16 query rows one workgroup of a config serves. */
function blocksPerGroup(c: FlashMmaConfig): number {
  return c.warps / (c.split ?? 1);
}

/** Bytes of the scratch buffers and where each tensor's scales start in `scales` (in f32). */
function scratchSizes(p: AttentionProblem, c: FlashMmaConfig, max: FlashMmaConfig | null = null) {
  const { dQ, dV } = sageMmaDims(p.d);
  const qBlocks = Math.ceil(p.sQ / MMA_ROWS), kBlocks = Math.ceil(p.sKv / c.bc);
  const perGroup = blocksPerGroup(c);
  const blocks = Math.ceil(p.sQ / (MMA_ROWS * perGroup));
  // The last workgroup's extra subgroups (of either kernel) read up to their blocks past the end
  // (rows never stored).
  const qRows = (p.b * p.n * qBlocks + Math.max(perGroup, max ? blocksPerGroup(max) : 0)) * MMA_ROWS;
  const kRows = p.b * p.nKv * kBlocks * c.bc;
  return {
    qBlocks,
    kBlocks,
    blocks,
    maxBlocks: max ? Math.ceil(p.sQ / (MMA_ROWS * blocksPerGroup(max))) : 0,
    q8: qRows * dQ * c.slices,
    k8: kRows * dQ * c.slices,
    v8: kRows * dV * c.slices,
    kSc: qRows,
    vSc: qRows + kRows,
    scales: (qRows + kRows + p.b * p.nKv * dV) * 4,
  };
}

function unsupportedReasons(p: AttentionProblem, caps: Capabilities | null): string[] {
  const reasons = flashUnsupportedReasons(p, caps, false);
  if (!caps) return reasons;
  reasons.push(...servingReasons(p, { varlen: true }));
  if (p.flex) reasons.push("flex functions (scoreMod, maskMod) are not fused in its kernel");
  const emulate = emulatingFlashMma();
  if (!emulate) reasons.push(...realMmaReasons(caps));
  if (reasons.length === 0) {
    const c = chooseFlashMmaConfig(p, caps, true, emulate);
    if (typeof c === "string") reasons.push(c);
    else {
      const maxKeys = flashMmaMaxKeys(c);
      if (p.sKv > maxKeys) {
        reasons.push(
          `s_kv ${p.sKv} is over ${maxKeys}, past which its i32 P·V accumulators could overflow ` +
            `(${c.slices} slices, products up to order ${c.order})`,
        );
      }
      const sizes = scratchSizes(p, c);
      if (Math.max(sizes.q8, sizes.k8, sizes.v8, sizes.scales) > caps.limits.maxStorageBufferBindingSize) {
        reasons.push("its int8 slices of q, k or v do not fit one storage binding");
      }
      // q8, k8, v8, o, scales; the mask, the lse, a packed batch's offsets, the row maxima.
      const buffers = 5 + (p.mask ? 1 : 0) + 1 + (p.varlen ? 2 : 0) + (c.maxPass === "read" ? 1 : 0);
      if (buffers > caps.limits.maxStorageBuffersPerShaderStage) {
        reasons.push(
          `its kernel binds ${buffers} storage buffers, over maxStorageBuffersPerShaderStage (${caps.limits.maxStorageBuffersPerShaderStage})`,
        );
      }
    }
  }
  return reasons;
}

/** The minimum sequence the router needs before it picks `flash-mma` (tests may lower it). */
function minSeq(): number {
  return flashMmaTuning.minSeq ?? FLASH_MMA_MIN_SEQ;
}

function unsuitedReasons(p: AttentionProblem): string[] {
  if (emulatingFlashMma()) {
    return [
      `${EMULATE_MMA_VARIABLE}=1 selects its emulated form, for tests (slower than flash): by name only`,
    ];
  }
  if (p.dtype !== "f32") {
    return [
      "16-bit inputs: flash-subgroup is exact for them too and is not measured slower; choose it with " +
      "backend: 'flash-mma' or WGATTN_IMPLEMENTATION=flash-mma",
    ];
  }
  const least = minSeq();
  if (p.d < ROUTED_D[0] || p.d > ROUTED_D[1]) {
    return [
      `d ${p.d}: measured faster than flash-subgroup only for d ${ROUTED_D[0]} to ${ROUTED_D[1]} ` +
      "(bench/RESULTS.md, run 19); choose it with backend: 'flash-mma' or WGATTN_IMPLEMENTATION=flash-mma",
    ];
  }
  if (Math.min(p.sQ, p.sKv) < least) {
    return [
      `s_q ${p.sQ} / s_kv ${p.sKv} under ${least}: flash-subgroup measured faster there (FLASH_MMA_MIN_SEQ)`,
    ];
  }
  return [];
}

async function encode(p: AttentionProblem, io: GpuIO, call: GpuCall): Promise<void> {
  const caps = call.rt.caps;
  const lse = io.lse !== null;
  const c = chooseFlashMmaConfig(p, caps, lse);
  if (typeof c === "string") throw new Error(c);
  const input = { dtype: p.dtype, f16: caps.shaderF16, d: p.d };
  const main = kernelOf(flashMmaKernel, c);
  // The maximum pass as a kernel of its own (maxPass "read"): eight blocks a workgroup.
  const maxC = c.maxPass === "read" ? maxKernelConfig(c, mmaTileFor(caps, c.emulate).limits) : null;
  if (c.maxPass === "read" && !maxC) throw new Error("no maximum kernel fits");
  const maxMain = maxC ? kernelOf(flashMmaKernel, maxC) : null;
  const sliceQ = kernelOf(flashMmaSliceKernel, { ...input, rows: MMA_ROWS, slices: c.slices });
  const sliceK = kernelOf(flashMmaSliceKernel, { ...input, rows: c.bc, slices: c.slices });
  const sliceV = kernelOf(flashMmaVKernel, { ...input, bc: c.bc, slices: c.slices });
  // V's per-channel extremes over chunks of keys side by side: sage's column statistics.
  const statsV = kernelOf(sageStatsKernel, { ...input, extremes: true });
  const [mainPipe, qPipe, kPipe, vPipe, vStatsPipe, maxPipe] = await Promise.all(
    [main, sliceQ, sliceK, sliceV, statsV, ...(maxMain ? [maxMain] : [])].map((k) => call.pipeline(k)),
  );
  const sz = scratchSizes(p, c, maxC);
  const q8 = call.scratch(sz.q8, "flash-mma q slices");
  const k8 = call.scratch(sz.k8, "flash-mma k slices");
  const v8 = call.scratch(sz.v8, "flash-mma v slices");
  const scales = call.scratch(sz.scales, "flash-mma scales");
  const v4 = (x: number) => x / 4;
  const { dV } = sageMmaDims(p.d);
  const rpg = sliceRowsPerGroup(p.d);

  // 1. q and k split per row (q's scale carries the softmax scale and log2 e).
  const qTotal = sz.qBlocks * MMA_ROWS, kTotal = sz.kBlocks * c.bc;
  const qChunks = Math.ceil(qTotal / rpg), kChunks = Math.ceil(kTotal / rpg);
  call.dispatch(qPipe, sliceQ, { x: io.q, x8: q8, scales }, {
    heads: p.n,
    chunks: qChunks,
    total: qTotal,
    s: p.sQ,
    sb: v4(p.q.strides.b),
    sh: v4(p.q.strides.n),
    ss: v4(p.q.strides.s),
    scale_mul: p.scale * Math.LOG2E,
    sc_off: 0,
  }, p.b * p.n * qChunks);
  call.dispatch(kPipe, sliceK, { x: io.k, x8: k8, scales }, {
    heads: p.nKv,
    chunks: kChunks,
    total: kTotal,
    s: p.sKv,
    sb: v4(p.k.strides.b),
    sh: v4(p.k.strides.n),
    ss: v4(p.k.strides.s),
    scale_mul: 1,
    sc_off: sz.kSc,
  }, p.b * p.nKv * kChunks);
  // 2. v's per-channel extremes over chunks of keys side by side, then v split per channel by tiles.
  const { chunk, chunks } = sageStatsChunks(p.sKv);
  const part = call.scratch(p.b * p.nKv * chunks * 3 * p.d * 4, "flash-mma v partial statistics");
  const strides = {
    s: p.sKv,
    heads: p.nKv,
    chunks,
    sb: v4(p.v.strides.b),
    sh: v4(p.v.strides.n),
    ss: v4(p.v.strides.s),
  };
  const statGroups = Math.ceil(p.d / 4 / SAGE_MEAN_COLUMNS);
  call.dispatch(
    vStatsPipe,
    statsV,
    { x: io.v, part },
    { ...strides, cgroups: statGroups, chunk },
    p.b * p.nKv * statGroups * chunks,
  );
  const cgroups = Math.ceil(dV / 4 / V_COLUMNS), tiles = Math.ceil(kTotal / V_TILE);
  call.dispatch(
    vPipe,
    sliceV,
    { x: io.v, v8, scales, part },
    { ...strides, cgroups, tiles, rows: kTotal, sc_off: sz.vSc },
    p.b * p.nKv * cgroups * tiles,
  );
  if (flashMmaTuning.prepassOnly) return;
  // 3. The matrix kernel.
  const buffers: Record<string, GPUBuffer> = { q8, k8, v8, o: io.out, scales };
  if (io.mask) buffers.mask = io.mask;
  if (io.lse) buffers.lse = io.lse;
  if (p.varlen) Object.assign(buffers, { cuq: io.cuQ!, cuk: io.cuK! });
  const uniforms = { k_sc: sz.kSc, v_sc: sz.vSc, seqs: p.varlen?.seqs ?? 0 };
  if (maxC && maxMain) {
    const rowMax = call.scratch(p.b * p.n * p.sQ * 4, "flash-mma row maxima");
    const maxBuffers: Record<string, GPUBuffer> = { q8, k8, scales, row_max: rowMax };
    if (io.mask) maxBuffers.mask = io.mask;
    if (p.varlen) Object.assign(maxBuffers, { cuq: io.cuQ!, cuk: io.cuK! });
    call.dispatch(
      maxPipe,
      maxMain,
      maxBuffers,
      { ...mmaMainUniforms(p, { blocks: sz.maxBlocks, qBlocks: sz.qBlocks }), ...uniforms },
      p.b * p.n * sz.maxBlocks,
    );
    buffers.row_max = rowMax;
  }
  call.dispatch(
    mainPipe,
    main,
    buffers,
    { ...mmaMainUniforms(p, sz), ...uniforms },
    p.b * p.n * sz.blocks,
  );
}

/** Exact attention on int8 matrix tiles (Ozaki-style slices). */
export const flashMmaBackend: GpuBackend = {
  kind: "gpu",
  name: "flash-mma",
  aliases: ["flash_mma"],
  summary:
    "exact attention on int8 subgroup matrices: f32 operands split into int8 slices (Ozaki), exact i32 " +
    "slice products",
  producesLse: true,
  unsupportedReasons,
  unsuitedReasons,
  encode,
};
