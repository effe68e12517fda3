/**
 * `sage`: the SageAttention idea in WGSL. A GPU pre-pass (wgsl/sage.ts) smooths K (subtracts its
 * mean over the sequence per channel, which leaves the softmax unchanged) and quantizes Q per block
 * of query rows and K per block of keys to int8 with one f32 scale per block; the flash kernel's
 * int8 mode (`qk: "int8"`, wgsl/flash.ts) computes Q K^T with `dot4I8Packed` in i32, dequantizes
 * once per score and keeps the softmax and P V in f32. All in one compute pass, without waiting.
 *
 * Serves what `flash` serves (causal, window, GQA, key padding, layouts, f32/f16/bf16, lse, flex
 * functions and block masks, packed batches) but paged caches and sinks, where the device has
 * `dot4I8Packed`. A packed batch is quantized in blocks aligned to each sequence's start (its
 * query blocks are the kernel's work items, its key blocks the key tiles of its sequence), by two
 * work lists as flash's; K's mean is taken over all packed keys of a head (a shift common to all of
 * a row's keys). Smoothing shifts each row's
 * scores by `scale * q . mean(k)`: the pre-pass writes that per row and the kernel adds it back to
 * the lse and, before a score_mod, to each score. Its output is approximate (relative L1 error
 * about 2e-3, cosine similarity to float64 about 0.99999, tests/sage_test.ts), so the router picks
 * it by itself only for 16-bit inputs on long sequences, where it measured 1.4x to 1.5x faster than
 * flash (a packed batch: for its longest sequences); f32 inputs get it only by name.
 */
import { flexKernelConfig, type GpuBackend, type GpuIO } from "./backend.ts";
import { flashUnsupportedReasons, varlenItems, varlenWorkList } from "./flash.ts";
import type { Capabilities } from "../core/device.ts";
import type { GpuCall } from "../core/gpu.ts";
import { type AttentionProblem, diagonalOffset, hasBand, servingReasons } from "../core/problem.ts";
import { firstFitting, type FlashConfig, flashKernel } from "../wgsl/flash.ts";
import { SMALL_CALL_ROWS } from "./flash.ts";
import { blockMapFor } from "../core/flex_gpu.ts";
import {
  SAGE_MEAN_COLUMNS,
  SAGE_THREADS,
  sagePaddedDim,
  sageQuantKernel,
  sageStatsChunks,
  sageStatsFinalKernel,
  sageStatsKernel,
} from "../wgsl/sage.ts";
import { type Kernel, kernelOf } from "../wgsl/common.ts";

/** Tile shapes tried in order (as flash's); the first valid for the device and head dim wins. */
const TILINGS: readonly Pick<FlashConfig, "br" | "bc" | "rt" | "ct">[] = [
  { br: 64, bc: 64, rt: 16, ct: 16 },
  { br: 64, bc: 64, rt: 16, ct: 8 },
  { br: 32, bc: 64, rt: 8, ct: 16 },
  { br: 32, bc: 32, rt: 8, ct: 8 }, // small devices (16 KiB, e.g. software adapters)
  { br: 16, bc: 32, rt: 4, ct: 8 },
  { br: 16, bc: 16, rt: 4, ct: 4 },
];

/**
 * Test and benchmark hooks: force tile parameters (merged over the chosen config); `smooth: false`
 * skips K's mean (the mean buffer stays zero) to show what smoothing buys.
 */
export const sageTuning: { override: Partial<FlashConfig> | null; smooth: boolean } = {
  override: null,
  smooth: true,
};

/** Shortest query and key sequence for which the router picks `sage` by itself. */
export const SAGE_MIN_SEQ = 2048;

/** Largest |scale|·√d (1 at the default scale) for which the router picks `sage` by itself. */
export const SAGE_MAX_SHARPNESS = 2;

/** Why the router does not pick `sage` by itself for f32 inputs. */
export const SAGE_UNSUITED_F32 =
  "f32 inputs keep f32 accuracy (int8 Q·Kᵀ has relative L1 error about 2e-3); choose it with " +
  "backend: 'sage' or WGATTN_IMPLEMENTATION=sage";

/**
 * When the router passes `sage` over (it is its first choice otherwise). Measured on the H200
 * (bench/RESULTS.md, run 7): 1.30x to 1.56x faster than flash-subgroup on every suite shape from
 * s = 2048 up (Flux f16 6.26 vs 9.34 ms), 0.84x to 0.87x at s = 128 where its quantization
 * pre-pass does not pay off. Its error (cosine similarity 0.999998, relative L1 1.9e-3 at
 * s = 4608) is within a few roundings of 16-bit inputs, not of f32 ones: f32 calls keep flash
 * unless sage is named.
 */
function unsuitedReasons(p: AttentionProblem): string[] {
  if (p.dtype === "f32") return [SAGE_UNSUITED_F32];
  const sharpness = Math.abs(p.scale) * Math.sqrt(p.d);
  if (sharpness > SAGE_MAX_SHARPNESS) {
    return [
      `scale ${p.scale} is ${sharpness.toFixed(1)}x the default 1/sqrt(d): int8 Q·Kᵀ error grows with ` +
      `the scale (router limit ${SAGE_MAX_SHARPNESS}x)`,
    ];
  }
  // A packed batch: its longest sequences (for GPU offsets, the totals), as a batch of short
  // sequences is as many short calls.
  if (p.varlen && Math.min(p.varlen.maxSq, p.varlen.maxSkv) < SAGE_MIN_SEQ) {
    return [
      `longest packed sequence q ${p.varlen.maxSq} / k ${p.varlen.maxSkv} under ${SAGE_MIN_SEQ}: its ` +
      "quantization pre-pass does not pay off (flash measured faster at s = 128)",
    ];
  }
  if (Math.min(p.sQ, p.sKv) < SAGE_MIN_SEQ) {
    return [
      `s_q ${p.sQ} / s_kv ${p.sKv} under ${SAGE_MIN_SEQ}: its quantization pre-pass does not pay off ` +
      "(flash measured faster at s = 128)",
    ];
  }
  return [];
}

/** The int8-mode flash config for a call on a device, or the reason there is none. */
export function chooseSageConfig(
  p: AttentionProblem,
  caps: Capabilities,
  lse: boolean,
): FlashConfig | string {
  const limits = {
    storage: caps.limits.maxComputeWorkgroupStorageSize,
    invocations: caps.limits.maxComputeInvocationsPerWorkgroup,
  };
  // int8 columns of K staged at once: multiples of 16 dividing d padded to 16, at most 128.
  const dQ = sagePaddedDim(p.d);
  const dks = [128, 112, 96, 80, 64, 48, 32, 16].filter((x) => x <= dQ && dQ % x === 0);
  const base = {
    dtype: p.dtype,
    f16: caps.shaderF16,
    d: p.d,
    band: hasBand(p),
    keyPadding: p.mask !== null,
    lse,
    subgroups: false,
    swizzle: true,
    qk: "int8",
    flex: flexKernelConfig(p, true),
    varlen: p.varlen !== null,
  } as const;
  function* candidates(): Generator<FlashConfig> {
    // Few query rows or a software adapter: the smallest tile, flat, as flash does (backends/flash.ts).
    if (p.sQ <= SMALL_CALL_ROWS || caps.isFallbackAdapter) {
      for (const tiling of TILINGS.filter((t) => t.br <= SMALL_CALL_ROWS && t.bc <= SMALL_CALL_ROWS)) {
        yield { ...base, ...tiling, vc: 4, dk: 16, pointers: false, ...(sageTuning.override ?? {}) };
      }
    }
    for (const tiling of TILINGS) {
      if (p.d > 128 && tiling.ct < 16 && limits.storage >= 32768) continue;
      // Row pointers first where they fit (as flash; bench/RESULTS.md, run 7).
      for (const pointers of [true, false]) {
        for (const vc of [32, 16, 8, 4]) {
          if (vc > tiling.bc) continue;
          for (const dk of dks) {
            yield { ...base, ...tiling, vc, dk, pointers, ...(sageTuning.override ?? {}) };
          }
        }
      }
    }
  }
  const c = firstFitting(candidates(), limits);
  return typeof c === "string" ? `no int8 tile configuration fits this device (${c})` : c;
}

/**
 * Whether the pre-pass writes each row's `scale * q . mean(k)`: the lse adds it back, and so does
 * each score before a score_mod (K smoothing shifted the row's scores by it).
 */
export function needsRowBias(p: AttentionProblem, lse: boolean): boolean {
  return lse || p.flex?.scoreMod != null;
}

/**
 * Bytes of the pre-pass's scratch buffers; `items`: a packed batch's blocks per head (b is 1), q's
 * and k's.
 */
function scratchSizes(p: AttentionProblem, c: FlashConfig, lse: boolean, items?: { q: number; k: number }) {
  const dQ = sagePaddedDim(p.d);
  const qBlocks = items?.q ?? Math.ceil(p.sQ / c.br), kBlocks = items?.k ?? Math.ceil(p.sKv / c.bc);
  return {
    qBlocks,
    kBlocks,
    q8: p.b * p.n * qBlocks * c.br * dQ,
    k8: p.b * p.nKv * kBlocks * c.bc * dQ,
    qScale: p.b * p.n * qBlocks * 4,
    kScale: p.b * p.nKv * kBlocks * 4,
    mean: p.b * p.nKv * p.d * 4,
    bias: needsRowBias(p, lse) ? p.b * p.n * p.sQ * 4 : 0,
  };
}

function unsupportedReasons(p: AttentionProblem, caps: Capabilities | null): string[] {
  const reasons = flashUnsupportedReasons(p, caps, false);
  if (!caps) return reasons;
  // K smoothing shifts each row's scores by q·mean(k), which a sink logit would have to follow; its
  // int8 blocks of a paged cache would have to follow the table. Packed batches: blocks aligned to
  // each sequence's start (wgsl/sage.ts).
  reasons.push(...servingReasons(p, { varlen: true }));
  if (!caps.packedInt8Dot) {
    reasons.push("the device has no dot4I8Packed (WGSL packed_4x8_integer_dot_product)");
  }
  if (reasons.length === 0) {
    const c = chooseSageConfig(p, caps, false);
    if (typeof c === "string") reasons.push(c);
    else {
      const items = p.varlen ? { q: varlenItems(p, c.br, "q"), k: varlenItems(p, c.bc, "k") } : undefined;
      const sizes = scratchSizes(p, c, true, items);
      const limit = caps.limits.maxStorageBufferBindingSize;
      if (Math.max(sizes.q8, sizes.k8, sizes.bias) > limit) {
        reasons.push("its int8 copies of q and k do not fit one storage binding");
      }
      // A packed batch's kernel with the lse binds q8, k8, v, o, the two scales, the lse and its bias,
      // the offsets and both work lists.
      const buffers = kernelOf(flashKernel, { ...c, lse: true }).bindings.length;
      if (p.varlen && buffers > caps.limits.maxStorageBuffersPerShaderStage) {
        reasons.push(
          `its packed-batch kernel binds ${buffers} storage buffers, over maxStorageBuffersPerShaderStage (${caps.limits.maxStorageBuffersPerShaderStage})`,
        );
      }
    }
  }
  return reasons;
}

async function encode(p: AttentionProblem, io: GpuIO, call: GpuCall): Promise<void> {
  const caps = call.rt.caps;
  const lse = io.lse !== null;
  const c = chooseSageConfig(p, caps, lse);
  if (typeof c === "string") throw new Error(c);
  const input = { dtype: p.dtype, f16: c.f16, d: p.d, varlen: p.varlen !== null };
  const main = kernelOf(flashKernel, c);
  const quantK = kernelOf(sageQuantKernel, { ...input, rows: c.bc, smooth: true, bias: false });
  const bias = needsRowBias(p, lse);
  const quantQ = kernelOf(sageQuantKernel, { ...input, rows: c.br, smooth: false, bias });
  const [mainPipe, quantKPipe, quantQPipe] = await Promise.all(
    [main, quantK, quantQ].map((k) => call.pipeline(k)),
  );
  // A packed batch: the work lists of each sequence's own query blocks (the kernel's) and key blocks.
  const lists = p.varlen
    ? {
      q: await varlenWorkList(p, io, call, c.br, "q"),
      k: await varlenWorkList(p, io, call, c.bc, "k"),
    }
    : null;
  const sz = scratchSizes(p, c, lse, lists ? { q: lists.q.items, k: lists.k.items } : undefined);
  const q8 = call.scratch(sz.q8, "sage q int8");
  const k8 = call.scratch(sz.k8, "sage k int8");
  const qScale = call.scratch(sz.qScale, "sage q scales");
  const kScale = call.scratch(sz.kScale, "sage k scales");
  const mean = call.scratch(sz.mean, "sage k mean");
  const rowBias = bias ? call.scratch(sz.bias, "sage row bias") : null;
  const v4 = (x: number) => x / 4;

  if (sageTuning.smooth) await encodeKMean(call, p, io.k, mean);
  encodeSageQuantization(call, p, io, {
    pipes: { quantKPipe, quantK, quantQPipe, quantQ },
    buffers: { q8, k8, qScale, kScale, mean, bias: rowBias },
    blocks: { q: sz.qBlocks, k: sz.kBlocks },
    varlen: lists ? { q: lists.q.wl, k: lists.k.wl } : undefined,
  });
  // 4. The flash kernel in int8 mode.
  const ms = p.mask?.strides ?? { b: 0, j: 0 };
  const buffers: Record<string, GPUBuffer> = { q8, k8, v: io.v, o: io.out, q_scale: qScale, k_scale: kScale };
  if (io.mask) buffers.mask = io.mask;
  if (io.lse) buffers.lse = io.lse;
  if (rowBias) buffers.lse_bias = rowBias;
  if (lists) Object.assign(buffers, { cuq: io.cuQ!, cuk: io.cuK!, wl: lists.q.wl, wlk: lists.k.wl });
  if (io.flex) Object.assign(buffers, io.flex);
  const map = c.flex?.blockMap ? await blockMapFor(call, p, io, c.br, c.bc) : null;
  if (map) buffers.flex_blocks = map.buffer;
  const bound = p.sQ + p.sKv + Math.abs(diagonalOffset(p));
  call.dispatch(mainPipe, main, buffers, {
    ...(map?.uniforms ?? {}),
    flex_scale: p.scale,
    n: p.n,
    group: p.n / p.nKv,
    s_q: p.sQ,
    s_kv: p.sKv,
    blocks: sz.qBlocks,
    scale_log2: p.scale * Math.LOG2E, // unused in int8 mode (folded into the q scales)
    offset: diagonalOffset(p),
    // Unbounded sides as a finite bound that cannot overflow i32 in the kernel's index arithmetic.
    left: Math.min(p.left, bound),
    right: Math.min(p.right, bound),
    q_sb: v4(p.q.strides.b),
    q_sh: v4(p.q.strides.n),
    q_ss: v4(p.q.strides.s),
    k_sb: v4(p.k.strides.b),
    k_sh: v4(p.k.strides.n),
    k_ss: v4(p.k.strides.s),
    v_sb: v4(p.v.strides.b),
    v_sh: v4(p.v.strides.n),
    v_ss: v4(p.v.strides.s),
    o_sb: v4(p.out.strides.b),
    o_sh: v4(p.out.strides.n),
    o_ss: v4(p.out.strides.s),
    m_sb: ms.b,
    m_sj: ms.j,
    seqs: p.varlen?.seqs ?? 0,
    k_items: sz.kBlocks,
  }, lists ? sz.qBlocks * p.n : p.b * p.n * sz.qBlocks);
}

/** The int8 Q·Kᵀ (SageAttention-style) backend. */
export const sageBackend: GpuBackend = {
  kind: "gpu",
  name: "sage",
  // "sage_attention" and "sageattention" name the sage family (core/router.ts, BACKEND_FAMILIES).
  aliases: ["sage_int8"],
  summary: "SageAttention-style: smoothed K, int8 Q·Kᵀ by dot4I8Packed, f32 softmax and P·V",
  producesLse: true,
  unsupportedReasons,
  unsuitedReasons,
  encode,
};

/** Pipelines and kernels of sage's quantization pre-pass (wgsl/sage.ts). */
export interface SageQuantPipes {
  quantKPipe: GPUComputePipeline;
  quantK: Kernel;
  quantQPipe: GPUComputePipeline;
  quantQ: Kernel;
}

/**
 * Records sage's quantization pre-pass, shared with `sage-mma`, after K's mean ({@link encodeKMean},
 * left zero when K is not smoothed): K - mean to int8 per block of keys, and Q to int8 per block of rows with a scale that carries the softmax scale in log2 units (and, for the
 * log-sum-exp or a score_mod, each row's scale·q·mean(k) in `bias`).
 */
export function encodeSageQuantization(
  call: GpuCall,
  p: AttentionProblem,
  io: GpuIO,
  o: {
    pipes: SageQuantPipes;
    buffers: {
      q8: GPUBuffer;
      k8: GPUBuffer;
      qScale: GPUBuffer;
      kScale: GPUBuffer;
      mean: GPUBuffer;
      bias: GPUBuffer | null;
    };
    blocks: { q: number; k: number };
    /**
     * A packed batch: the work lists of q's and k's blocks (`blocks` their totals or bounds); each
     * sequence's blocks start at its own first row.
     */
    varlen?: { q: GPUBuffer; k: GPUBuffer };
  },
): void {
  const { pipes, buffers: b } = o;
  const v4 = (x: number) => x / 4;
  const vl = o.varlen;
  const kBuffers: Record<string, GPUBuffer> = { x: io.k, x8: b.k8, x_scale: b.kScale, mean: b.mean };
  if (vl) Object.assign(kBuffers, { cu: io.cuK!, wl: vl.k });
  call.dispatch(pipes.quantKPipe, pipes.quantK, kBuffers, {
    heads: p.nKv,
    group: 1,
    n_kv: p.nKv,
    blocks: o.blocks.k,
    s: p.sKv,
    sb: v4(p.k.strides.b),
    sh: v4(p.k.strides.n),
    ss: v4(p.k.strides.s),
    scale_mul: 1,
    bias_scale: 0,
    seqs: p.varlen?.seqs ?? 0,
  }, p.b * p.nKv * o.blocks.k);
  const qBuffers: Record<string, GPUBuffer> = { x: io.q, x8: b.q8, x_scale: b.qScale };
  if (b.bias) {
    qBuffers.mean = b.mean;
    qBuffers.bias = b.bias;
  }
  if (vl) Object.assign(qBuffers, { cu: io.cuQ!, wl: vl.q });
  call.dispatch(pipes.quantQPipe, pipes.quantQ, qBuffers, {
    heads: p.n,
    group: p.n / p.nKv,
    n_kv: p.nKv,
    blocks: o.blocks.q,
    s: p.sQ,
    sb: v4(p.q.strides.b),
    sh: v4(p.q.strides.n),
    ss: v4(p.q.strides.s),
    scale_mul: p.scale * Math.LOG2E,
    bias_scale: p.scale,
    seqs: p.varlen?.seqs ?? 0,
  }, p.b * p.n * o.blocks.q);
}

/**
 * Records a tensor's per-channel statistics (the call's `k` or `v`, buffer `x`) into `out`: partial
 * statistics over chunks of keys side by side ({@link sageStatsKernel}), then one invocation per
 * output column combines them ({@link sageStatsFinalKernel}: the mean, or with `extremes` the scale
 * and the mean, `width` vec4 columns per head).
 */
export async function encodeColumnStats(
  call: GpuCall,
  p: AttentionProblem,
  which: "k" | "v",
  x: GPUBuffer,
  out: GPUBuffer,
  o: { extremes: boolean; width: number },
): Promise<void> {
  const { extremes, width } = o;
  const stats = kernelOf(sageStatsKernel, { dtype: p.dtype, f16: call.rt.caps.shaderF16, d: p.d, extremes });
  const final = kernelOf(sageStatsFinalKernel, { d: p.d, extremes, width });
  const [statsPipe, finalPipe] = await Promise.all([call.pipeline(stats), call.pipeline(final)]);
  const { chunk, chunks } = sageStatsChunks(p.sKv);
  const cgroups = Math.ceil(p.d / 4 / SAGE_MEAN_COLUMNS);
  const part = call.scratch(
    p.b * p.nKv * chunks * (extremes ? 3 : 1) * p.d * 4,
    `wgattn ${which} partial statistics`,
  );
  const strides = p[which].strides;
  call.dispatch(statsPipe, stats, { x, part }, {
    heads: p.nKv,
    cgroups,
    chunks,
    chunk,
    s: p.sKv,
    sb: strides.b / 4,
    sh: strides.n / 4,
    ss: strides.s / 4,
  }, p.b * p.nKv * cgroups * chunks);
  const columns = p.b * p.nKv * width;
  call.dispatch(
    finalPipe,
    final,
    { part, out },
    { columns, chunks, s: p.sKv },
    Math.ceil(columns / SAGE_THREADS),
  );
}

/** Records K's mean over the sequence per (batch, K/V head, channel) into `mean` (`[b, n_kv, d]` f32). */
export function encodeKMean(
  call: GpuCall,
  p: AttentionProblem,
  k: GPUBuffer,
  mean: GPUBuffer,
): Promise<void> {
  return encodeColumnStats(call, p, "k", k, mean, { extremes: false, width: p.d / 4 });
}
