/**
 * `split-kv`: flash-decoding for few queries over many keys (decoding with a KV cache, cross
 * attention to a long context). The key sequence is split into chunks over many workgroups, each
 * serving every query head of a GQA group (K and V are read once per group), writing a partial
 * output and log-sum-exp; a second pass merges them. Serves f32/f16/bf16, GQA, causal and window
 * (bottom-right), key-padding masks, every layout whose head dim is contiguous, attention sinks (in
 * the merge), paged K/V (rows read through the block table, each batch its own length) and packed
 * batches (`cuSeqlensQ`/`cuSeqlensK`: each sequence its own query rows and keys, its band aligned
 * bottom-right within it; workgroups are laid out for the longest sequence, and those past a
 * shorter one's rows or keys do nothing).
 *
 * The router picks it only while `s_q * (n / n_kv)` (the query rows sharing one K/V head) is at
 * most {@link SPLITKV_MAX_ROWS} and s_q at most {@link SPLITKV_MAX_SQ}; past that `flash` reuses
 * each K/V tile over more rows. For a packed batch s_q is the longest sequence's query count (with
 * GPU offsets, whose lengths the host cannot see, the total: a bound), so a packed decode batch
 * (one query row per sequence) takes it and a packed prefill does not.
 */
import { kernelOf } from "../wgsl/common.ts";
import { flexKernelConfig, type GpuBackend, gpuBaseReasons, type GpuIO } from "./backend.ts";
import type { Capabilities } from "../core/device.ts";
import type { GpuCall } from "../core/gpu.ts";
import { type AttentionProblem, diagonalOffset, hasBand, servingReasons } from "../core/problem.ts";
import {
  splitKvCombineKernel,
  type SplitKvConfig,
  splitKvConfigProblems,
  splitKvKernel,
  splitKvShape,
} from "../wgsl/splitkv.ts";

/**
 * The router's crossover, measured on the H200 (bench/RESULTS.md, runs 5 and 6, batch 1 and 8):
 * split-kv is chosen on its own while the query rows sharing one K/V head (`s_q * n / n_kv`) are at
 * most this many and s_q is at most {@link SPLITKV_MAX_SQ}. There it beat flash at every point
 * measured, 5x at 128 rows (s_kv 8192), 1.6x at 128 rows with batch 8 and 100x at 4 (decode, s_kv
 * 32768): flash's 64-row query tile is at most half full for s_q <= 32, so flash wastes half its
 * arithmetic, while split-kv spreads the keys over the chip. Past it (batch 8, MHA, s_q 64) flash
 * won: 3.0 vs 3.7 ms.
 */
export const SPLITKV_MAX_ROWS = 128;

/** Longest query sequence split-kv is chosen for on its own (half of flash's 64-row query tile). */
export const SPLITKV_MAX_SQ = 32;

/** Most chunks one row is split into (the combine pass keeps their weights in workgroup memory). */
export const SPLITKV_MAX_SPLITS = 1024;

/** Partial outputs kept in scratch per call, at most (and never more than one storage binding). */
const SCRATCH_BUDGET_BYTES = 64 << 20;

/** Tuning knobs (benchmarks sweep them; tests force code paths). */
export interface SplitKvTuning {
  /**
   * Most workgroups of pass 1 when it splits keys. Default 528 (4 per SM of a 132-SM H200, one
   * wave): fastest of 264 to 4224 on the decode shape there (bench/RESULTS.md, runs 5 and 6).
   */
  targetWorkgroups: number;
  /** Registers (f32) for q and accumulators per lane that decide the rows per workgroup. */
  registerBudget: number;
  /** Fixed parts of the config, merged over the chosen one. */
  override: Partial<SplitKvConfig> | null;
  /** Force the number of chunks (clamped to what the key range allows). */
  splits: number | null;
  /** Give each pass its own compute pass, so a profiler times them apart (benchmarks). */
  separatePasses: boolean;
  /**
   * Steps ahead whose rows configs load into registers ({@link SplitKvConfig.prefetch}). Default 1:
   * on the H200, b 16 decode over 8192 keys 177 -> 169 µs dense (70.5% -> 74% of 4.3 TB/s), paged
   * 187 -> 185; b 1 over 32768 keys 64.8 -> 62.9 µs; 2 was slower than 0 (bench/RESULTS.md, run 14).
   */
  prefetch: 0 | 1 | 2;
}

/** Test and benchmark hook. */
export const splitKvTuning: SplitKvTuning = {
  targetWorkgroups: 528,
  registerBudget: 64,
  override: null,
  splits: null,
  separatePasses: false,
  prefetch: 1,
};

const pow2Floor = (x: number) => 2 ** Math.floor(Math.log2(Math.max(1, x)));
const pow2Ceil = (x: number) => 2 ** Math.ceil(Math.log2(Math.max(1, x)));

/** Threads per workgroup of pass 1, at most. */
const MAX_THREADS = 128;

/**
 * Key groups per workgroup of pass 1, at most. Their partials are combined in workgroup memory in
 * log2(groups) rounds, so many small groups (tiny head dims: one lane each) cost more code and
 * compile time than they save; the H200's configs for d >= 32 have 8 or 16 (bench/RESULTS.md).
 */
const MAX_KEY_GROUPS = 16;

/**
 * Query positions the kernel serves per sequence (batch): s_q, or for a packed batch the longest
 * sequence's (with GPU offsets the total, a bound).
 */
function queryRows(p: AttentionProblem): number {
  return p.varlen ? p.varlen.maxSq : p.sQ;
}

/** Sequences (batches) of the dispatch. */
function batches(p: AttentionProblem): number {
  return p.varlen ? p.varlen.seqs : p.b;
}

/** The pass-1 config for a call on a device, or the reason there is none. */
export function chooseSplitKvConfig(p: AttentionProblem, caps: Capabilities): SplitKvConfig | string {
  const sixteen = p.dtype !== "f32";
  const vecStrides = [p.q.strides, p.k.strides, p.v.strides];
  const wide = sixteen && p.d % 8 === 0 && p.dV % 8 === 0 &&
    vecStrides.every((s) => s.b % 8 === 0 && s.n % 8 === 0 && s.s % 8 === 0);
  const f16 = p.dtype === "f16" && caps.shaderF16 && !wide;
  const vw = wide ? 8 : 4;
  const subgroups = caps.subgroups && caps.subgroupMinSize >= 4 ? caps.subgroupDirective : false;
  const dvec = Math.max(p.d, p.dV) / vw;
  const maxLanes = subgroups === false ? 8 : Math.min(16, caps.subgroupMinSize);
  const lanes = Math.min(pow2Floor(dvec), pow2Floor(maxLanes));
  const perRow = (Math.ceil(p.d / vw / lanes) + Math.ceil(p.dV / vw / lanes)) * vw;
  const rowsAll = (p.n / p.nKv) * queryRows(p);
  const rows = Math.max(1, Math.min(rowsAll, Math.floor(splitKvTuning.registerBudget / perRow), 8));
  const limits = {
    storage: caps.limits.maxComputeWorkgroupStorageSize,
    invocations: caps.limits.maxComputeInvocationsPerWorkgroup,
    subgroupSize: caps.subgroupMinSize,
  };
  const unroll = rows > 4 ? 2 : 4;
  // No more key groups than the keys need (s_kv 5: 4 groups of 2 keys, not 128 threads of which
  // 3 work) and at most MAX_KEY_GROUPS.
  const [lo, hi] = keyRange(p);
  const keyGroups = Math.min(MAX_KEY_GROUPS, pow2Ceil(Math.ceil(Math.max(1, hi - lo) / unroll)));
  let last = "no configuration fits";
  for (let kg = keyGroups; kg >= 1; kg /= 2) {
    const threads = kg * lanes;
    if (threads > MAX_THREADS) continue;
    const c: SplitKvConfig = {
      dtype: p.dtype,
      f16,
      vw,
      d: p.d,
      dV: p.dV,
      rows,
      lanes,
      threads,
      unroll,
      band: hasBand(p),
      keyPadding: p.mask !== null,
      subgroups,
      flex: flexKernelConfig(p, false),
      page: p.paged?.pageSize,
      prefetch: splitKvTuning.prefetch,
      ...(p.varlen ? { varlen: true } : {}),
      ...(splitKvTuning.override ?? {}),
    };
    const problems = splitKvConfigProblems(c, limits);
    if (problems.length === 0) return c;
    last = problems.join("; ");
  }
  return `no split-kv configuration fits this device (${last})`;
}

function stridesOk(s: { b: number; n: number; s: number; d: number }): boolean {
  return s.d === 1 && s.b % 4 === 0 && s.n % 4 === 0 && s.s % 4 === 0;
}

/** The keys any query row may see: [lo, hi). */
function keyRange(p: AttentionProblem): [number, number] {
  // A paged cache's band is aligned to each batch's own length: the kernel narrows it. So is a
  // packed batch's, over its longest sequence's keys.
  if (p.paged) return [0, p.sKv];
  if (p.varlen) return [0, p.varlen.maxSkv];
  const offset = diagonalOffset(p);
  const lo = Math.max(0, Number.isFinite(p.left) ? offset - p.left : 0);
  const hi = Math.min(p.sKv, Number.isFinite(p.right) ? p.sQ - 1 + offset + p.right + 1 : p.sKv);
  return [lo, Math.max(lo, hi)];
}

/** How a call is laid out over workgroups: row blocks, chunks and the scratch they need. */
export function splitKvPlan(p: AttentionProblem, c: SplitKvConfig, caps: Capabilities) {
  const s = splitKvShape(c);
  // Packed: the rows of the longest sequence (a bound), each sequence's row blocks past its own
  // rows return at once; the scratch holds every packed row (b = 1, s_q = total_q).
  const rowsAll = (p.n / p.nKv) * queryRows(p);
  const rowBlocks = Math.ceil(rowsAll / c.rows);
  const [lo, hi] = keyRange(p);
  const keys = Math.max(1, hi - lo);
  const perSplit = batches(p) * p.nKv * rowBlocks;
  const totalRows = p.b * p.n * p.sQ;
  const budget = Math.min(caps.limits.maxStorageBufferBindingSize, SCRATCH_BUDGET_BYTES);
  const byScratch = Math.max(1, Math.floor(budget / (totalRows * p.dV * 4)));
  const bySteps = Math.ceil(keys / s.step);
  // At most the target (one wave of resident workgroups): a few workgroups past it form a second
  // wave that costs nearly a whole chunk's time (H200, b 8: 8 chunks in 512 workgroups 90.5 µs,
  // 9 chunks in 576 workgroups 120.3 µs; bench/RESULTS.md, run 6).
  let splits = splitKvTuning.splits ?? Math.floor(splitKvTuning.targetWorkgroups / perSplit);
  splits = Math.max(1, Math.min(splits, bySteps, byScratch, SPLITKV_MAX_SPLITS));
  const chunk = Math.ceil(Math.ceil(keys / splits) / s.step) * s.step;
  splits = Math.ceil(keys / chunk);
  return { rowsAll, rowBlocks, splits, chunk, lo, hi, totalRows, workgroups: perSplit * splits };
}

function unsupportedReasons(p: AttentionProblem, caps: Capabilities | null): string[] {
  const reasons = gpuBaseReasons(p, caps);
  if (!caps) return reasons;
  if (p.d % 4 !== 0 || p.dV % 4 !== 0 || p.d > 256 || p.dV > 256) {
    reasons.push(`head dims ${p.d}/${p.dV} are not multiples of 4 up to 256`);
  }
  if (p.mask && !p.mask.keyPadding) {
    reasons.push("only key-padding masks (bool [b, s_kv]) are fused; other masks need naive");
  }
  reasons.push(...servingReasons(p, { sinks: true, paged: true, varlen: true }));
  if (![p.q.strides, p.k.strides, p.v.strides, p.out.strides].every(stridesOk)) {
    reasons.push("a layout whose head dim is not contiguous (or not 4-aligned)");
  }
  if (reasons.length === 0) {
    const c = chooseSplitKvConfig(p, caps);
    if (typeof c === "string") reasons.push(c);
    else {
      const plan = splitKvPlan(p, c, caps);
      if (plan.totalRows * plan.splits * p.dV * 4 > caps.limits.maxStorageBufferBindingSize) {
        reasons.push("its partial outputs do not fit one storage binding");
      }
      const maxDim = caps.limits.maxComputeWorkgroupsPerDimension;
      if (p.varlen && plan.workgroups > maxDim * maxDim) {
        reasons.push(
          `a packed batch's row bound (${plan.rowsAll} rows per K/V head in each of ${p.varlen.seqs} ` +
            `sequences${p.varlen.cuQ.residency === "gpu" ? ", from GPU offsets: total_q" : ""}) needs ` +
            `${plan.workgroups} workgroups > ${maxDim * maxDim}`,
        );
      }
    }
  }
  return reasons;
}

function unsuitedReasons(p: AttentionProblem): string[] {
  // A packed batch: its longest sequence's query rows (GPU offsets: total_q, a bound).
  const sQ = queryRows(p);
  const what = !p.varlen ? "s_q" : p.varlen.cuQ.residency === "host" ? "longest sequence's s_q" : "total_q";
  const rows = (p.n / p.nKv) * sQ;
  if (rows > SPLITKV_MAX_ROWS) {
    return [
      `${what} x group = ${rows} query rows per K/V head > ${SPLITKV_MAX_ROWS}: flash reuses K/V better`,
    ];
  }
  if (sQ > SPLITKV_MAX_SQ) {
    return [`${what} = ${sQ} > ${SPLITKV_MAX_SQ}: flash's query tiles are well filled`];
  }
  return [];
}

/** Clamps an unbounded window side to a large finite value (i32 arithmetic in the kernel). */
const finite = (x: number) => Number.isFinite(x) ? x : 1 << 30;

async function encode(p: AttentionProblem, io: GpuIO, call: GpuCall): Promise<void> {
  const caps = call.rt.caps;
  const c = chooseSplitKvConfig(p, caps);
  if (typeof c === "string") throw new Error(c);
  const plan = splitKvPlan(p, c, caps);
  const kernel = kernelOf(splitKvKernel, c);
  const combine = kernelOf(splitKvCombineKernel, {
    dtype: p.dtype,
    f16: p.dtype === "f16" && caps.shaderF16,
    dV: p.dV,
    lse: io.lse !== null,
    sinks: p.sinks !== null,
  });
  const [pipe, combinePipe] = await Promise.all([call.pipeline(kernel), call.pipeline(combine)]);
  const slots = plan.totalRows * plan.splits;
  const po = call.scratch(slots * p.dV * 4, "split-kv partial outputs");
  const plse = call.scratch(slots * 4, "split-kv partial lse");
  const vec = (x: number) => x / c.vw;
  const ms = p.mask?.strides ?? { b: 0, j: 0 };
  const buffers: Record<string, GPUBuffer> = { q: io.q, k: io.k, v: io.v, po, plse };
  if (io.mask) buffers.mask = io.mask;
  if (io.flex) Object.assign(buffers, io.flex);
  if (p.paged) Object.assign(buffers, { tbl: io.table!, cache_len: io.seqlens! });
  if (p.varlen) Object.assign(buffers, { cuq: io.cuQ!, cuk: io.cuK! });
  call.dispatch(pipe, kernel, buffers, {
    n: p.n,
    n_kv: p.nKv,
    group: p.n / p.nKv,
    s_q: p.sQ,
    rows: plan.rowsAll,
    row_blocks: plan.rowBlocks,
    splits: plan.splits,
    chunk: plan.chunk,
    j_start: plan.lo,
    j_end: plan.hi,
    scale_log2: p.scale * Math.LOG2E,
    offset: diagonalOffset(p),
    left: finite(p.left),
    right: finite(p.right),
    q_sb: vec(p.q.strides.b),
    q_sh: vec(p.q.strides.n),
    q_ss: vec(p.q.strides.s),
    k_sb: vec(p.k.strides.b),
    k_sh: vec(p.k.strides.n),
    k_ss: vec(p.k.strides.s),
    v_sb: vec(p.v.strides.b),
    v_sh: vec(p.v.strides.n),
    v_ss: vec(p.v.strides.s),
    m_sb: ms.b,
    m_sj: ms.j,
    max_pages: p.paged?.maxPages ?? 0,
    num_pages: p.paged?.numPages ?? 0,
    seqs: p.varlen?.seqs ?? 0,
    s_kv: p.sKv,
  }, plan.workgroups);
  if (splitKvTuning.separatePasses) call.endPass();
  const combineBuffers: Record<string, GPUBuffer> = { po, plse, o: io.out };
  if (io.lse) combineBuffers.lse = io.lse;
  if (io.sinks) combineBuffers.sinks = io.sinks;
  call.dispatch(combinePipe, combine, combineBuffers, {
    n: p.n,
    s_q: p.sQ,
    splits: plan.splits,
    o_sb: p.out.strides.b / 4,
    o_sh: p.out.strides.n / 4,
    o_ss: p.out.strides.s / 4,
  }, plan.totalRows);
}

/** The flash-decoding backend. */
export const splitKvBackend: GpuBackend = {
  kind: "gpu",
  name: "split-kv",
  aliases: ["splitkv", "flash_decoding", "flash-decoding", "xformers", "memory_efficient"],
  summary: "flash-decoding: keys split over workgroups, partials merged by log-sum-exp (few queries)",
  producesLse: true,
  unsupportedReasons,
  unsuitedReasons,
  encode,
};
