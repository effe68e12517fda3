/**
 * `flash`: fused FlashAttention-2 (online softmax, tiles in workgroup memory, no score matrix in
 * memory). Serves any s_q/s_kv, head dims up to 256 (multiples of 4), GQA, causal and window
 * (tiles outside the band skipped), key-padding masks, flex functions (scoreMod, maskMod; the empty
 * tiles of a block map skipped), every layout whose head dim is contiguous, attention sinks, packed
 * batches (a work list of each sequence's own query blocks) and paged K/V (rows read through the
 * block table). Other masks fall back to `naive`.
 */
import { kernelOf } from "../wgsl/common.ts";
import { flexKernelConfig, type GpuBackend, gpuBaseReasons, type GpuIO } from "./backend.ts";
import type { Capabilities } from "../core/device.ts";
import type { GpuCall } from "../core/gpu.ts";
import { type AttentionProblem, diagonalOffset, hasBand } from "../core/problem.ts";
import { firstFitting, type FlashConfig, flashKernel } from "../wgsl/flash.ts";
import { flexKey } from "../wgsl/flex.ts";
import { workListKernel } from "../wgsl/serving.ts";
import { blockMapFor } from "../core/flex_gpu.ts";

/** Tile shapes tried in order; the first valid for the device and head dim wins. */
const TILINGS: readonly Pick<FlashConfig, "br" | "bc" | "rt" | "ct">[] = [
  // 256 threads, 4x4 scores and 4x(d/16) outputs per thread: fastest measured on the H200
  // (bench/RESULTS.md), ahead of 128 threads with 4x8 scores.
  { br: 64, bc: 64, rt: 16, ct: 16 },
  { br: 64, bc: 64, rt: 16, ct: 8 },
  { br: 32, bc: 64, rt: 8, ct: 16 },
  { br: 32, bc: 32, rt: 8, ct: 8 }, // small devices (16 KiB, e.g. software adapters)
  { br: 16, bc: 32, rt: 4, ct: 8 },
  { br: 16, bc: 16, rt: 4, ct: 4 },
];

/** Calls of at most this many query rows get the smallest tile (see {@link chooseFlashConfig}). */
export const SMALL_CALL_ROWS = 16;

/** Test and benchmark hook: force tile parameters (merged over the chosen config). */
export const flashTuning: { override: Partial<FlashConfig> | null } = { override: null };

/** The flash config for a call on a device, or the reason there is none. */
export function chooseFlashConfig(
  p: AttentionProblem,
  caps: Capabilities,
  subgroups: boolean,
  lse: boolean,
): FlashConfig | string {
  const limits = {
    storage: caps.limits.maxComputeWorkgroupStorageSize,
    invocations: caps.limits.maxComputeInvocationsPerWorkgroup,
  };
  const dk = [32, 16, 8, 4].find((x) => p.d % x === 0) ?? 4;
  const base = {
    dtype: p.dtype,
    f16: caps.shaderF16,
    d: p.d,
    dk,
    band: hasBand(p),
    keyPadding: p.mask !== null,
    lse,
    subgroups: subgroups ? caps.subgroupDirective : false,
    swizzle: true,
    flex: flexKernelConfig(p, true),
    sinks: p.sinks !== null,
    varlen: p.varlen !== null,
    page: p.paged?.pageSize,
  } as const;
  // A call of few query rows gets the smallest tile, flat, Q and K staged 8 columns and V 4 keys at a
  // time: the 64-row tiles would run at most a quarter full, and their code compiles for 10 to 30 s
  // on a CPU adapter (lavapipe, cold cache) against 3 s for this one (tests/codesize_test.ts bounds
  // it). A software adapter gets it for every call: a CPU gains nothing from the wide tiles, whose
  // code is twice the size and compiled 4x longer (Mesa 25 lavapipe: 142 s against 37 s for one
  // d 64 case); tests/flash_test.ts forces the wide tiles there.
  const small = p.sQ <= SMALL_CALL_ROWS || caps.isFallbackAdapter;
  // The search below depends on nothing else: routing and encoding ask again for every call.
  const key = JSON.stringify([
    { ...base, flex: flexKey(base.flex) },
    small,
    subgroups,
    caps.subgroupMinSize,
    limits,
    flashTuning.override,
  ]);
  let known = configsFound.get(caps);
  if (!known) configsFound.set(caps, known = new Map());
  const found = known.get(key);
  if (found !== undefined) return found;
  function* candidates(): Generator<FlashConfig> {
    if (small) {
      for (const tiling of TILINGS.filter((t) => t.br <= SMALL_CALL_ROWS && t.bc <= SMALL_CALL_ROWS)) {
        if (subgroups && (caps.subgroupMinSize === 0 || tiling.ct > caps.subgroupMinSize)) continue;
        const dkSmall = [8, 4].find((x) => p.d % x === 0) ?? 4;
        yield { ...base, ...tiling, dk: dkSmall, vc: 4, pointers: false, ...(flashTuning.override ?? {}) };
      }
    }
    for (const tiling of TILINGS) {
      if (subgroups && (caps.subgroupMinSize === 0 || tiling.ct > caps.subgroupMinSize)) continue;
      // Head dims past 128 need the wider thread grid to keep outputs in registers.
      if (p.d > 128 && tiling.ct < 16 && limits.storage >= 32768) continue;
      // Row pointers first, with the widest V stage that fits: 12% (Flux) to 15% (SD3) faster on
      // the H200 than the flat layout at its widest, same bits (bench/RESULTS.md, run 7).
      for (const pointers of [true, false]) {
        for (const vc of [32, 16, 8, 4]) {
          if (vc <= tiling.bc) yield { ...base, ...tiling, vc, pointers, ...(flashTuning.override ?? {}) };
        }
      }
    }
  }
  const c = firstFitting(candidates(), limits);
  const result = typeof c === "string" ? `no tile configuration fits this device (${c})` : c;
  if (known.size >= 256) known.clear();
  known.set(key, result);
  return result;
}

/** Configs found per device's capabilities, by what {@link chooseFlashConfig} reads. */
const configsFound = new WeakMap<Capabilities, Map<string, FlashConfig | string>>();

function stridesOk(s: { b: number; n: number; s: number; d: number }): boolean {
  return s.d === 1 && s.b % 4 === 0 && s.n % 4 === 0 && s.s % 4 === 0;
}

/** Reasons shared by `flash` and `flash-subgroup`. */
export function flashUnsupportedReasons(
  p: AttentionProblem,
  caps: Capabilities | null,
  subgroups: boolean,
): string[] {
  const reasons = gpuBaseReasons(p, caps);
  if (!caps) return reasons;
  if (p.d !== p.dV) reasons.push(`v's head dim (${p.dV}) differs from q's (${p.d})`);
  if (p.d % 4 !== 0 || p.d > 256) reasons.push(`head dim ${p.d} is not a multiple of 4 up to 256`);
  if (p.mask && !p.mask.keyPadding) {
    reasons.push("only key-padding masks (bool [b, s_kv]) are fused; other masks need naive");
  }
  if (![p.q.strides, p.k.strides, p.v.strides, p.out.strides].every(stridesOk)) {
    reasons.push("a layout whose head dim is not contiguous (or not 4-aligned)");
  }
  if (subgroups && !caps.subgroups) reasons.push("the device has no subgroup operations");
  if (reasons.length === 0) {
    const c = chooseFlashConfig(p, caps, subgroups, false);
    if (typeof c === "string") reasons.push(c);
  }
  return reasons;
}

/** Records the flash dispatch (shared by `flash` and `flash-subgroup`). */
export async function encodeFlash(
  p: AttentionProblem,
  io: GpuIO,
  call: GpuCall,
  subgroups: boolean,
): Promise<void> {
  const c = chooseFlashConfig(p, call.rt.caps, subgroups, io.lse !== null);
  if (typeof c === "string") throw new Error(c);
  const kernel = kernelOf(flashKernel, c);
  const pipeline = await call.pipeline(kernel);
  // A mask function comes with a block map: the call's blockMask, or one built now per tile.
  const map = c.flex?.blockMap ? await blockMapFor(call, p, io, c.br, c.bc) : null;
  const blocks = Math.ceil(p.sQ / c.br);
  const serving = p.varlen ? await varlenWorkList(p, io, call, c.br) : null;
  const v4 = (x: number) => x / 4;
  const ms = p.mask?.strides ?? { b: 0, j: 0 };
  const buffers: Record<string, GPUBuffer> = { q: io.q, k: io.k, v: io.v, o: io.out };
  if (io.mask) buffers.mask = io.mask;
  if (io.lse) buffers.lse = io.lse;
  if (io.flex) Object.assign(buffers, io.flex);
  if (map) buffers.flex_blocks = map.buffer;
  if (io.sinks) buffers.sinks = io.sinks;
  if (serving) Object.assign(buffers, { cuq: io.cuQ!, cuk: io.cuK!, wl: serving.wl });
  if (p.paged) Object.assign(buffers, { tbl: io.table!, cache_len: io.seqlens! });
  call.dispatch(pipeline, kernel, buffers, {
    ...(map?.uniforms ?? {}),
    flex_scale: p.scale,
    n: p.n,
    group: p.n / p.nKv,
    s_q: p.sQ,
    s_kv: p.sKv,
    blocks,
    scale_log2: p.scale * Math.LOG2E,
    offset: diagonalOffset(p),
    // Unbounded sides as a finite bound that cannot overflow i32 in the kernel's index arithmetic.
    left: Math.min(p.left, p.sQ + p.sKv + Math.abs(diagonalOffset(p))),
    right: Math.min(p.right, p.sQ + p.sKv + Math.abs(diagonalOffset(p))),
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
    max_pages: p.paged?.maxPages ?? 0,
    num_pages: p.paged?.numPages ?? 0,
  }, serving ? serving.items * p.n : p.b * p.n * blocks);
}

/**
 * The work list of a packed batch (see wgsl/flash.ts): built here from host offsets, with exactly
 * the sequences' query blocks as work items; from GPU offsets by a one-thread kernel, with a bound
 * of items (each sequence's last block may be partial: at most one more per sequence), those past
 * the real total returning at once. `side` "k" builds the same over the key offsets in blocks of
 * `rows` keys (`sage`'s K quantization blocks).
 */
export async function varlenWorkList(
  p: AttentionProblem,
  io: GpuIO,
  call: GpuCall,
  rows: number,
  side: "q" | "k" = "q",
): Promise<{ wl: GPUBuffer; items: number }> {
  const v = p.varlen!;
  const cu = side === "q" ? v.cuQ : v.cuK;
  if (cu.residency === "host") {
    const wl = hostWorkList(cu.data, v.seqs, rows);
    return { wl: call.upload(wl, "wgattn varlen work list"), items: wl[v.seqs] };
  }
  const kernel = workListKernel(rows);
  const wl = call.scratch((v.seqs + 1) * 4, "wgattn varlen work list");
  const offsets = side === "q" ? io.cuQ! : io.cuK!;
  const total = side === "q" ? p.sQ : p.sKv;
  call.dispatch(await call.pipeline(kernel), kernel, { cuq: offsets, wl }, { seqs: v.seqs, total }, 1);
  return { wl, items: varlenItems(p, rows, side) };
}

/**
 * Work items (blocks of `rows`) of a packed batch's query rows (side "q") or keys per head, as
 * {@link varlenWorkList} lays them out: exact from host offsets; from GPU offsets a bound (each
 * sequence's last block may be partial: at most one more per sequence).
 */
export function varlenItems(p: AttentionProblem, rows: number, side: "q" | "k"): number {
  const v = p.varlen!;
  const cu = side === "q" ? v.cuQ : v.cuK;
  if (cu.residency === "host") return hostWorkList(cu.data, v.seqs, rows)[v.seqs];
  return Math.ceil((side === "q" ? p.sQ : p.sKv) / rows) + v.seqs;
}

/** `wl[s]`: the blocks of `rows` of the sequences before s (`wl[seqs]` their total). */
function hostWorkList(cu: Int32Array, seqs: number, rows: number): Uint32Array {
  const wl = new Uint32Array(seqs + 1);
  for (let s = 0; s < seqs; s++) wl[s + 1] = wl[s] + Math.ceil((cu[s + 1] - cu[s]) / rows);
  return wl;
}

/** The fused FlashAttention-2 backend. */
export const flashBackend: GpuBackend = {
  kind: "gpu",
  name: "flash",
  aliases: ["flash_attention_2", "flash_attention_3", "flash_attention", "fa2"],
  summary: "fused FlashAttention-2 in generated WGSL (online softmax, tiles in workgroup memory)",
  producesLse: true,
  unsupportedReasons: (p, caps) => flashUnsupportedReasons(p, caps, false),
  encode: (p, io, call) => encodeFlash(p, io, call, false),
};
