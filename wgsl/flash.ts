/**
 * The `flash` kernel generator: FlashAttention-2 in straight-line WGSL.
 *
 * One workgroup computes `br` query rows of one (batch, head). It walks the key/value sequence in
 * tiles of `bc` keys, keeping a running row max `m`, row sum `l` and the output rows `o` in
 * registers (online softmax); the score matrix never reaches memory.
 *
 * Threads form an `rt` x `ct` grid. Thread (ty, tx) owns query rows `ty + rt*i` (i < TM = br/rt),
 * score columns `tx + ct*j` (j < TN = bc/ct; interleaved so reads of K rows do not collide in
 * shared-memory banks) and output columns `4*(tx + ct*g) .. +3` (g < TD/4, TD = dPad/ct).
 *
 * Per key tile:
 *   S = Q K^T, with Q and K staged through workgroup memory `dk` head-dim columns at a time;
 *   row max across the ct threads of a row (workgroup memory, or subgroup shuffles);
 *   P = exp2(S - m) written to workgroup memory; O = O * alpha + P V, V staged `vc` keys at a time.
 * Every inner loop is unrolled by this generator (Naga does not unroll) with accumulators as
 * named variables; loads along d are vec4. With `pointers` (the default where it fits) Q, K, P
 * and V (transposed) sit in 2D workgroup arrays that each thread reads through row pointers taken
 * once, and the V stages are written out, so every read in the math has a constant index: Naga
 * clamps each dynamic index into workgroup memory, and those clamps and the address arithmetic
 * cost 12% to 15% on the H200.
 *
 * With `qk: "int8"` (the `sage` backend) S comes from int8 Q and K that a pre-pass
 * (wgsl/sage.ts) quantized per block of br query rows and bc keys, packed four to a u32 along d
 * (d padded to 16) with one f32 scale per block. The Q block stays in workgroup memory for the
 * whole key loop; K is staged `dk` int8 columns at a time as vec4<u32> words (16 values);
 * S accumulates in i32 with `dot4I8Packed` and is dequantized once per element (q scale, which
 * carries the softmax scale and log2 e, times k scale). Softmax and P V are as in f32 mode. K was
 * smoothed (its mean removed), which shifts a row's scores by `scale * q . mean(k)`: the pre-pass
 * writes that per row (`lse_bias`), added back to the lse, and with a score_mod to each score
 * before the function sees it (the softmax ignores the shift, an arbitrary score_mod does not).
 * A packed batch's blocks are aligned to each sequence's start: query block `blk` of sequence b is
 * pre-pass block `wl[b] + blk` of its head, its key tile t block `wlk[b] + t` of its K/V head.
 */
import type { DType } from "../core/types.ts";
import { BF16_PACK, isNanExpr, type Kernel, NEG_INF, uniformBlock, type UniformType } from "./common.ts";
import { BLOCK_MAP_UNIFORMS, flexDeclarations, type FlexKernelConfig, flexKey } from "./flex.ts";
import { sequenceRange, workListSearch } from "./serving.ts";

/** Everything that changes the flash kernel's text. */
export interface FlashConfig {
  dtype: DType;
  /** f16 tensors use `array<vec4<f16>>` (shader-f16); otherwise 16-bit values travel in u32 words. */
  f16: boolean;
  /** Head dim of q, k and v (a multiple of 4). */
  d: number;
  /** Query rows per workgroup. */
  br: number;
  /** Keys per tile. */
  bc: number;
  /** Thread grid: rt rows x ct columns. */
  rt: number;
  ct: number;
  /**
   * Head-dim columns of Q and K staged at once (divides d, multiple of 4). With `qk: "int8"`: int8
   * columns of K staged at once (a multiple of 16 dividing d padded to 16).
   */
  dk: number;
  /** V rows staged at once (divides bc, multiple of 4). */
  vc: number;
  /** Causal or window limits apply. */
  band: boolean;
  /** A key-padding mask (bool bytes, [b, s_kv] with strides) applies. */
  keyPadding: boolean;
  lse: boolean;
  /** Row max by subgroup shuffles (needs ct <= subgroup size); "" or the directive WGSL needs. */
  subgroups: false | "" | "enable subgroups;\n";
  /**
   * Lay each 32-thread warp over 8 score columns x 4 query rows (when the grid allows) instead of
   * 32 consecutive columns: a warp's K and V reads then touch half as many shared-memory
   * wavefronts. Rows then span warps, so it applies only without subgroup reductions.
   */
  swizzle?: boolean;
  /**
   * How S = Q K^T is computed: from the inputs in f32 (default), or from the int8 blocks and scales
   * of the `sage` pre-pass with `dot4I8Packed` (bindings `q8`, `k8`, `q_scale`, `k_scale` and, with
   * lse or a score_mod, `lse_bias` in place of `q` and `k`; see {@link flashKernel}).
   */
  qk?: "f32" | "int8";
  /**
   * Workgroup memory as 2D arrays (a row per query, key or head-dim column, V stored
   * transposed) read through row pointers taken once per thread, and the V stages written out
   * one by one, so every read in the math has a constant index: no per-read address arithmetic
   * and no bounds clamp (Naga clamps every dynamic index into workgroup memory).
   */
  pointers?: boolean;
  /**
   * Flex attention: score_mod on every score (int8: with the smoothing's row shift added back),
   * mask_mod on the scores of partial tiles, and with a block map (binding `flex_blocks`) empty key
   * tiles skipped.
   */
  flex?: FlexKernelConfig;
  /** Attention sinks: binding `sinks` (f32 [n]), one more denominator term per row. */
  sinks?: boolean;
  /**
   * Packed batch: bindings `cuq`, `cuk` (i32 offsets) and `wl` (u32, the first work item of each
   * sequence: its query blocks, prefix-summed); the dispatch is (work item, head) with no padding.
   * With `qk: "int8"` also `wlk` (the same over the key blocks of bc, the pre-pass's K blocks) and
   * uniform `k_items` (K blocks per K/V head): the pre-pass's blocks start at each sequence's start.
   */
  varlen?: boolean;
  /** Paged K/V with this page size (a multiple of 16): bindings `tbl` (i32 [b, max_pages]) and `cache_len`. */
  page?: number;
}

/** Derived sizes of a config. */
export function flashShape(c: FlashConfig) {
  const tm = c.br / c.rt, tn = c.bc / c.ct;
  const dPad = Math.ceil(c.d / (4 * c.ct)) * 4 * c.ct;
  const td = dPad / c.ct;
  const threads = c.rt * c.ct;
  const int8 = c.qk === "int8";
  // int8: the head dim padded to 16 (one vec4<u32> word holds 16 values), words per staged K row.
  const dQ = int8 ? Math.ceil(c.d / 16) * 16 : c.d;
  const words = int8 ? c.dk / 16 : c.dk / 4;
  // vec4s per staged Q/K row, padded by one against bank conflicts (int8: Q holds all of dQ).
  const qStride = int8 ? dQ / 16 + 1 : c.dk / 4 + 1;
  const kStride = words + 1;
  const pStride = c.bc / 4 + 1;
  // Row pointers: K rows and transposed V rows (one per vec4 column of d) share one 2D array.
  const kvWidth = Math.max(words, c.vc) + 1, kvRows = Math.max(c.bc, dPad / 4);
  const kvVec4 = c.pointers ? kvRows * kvWidth : Math.max(c.bc * kStride, c.vc * (dPad / 4));
  const sharedBytes = 16 * (c.br * qStride + kvVec4 + c.br * pStride) +
    (c.subgroups === false ? 4 * c.br * c.ct : 0);
  return {
    tm,
    tn,
    dPad,
    td,
    threads,
    qStride,
    kStride,
    pStride,
    kvVec4,
    kvWidth,
    kvRows,
    sharedBytes,
    dQ,
    words,
  };
}

/**
 * The first of `candidates` valid for a device with these limits, or why none is (the last
 * candidate's problems).
 */
export function firstFitting(
  candidates: Iterable<FlashConfig>,
  limits: { storage: number; invocations: number },
): FlashConfig | string {
  let last = "no tiling fits";
  for (const c of candidates) {
    const problems = flashConfigProblems(c, limits);
    if (problems.length === 0) return c;
    last = problems.join("; ");
  }
  return last;
}

/** Why a config is not valid for a device with these limits (empty when valid). */
export function flashConfigProblems(
  c: FlashConfig,
  limits: { storage: number; invocations: number },
): string[] {
  const s = flashShape(c);
  const problems: string[] = [];
  if (!Number.isInteger(s.tm) || !Number.isInteger(s.tn)) {
    problems.push("tile sizes must divide by the thread grid");
  }
  if (c.qk === "int8") {
    if (c.d % 4 !== 0 || c.dk % 16 !== 0 || s.dQ % c.dk !== 0) {
      problems.push("d must be a multiple of 4 and dk a multiple of 16 dividing d padded to 16");
    }
  } else if (c.d % 4 !== 0 || c.d % c.dk !== 0 || c.dk % 4 !== 0) {
    problems.push("dk must divide d, both multiples of 4");
  }
  if (c.bc % c.vc !== 0 || c.vc % 4 !== 0 || c.bc % 4 !== 0) {
    problems.push("vc must divide bc, both multiples of 4");
  }
  if (s.threads > limits.invocations) problems.push(`${s.threads} threads > ${limits.invocations}`);
  if (s.sharedBytes > limits.storage) {
    problems.push(`${s.sharedBytes} B workgroup memory > ${limits.storage}`);
  }
  return problems;
}

/** Uniform fields of the flash kernel. */
const UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["n", "u32"],
  ["group", "u32"],
  ["s_q", "u32"],
  ["s_kv", "u32"],
  ["blocks", "u32"],
  ["scale_log2", "f32"],
  ["offset", "i32"],
  ["left", "i32"],
  ["right", "i32"],
  // Strides of q, k, v and out in vec4 units (b, head, s); d is contiguous.
  ["q_sb", "u32"],
  ["q_sh", "u32"],
  ["q_ss", "u32"],
  ["k_sb", "u32"],
  ["k_sh", "u32"],
  ["k_ss", "u32"],
  ["v_sb", "u32"],
  ["v_sh", "u32"],
  ["v_ss", "u32"],
  ["o_sb", "u32"],
  ["o_sh", "u32"],
  ["o_ss", "u32"],
  // Key-padding mask strides in bytes (b, key).
  ["m_sb", "u32"],
  ["m_sj", "u32"],
];

/** WGSL element of a tensor of the config's dtype, four values of d (also used by wgsl/sage_mma.ts). */
export function vecElement(c: Pick<FlashConfig, "dtype" | "f16">): string {
  if (c.dtype === "f32") return "vec4<f32>";
  if (c.dtype === "f16" && c.f16) return "vec4<f16>";
  return "vec2<u32>";
}

/** Reads vec4 `index` of tensor `name` as vec4<f32>. */
export function loadVec(c: Pick<FlashConfig, "dtype" | "f16">, name: string, index: string): string {
  if (c.dtype === "f32") return `${name}[${index}]`;
  if (c.dtype === "f16" && c.f16) return `vec4<f32>(${name}[${index}])`;
  if (c.dtype === "f16") return `unpack_f16x4(${name}[${index}])`;
  return `unpack_bf16x4(${name}[${index}])`;
}

/** A vec4<f32> WGSL value as the config's dtype element (see {@link vecElement}). */
export function storeVec(c: Pick<FlashConfig, "dtype" | "f16">, value: string): string {
  if (c.dtype === "f32") return value;
  if (c.dtype === "f16" && c.f16) return `vec4<f16>(${value})`;
  if (c.dtype === "f16") return `vec2<u32>(pack2x16float(${value}.xy), pack2x16float(${value}.zw))`;
  return `vec2<u32>(pack_bf16(${value}.x, ${value}.y), pack_bf16(${value}.z, ${value}.w))`;
}

/** Unpacking helpers for 16-bit tensors without shader-f16. */
export const UNPACK = `fn unpack_f16x4(w: vec2<u32>) -> vec4<f32> {
  return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
fn unpack_bf16x4(w: vec2<u32>) -> vec4<f32> {
  return vec4<f32>(bitcast<f32>(w.x << 16u), bitcast<f32>(w.x & 0xffff0000u),
                   bitcast<f32>(w.y << 16u), bitcast<f32>(w.y & 0xffff0000u));
}
`;

/** Whether the warp-over-8x4 thread layout applies (see {@link FlashConfig.swizzle}). */
export function swizzled(c: FlashConfig): boolean {
  return c.swizzle === true && c.subgroups === false && c.ct % 8 === 0 && c.rt % 4 === 0 && c.ct > 8;
}

/** A stable cache key for a config. */
export function flashKey(c: FlashConfig): string {
  return `flash:${c.dtype}:${c.f16}:d${c.d}:${c.br}x${c.bc}:${c.rt}x${c.ct}:dk${c.dk}:vc${c.vc}:sw${
    swizzled(c)
  }:` +
    `${c.band}:${c.keyPadding}:${c.lse}:${c.subgroups === false ? "wg" : "sg"}${
      c.qk === "int8" ? ":i8" : ""
    }${c.pointers ? ":rp" : ""}${c.sinks ? ":sk" : ""}${c.varlen ? ":vl" : ""}${
      c.page ? `:pg${c.page}` : ""
    }${flexKey(c.flex)}`;
}

/** Uniforms of packed batches (`seqs`) and paged caches (the rest). */
const SERVING_UNIFORMS: [string, UniformType][] = [
  ["seqs", "u32"],
  ["max_pages", "u32"],
  ["num_pages", "u32"],
];

/**
 * Work item of a packed batch: work item `wg / n` of head `wg % n` (heads of one item adjacent, so
 * a GQA group's K/V tiles are read while cached). `wl[s]` is the first item of sequence s (its
 * query blocks prefix-summed, `wl[seqs]` the total), found by binary search; a dispatch past the
 * total (GPU offsets: a bound) returns at once. Offsets are clamped into the tensors.
 */
function varlenPrologue(c: FlashConfig): string {
  return `  let h = wg % P.n;
  let item = wg / P.n;
  if (item >= wl[P.seqs]) { return; }
${workListSearch()}  let b = lo_s;
  let local_blk = item - wl[b];
  // Heaviest query blocks of a sequence first under a causal band.
  let blk = ${c.band ? "wl[b + 1u] - wl[b] - 1u - local_blk" : "local_blk"};
${sequenceRange()}  let off_ = i32(skv_) - i32(sq_);`;
}

/** Generates the flash kernel for `c`. */
export function flashKernel(c: FlashConfig): Kernel {
  const s = flashShape(c);
  const { tm, tn, td, threads, qStride, pStride } = s;
  const d4 = c.d / 4, dPad4 = s.dPad / 4, dk4 = c.dk / 4;
  const int8 = c.qk === "int8";
  const rp = c.pointers === true;
  const { kStride, words } = s;
  const dq4 = s.dQ / 16; // int8: vec4<u32> words per row of the packed q8/k8
  const L: string[] = [];
  const emit = (line: string) => L.push(line);
  const flex = c.flex ?? null;
  // int8 (sage): K smoothing shifted each row's scores; a score_mod gets them back exact (`lse_bias`).
  const rowBias = int8 && flex?.scoreMod != null;
  const blockMap = flex?.blockMap === true;
  if ((c.varlen || c.page) && (flex || c.keyPadding) || (c.page && int8)) {
    throw new Error(
      "packed batches and paged caches take no masks or flex functions, paged caches no int8 scores",
    );
  }
  // int8 packed batch: K blocks per sequence (see the int8 prologue below).
  const varlen8 = int8 && c.varlen === true;
  const uniforms: [string, UniformType][] = flex
    ? [...UNIFORMS, ["flex_scale", "f32"], ...(blockMap ? BLOCK_MAP_UNIFORMS : [])]
    : [
      ...UNIFORMS,
      ...SERVING_UNIFORMS.filter(([name]) => name === "seqs" ? c.varlen : c.page && name !== "seqs"),
      ...(varlen8 ? [["k_items", "u32"]] as [string, UniformType][] : []),
    ];
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  /** Start of key `key` of k or v (`base` is the head's start); paged K/V go through the table. */
  const keyAddress = (name: "k" | "v", base: string, key: string) =>
    c.page ? `${base} + page_row(b, ${key}) * P.${name}_ss` : `${base} + (${key}) * P.${name}_ss`;

  if (c.subgroups !== false) emit(c.subgroups);
  if (c.dtype === "f16" && c.f16) emit("enable f16;");
  emit(uniformBlock(uniforms));
  const el = vecElement(c);
  if (int8) {
    emit(`@group(0) @binding(1) var<storage, read> q8: array<vec4<u32>>;`);
    emit(`@group(0) @binding(2) var<storage, read> k8: array<vec4<u32>>;`);
  } else {
    emit(`@group(0) @binding(1) var<storage, read> q: array<${el}>;`);
    emit(`@group(0) @binding(2) var<storage, read> k: array<${el}>;`);
  }
  emit(`@group(0) @binding(3) var<storage, read> v: array<${el}>;`);
  emit(`@group(0) @binding(4) var<storage, read_write> o: array<${el}>;`);
  const bindings = int8 ? ["q8", "k8", "v", "o"] : ["q", "k", "v", "o"];
  if (c.keyPadding) {
    emit(`@group(0) @binding(${bindings.length + 1}) var<storage, read> mask: array<u32>;`);
    bindings.push("mask");
  }
  if (c.lse) {
    emit(`@group(0) @binding(${bindings.length + 1}) var<storage, read_write> lse: array<f32>;`);
    bindings.push("lse");
  }
  if (int8) {
    const extra = c.lse || rowBias ? ["q_scale", "k_scale", "lse_bias"] : ["q_scale", "k_scale"];
    for (const name of extra) {
      emit(`@group(0) @binding(${bindings.length + 1}) var<storage, read> ${name}: array<f32>;`);
      bindings.push(name);
    }
  }
  // Serving bindings: read-only storage, so reads at uniform indices are uniform (the work item,
  // lengths and loop bounds below may steer control flow around barriers).
  const servingBindings: [string, string][] = [
    ...(c.sinks ? [["sinks", "f32"]] as [string, string][] : []),
    ...(c.varlen ? [["cuq", "i32"], ["cuk", "i32"], ["wl", "u32"]] as [string, string][] : []),
    ...(varlen8 ? [["wlk", "u32"]] as [string, string][] : []),
    ...(c.page ? [["tbl", "i32"], ["cache_len", "i32"]] as [string, string][] : []),
  ];
  for (const [name, type] of servingBindings) {
    emit(`@group(0) @binding(${bindings.length + 1}) var<storage, read> ${name}: array<${type}>;`);
    bindings.push(name);
  }
  if (c.page) {
    // The row of the page pool holding key `key` of batch `bb`; table entries clamped to the pool.
    emit(`fn page_row(bb: u32, key: u32) -> u32 {
  let pg = u32(clamp(tbl[bb * P.max_pages + key / ${c.page}u], 0i, i32(P.num_pages) - 1i));
  return pg * ${c.page}u + key % ${c.page}u;
}`);
  }
  if (c.dtype !== "f32" && !(c.dtype === "f16" && c.f16)) emit(UNPACK);
  if (c.dtype === "bf16") emit(BF16_PACK);
  // int8: K words and V values (as bits) share kvs.
  const wv = int8 ? "vec4<u32>" : "vec4<f32>";
  if (rp) {
    emit(`var<workgroup> qs: array<array<${wv}, ${qStride}>, ${c.br}>;`);
    emit(`var<workgroup> kvs: array<array<${wv}, ${s.kvWidth}>, ${s.kvRows}>;`);
    emit(`var<workgroup> ps: array<array<vec4<f32>, ${pStride}>, ${c.br}>;`);
  } else {
    emit(`var<workgroup> qs: array<${wv}, ${c.br * qStride}>;`);
    emit(`var<workgroup> kvs: array<${wv}, ${s.kvVec4}>;`);
    emit(`var<workgroup> ps: array<vec4<f32>, ${c.br * pStride}>;`);
  }
  if (c.subgroups === false) emit(`var<workgroup> red: array<f32, ${c.br * c.ct}>;`);
  emit(`const NEG: f32 = -3.0e38;`);
  emit(`const LN2: f32 = 0.6931471805599453;`);

  const sgBuiltin = "";
  emit(`@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32${sgBuiltin}) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
${
    c.varlen ? varlenPrologue(c) : `  let bh = wg / P.blocks;
  // Heaviest query blocks first under a causal band (bottom-right aligned: the last rows see most keys).
  let blk = ${c.band ? "P.blocks - 1u - (wg % P.blocks)" : "wg % P.blocks"};
  let h = bh % P.n;
  let b = bh / P.n;
  let sq_ = P.s_q;
${
      c.page
        ? `  // Each batch attends its own cache length, clamped into its table's span.
  let skv_ = u32(clamp(cache_len[b], 0i, i32(P.max_pages * ${c.page}u)));
  let off_ = i32(skv_) - i32(P.s_q);`
        : `  let skv_ = P.s_kv;
  let off_ = P.offset;`
    }`
  }
  let hk = h / P.group;
  let q0 = blk * ${c.br}u;
  ${
    swizzled(c)
      ? `let tx = ((lid / 32u) % ${c.ct / 8}u) * 8u + lid % 8u;
  let ty = ((lid / 32u) / ${c.ct / 8}u) * 4u + (lid % 32u) / 8u;`
      : `let tx = lid % ${c.ct}u;
  let ty = lid / ${c.ct}u;`
  }
  ${
    c.varlen
      ? `let q_base = h * P.q_sh + cq0 * P.q_ss;
  let k_base = hk * P.k_sh + ck0 * P.k_ss;
  let v_base = hk * P.v_sh + ck0 * P.v_ss;`
      : c.page
      ? `let q_base = b * P.q_sb + h * P.q_sh;
  let k_base = hk * P.k_sh;
  let v_base = hk * P.v_sh;`
      : `let q_base = b * P.q_sb + h * P.q_sh;
  let k_base = b * P.k_sb + hk * P.k_sh;
  let v_base = b * P.v_sb + hk * P.v_sh;`
  }
  let rows_here = min(sq_ - q0, ${c.br}u);`);
  if (rp) {
    // The thread's rows, taken once: reads below index them with constants only.
    for (const i of range(tm)) {
      emit(`  let qrow${i} = &qs[ty + ${c.rt * i}u];\n  let prow${i} = &ps[ty + ${c.rt * i}u];`);
    }
    for (const j of range(tn)) emit(`  let krow${j} = &kvs[tx + ${c.ct * j}u];`);
    for (const g of range(td / 4)) emit(`  let vrow${g} = &kvs[tx + ${c.ct * g}u];`);
  }
  if (int8) {
    if (varlen8) {
      // Packed batch: blocks aligned to each sequence's start, q8 [n, blocks, br, dq4] (block
      // wl[b] + blk of head h is this one), k8 [n_kv, k_items, bc, dq4] (the sequence's first key
      // block is wlk[b], its K work list entry), zero padded.
      emit(`  let ks_base = hk * P.k_items + wlk[b];
  let k8_base = ks_base * ${c.bc * dq4}u;
  let q_blk = h * P.blocks + wl[b] + blk;
  let q_sc = q_scale[q_blk];`);
    } else {
      // Packed blocks: q8 [b, n, blocks * br, dq4], k8 [b, n_kv, k_blocks * bc, dq4] (zero padded).
      emit(`  let k_blocks = (skv_ + ${c.bc - 1}u) / ${c.bc}u;
  let ks_base = (b * (P.n / P.group) + hk) * k_blocks;
  let k8_base = ks_base * ${c.bc * dq4}u;
  let q_blk = (b * P.n + h) * P.blocks + blk;
  let q_sc = q_scale[q_blk];`);
    }
    if (rowBias) {
      // Each thread's rows' scale * q . mean(k) (natural-log units), clamped into the sequence.
      for (const i of range(tm)) {
        emit(
          c.varlen
            ? `  let rb${i} = lse_bias[h * P.s_q + cq0 + min(q0 + ty + ${c.rt * i}u, sq_ - 1u)];`
            : `  let rb${i} = lse_bias[(b * P.n + h) * P.s_q + min(q0 + ty + ${c.rt * i}u, P.s_q - 1u)];`,
        );
      }
    }
    // The Q block stays in workgroup memory for the whole key loop (the loop's barrier publishes it).
    for (const u of range(Math.ceil((c.br * dq4) / threads))) {
      const e = `(lid + ${u * threads}u)`;
      const guard = (u + 1) * threads > c.br * dq4 ? `if (${e} < ${c.br * dq4}u) ` : "";
      emit(
        `  ${guard}{ qs${
          rp ? `[${e} / ${dq4}u][${e} % ${dq4}u]` : `[(${e} / ${dq4}u) * ${qStride}u + ${e} % ${dq4}u]`
        } = q8[q_blk * ${c.br * dq4}u + ${e}]; }`,
      );
    }
  }

  // Key range this block can see.
  emit(`  var j_lo = 0i;
  var j_hi = i32(skv_);`);
  if (c.band) {
    emit(`  j_lo = max(j_lo, i32(q0) + off_ - P.left);
  j_hi = min(j_hi, i32(q0 + rows_here) - 1i + off_ + P.right + 1i);`);
  }
  emit(`  let t_lo = u32(max(j_lo, 0i)) / ${c.bc}u;
  let t_hi = select(0u, (u32(max(j_hi, 0i)) + ${c.bc - 1}u) / ${c.bc}u, j_hi > j_lo);`);

  for (const i of range(tm)) {
    emit(`  var m${i} = NEG;`);
    emit(`  var l${i} = 0.0;`);
    for (const g of range(td / 4)) emit(`  var o${i}_${g} = vec4<f32>(0.0);`);
  }
  // Staging is software-pipelined: while the threads compute on one stage in workgroup memory,
  // the next stage's global loads are already in flight into registers `pf*`. A tile has d/dk
  // "qk" stages (a Q and a K chunk) then bc/vc "v" stages; after the last comes the next tile's
  // first qk stage.
  const nS = int8 ? s.dQ / c.dk : c.d / c.dk, nV = c.bc / c.vc;
  const qPer = int8 ? 0 : Math.ceil((c.br * dk4) / threads);
  const kPer = Math.ceil((c.bc * words) / threads);
  const vPer = Math.ceil((c.vc * dPad4) / threads);
  const pfCount = Math.max(qPer + kPer, vPer);
  const zero = int8 ? "vec4<u32>(0u)" : "vec4<f32>(0.0)";
  for (const u of range(pfCount)) emit(`  var pf${u} = ${zero};`);

  /** Loads qk chunk `chunk` of the tile at key `kv` into pf registers (zeros past the edges). */
  const fetchQk = (chunk: string, kv: string, live: string, indent: string) => {
    if (int8) {
      // K words only (Q is resident); the packed rows are zero-padded to whole tiles.
      for (const u of range(kPer)) {
        const e = `(lid + ${u * threads}u)`;
        const conds = [...(live === "true" ? [] : [live])];
        if ((u + 1) * threads > c.bc * words) conds.push(`${e} < ${c.bc * words}u`);
        emit(
          `${indent}${
            conds.length ? `if (${conds.join(" && ")}) ` : ""
          }{ pf${u} = k8[k8_base + ((${kv}) + ${e} / ${words}u) * ${dq4}u + (${chunk}) * ${words}u + ${e} % ${words}u]; }`,
        );
      }
      return;
    }
    const part = (
      per: number,
      first: number,
      rowsTotal: number,
      name: string,
      address: (r: string) => string,
      limit: string,
    ) => {
      for (const u of range(per)) {
        const e = `(lid + ${u * threads}u)`;
        const inRange = (u + 1) * threads > rowsTotal * dk4 ? ` && ${e} < ${rowsTotal * dk4}u` : "";
        emit(`${indent}{
${indent}  let r = ${e} / ${dk4}u;
${indent}  pf${first + u} = vec4<f32>(0.0);
${indent}  if (${live}${inRange} && r < ${limit}) { pf${first + u} = ${
          loadVec(c, name, `${address("r")} + (${chunk}) * ${dk4}u + ${e} % ${dk4}u`)
        }; }
${indent}}`);
      }
    };
    part(qPer, 0, c.br, "q", (r) => `q_base + (q0 + ${r}) * P.q_ss`, "rows_here");
    part(kPer, qPer, c.bc, "k", (r) => keyAddress("k", "k_base", `(${kv}) + ${r}`), `skv_ - (${kv})`);
  };
  /** Loads V chunk `chunk` of the tile at key `kv` into pf registers. */
  const fetchV = (chunk: string, kv: string, indent: string) => {
    for (const u of range(vPer)) {
      const e = `(lid + ${u * threads}u)`;
      const inRange = (u + 1) * threads > c.vc * dPad4 ? ` && ${e} < ${c.vc * dPad4}u` : "";
      const colOk = s.dPad > c.d ? ` && ${e} % ${dPad4}u < ${d4}u` : "";
      const row = `(${kv}) + (${chunk}) * ${c.vc}u + ${e} / ${dPad4}u`;
      const value = loadVec(c, "v", `${keyAddress("v", "v_base", row)} + ${e} % ${dPad4}u`);
      emit(`${indent}{
${indent}  pf${u} = ${zero};
${indent}  if (${row} < skv_${inRange}${colOk}) { pf${u} = ${int8 ? `bitcast<vec4<u32>>(${value})` : value}; }
${indent}}`);
    }
  };
  const storeQk = () => {
    for (const u of range(qPer)) {
      const e = `(lid + ${u * threads}u)`;
      const guard = (u + 1) * threads > c.br * dk4 ? `if (${e} < ${c.br * dk4}u) ` : "";
      const at = rp
        ? `[${e} / ${dk4}u][${e} % ${dk4}u]`
        : `[(${e} / ${dk4}u) * ${qStride}u + ${e} % ${dk4}u]`;
      emit(`      ${guard}{ qs${at} = pf${u}; }`);
    }
    for (const u of range(kPer)) {
      const e = `(lid + ${u * threads}u)`;
      const guard = (u + 1) * threads > c.bc * words ? `if (${e} < ${c.bc * words}u) ` : "";
      const at = rp
        ? `[${e} / ${words}u][${e} % ${words}u]`
        : `[(${e} / ${words}u) * ${kStride}u + ${e} % ${words}u]`;
      emit(`      ${guard}{ kvs${at} = pf${qPer + u}; }`);
    }
  };
  const storeV = () => {
    for (const u of range(vPer)) {
      const e = `(lid + ${u * threads}u)`;
      const guard = (u + 1) * threads > c.vc * dPad4 ? `if (${e} < ${c.vc * dPad4}u) ` : "";
      // Row pointers: V transposed, a row per vec4 column of d.
      const at = rp ? `[${e} % ${dPad4}u][${e} / ${dPad4}u]` : `[${e}]`;
      emit(`      ${guard}{ kvs${at} = pf${u}; }`);
    }
  };

  const masked = c.band || c.keyPadding || flex?.maskMod != null;
  const softmax = () => {
    emit(
      `    let full_tile = kv0 + ${c.bc}u <= skv_${
        c.band
          ? ` && i32(kv0) - (i32(q0 + rows_here) - 1i + off_) >= -P.left && i32(kv0) + ${
            c.bc - 1
          }i - (i32(q0) + off_) <= P.right`
          : ""
      }${c.keyPadding ? " && false" : ""}${blockMap ? " && tile_state == 2u" : ""};`,
    );
    // Positions for the flex functions, clamped into the sequences (out-of-range scores are masked).
    if (flex) {
      for (const j of range(tn)) emit(`    let fc${j} = min(kv0 + tx + ${c.ct * j}u, skv_ - 1u);`);
      for (const i of range(tm)) emit(`    let fr${i} = min(q0 + ty + ${c.rt * i}u, sq_ - 1u);`);
    }
    if (flex?.scoreMod) {
      // score_mod takes and returns natural-log units; the kernel's softmax works in log2 units. f32:
      // s is the raw q . k; int8: s is in log2 units already (the q scale carries scale * log2 e) and
      // misses the row's smoothing shift.
      for (const i of range(tm)) {
        for (const j of range(tn)) {
          const score = int8 ? `s${i}_${j} * LN2 + rb${i}` : `s${i}_${j} * P.flex_scale`;
          emit(`    s${i}_${j} = score_mod(${score}, b, h, fr${i}, fc${j}) * ${Math.LOG2E};`);
        }
      }
    } else if (!int8) {
      // int8: the softmax scale is in the dequantization factor.
      for (const i of range(tm)) {
        for (const j of range(tn)) emit(`    s${i}_${j} *= P.scale_log2;`);
      }
    }
    emit(`    if (!full_tile) {`);
    for (const j of range(tn)) {
      emit(`      let col${j} = kv0 + tx + ${c.ct * j}u;`);
      let ok = `col${j} < skv_`;
      if (c.keyPadding) {
        emit(`      let mi${j} = b * P.m_sb + min(col${j}, skv_ - 1u) * P.m_sj;`);
        ok += ` && ((mask[mi${j} >> 2u] >> ((mi${j} & 3u) * 8u)) & 0xffu) != 0u`;
      }
      emit(`      let cok${j} = ${ok};`);
    }
    for (const i of range(tm)) {
      emit(`      let row${i} = i32(q0 + ty + ${c.rt * i}u) + off_;`);
      for (const j of range(tn)) {
        const band = c.band
          ? ` && i32(col${j}) - row${i} >= -P.left && i32(col${j}) - row${i} <= P.right`
          : "";
        emit(`      s${i}_${j} = select(NEG, s${i}_${j}, cok${j}${band});`);
        if (flex?.maskMod) {
          const full = blockMap ? "tile_state == 2u || " : "";
          emit(`      s${i}_${j} = select(NEG, s${i}_${j}, ${full}mask_mod(b, h, fr${i}, fc${j}));`);
        }
      }
    }
    emit(`    }`);
    for (const i of range(tm)) {
      const terms = range(tn).map((j) => `s${i}_${j}`);
      let expr = terms[0];
      for (const t of terms.slice(1)) expr = `max(${expr}, ${t})`;
      emit(`    var mt${i} = ${expr};`);
    }
    if (c.subgroups === false) {
      for (const i of range(tm)) emit(`    red[(ty + ${c.rt * i}u) * ${c.ct}u + tx] = mt${i};`);
      emit(`    workgroupBarrier();`);
      for (const i of range(tm)) {
        const terms = range(c.ct).map((x) => `red[(ty + ${c.rt * i}u) * ${c.ct}u + ${x}u]`);
        let expr = terms[0];
        for (const t of terms.slice(1)) expr = `max(${expr}, ${t})`;
        emit(`    mt${i} = ${expr};`);
      }
    } else {
      for (let w = c.ct / 2; w >= 1; w /= 2) {
        for (const i of range(tm)) emit(`    mt${i} = max(mt${i}, subgroupShuffleXor(mt${i}, ${w}u));`);
      }
    }
    for (const i of range(tm)) {
      emit(`    let mn${i} = max(m${i}, mt${i});
    let alpha${i} = exp2(m${i} - mn${i});
    m${i} = mn${i};`);
      const pRow = `(ty + ${c.rt * i}u) * ${pStride}u`;
      const sums: string[] = [];
      for (const j of range(tn)) {
        const p = masked
          ? `select(exp2(s${i}_${j} - mn${i}), 0.0, s${i}_${j} <= -1.0e38)`
          : `exp2(s${i}_${j} - mn${i})`;
        emit(`    let p${i}_${j} = ${p};`);
        const col = `tx + ${c.ct * j}u`;
        emit(
          rp
            ? `    (*prow${i})[(${col}) >> 2u][(${col}) & 3u] = p${i}_${j};`
            : `    ps[${pRow} + ((${col}) >> 2u)][(${col}) & 3u] = p${i}_${j};`,
        );
        sums.push(`p${i}_${j}`);
      }
      emit(`    l${i} = l${i} * alpha${i} + ${sums.join(" + ")};`);
      for (const g of range(td / 4)) emit(`    o${i}_${g} *= alpha${i};`);
    }
  };

  if (blockMap) {
    // Empty tiles of the block map are skipped: the loop walks the live tiles only, and the
    // prefetch at the end of a tile loads the next live one. Every value here is workgroup-uniform.
    emit(`  let t_first = flex_next(b, h, q0, q0 + rows_here, t_lo, t_hi);
  if (t_first < t_hi) {`);
    fetchQk("0u", `t_first * ${c.bc}u`, "true", "    ");
    emit(`  }
  var t_nx = t_first;
  for (var t = t_first; t < t_hi; t = t_nx) {
    let kv0 = t * ${c.bc}u;
    let tile_state = flex_tile(b, h, q0, q0 + rows_here, t);
    t_nx = flex_next(b, h, q0, q0 + rows_here, t + 1u, t_hi);
    let has_next = t_nx < t_hi;`);
  } else {
    emit(`  if (t_lo < t_hi) {`);
    fetchQk("0u", `t_lo * ${c.bc}u`, "true", "    ");
    emit(`  }`);
    emit(`  for (var t = t_lo; t < t_hi; t++) {
    let kv0 = t * ${c.bc}u;
    let has_next = t + 1u < t_hi;`);
  }
  const nextKv = blockMap ? `t_nx * ${c.bc}u` : `kv0 + ${c.bc}u`;
  for (const i of range(tm)) {
    for (const j of range(tn)) emit(int8 ? `    var si${i}_${j} = 0i;` : `    var s${i}_${j} = 0.0;`);
  }
  // ---- S = Q K^T, one qk stage per head-dim chunk ----
  emit(`    for (var kc = 0u; kc < ${nS}u; kc++) {
      workgroupBarrier();`);
  storeQk();
  emit(`      workgroupBarrier();
      if (kc + 1u < ${nS}u) {`);
  fetchQk("kc + 1u", "kv0", "true", "        ");
  emit(`      } else {`);
  fetchV("0u", "kv0", "        ");
  emit(`      }`);
  for (const kk of range(int8 ? 0 : dk4)) {
    for (const i of range(tm)) {
      emit(
        rp
          ? `      let qv${i}_${kk} = (*qrow${i})[${kk}u];`
          : `      let qv${i}_${kk} = qs[(ty + ${c.rt * i}u) * ${qStride}u + ${kk}u];`,
      );
    }
    for (const j of range(tn)) {
      emit(
        rp
          ? `      let kv${j}_${kk} = (*krow${j})[${kk}u];`
          : `      let kv${j}_${kk} = kvs[(tx + ${c.ct * j}u) * ${qStride}u + ${kk}u];`,
      );
      for (const i of range(tm)) {
        const a = `qv${i}_${kk}`, b = `kv${j}_${kk}`;
        emit(
          `      s${i}_${j} = fma(${a}.w, ${b}.w, fma(${a}.z, ${b}.z, fma(${a}.y, ${b}.y, fma(${a}.x, ${b}.x, s${i}_${j}))));`,
        );
      }
    }
  }
  for (const kk of range(int8 ? words : 0)) {
    for (const i of range(tm)) {
      // One K stage (nS 1): kc is 0 and the Q word index a constant.
      const word = nS === 1 ? `${kk}u` : `kc * ${words}u + ${kk}u`;
      emit(
        rp
          ? `      let qv${i}_${kk} = (*qrow${i})[${word}];`
          : `      let qv${i}_${kk} = qs[(ty + ${c.rt * i}u) * ${qStride}u + ${word}];`,
      );
    }
    for (const j of range(tn)) {
      emit(
        rp
          ? `      let kv${j}_${kk} = (*krow${j})[${kk}u];`
          : `      let kv${j}_${kk} = kvs[(tx + ${c.ct * j}u) * ${kStride}u + ${kk}u];`,
      );
      for (const i of range(tm)) {
        const a = `qv${i}_${kk}`, b = `kv${j}_${kk}`;
        emit(
          `      si${i}_${j} += dot4I8Packed(${a}.x, ${b}.x) + dot4I8Packed(${a}.y, ${b}.y) + dot4I8Packed(${a}.z, ${b}.z) + dot4I8Packed(${a}.w, ${b}.w);`,
        );
      }
    }
  }
  emit(`    }`);
  if (int8) {
    emit(`    let dq = q_sc * k_scale[ks_base + t];`);
    for (const i of range(tm)) for (const j of range(tn)) emit(`    var s${i}_${j} = f32(si${i}_${j}) * dq;`);
  }
  softmax();
  // ---- O += P V, one v stage per vc keys ----
  /** One V stage's math; `stage` is the stage index (a WGSL expression, or a number with rp). */
  const pv = (stage: string | number) => {
    for (const jj of range(c.vc / 4)) {
      for (const i of range(tm)) {
        emit(
          rp
            ? `      let pv${i}_${jj} = (*prow${i})[${(stage as number) * (c.vc / 4) + jj}u];`
            : `      let pv${i}_${jj} = ps[(ty + ${c.rt * i}u) * ${pStride}u + ${stage} * ${
              c.vc / 4
            }u + ${jj}u];`,
        );
      }
      for (const e of range(4)) {
        const comp = "xyzw"[e];
        for (const g of range(td / 4)) {
          const vv = `vv${g}_${jj}_${e}`;
          const read = rp
            ? `(*vrow${g})[${4 * jj + e}u]`
            : `kvs[${(4 * jj + e) * dPad4}u + tx + ${c.ct * g}u]`;
          emit(`      let ${vv} = ${int8 ? `bitcast<vec4<f32>>(${read})` : read};`);
          for (const i of range(tm)) {
            emit(`      o${i}_${g} = fma(vec4<f32>(pv${i}_${jj}.${comp}), ${vv}, o${i}_${g});`);
          }
        }
      }
    }
  };
  if (rp) {
    // Stages written out one by one: each reads P at constant offsets.
    for (const stage of range(nV)) {
      emit(`    {
      workgroupBarrier();`);
      storeV();
      emit(`      workgroupBarrier();`);
      if (stage + 1 < nV) fetchV(`${stage + 1}u`, "kv0", "      ");
      else fetchQk("0u", nextKv, "has_next", "      ");
      pv(stage);
      emit(`    }`);
    }
    emit(`  }`);
  } else {
    emit(`    for (var vc = 0u; vc < ${nV}u; vc++) {
      workgroupBarrier();`);
    storeV();
    emit(`      workgroupBarrier();
      if (vc + 1u < ${nV}u) {`);
    fetchV("vc + 1u", "kv0", "        ");
    emit(`      } else {`);
    fetchQk("0u", nextKv, "has_next", "        ");
    emit(`      }`);
    pv("vc");
    emit(`    }
  }`);
  }

  // ---- finish: row sums across the row's threads, normalise, store ----
  if (c.subgroups === false) {
    for (const i of range(tm)) emit(`  red[(ty + ${c.rt * i}u) * ${c.ct}u + tx] = l${i};`);
    emit(`  workgroupBarrier();`);
    for (const i of range(tm)) {
      const terms = range(c.ct).map((x) => `red[(ty + ${c.rt * i}u) * ${c.ct}u + ${x}u]`);
      emit(`  let lt${i} = ${terms.join(" + ")};`);
    }
  } else {
    for (const i of range(tm)) emit(`  var lt${i} = l${i};`);
    for (let w = c.ct / 2; w >= 1; w /= 2) {
      for (const i of range(tm)) emit(`  lt${i} += subgroupShuffleXor(lt${i}, ${w}u);`);
    }
  }
  // A sink is one more denominator term exp2(sk), with no value; NEG (or below) means none.
  if (c.sinks) emit(`  let sk = max(sinks[h] * ${Math.LOG2E}, NEG);`);
  const lseRow = c.varlen ? "h * P.s_q + cq0 + r" : "(b * P.n + h) * P.s_q + r";
  for (const i of range(tm)) {
    emit(`  {
    let r = q0 + ty + ${c.rt * i}u;
    if (r < sq_) {`);
    if (c.sinks) {
      emit(`      let mx${i} = max(m${i}, sk);
      let keep${i} = exp2(m${i} - mx${i});
      let den${i} = lt${i} * keep${i} + select(exp2(sk - mx${i}), 0.0, sk <= NEG);
      let inv = select(0.0, keep${i} / den${i}, den${i} > 0.0);`);
    } else emit(`      let inv = select(0.0, 1.0 / lt${i}, lt${i} > 0.0);`);
    emit(
      `      let ob = ${
        c.varlen ? "h * P.o_sh + (cq0 + r) * P.o_ss" : "b * P.o_sb + h * P.o_sh + r * P.o_ss"
      };`,
    );
    for (const g of range(td / 4)) {
      const col = `tx + ${c.ct * g}u`;
      const guard = s.dPad > c.d ? `if (${col} < ${d4}u) ` : "";
      emit(`      ${guard}{ o[ob + ${col}] = ${storeVec(c, `(o${i}_${g} * inv)`)}; }`);
    }
    if (c.lse && int8 && !rowBias) {
      // K was smoothed (its mean removed): lse_bias adds back the row's scale * q . mean(k) (with a
      // score_mod the scores had it added already).
      emit(`      if (tx == 0u) {
        let li = ${lseRow};
        lse[li] = select(select(${NEG_INF}, (m${i} + log2(lt${i})) * LN2 + lse_bias[li], lt${i} > 0.0), lt${i}, ${
        isNanExpr(`lt${i}`)
      });
      }`);
    } else if (c.lse && c.sinks) {
      emit(`      if (tx == 0u) {
        lse[${lseRow}] = select(select(${NEG_INF}, (mx${i} + log2(den${i})) * LN2, den${i} > 0.0), lt${i}, ${
        isNanExpr(`lt${i}`)
      });
      }`);
    } else if (c.lse) {
      emit(`      if (tx == 0u) {
        lse[${lseRow}] = select(select(${NEG_INF}, (m${i} + log2(lt${i})) * LN2, lt${i} > 0.0), lt${i}, ${
        isNanExpr(`lt${i}`)
      });
      }`);
    }
    emit(`    }
  }`);
  }
  emit(`}`);
  if (flex) {
    const decls = flexDeclarations(flex, L.join("\n"), bindings.length + 1, c.bc);
    emit(decls.code);
    bindings.push(...decls.bindings);
  }
  return {
    key: flashKey(c),
    label: `flash ${flashKey({ ...c, flex: undefined })}${flex ? " flex" : ""}`,
    code: L.join("\n") + "\n",
    bindings,
    uniforms,
  };
}
