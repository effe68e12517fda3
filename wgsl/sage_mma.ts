/**
 * The `sage-mma` kernels: SageAttention on matrix tiles (wgsl/mma.ts), int8 Q·Kᵀ and int8 P·V.
 *
 * Pre-pass (with wgsl/sage.ts's mean and quantization kernels, d padded to 32): K smoothed by its
 * per-channel mean and quantized per block of `bc` keys, Q per block of 16 rows (one scale each,
 * Q's carrying the softmax scale and log2 e); V's per-channel mean and absmax come from partial
 * statistics over chunks of keys (wgsl/sage.ts, `sageStatsKernel` and `sageStatsFinalKernel`), and
 * {@link sageMmaVKernel} quantizes V - mean per channel (one scale per channel over the sequence).
 *
 * Main kernel ({@link sageMmaKernel}): a workgroup of `warps` subgroups of 32 invocations serves
 * 16·warps query rows of one (batch, head); each subgroup owns 16 rows and keeps their Q tiles
 * (d/32 left matrices) for the whole key loop. Per tile of `bc` keys each subgroup
 *   1. S = Q Kᵀ: (bc/N)·(d/32) multiply-accumulates into i32 tiles, stored to workgroup memory;
 *   2. two invocations per row read the row's scores, dequantize them (q scale · k scale), mask,
 *      take the row max (the pair exchange partial maxima through workgroup memory), and quantize
 *      P = exp2(s - tile max) ∈ [0, 1] to i8 (0..127, one scale per row and key tile);
 *   3. O_tile = P V: (dV/N)·(bc/32) multiply-accumulates (V int8 per channel) into i32 tiles,
 *      stored to workgroup memory and added into the invocations' f32 accumulators with the
 *      online-softmax factors (alpha for the old rows, exp2(tile max - new max) for the tile).
 * The end multiplies each channel by V's scale, divides by the row sum and adds V's mean back
 * (zero rows stay zero). Four workgroup barriers per tile; matrix steps run in workgroup-uniform
 * control flow.
 *
 * Flex functions (wgsl/flex.ts) as in flash's int8 mode: mask_mod on the scores of partial tiles, the
 * empty tiles of a block map skipped (the key loop walks the live ones, a workgroup-uniform walk) and
 * the per-element test left out on full ones; score_mod on every score in natural-log units, with
 * the row's `scale * q . mean(k)` (`lse_bias`, from the pre-pass) added back first, since K's
 * smoothing shifted the row's scores by it.
 */
import type { DType } from "../core/types.ts";
import { BF16_PACK, isNanExpr, type Kernel, NEG_INF, uniformBlock, type UniformType } from "./common.ts";
import { storeVec, UNPACK, vecElement } from "./flash.ts";
import { BLOCK_MAP_UNIFORMS, flexDeclarations, type FlexKernelConfig, flexKey } from "./flex.ts";
import { MMA_SUBGROUP, MmaEmitter, mmaLoops, type MmaPlace, type MmaShape } from "./mma.ts";
import { SAGE_MEAN_COLUMNS, SAGE_THREADS, type SageInput, sageInputHeader, sageLoader } from "./sage.ts";

/** What every matrix-tile attention kernel's text depends on (sage-mma's and flash-mma's). */
export interface MmaKernelConfig {
  dtype: DType;
  f16: boolean;
  /** Head dim of q, k, v (a multiple of 4, at most 256). */
  d: number;
  /** Subgroups (of 32 invocations) per workgroup; query rows per workgroup are 16·warps. */
  warps: number;
  /** Keys per tile (a multiple of 32 and of the tile's N). */
  bc: number;
  /** The matrix tile: M 16, K 32; N 16 or 8. */
  shape: MmaShape;
  band: boolean;
  keyPadding: boolean;
  lse: boolean;
  /** Plain-WGSL matrix steps (any adapter) instead of subgroup matrices. */
  emulate: boolean;
}

/** Everything that changes the main kernel's text. */
export interface SageMmaConfig extends MmaKernelConfig {
  /**
   * One result tile live at a time (each stored as soon as it is complete) instead of all the S
   * tiles, then all the O tiles, accumulated together: fewer registers, less independent work.
   */
  oneTile?: boolean;
  /**
   * V quantized per key tile as [channels, bc keys] (keys contiguous: the K-major layout int8
   * tensor-core operands want) instead of [keys, channels]; {@link sageMmaVKernel} must match.
   */
  vTransposed?: boolean;
  /**
   * The S and O tiles share one workgroup-memory region per subgroup (one barrier more per tile),
   * so that more subgroups fit a workgroup.
   */
  alias?: boolean;
  /** Row maxima and sums exchanged by subgroup shuffles (real form only): one barrier less per tile. */
  shuffle?: boolean;
  /**
   * Flex attention: score_mod on every score (the smoothing's row shift added back: binding
   * `lse_bias`), mask_mod on the scores of partial tiles, and with a block map (binding
   * `flex_blocks`) empty key tiles skipped.
   */
  flex?: FlexKernelConfig;
}

/** Rows of a Q block and of a subgroup's tile. */
export const MMA_ROWS = 16;

/** Head dims of the packed Q/K (to the tile's K, 32) and V (to 16) rows. */
export function sageMmaDims(d: number) {
  return { dQ: Math.ceil(d / 32) * 32, dV: Math.ceil(d / 16) * 16 };
}

/** Derived sizes. */
export function sageMmaShape(c: SageMmaConfig) {
  const { dQ, dV } = sageMmaDims(c.d);
  const br = MMA_ROWS * c.warps, threads = MMA_SUBGROUP * c.warps;
  const ss = c.bc + 4, so = dV + 4; // i32 strides of the S and O tiles (+4 against bank conflicts)
  // With `alias` the S and O tiles share one region per subgroup.
  const tilesWords = c.alias ? MMA_ROWS * Math.max(ss, so) : MMA_ROWS * (ss + so);
  const perWarp = tilesWords + (MMA_ROWS * c.bc) / 4 + MMA_SUBGROUP;
  return { dQ, dV, br, threads, ss, so, sharedBytes: 4 * perWarp * c.warps };
}

/**
 * Problems every matrix kernel's config shares (head dim, tile, threads, workgroup memory), given
 * its derived sizes; each kernel adds its own.
 */
export function mmaConfigProblems(
  c: MmaKernelConfig,
  s: { threads: number; sharedBytes: number },
  limits: { storage: number; invocations: number },
): string[] {
  const problems: string[] = [];
  if (c.d % 4 !== 0 || c.d > 256) problems.push("d must be a multiple of 4 up to 256");
  if (c.shape.M !== 16 || c.shape.K !== 32 || (c.shape.N !== 16 && c.shape.N !== 8)) {
    problems.push("the tile must be M16 K32 with N 16 or 8");
  }
  if (s.threads > limits.invocations) problems.push(`${s.threads} threads > ${limits.invocations}`);
  if (s.sharedBytes > limits.storage) {
    problems.push(`${s.sharedBytes} B workgroup memory > ${limits.storage}`);
  }
  return problems;
}

/** Why a config is not valid for a device with these limits (empty when valid). */
export function sageMmaConfigProblems(
  c: SageMmaConfig,
  limits: { storage: number; invocations: number },
): string[] {
  const problems = mmaConfigProblems(c, sageMmaShape(c), limits);
  if (c.shape.component !== "i8" || c.shape.result !== "i32") {
    problems.push("only i8 -> i32 tiles are generated");
  }
  if (c.bc % 32 !== 0 || c.bc % c.shape.N !== 0) problems.push("bc must be a multiple of 32");
  return problems;
}

/** A stable cache key. */
export function sageMmaKey(c: SageMmaConfig): string {
  const t = c.shape;
  return `sage-mma:${c.dtype}:${c.f16}:d${c.d}:w${c.warps}:bc${c.bc}:${t.component}${t.M}x${t.N}x${t.K}:` +
    `${c.band}:${c.keyPadding}:${c.lse}:${c.emulate ? "emu" : "real"}${c.oneTile ? ":one" : ""}${
      c.shuffle && !c.emulate ? ":shfl" : ""
    }${c.vTransposed ? ":vt" : ""}${c.alias ? ":alias" : ""}${flexKey(c.flex)}`;
}

/** The main kernels' uniforms (one-pass and two-pass alike). */
export const SAGE_MMA_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["n", "u32"],
  ["group", "u32"],
  ["s_q", "u32"],
  ["s_kv", "u32"],
  ["blocks", "u32"],
  // Q blocks of 16 rows per head (q8 rows per head are 16 of these).
  ["q_blocks", "u32"],
  ["offset", "i32"],
  ["left", "i32"],
  ["right", "i32"],
  // Output strides in vec4 units (b, head, s); d is contiguous.
  ["o_sb", "u32"],
  ["o_sh", "u32"],
  ["o_ss", "u32"],
  // Key-padding mask strides in bytes (b, key).
  ["m_sb", "u32"],
  ["m_sj", "u32"],
];

/**
 * Both main kernels' bindings, emitted in order: q8, k8, v8 (as `types` says), o, [mask], [lse],
 * q_scale, k_scale, v_stat ([b, n_kv, 2, dV]: V's scale per channel, then its mean), [lse_bias]
 * (with the lse or a score_mod), and the 16-bit unpacking helpers the dtype needs; the names in
 * binding order come back (the flex declarations append theirs).
 */
export function sageMmaBindings(
  c: Pick<SageMmaConfig, "dtype" | "f16" | "keyPadding" | "lse">,
  types: { k8: string; v8: string; rowBias: boolean },
  emit: (line: string) => void,
): string[] {
  const bindings = ["q8", "k8", "v8", "o"];
  emit(`@group(0) @binding(1) var<storage, read> q8: array<i32>;
@group(0) @binding(2) var<storage, read> k8: array<${types.k8}>;
@group(0) @binding(3) var<storage, read> v8: array<${types.v8}>;
@group(0) @binding(4) var<storage, read_write> o: array<${vecElement(c)}>;`);
  const bind = (name: string, decl: string) => {
    bindings.push(name);
    emit(`@group(0) @binding(${bindings.length}) ${decl}`);
  };
  if (c.keyPadding) bind("mask", "var<storage, read> mask: array<u32>;");
  if (c.lse) bind("lse", "var<storage, read_write> lse: array<f32>;");
  bind("q_scale", "var<storage, read> q_scale: array<f32>;");
  bind("k_scale", "var<storage, read> k_scale: array<f32>;");
  bind("v_stat", "var<storage, read> v_stat: array<f32>;");
  if (c.lse || types.rowBias) bind("lse_bias", "var<storage, read> lse_bias: array<f32>;");
  if (c.dtype !== "f32" && !(c.dtype === "f16" && c.f16)) emit(UNPACK);
  if (c.dtype === "bf16") emit(BF16_PACK);
  return bindings;
}

/**
 * The start of both main kernels' entry point (this and wgsl/sage_mma_two_pass.ts): the workgroup's
 * (batch, head, query block), each invocation's subgroup, row and half, and the int8 operands' bases.
 * wgsl/flash_mma.ts passes dQ and dV times its slice count (a tile holds every slice).
 */
export function sageMmaPrologue(
  c: {
    threads: number;
    br: number;
    band: boolean;
    bc: number;
    dQ: number;
    dV: number;
    warps: number;
    /**
     * Subgroups per block of 16 rows (default 1): `wblk` is the subgroup's block, `part` its share
     * (flash-mma's split).
     */
    split?: number;
    /** WGSL of the row's Q scale `q_sc` (default one per block of 16 rows: `q_scale[qb]`). */
    qScale?: string;
  },
): string {
  const R = MMA_ROWS, split = c.split ?? 1;
  const block = split > 1 ? "wblk" : "warp";
  return `@compute @workgroup_size(${c.threads})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
  let bh = wg / P.blocks;
  // Heaviest query blocks first under a causal band (bottom-right aligned: the last rows see most keys).
  let blk = ${c.band ? "P.blocks - 1u - (wg % P.blocks)" : "wg % P.blocks"};
  let h = bh % P.n;
  let b = bh / P.n;
  let hk = h / P.group;
  let q0 = blk * ${c.br}u;
  let warp = lid / ${MMA_SUBGROUP}u;
  let lane = lid % ${MMA_SUBGROUP}u;${
    split > 1 ? `\n  let wblk = warp / ${split}u;\n  let part = warp % ${split}u;` : ""
  }
  // This invocation's row of the subgroup's 16 and its half of each tile's columns.
  let r = lane % ${R}u;
  let hh = lane / ${R}u;
  let row = q0 + ${block} * ${R}u + r;
  let rows_here = min(P.s_q - q0, ${c.br}u);
  let k_blocks = (P.s_kv + ${c.bc - 1}u) / ${c.bc}u;
  let bhk = b * (P.n / P.group) + hk;
  let ks_base = bhk * k_blocks;
  let k8_base = ks_base * ${c.bc * c.dQ}u;
  let v8_base = ks_base * ${c.bc * c.dV}u;
  let qb = bh * P.q_blocks + blk * ${c.warps / split}u + ${block};
  let q_sc = ${c.qScale ?? "q_scale[qb]"};
  let q8_base = qb * ${R * c.dQ}u;`;
}

/**
 * The main kernel. Bindings: q8, k8, v8, o, [mask], [lse], q_scale, k_scale, v_stat, [lse_bias] (with
 * the lse or a score_mod), then the flex bindings (mod buffers, [flex_blocks]).
 */
export function sageMmaKernel(c: SageMmaConfig): Kernel {
  const s = sageMmaShape(c);
  const { dQ, dV, br, ss, so } = s;
  const { N } = c.shape;
  const R = MMA_ROWS, half = c.bc / 2, halfV = dV / 2;
  const mma = new MmaEmitter(c.shape, c.emulate, "lane");
  const L: string[] = [];
  const emit = (line: string) => L.push(line);
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  const flex = c.flex ?? null;
  const blockMap = flex?.blockMap === true;
  // K smoothing shifted each row's scores; a score_mod gets them back exact (`lse_bias`).
  const rowBias = flex?.scoreMod != null;
  const uniforms: [string, UniformType][] = blockMap
    ? [...SAGE_MMA_UNIFORMS, ...BLOCK_MAP_UNIFORMS]
    : SAGE_MMA_UNIFORMS;
  const { forEach, tile } = mmaLoops(c.emulate, emit);
  const tiles = (name: string, n: number, zero: (v: string) => void) => {
    if (c.emulate) emit(`    ${mma.zeroArray(name, n)}`);
    else range(n).forEach((i) => zero(`${name}${i}`));
  };

  if (c.dtype === "f16" && c.f16) emit("enable f16;");
  emit(mma.header() + uniformBlock(uniforms));
  const bindings = sageMmaBindings(c, { k8: "i32", v8: "i32", rowBias }, emit);
  const sArr = c.alias ? "sso" : "ss", oArr = c.alias ? "sso" : "so";
  const region = c.alias ? R * Math.max(ss, so) : 0;
  emit(
    c.alias
      ? `var<workgroup> sso: array<i32, ${c.warps * region}>;`
      : `var<workgroup> ss: array<i32, ${c.warps * R * ss}>;
var<workgroup> so: array<i32, ${c.warps * R * so}>;`,
  );
  emit(`
var<workgroup> sp: array<i32, ${(c.warps * R * c.bc) / 4}>;
var<workgroup> red: array<f32, ${c.warps * MMA_SUBGROUP}>;
const NEG: f32 = -3.0e38;
const LN2: f32 = 0.6931471805599453;`);
  // Operand places (strides in elements of the component type: i8 bytes, i32 words).
  const qAt: MmaPlace = { array: "q8", colMajor: false, stride: dQ };
  const kAt: MmaPlace = { array: "k8", colMajor: true, stride: dQ }; // Kᵀ: key j's column is its row
  const sAt: MmaPlace = { array: sArr, colMajor: false, stride: ss };
  const pAt: MmaPlace = { array: "sp", colMajor: false, stride: c.bc };
  // V: [keys, channels] row-major, or per key tile [channels, bc keys] (column-major for the tile).
  const vAt: MmaPlace = c.vTransposed
    ? { array: "v8", colMajor: true, stride: c.bc }
    : { array: "v8", colMajor: false, stride: dV };
  const vOffset = (kk: string, g: string) =>
    c.vTransposed
      ? `v8_base + kv0 * ${dV}u + ${g} * ${N * c.bc}u + ${kk} * 32u`
      : `v8_base + (kv0 + ${kk} * 32u) * ${dV}u + ${g} * ${N}u`;
  const oAt: MmaPlace = { array: oArr, colMajor: false, stride: so };

  emit(sageMmaPrologue({ threads: s.threads, br, band: c.band, bc: c.bc, dQ, dV, warps: c.warps }));
  emit(`  let ws = warp * ${c.alias ? region : R * ss}u;
  let wo = warp * ${c.alias ? region : R * so}u;
  let wp = warp * ${R * c.bc}u;`);
  if (flex) {
    emit(`  let fr = min(row, P.s_q - 1u); // the row for the flex functions, clamped into the sequence`);
  }
  if (rowBias) emit(`  let rb = lse_bias[bh * P.s_q + fr];`);
  // Real form: the Q tiles stay in registers for the whole key loop (the emulated form reads them
  // at each multiply).
  if (!c.emulate) {
    for (const k of range(dQ / 32)) emit("  " + mma.loadLeft(`qa${k}`, qAt, `q8_base + ${k * 32}u`));
  }
  emit(`  var j_lo = 0i;
  var j_hi = i32(P.s_kv);`);
  if (c.band) {
    emit(`  j_lo = max(j_lo, i32(q0) + P.offset - P.left);
  j_hi = min(j_hi, i32(q0 + rows_here) - 1i + P.offset + P.right + 1i);`);
  }
  emit(`  let t_lo = u32(max(j_lo, 0i)) / ${c.bc}u;
  let t_hi = select(0u, (u32(max(j_hi, 0i)) + ${c.bc - 1}u) / ${c.bc}u, j_hi > j_lo);
  var m = NEG;
  var l = 0.0;`);
  for (const e of range(halfV)) emit(`  var o${e} = 0.0;`);
  if (blockMap) {
    // Empty tiles of the block map are skipped: the loop walks the live tiles only. Every value here
    // is workgroup-uniform (the map is read-only storage), as the barriers and matrix steps need.
    emit(`  for (var t = flex_next(b, h, q0, q0 + rows_here, t_lo, t_hi); t < t_hi;
       t = flex_next(b, h, q0, q0 + rows_here, t + 1u, t_hi)) {
    let kv0 = t * ${c.bc}u;
    let tile_state = flex_tile(b, h, q0, q0 + rows_here, t);`);
  } else {
    emit(`  for (var t = t_lo; t < t_hi; t++) {
    let kv0 = t * ${c.bc}u;`);
  }
  // Aliased: the previous tile's O reads end before this tile's S store.
  if (c.alias) emit(`    workgroupBarrier();`);
  // ---- 1. S = Q Kᵀ ----
  if (c.oneTile) {
    // One S tile at a time, stored as soon as its d/32 multiplies are done (fewer live registers).
    forEach("j", c.bc / N, (j) => {
      emit("    {");
      emit("    " + mma.zero("s"));
      forEach("k", dQ / 32, (k) => {
        if (c.emulate) emit("    " + mma.loadLeft("qa", qAt, `q8_base + ${k} * 32u`));
        emit("      {");
        emit("      " + mma.loadRight(`kb`, kAt, `k8_base + (kv0 + ${j} * ${N}u) * ${dQ}u + ${k} * 32u`));
        emit("      " + mma.mma("s", c.emulate ? "qa" : `qa${parseInt(k)}`, qAt, "kb", kAt));
        emit("      }");
      });
      emit("    " + mma.store(sAt, `ws + ${j} * ${N}u`, "s"));
      emit("    }");
    });
  } else {
    tiles("s", c.bc / N, (j) => emit("    " + mma.zero(j)));
    forEach("k", dQ / 32, (k) => {
      if (c.emulate) emit("    " + mma.loadLeft("qa", qAt, `q8_base + ${k} * 32u`));
      forEach("j", c.bc / N, (j) => {
        emit("    {");
        emit("      " + mma.loadRight(`kb`, kAt, `k8_base + (kv0 + ${j} * ${N}u) * ${dQ}u + ${k} * 32u`));
        emit("      " + mma.mma(tile("s", j), c.emulate ? "qa" : `qa${parseInt(k)}`, qAt, "kb", kAt));
        emit("    }");
      });
    });
    forEach("j", c.bc / N, (j) => emit("    " + mma.store(sAt, `ws + ${j} * ${N}u`, tile("s", j))));
  }
  emit(`    workgroupBarrier();`);
  // ---- 2. softmax of the row half, P to i8 ----
  emit(`    let dq = q_sc * k_scale[ks_base + t];
    let sb = ws + r * ${ss}u + hh * ${half}u;`);
  for (const e of range(half)) emit(`    var x${e} = f32(${sArr}[sb + ${e}u]) * dq;`);
  if (rowBias) {
    // score_mod takes and returns natural-log units; x is in log2 units (the q scale carries
    // scale * log2 e) and misses the row's smoothing shift. Columns are clamped into the sequence
    // (scores past it are masked below).
    for (const e of range(half)) {
      emit(
        `    x${e} = score_mod(x${e} * LN2 + rb, b, h, fr, min(kv0 + hh * ${half}u + ${e}u, P.s_kv - 1u)) * ${Math.LOG2E};`,
      );
    }
  }
  const maskMod = flex?.maskMod != null;
  const masked = c.band || c.keyPadding || maskMod;
  emit(
    `    let full_tile = kv0 + ${c.bc}u <= P.s_kv${
      c.band
        ? ` && i32(kv0) - (i32(q0 + rows_here) - 1i + P.offset) >= -P.left && i32(kv0) + ${
          c.bc - 1
        }i - (i32(q0) + P.offset) <= P.right`
        : ""
    }${c.keyPadding ? " && false" : ""}${blockMap ? " && tile_state == 2u" : maskMod ? " && false" : ""};
    if (!full_tile) {
      let ri = i32(row) + P.offset;`,
  );
  for (const e of range(half)) {
    emit(`      {
        let col = kv0 + hh * ${half}u + ${e}u;`);
    let ok = "col < P.s_kv";
    if (c.keyPadding) {
      emit(`        let mi = b * P.m_sb + min(col, P.s_kv - 1u) * P.m_sj;`);
      ok += " && ((mask[mi >> 2u] >> ((mi & 3u) * 8u)) & 0xffu) != 0u";
    }
    if (c.band) ok += " && i32(col) - ri >= -P.left && i32(col) - ri <= P.right";
    if (maskMod) {
      // A full tile of the map needs no test (its band and key checks still apply).
      ok += ` && (${blockMap ? "tile_state == 2u || " : ""}mask_mod(b, h, fr, min(col, P.s_kv - 1u)))`;
    }
    emit(`        x${e} = select(NEG, x${e}, ${ok});
      }`);
  }
  emit(`    }`);
  let mx = "x0";
  for (const e of range(half).slice(1)) mx = `max(${mx}, x${e})`;
  // The row's two invocations exchange partial maxima: by a subgroup shuffle in the real form with
  // `shuffle` (a hardware subgroup is the tile's 32 invocations there), else through workgroup memory.
  const shuffle = c.shuffle === true && !c.emulate;
  emit(
    shuffle
      ? `    let mx = ${mx};
    let mt = max(mx, subgroupShuffleXor(mx, ${R}u));`
      : `    red[warp * ${MMA_SUBGROUP}u + lane] = ${mx};
    workgroupBarrier();
    let mt = max(red[warp * ${MMA_SUBGROUP}u + lane], red[warp * ${MMA_SUBGROUP}u + (lane ^ ${R}u)]);`,
  );
  emit(`    let mn = max(m, mt);
    let alpha = exp2(m - mn);
    let beta = exp2(mt - mn);
    m = mn;`);
  // P relative to the tile's row max, so its largest element is 127.
  for (const e of range(half)) {
    const p = masked ? `select(exp2(x${e} - mt), 0.0, x${e} <= -1.0e38)` : `exp2(x${e} - mt)`;
    emit(`    let p${e} = u32(round(${p} * 127.0));`);
  }
  const pb = `wp / 4u + r * ${c.bc / 4}u + hh * ${half / 4}u`;
  for (const w of range(half / 4)) {
    const e = 4 * w;
    emit(`    sp[${pb} + ${w}u] = i32(p${e} | (p${e + 1} << 8u) | (p${e + 2} << 16u) | (p${e + 3} << 24u));`);
  }
  emit(`    l = l * alpha + f32(${range(half).map((e) => `p${e}`).join(" + ")}) * beta;
    workgroupBarrier();`);
  // ---- 3. O_tile = P V ----
  if (c.oneTile) {
    // P's tiles loaded once; one O tile at a time, stored as soon as its bc/32 multiplies are done.
    if (!c.emulate) {
      for (const kk of range(c.bc / 32)) emit("    " + mma.loadLeft(`pa${kk}`, pAt, `wp + ${kk * 32}u`));
    }
    forEach("g", dV / N, (g) => {
      emit("    {");
      emit("    " + mma.zero("a"));
      forEach("kk", c.bc / 32, (kk) => {
        if (c.emulate) emit("    " + mma.loadLeft("pa", pAt, `wp + ${kk} * 32u`));
        emit("      {");
        emit("      " + mma.loadRight("vb", vAt, vOffset(kk, g)));
        emit("      " + mma.mma("a", c.emulate ? "pa" : `pa${parseInt(kk)}`, pAt, "vb", vAt));
        emit("      }");
      });
      emit("    " + mma.store(oAt, `wo + ${g} * ${N}u`, "a"));
      emit("    }");
    });
  } else {
    tiles("a", dV / N, (g) => emit("    " + mma.zero(g)));
    forEach("kk", c.bc / 32, (kk) => {
      emit("    {");
      emit("      " + mma.loadLeft("pa", pAt, `wp + ${kk} * 32u`));
      forEach("g", dV / N, (g) => {
        emit("      {");
        emit("        " + mma.loadRight("vb", vAt, vOffset(kk, g)));
        emit("        " + mma.mma(tile("a", g), "pa", pAt, "vb", vAt));
        emit("      }");
      });
      emit("    }");
    });
    forEach("g", dV / N, (g) => emit("    " + mma.store(oAt, `wo + ${g} * ${N}u`, tile("a", g))));
  }
  emit(`    workgroupBarrier();
    let ob = wo + r * ${so}u + hh * ${halfV}u;`);
  for (const e of range(halfV)) emit(`    o${e} = o${e} * alpha + f32(${oArr}[ob + ${e}u]) * beta;`);
  emit(`  }`);

  // ---- finish: the row sum over both halves, V's scale and mean; zero rows stay zero ----
  emit(
    shuffle ? `  l += subgroupShuffleXor(l, ${R}u);` : `  workgroupBarrier();
  red[warp * ${MMA_SUBGROUP}u + lane] = l;
  workgroupBarrier();
  l = red[warp * ${MMA_SUBGROUP}u + lane] + red[warp * ${MMA_SUBGROUP}u + (lane ^ ${R}u)];`,
  );
  emit(`  if (row < P.s_q) {
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let vs = bhk * ${2 * dV}u + hh * ${halfV}u;
    let obase = b * P.o_sb + h * P.o_sh + row * P.o_ss + hh * ${halfV / 4}u;`);
  for (const g of range(halfV / 4)) {
    const vals = range(4).map((i) => {
      const e = 4 * g + i;
      return `select(o${e} * v_stat[vs + ${e}u] * inv + v_stat[vs + ${dV + e}u], 0.0, l == 0.0)`;
    });
    const guard = dV > c.d ? `if (hh * ${halfV}u + ${4 * g}u < ${c.d}u) ` : "";
    emit(`    ${guard}{ o[obase + ${g}u] = ${storeVec(c, `vec4<f32>(${vals.join(", ")})`)}; }`);
  }
  if (c.lse) {
    // K was smoothed (its mean removed): lse_bias adds back the row's scale * q . mean(k) (with a
    // score_mod the scores had it added already). l counts P in units of 1/127.
    emit(`    if (hh == 0u) {
      let li = bh * P.s_q + row;
      lse[li] = select(select(${NEG_INF}, (m + log2(l / 127.0)) * LN2${
      rowBias ? "" : " + lse_bias[li]"
    }, l > 0.0), l, ${isNanExpr("l")});
    }`);
  }
  emit(`  }
}`);
  emit(mma.helpers());
  if (flex) {
    const decls = flexDeclarations(flex, L.join("\n"), bindings.length + 1, c.bc);
    emit(decls.code);
    bindings.push(...decls.bindings);
  }
  const key = sageMmaKey(c);
  const label = `sage-mma ${sageMmaKey({ ...c, flex: undefined })}${flex ? " flex" : ""}`;
  return { key, label, code: L.join("\n") + "\n", bindings, uniforms };
}

const V_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["cgroups", "u32"],
  ["tiles", "u32"],
  ["s", "u32"],
  // Rows of v8 per head (k_blocks * bc): rows past s are written as zeros.
  ["rows", "u32"],
  // Strides of v in vec4 units (b, head, s) and the K/V head count.
  ["heads", "u32"],
  ["sb", "u32"],
  ["sh", "u32"],
  ["ss", "u32"],
];

/** Rows of V one quantization workgroup writes ({@link sageMmaVKernel}). */
export const V_TILE_ROWS = 4 * SAGE_THREADS / SAGE_MEAN_COLUMNS;

/**
 * V - mean quantized to int8 per channel under `v_stat` (wgsl/sage.ts, `sageStatsFinalKernel`): one workgroup
 * per (batch, K/V head, {@link SAGE_MEAN_COLUMNS} vec4 columns of dV, {@link V_TILE_ROWS} rows), each
 * invocation four rows of one vec4 column. Bindings: v, v8 (packed `[b, n_kv, rows, dV/4]`, or per key
 * tile `[channels, bc keys]` when `transposed`), v_stat. Dispatch `b * n_kv * cgroups * tiles`
 * workgroups, `cgroups = ceil(dV / 4 / SAGE_MEAN_COLUMNS)`, `tiles = ceil(rows / V_TILE_ROWS)`.
 */
export function sageMmaVKernel(c: SageInput & { bc: number; transposed: boolean; offset?: boolean }): Kernel {
  const { dV } = sageMmaDims(c.d);
  const d4 = c.d / 4, w4 = dV / 4, cw = SAGE_MEAN_COLUMNS, lanes = SAGE_THREADS / cw;
  const key = `sage-mma-v:${c.dtype}:${c.f16}:d${c.d}${c.transposed ? `:t${c.bc}` : ""}${
    c.offset ? ":u8" : ""
  }`;
  // u8 operands (two-pass kernel): each byte offset by 128, i.e. its sign bit flipped.
  const flip = c.offset ? " ^ 0x80808080u" : "";
  // An invocation's four rows loaded at once (clamped into the sequence, zero past its end), then
  // quantized: a loop waiting on each load in turn kept too few bytes in flight (run 19).
  const loads = (row: (i: number) => string) =>
    [0, 1, 2, 3].map((i) =>
      `    let x${i} = select(vec4<f32>(0.0), ld(base + min(${row(i)}, last) * P.ss) - mean, live && ${
        row(i)
      } < P.s);
`
    ).join("");
  const quantized = (i: number) =>
    `vec4<i32>(clamp(round(select(vec4<f32>(0.0), x${i} * inv, finite4(x${i}))), vec4<f32>(-127.0), vec4<f32>(127.0)))`;
  const rowStore = `  if (col < ${w4}u) {
${loads((i) => `r0 + ${i * lanes}u + lane`)}${
    [0, 1, 2, 3].map((i) =>
      `    if (r0 + ${i * lanes}u + lane < P.rows) {
      let iv = ${quantized(i)};
      v8[(bh * P.rows + r0 + ${
        i * lanes
      }u + lane) * ${w4}u + col] = ((u32(iv.x) & 0xffu) | ((u32(iv.y) & 0xffu) << 8u) | ((u32(iv.z) & 0xffu) << 16u) | (u32(iv.w) << 24u))${flip};
    }
`
    ).join("")
  }  }
`;
  // Per key tile [channels, bc keys]: four keys of one channel per word.
  const bw = c.bc / 4;
  const transposedStore = `  let r4 = r0 / 4u + lane;
  if (col < ${w4}u && r4 < P.rows / 4u) {
${loads((i) => `r4 * 4u + ${i}u`)}    var w = vec4<u32>(0u);
${
    [0, 1, 2, 3].map((i) =>
      `    w |= (bitcast<vec4<u32>>(${quantized(i)}) & vec4<u32>(0xffu)) << vec4<u32>(${8 * i}u);
`
    )
      .join("")
  }    let at = ((bh * (P.rows / ${c.bc}u) + (r4 * 4u) / ${c.bc}u) * ${dV}u + col * 4u) * ${bw}u + r4 % ${bw}u;
    v8[at] = w.x${flip};
    v8[at + ${bw}u] = w.y${flip};
    v8[at + ${2 * bw}u] = w.z${flip};
    v8[at + ${3 * bw}u] = w.w${flip};
  }
`;
  const code = sageInputHeader(c, V_UNIFORMS) +
    `@group(0) @binding(2) var<storage, read_write> v8: array<u32>;
@group(0) @binding(3) var<storage, read> v_stat: array<vec4<f32>>;
${sageLoader(c)}@compute @workgroup_size(${SAGE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
  let r0 = (wg % P.tiles) * ${V_TILE_ROWS}u;
  let bg = wg / P.tiles;
  let bh = bg / P.cgroups;
  let col = (bg % P.cgroups) * ${cw}u + lid % ${cw}u;
  let lane = lid / ${cw}u;
  let live = col < ${d4}u;
  let base = (bh / P.heads) * P.sb + (bh % P.heads) * P.sh + min(col, ${d4 - 1}u);
  let at = bh * ${2 * w4}u + min(col, ${w4 - 1}u);
  let scale = v_stat[at];
  let mean = v_stat[at + ${w4}u];
  // A scale of +Inf (a non-finite value in the channel) gives 0, as 127 / absmax did.
  let inv = select(vec4<f32>(0.0), 1.0 / scale, scale > vec4<f32>(0.0));
  let last = max(P.s, 1u) - 1u;
${c.transposed ? transposedStore : rowStore}}
`;
  return { key, label: key, code, bindings: ["x", "v8", "v_stat"], uniforms: V_UNIFORMS };
}
