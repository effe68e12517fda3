/**
 * The `flash-mma` kernels: exact attention on int8 matrix tiles (wgsl/mma.ts), after Ozaki's
 * splitting of floating-point operands into integer slices.
 *
 * Slices. A row x of Q or K (or a channel of V, or a score's P) is held as
 * `x ≈ scale · (x_0 + x_1/F + x_2/F² + …)` with `F` = {@link SLICE_BASE} = 254 and every slice an
 * i8 in [-127, 127]: `y = x · 127 / absmax`, `x_0 = round(y)`, then each next slice rounds the
 * residual times F (a residual of a round is within ±1/2, so ±127 holds it). Three slices carry
 * about 23 bits (a residual of at most 2^-24 · absmax), two about 15 (enough for f16 and bf16).
 * The dot product of split operands is a sum of slice products `x_a · y_b / F^(a+b)`, each computed
 * exactly in i32 by the matrix units; products of one order o = a + b share an i32 accumulator
 * (products of different orders would overflow one), and the orders are combined in f32 per
 * element after the tile, `A_0 + (A_1 + A_2/F)/F`. Products of order above `order` are left out
 * (for three slices, order 2 keeps six of the nine: the dropped ones weigh at most 2/F³ ≈ 2^-23 of
 * |x|·|y| per term).
 *
 * Pre-pass: {@link flashMmaSliceKernel} splits Q (per row, one scale each, carrying the softmax
 * scale and log2 e; blocks of 16 rows) and K (per key; tiles of bc keys) into slices, packed four to
 * an i32 word along d (padded to 32); {@link flashMmaVKernel} splits V per channel (one scale per
 * channel over the sequence), laid out per key tile as [slice][channels][bc keys]. The scales of all
 * three go to one f32 buffer (`scales`: Q's rows, then K's keys at `k_sc`, then V's channels at
 * `v_sc`), so the main kernel binds 5 to 10 storage buffers (the mask, the lse, the row maxima, a
 * packed batch's offsets).
 *
 * Main kernel ({@link flashMmaKernel}), two passes as sage-mma's (wgsl/sage_mma_two_pass.ts): a
 * workgroup of `warps` subgroups serves blocks of 16 query rows of one (batch, head), `split`
 * subgroups a block: in each key tile subgroup `part` takes keys [part·bc/split, …) for S and
 * channels [part·dV/split, …) for P·V, the block's P shared through workgroup memory.
 *   1. The maximum: per key tile, S = Q·Kᵀ from the slice products of order up to `maxOrder`,
 *      consecutive orders in one i32 tile by Horner's rule ({@link sliceOrderGroups}), stored to
 *      the subgroup's S region, combined per element, each row's maximum kept (then over the
 *      block's subgroups). With `maxOrder` < `order` a proven bound of the products left out is
 *      added (so P ≤ 1 holds). With `maxPass` this pass is a kernel of its own (eight blocks a
 *      workgroup, the maxima through a buffer) and the main kernel starts at pass 2.
 *   2. S again (every kept order), P = exp2(s - max) ∈ [0, 1] split into slices of P·127 (a
 *      fixed scale), P·V from the slice products of order up to `order`, one i32 accumulator tile
 *      per order and V tile that stays in the matrix registers across the whole key loop (exact up
 *      to {@link flashMmaMaxKeys} keys), and the row sum Σp from the same slices, exact in i32.
 * The end combines the orders per element, times V's channel scale, over Σp. A NaN or Inf in a
 * row of q or k makes its scale non-finite, so exactly the scores it takes part in are NaN, and a
 * NaN score makes its row NaN (a flag, not a float comparison); V's per-channel scale carries a
 * non-finite value to its channel.
 */
import { BF16_PACK, isNanExpr, type Kernel, NEG_INF, uniformBlock, type UniformType } from "./common.ts";
import { storeVec, UNPACK, vecElement } from "./flash.ts";
import { MMA_SUBGROUP, MmaEmitter, mmaLoops, type MmaPlace } from "./mma.ts";
import { SAGE_THREADS, type SageInput, sageInputHeader, sageLoader } from "./sage.ts";
import {
  MMA_ROWS,
  mmaConfigProblems,
  type MmaKernelConfig,
  SAGE_MMA_UNIFORMS,
  sageMmaDims,
  sageMmaPrologue,
} from "./sage_mma.ts";
import {
  blockKeyRange,
  keyMaskExprs,
  PACKED_UNIFORMS,
  packedDeclarations,
  rowDiagonal,
  skewedKeyLoop,
  stagedTileCopy,
} from "./sage_mma_two_pass.ts";

/** The factor between consecutive slices. */
export const SLICE_BASE = 254;
/** The largest magnitude of a slice (i8, symmetric). */
export const SLICE_TOP = 127;
const I32_MAX = 2 ** 31 - 1;

/** Everything that changes the main kernel's text (its tile: i8 -> i32). */
export interface FlashMmaConfig extends MmaKernelConfig {
  /** Slices per operand (2 to 4). */
  slices: number;
  /** Highest order a + b of the slice products kept, in Q·Kᵀ and P·V (0 to 2·(slices - 1)). */
  order: number;
  /** Highest order kept in the maximum pass (at most `order`; below it a proven margin is added). */
  maxOrder: number;
  /** Real form: Q's slices loaded once into matrix registers (else loaded at each use). */
  qRegisters: boolean;
  /** Benchmark ablation: skip the maximum pass (wrong results; times the second pass alone). */
  skipMaxPass?: boolean;
  /**
   * K's and V's tiles (every slice) copied into workgroup memory by all invocations, the matrix loads
   * then reading workgroup memory (rows padded by 16 bytes) instead of storage: sage-mma's staging
   * ran 6x faster on the H200. One barrier more per tile in pass 2. "k" or "v" stages one of them
   * (both at d 128 fit one subgroup's S regions in 48 KB; K alone fits three).
   */
  stage?: "kv" | "k" | "v";
  /**
   * Subgroups that share one block of 16 query rows (1, 2 or 4): in each key tile subgroup `part`
   * computes the scores of keys [part·bc/split, (part+1)·bc/split), all of them write P to the block's
   * region, and each multiplies P by channels [part·dV/split, …) of V. P·V keeps one i32 accumulator
   * tile per order and 16 channels across the whole key loop, so at d 128 and three orders one
   * subgroup alone would hold 24 tiles (192 registers a lane, spilled); split 2 halves that.
   */
  split?: number;
  /** A packed batch (as sage-mma's two-pass kernel: wgsl/sage_mma_two_pass.ts, `varlen`). */
  varlen?: boolean;
  /**
   * The maximum pass as a kernel of its own: "only" runs pass 1 and writes each row's maximum to
   * `row_max` (f32, [b·n, s_q]); "read" skips pass 1 and reads it there. Pass 1 holds no P·V tiles
   * and multiplies only the slices up to maxOrder, so it fits eight blocks of 16 rows a workgroup
   * (each staged K tile serving 128 rows instead of 32) where the whole kernel fits two.
   */
  maxPass?: "only" | "read";
  /**
   * The maximum kernel (maxPass "only") with its subgroups in two halves one phase apart, as
   * sage-mma's `skewMax` (wgsl/sage_mma_two_pass.ts): while one half multiplies S the other takes
   * its maxima from the previous tile's, K staged in two slots. Applies with K staged, split 1, an
   * even number of subgroups and no packed batch (see {@link skewedFlashMax}).
   */
  skewMax?: boolean;
}

/** Whether a config is the maximum kernel in two halves one phase apart (FlashMmaConfig.skewMax). */
export function skewedFlashMax(c: FlashMmaConfig): boolean {
  return c.skewMax === true && c.maxPass === "only" && c.stage?.includes("k") === true &&
    (c.split ?? 1) === 1 &&
    c.warps % 2 === 0 && !c.varlen && !c.skipMaxPass;
}

/** The slice products (a, b) of order a + b up to `order`, with their order. */
export function sliceProducts(slices: number, order: number): { a: number; b: number; o: number }[] {
  const out: { a: number; b: number; o: number }[] = [];
  for (let o = 0; o <= order; o++) {
    for (let a = 0; a < slices; a++) {
      const b = o - a;
      if (b >= 0 && b < slices) out.push({ a, b, o });
    }
  }
  return out;
}

/** Products of each order (index o) up to `order`. */
function productCounts(slices: number, order: number): number[] {
  const counts = Array.from({ length: order + 1 }, () => 0);
  for (const p of sliceProducts(slices, order)) counts[p.o]++;
  return counts;
}

/**
 * Most keys whose P·V sums fit the i32 accumulators: 127² per product and key, times the products
 * of the fullest order. Past it the backend refuses the call (no flush to f32 is generated).
 */
export function flashMmaMaxKeys(c: Pick<FlashMmaConfig, "slices" | "order">): number {
  const most = Math.max(...productCounts(c.slices, c.order));
  return Math.floor(I32_MAX / (SLICE_TOP * SLICE_TOP * most));
}

/**
 * The bound on the slice products of orders `maxOrder + 1 .. order` of one score, in units of the
 * score's two scales (times `|q_sc · k_sc|` it bounds the maximum pass's shortfall), with a slack
 * of 2^-16 for f32 rounding. Zero when the maximum pass keeps every order.
 */
export function maxPassMargin(c: Pick<FlashMmaConfig, "slices" | "order" | "maxOrder" | "d">): number {
  const { dQ } = sageMmaDims(c.d);
  const counts = productCounts(c.slices, c.order);
  let m = 0;
  for (let o = c.maxOrder + 1; o <= c.order; o++) {
    m += (counts[o] * SLICE_TOP * SLICE_TOP * dQ) / SLICE_BASE ** o;
  }
  return m * (1 + 2 ** -16);
}

/**
 * The S accumulators of the products up to `order`: consecutive orders share one i32 tile by
 * Horner's rule, `G = Σ_{o = lo..hi} A_o · F^(hi - o)` (the tile times F between orders, exact), as
 * long as its bound, 127² · dQ · Σ count_o · F^(hi - o), stays under 2^31. Three slices to order 2
 * give two tiles, {0, 1} and {2}, instead of three: S's round trip through workgroup memory is
 * what bounds these kernels (bench/RESULTS.md, run 13), and a scalar multiply costs a fifth of a
 * tile's store (run 18).
 */
export function sliceOrderGroups(
  slices: number,
  order: number,
  d: number,
): { lo: number; hi: number }[] {
  const { dQ } = sageMmaDims(d);
  const counts = productCounts(slices, order);
  const bound = (lo: number, hi: number) => {
    let sum = 0;
    for (let o = lo; o <= hi; o++) sum += counts[o] * SLICE_BASE ** (hi - o);
    return SLICE_TOP * SLICE_TOP * dQ * sum;
  };
  const groups: { lo: number; hi: number }[] = [];
  let lo = 0;
  for (let o = 1; o <= order; o++) {
    if (bound(lo, o) > I32_MAX) {
      groups.push({ lo, hi: o - 1 });
      lo = o;
    }
  }
  groups.push({ lo, hi: order });
  return groups;
}

/** Derived sizes. */
export function flashMmaShape(c: FlashMmaConfig) {
  const { dQ, dV } = sageMmaDims(c.d);
  const split = c.split ?? 1;
  const blocks = c.warps / split;
  const br = MMA_ROWS * blocks, threads = MMA_SUBGROUP * c.warps;
  const orders = c.order + 1;
  // Keys and channels of one subgroup per tile; each invocation takes half a row of its keys.
  const kw = c.bc / split, dVs = dV / split, hk = kw / 2;
  const groups = sliceOrderGroups(c.slices, c.maxPass === "only" ? c.maxOrder : c.order, c.d).length;
  // S: one region of 16 rows per group of orders (i32, +4 words a row against bank conflicts);
  // at the end it takes the orders' output tiles in turn, as many at a time as fit.
  const ss = kw + 4, sWords = MMA_ROWS * ss;
  const sRegion = c.maxPass === "only" ? groups * sWords : Math.max(groups * sWords, MMA_ROWS * c.shape.N);
  // P: the slices of a block's 16 rows of bc keys (bytes), shared by the block's subgroups.
  const pSlice = (MMA_ROWS * c.bc) / 4, pRegion = c.maxPass === "only" ? 0 : c.slices * pSlice;
  // The exchange between a row's invocations: the maximum, the NaN flag and Σp per slice.
  const redWords = (2 + c.slices) * MMA_SUBGROUP;
  // Staged tiles: bytes between a K row (key) and a V row (channel), every slice's rows in turn.
  const ksStride = dQ + 16, vsStride = c.bc + 16;
  // The maximum kernel (maxPass "only") stages the slices it multiplies, no V, no P.
  const only = c.maxPass === "only";
  const kSlices = only ? c.maxOrder + 1 : c.slices;
  const kSlots = skewedFlashMax(c) ? 2 : 1;
  const kStaged = c.stage?.includes("k") ? (kSlots * kSlices * c.bc * ksStride) / 4 : 0;
  const vStaged = c.stage?.includes("v") && !only ? (c.slices * dV * vsStride) / 4 : 0;
  return {
    split,
    blocks,
    kw,
    dVs,
    hk,
    ksStride,
    vsStride,
    kSlots,
    kStaged,
    vStaged,
    dQ,
    dV,
    br,
    threads,
    orders,
    ss,
    sWords,
    sRegion,
    pSlice,
    pRegion,
    redWords,
    sharedBytes: 4 * ((sRegion + redWords) * c.warps + pRegion * blocks + kStaged + vStaged),
  };
}

/** Why a config is not valid for a device with these limits (empty when valid). */
export function flashMmaConfigProblems(
  c: FlashMmaConfig,
  limits: { storage: number; invocations: number },
): string[] {
  const s = flashMmaShape(c);
  const problems = mmaConfigProblems(c, s, limits);
  if (c.shape.component !== "i8" || c.shape.result !== "i32") {
    problems.push("only i8 -> i32 tiles are generated");
  }
  if (c.bc % 32 !== 0) problems.push("bc must be a multiple of 32");
  if (![1, 2, 4].includes(s.split) || c.warps % s.split !== 0) {
    problems.push("split must be 1, 2 or 4 and divide warps");
  } else if (s.kw % c.shape.N !== 0 || s.hk % 4 !== 0 || s.dVs % c.shape.N !== 0) {
    problems.push(
      `split ${s.split} leaves ${s.kw} keys and ${s.dVs} channels a subgroup: each must be whole tiles`,
    );
  }
  if (!Number.isInteger(c.slices) || c.slices < 1 || c.slices > 4) problems.push("slices must be 1 to 4");
  if (!Number.isInteger(c.order) || c.order < 0 || c.order > 2 * (c.slices - 1)) {
    problems.push(`order must be 0 to ${2 * (c.slices - 1)} for ${c.slices} slices`);
  }
  if (!Number.isInteger(c.maxOrder) || c.maxOrder < 0 || c.maxOrder > c.order) {
    problems.push("maxOrder must be 0 to order");
  }
  return problems;
}

/** A stable cache key. */
export function flashMmaKey(c: FlashMmaConfig): string {
  const t = c.shape;
  return `flash-mma:${c.dtype}:${c.f16}:d${c.d}:w${c.warps}:bc${c.bc}:${t.component}${t.M}x${t.N}x${t.K}:` +
    `x${c.slices}o${c.order}m${c.maxOrder}:${c.band}:${c.keyPadding}:${c.lse}:${c.emulate ? "emu" : "real"}` +
    `${c.qRegisters && !c.emulate ? ":qreg" : ""}${c.skipMaxPass ? ":skip1" : ""}${
      c.stage ? `:stage-${c.stage}` : ""
    }${(c.split ?? 1) > 1 ? `:split${c.split}` : ""}${c.varlen ? ":packed" : ""}${
      c.maxPass ? `:max-${c.maxPass}` : ""
    }${skewedFlashMax(c) ? ":skew" : ""}`;
}

/** The main kernel's uniforms: sage-mma's, and where K's and V's scales start in `scales`. */
export const FLASH_MMA_UNIFORMS: [string, UniformType][] = [
  ...SAGE_MMA_UNIFORMS,
  ["k_sc", "u32"],
  ["v_sc", "u32"],
];

/** `F^-n` as a WGSL literal. */
const invF = (n = 1) => `f32(${(SLICE_BASE ** -n).toPrecision(9)})`;

/** WGSL of Σ_o vals[o] / F^o by Horner's rule (smallest terms first). */
function combine(vals: string[]): string {
  let acc = vals[vals.length - 1];
  for (let o = vals.length - 2; o >= 0; o--) acc = `${vals[o]} + (${acc}) * ${invF()}`;
  return acc;
}

/** WGSL of Σ_o A_o / F^o from the groups' tiles `vals[g]` (see {@link sliceOrderGroups}). */
function combineGroups(vals: string[], groups: { lo: number; hi: number }[]): string {
  let acc = vals[vals.length - 1];
  for (let g = vals.length - 2; g >= 0; g--) {
    acc = `${vals[g]} + (${acc}) * ${invF(groups[g + 1].hi - groups[g].hi)}`;
  }
  return groups[0].hi === 0 ? acc : `(${acc}) * ${invF(groups[0].hi)}`;
}

/**
 * WGSL statements splitting `y` (already scaled to [-127, 127], f32 or vec4<f32>) into `slices`
 * i32 slices named `${out}0..`: round, then the residual times F, rounded, and so on.
 */
export function sliceStatements(
  y: string,
  out: string,
  slices: number,
  vec: boolean,
  indent: string,
): string {
  const T = vec ? "vec4<f32>" : "f32", I = vec ? "vec4<i32>" : "i32";
  const top = vec ? `vec4<f32>(${SLICE_TOP}.0)` : `${SLICE_TOP}.0`;
  const L = [`${indent}var ${out}y: ${T} = ${y};`];
  for (let a = 0; a < slices; a++) {
    const r = a === 0 ? `clamp(round(${out}y), -${top}, ${top})` : `round(${out}y)`;
    L.push(`${indent}let ${out}r${a} = ${r};`);
    L.push(`${indent}let ${out}${a} = ${I}(${out}r${a});`);
    if (a + 1 < slices) L.push(`${indent}${out}y = (${out}y - ${out}r${a}) * ${SLICE_BASE}.0;`);
  }
  return L.join("\n");
}

/** WGSL packing four i32 slice values (each in [-127, 127]) into an i32 word, byte i from `v[i]`. */
function packBytes(v: string[]): string {
  return `i32((u32(${v[0]}) & 0xffu) | ((u32(${v[1]}) & 0xffu) << 8u) | ((u32(${
    v[2]
  }) & 0xffu) << 16u) | (u32(${v[3]}) << 24u))`;
}

/**
 * The main kernel. Bindings: q8, k8, v8, o, [mask], [lse], scales. Dispatch
 * b·n·ceil(s_q / (16·warps/split)) workgroups.
 */
export function flashMmaKernel(c: FlashMmaConfig): Kernel {
  const s = flashMmaShape(c);
  const { dQ, dV, br, ss, sWords, sRegion, pSlice, pRegion, redWords, split, kw, dVs, hk } = s;
  const { N } = c.shape;
  const R = MMA_ROWS, bc = c.bc, S = c.slices;
  const mma = new MmaEmitter(c.shape, c.emulate, "lane");
  const L: string[] = [];
  const emit = (line: string) => L.push(line);
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  const { forEach, tile } = mmaLoops(c.emulate, emit);
  const zeroTiles = (name: string, n: number, indent: string) => {
    if (c.emulate) emit(`${indent}${mma.zeroArray(name, n)}`);
    else range(n).forEach((i) => emit(`${indent}${mma.zero(`${name}${i}`)}`));
  };
  const qRegisters = c.qRegisters && !c.emulate;
  // This subgroup's first key tile (of N keys) and channel tile within a block's share.
  const part = (n: number, i: string) => split > 1 ? `(part * ${n}u + ${i})` : i;

  if (c.dtype === "f16" && c.f16) emit("enable f16;");
  const uniforms = c.varlen ? [...FLASH_MMA_UNIFORMS, ...PACKED_UNIFORMS] : FLASH_MMA_UNIFORMS;
  emit(mma.header() + uniformBlock(uniforms));
  const only = c.maxPass === "only";
  const bindings: string[] = [];
  const bind = (name: string, decl: string) => {
    bindings.push(name);
    emit(`@group(0) @binding(${bindings.length}) ${decl}`);
  };
  bind("q8", "var<storage, read> q8: array<i32>;");
  bind("k8", `var<storage, read> k8: array<${s.kStaged ? "vec4<i32>" : "i32"}>;`);
  // The maximum kernel binds what pass 1 reads, and row_max.
  if (!only) {
    bind("v8", `var<storage, read> v8: array<${s.vStaged ? "vec4<i32>" : "i32"}>;`);
    bind("o", `var<storage, read_write> o: array<${vecElement(c)}>;`);
  }
  if (c.keyPadding) bind("mask", "var<storage, read> mask: array<u32>;");
  if (c.lse && !only) bind("lse", "var<storage, read_write> lse: array<f32>;");
  bind("scales", "var<storage, read> scales: array<f32>;");
  if (c.maxPass) {
    bind("row_max", `var<storage, ${only ? "read_write" : "read"}> row_max: array<f32>;`);
  }
  if (c.varlen) {
    emit(packedDeclarations(bindings.length + 1));
    bindings.push("cuq", "cuk");
  }
  if (c.dtype !== "f32" && !(c.dtype === "f16" && c.f16)) emit(UNPACK);
  if (c.dtype === "bf16") emit(BF16_PACK);
  emit(
    `var<workgroup> ss: array<i32, ${c.warps * sRegion}>;${
      pRegion ? `\nvar<workgroup> sp: array<i32, ${s.blocks * pRegion}>;` : ""
    }
var<workgroup> red: array<u32, ${c.warps * redWords}>;${
      (s.kStaged ? `\nvar<workgroup> ks: array<i32, ${s.kStaged}>;` : "") +
      (s.vStaged ? `\nvar<workgroup> vs: array<i32, ${s.vStaged}>;` : "")
    }
var<private> NAN_BITS: u32 = 0x7fc00000u;
const NEG: f32 = -3.0e38;
const LN2: f32 = 0.6931471805599453;`,
  );

  // Operand places (offsets and strides in elements of the component type: i8 bytes, i32 words).
  const qAt: MmaPlace = { array: "q8", colMajor: false, stride: dQ };
  const stageK = s.kStaged > 0, stageV = s.vStaged > 0, { ksStride, vsStride } = s;
  // Kᵀ: key j's column is its row.
  const kAt: MmaPlace = stageK
    ? { array: "ks", colMajor: true, stride: ksStride }
    : { array: "k8", colMajor: true, stride: dQ };
  const sAt: MmaPlace = { array: "ss", colMajor: false, stride: ss };
  const pAt: MmaPlace = { array: "sp", colMajor: false, stride: bc };
  // Per key tile [channels, bc keys].
  const vAt: MmaPlace = stageV
    ? { array: "vs", colMajor: true, stride: vsStride }
    : { array: "v8", colMajor: true, stride: bc };
  const oAt: MmaPlace = { array: "ss", colMajor: false, stride: N };
  const qOffset = (a: number, k: string) => `q8_base + ${a * R * dQ}u + ${k} * 32u`;
  // `slot`: the staged K slot's byte offset (WGSL ending in " + "), with skewMax.
  const kOffset = (b: number, j: string, k: string, slot = "") =>
    stageK
      ? `${slot}${b * bc * ksStride}u + ${j} * ${N * ksStride}u + ${k} * 32u`
      : `k8_base + t * ${bc * dQ * S}u + ${b * bc * dQ}u + ${j} * ${N * dQ}u + ${k} * 32u`;
  const vOffset = (b: number, g: string, kk: string) =>
    stageV
      ? `${b * dV * vsStride}u + ${g} * ${N * vsStride}u + ${kk} * 32u`
      : `v8_base + t * ${bc * dV * S}u + ${b * dV * bc}u + ${g} * ${N * bc}u + ${kk} * 32u`;
  // Staging (k8 and v8 then bound as 16-byte words): K tile t's S·bc·dQ bytes and V tile t's
  // S·dV·bc bytes, `nk` and `nv` words per invocation, fetched a tile ahead into registers kr*, vr*
  // and stored into ks, vs after a barrier: a matrix load from storage waits for the memory each
  // time (sage-mma's staging, wgsl/sage_mma_two_pass.ts). The maximum pass multiplies K's slices
  // up to maxOrder only: the first words of each tile.
  const threads = s.threads, kVecs = (S * bc * dQ) / 16, vVecs = (S * dV * bc) / 16;
  const kVecsMax = ((c.maxOrder + 1) * bc * dQ) / 16;
  const nk = Math.ceil(kVecs / threads),
    nv = Math.ceil(vVecs / threads),
    nkMax = Math.ceil(kVecsMax / threads);
  const { loadTile, storeTile } = stagedTileCopy(threads, emit);
  const loadK = (t: string) => loadTile("kr", nk, kVecs, "k8", "k4_base", `min(${t}, t_last)`);
  const loadKMax = (t: string) =>
    loadTile("kr", nkMax, kVecsMax, "k8", "k4_base", `min(${t}, t_last)`, kVecs);
  const loadV = (t: string) => loadTile("vr", nv, vVecs, "v8", "v4_base", `min(${t}, t_last)`);
  const storeK = () => storeTile("kr", nk, kVecs, "ks", dQ / 16, ksStride / 4);
  const storeKMax = (base: string | number = 0) =>
    storeTile("kr", nkMax, kVecsMax, "ks", dQ / 16, ksStride / 4, undefined, base);
  const storeV = () => storeTile("vr", nv, vVecs, "vs", bc / 16, vsStride / 4);

  // A tile holds every slice: the prologue's int8 bases count slices · dQ (and · dV) per row.
  emit(sageMmaPrologue({
    threads: s.threads,
    br,
    band: c.band,
    bc,
    dQ: dQ * S,
    dV: dV * S,
    warps: c.warps,
    split,
    qScale: `scales[qb * ${R}u + r]`,
  }));
  emit(rowDiagonal(c));
  // The invocation's keys of each tile start at kv0 + cols.
  const cols = split > 1 ? `part * ${kw}u + hh * ${hk}u` : `hh * ${hk}u`;
  emit(`  let ws = warp * ${sRegion}u;
  let wr = warp * ${redWords}u;
  let bp = ${split > 1 ? "wblk" : "warp"} * ${pRegion}u;
  let cols = ${cols};
  let ksb = P.k_sc + ks_base * ${bc}u;
  let vsb = P.v_sc + bhk * ${dV}u;`);
  if (qRegisters) {
    for (let a = 0; a < (only ? c.maxOrder + 1 : S); a++) {
      for (const k of range(dQ / 32)) emit("  " + mma.loadLeft(`qa${a}_${k}`, qAt, qOffset(a, `${k}`)));
    }
  }
  emit(blockKeyRange(c));
  emit(`  let t_lo = u32(max(j_lo, 0i)) / ${bc}u;
  let t_hi = select(0u, (u32(max(j_hi, 0i)) + ${bc - 1}u) / ${bc}u, j_hi > j_lo);`);
  if (stageK || stageV) {
    emit(`  let k4_base = k8_base / 16u;
  let v4_base = v8_base / 16u;
  let t_last = max(k_blocks, 1u) - 1u;`);
    if (stageK) range(nk).forEach((i) => emit(`  var kr${i}: vec4<i32>;`));
    if (stageV) range(nv).forEach((i) => emit(`  var vr${i}: vec4<i32>;`));
  }
  /** The red words of slot `at` of the block's subgroup `p` for the invocation's row, half `x`. */
  const redOf = (p: number, x: number, at: number) =>
    `red[${split > 1 ? `(wblk * ${split}u + ${p}u)` : "warp"} * ${redWords}u + ${
      at * MMA_SUBGROUP + x * R
    }u + r]`;
  const peers = range(split).flatMap((p) => [0, 1].map((x) => ({ p, x })));

  /**
   * S of this subgroup's keys of tile t from the products up to `upTo`, one region per group of
   * orders, then each of the invocation's scores as f32 `x${e}`.
   */
  const computeS = (
    upTo: number,
    barrierFirst: boolean,
    margin: number,
    afterStore: () => void = () => {},
  ) => {
    emit(`    let kv0 = t * ${bc}u;`);
    if (barrierFirst) emit(`    workgroupBarrier();`); // the previous tile's reads of ss are done
    multiplyS(upTo);
    emit(`    workgroupBarrier();`);
    afterStore();
    readS(upTo, margin);
  };
  /** S of tile t from the products up to `upTo` into the subgroup's regions (K from `slot`). */
  function multiplyS(upTo: number, slot = "") {
    const groups = sliceOrderGroups(S, upTo, c.d);
    groups.forEach((_, g) => zeroTiles(`s${g}_`, kw / N, "    "));
    const products = sliceProducts(S, upTo);
    forEach("j", kw / N, (j) => {
      groups.forEach(({ lo, hi }, g) => {
        for (let o = lo; o <= hi; o++) {
          // Horner's step: the orders before times F, exact in i32 (sliceOrderGroups' bound).
          if (o > lo) emit(`    ${mma.scale(tile(`s${g}_`, j), SLICE_BASE)}`);
          const here = products.filter((x) => x.o === o);
          forEach("k", dQ / 32, (k) => {
            emit("    {");
            for (const { a, b } of here) {
              if (!qRegisters) emit("      " + mma.loadLeft(`qa${a}`, qAt, qOffset(a, k)));
              emit("      " + mma.loadRight(`kb${b}`, kAt, kOffset(b, part(kw / N, j), k, slot)));
              const left = qRegisters ? `qa${a}_${parseInt(k)}` : `qa${a}`;
              emit("      " + mma.mma(tile(`s${g}_`, j), left, qAt, `kb${b}`, kAt));
            }
            emit("    }");
          });
        }
      });
    });
    groups.forEach((_, g) =>
      forEach(
        "j",
        kw / N,
        (j) => emit("    " + mma.store(sAt, `ws + ${g * sWords}u + ${j} * ${N}u`, tile(`s${g}_`, j))),
      )
    );
  }
  /** The invocation's scores of tile t (kv0 in scope) from the S regions as f32 `x${e}`. */
  function readS(upTo: number, margin: number) {
    const groups = sliceOrderGroups(S, upTo, c.d);
    emit(`    let sb = ws + r * ${ss}u + hh * ${hk}u;`);
    for (const e of range(hk)) {
      const vals = groups.map((_, g) => `f32(ss[sb + ${g * sWords + e}u])`);
      const ksc = `scales[ksb + kv0 + cols + ${e}u]`;
      const x = `(${combineGroups(vals, groups)}) * q_sc * ${ksc}`;
      emit(
        margin > 0
          ? `    let x${e} = ${x} + abs(q_sc * ${ksc}) * f32(${margin.toPrecision(9)});`
          : `    let x${e} = ${x};`,
      );
    }
  }
  const { fullTile, liveExpr } = keyMaskExprs({
    bc,
    band: c.band,
    keyPadding: c.keyPadding,
    blockMap: false,
    maskMod: false,
    varlen: c.varlen,
    cols: "cols",
  });

  /** The running maximum m over tile t's scores x* (kv0 in scope). */
  function tileMax() {
    emit(`    let full = ${fullTile};`);
    // A NaN score is left out here (max() with NaN is unspecified); pass 2 flags it.
    for (const e of range(hk)) {
      emit(`    m = select(m, max(m, x${e}), (full || (${liveExpr(e)})) && !${isNanExpr(`x${e}`)});`);
    }
  }
  /**
   * The maximum kernel's loop in two halves one phase apart (FlashMmaConfig.skewMax; the loop of
   * sage-mma's skewed passes, skewedKeyLoop): S of tile p multiplied by one half while the other takes
   * the maxima of the tile before; K tile p in slot (p - t_lo) % 2.
   */
  function emitSkewedMax() {
    const kSlot = ((c.maxOrder + 1) * bc * ksStride) / 4; // words
    const margin = maxPassMargin(c);
    skewedKeyLoop(emit, c.warps, {
      stageFirst: () => {
        loadKMax("t_lo");
        storeKMax();
        emit(`  workgroupBarrier();`);
        loadKMax("t_lo + 1u");
      },
      multiply: () => {
        emit(`    if (p < t_hi) {
    let t = p;`);
        multiplyS(c.maxOrder, `slot * ${kSlot * 4}u + `);
        emit(`    }`);
      },
      read: (t) => {
        emit(`    {
    let t = ${t};
    let kv0 = t * ${bc}u;`);
        readS(c.maxOrder, margin);
        tileMax();
        emit(`    }`);
      },
      stageNext: () => {
        storeKMax(`(slot ^ 1u) * ${kSlot}u`);
        loadKMax("p + 2u");
      },
    });
  }

  // ---- pass 1: each row's maximum (log2 units), over the block's subgroups and row halves ----
  emit(`  var m = NEG;`);
  if (c.maxPass === "read") {
    emit(`  m = row_max[bh * P.s_q + min(row, P.s_q - 1u)];`);
  } else if (skewedFlashMax(c)) {
    emitSkewedMax();
  } else if (!c.skipMaxPass) {
    if (stageK) {
      // K tile t_lo in ks, t_lo + 1 in registers.
      loadKMax("t_lo");
      storeKMax();
      emit(`  workgroupBarrier();`);
      loadKMax("t_lo + 1u");
    }
    emit(`  for (var t = t_lo; t < t_hi; t++) {`);
    // Staged: after the S barrier every subgroup is done with ks: tile t + 1 goes in, t + 2 is
    // fetched, and the tile ends with a barrier (which also orders the S reads before the next
    // tile's stores).
    computeS(c.maxOrder, !stageK, maxPassMargin(c), () => {
      if (!stageK) return;
      storeKMax();
      loadKMax("t + 2u");
    });
    tileMax();
    if (stageK) emit(`    workgroupBarrier();`);
    emit(`  }`);
  }
  if (c.skipMaxPass && c.maxPass !== "read") emit(`  m = 8.0;`);
  else if (c.maxPass !== "read") {
    emit(`  red[wr + lane] = bitcast<u32>(m);
  workgroupBarrier();
  m = ${peers.map(({ p, x }) => `bitcast<f32>(${redOf(p, x, 0)})`).reduce((a, b) => `max(${a}, ${b})`)};`);
  }
  if (only) {
    // One invocation of each row writes it (the row's maximum over its subgroups and halves).
    emit(`  if (row < P.s_q && cols == 0u) { row_max[bh * P.s_q + row] = m; }
}`);
    emit(mma.helpers());
    return { key: flashMmaKey(c), label: flashMmaKey(c), code: L.join("\n") + "\n", bindings, uniforms };
  }

  // ---- pass 2: P = exp2(s - m) in slices of P·127, P·V accumulated per order in integer tiles ----
  for (let a = 0; a < S; a++) emit(`  var psum${a} = 0i;`);
  emit(`  var bad = false;`);
  for (let o = 0; o <= c.order; o++) zeroTiles(`acc${o}_`, dVs / N, "  ");
  if (stageK || stageV) {
    // K tile t_lo in ks, t_lo + 1 and V tile t_lo in registers (the maximum pass's last reads of ks
    // were before its last barrier).
    if (stageK) {
      loadK("t_lo");
      storeK();
    }
    if (stageV) loadV("t_lo");
    emit(`  workgroupBarrier();`);
    if (stageK) loadK("t_lo + 1u");
  }
  emit(`  for (var t = t_lo; t < t_hi; t++) {`);
  // The barrier after the previous tile's P writes ordered its S reads (and the block's P·V reads
  // of sp) before this tile's stores. Staged: after the S barrier every subgroup is done with ks
  // (this tile's S) and vs (the previous tile's P·V): V tile t and K tile t + 1 go in, the next
  // ones are fetched, and the P barrier below orders them before their reads.
  computeS(c.order, false, 0, () => {
    if (stageV) storeV();
    if (stageK) {
      storeK();
      loadK("t + 2u");
    }
    if (stageV) loadV("t + 1u");
  });
  emit(`    let full = ${fullTile};`);
  for (const e of range(hk)) {
    emit(`    let ok${e} = full || (${liveExpr(e)});
    bad = bad || (ok${e} && ${isNanExpr(`x${e}`)});
    let pf${e} = select(0.0, min(exp2(x${e} - m), 1.0), ok${e} && !${isNanExpr(`x${e}`)});`);
    emit(sliceStatements(`pf${e} * ${SLICE_TOP}.0`, `p${e}_`, S, false, "    "));
  }
  const pb = `bp + r * ${bc / 4}u + cols / 4u`;
  for (let a = 0; a < S; a++) {
    for (const w of range(hk / 4)) {
      const e = 4 * w;
      emit(`    sp[${pb} + ${a * pSlice + w}u] = ${packBytes(range(4).map((i) => `p${e + i}_${a}`))};`);
    }
    emit(`    psum${a} += ${range(hk).map((e) => `p${e}_${a}`).join(" + ")};`);
  }
  emit(`    workgroupBarrier();`);
  const pvProducts = sliceProducts(S, c.order);
  const pLefts = [...new Set(pvProducts.map((x) => x.a))], vRights = [...new Set(pvProducts.map((x) => x.b))];
  forEach("kk", bc / 32, (kk) => {
    emit("    {");
    // Bytes: bp counts words.
    for (const a of pLefts) {
      emit("      " + mma.loadLeft(`pa${a}`, pAt, `bp * 4u + ${a * pSlice * 4}u + ${kk} * 32u`));
    }
    forEach("g", dVs / N, (g) => {
      emit("      {");
      for (const b of vRights) {
        emit("        " + mma.loadRight(`vb${b}`, vAt, vOffset(b, part(dVs / N, g), kk)));
      }
      for (const { a, b, o } of pvProducts) {
        emit("        " + mma.mma(tile(`acc${o}_`, g), `pa${a}`, pAt, `vb${b}`, vAt));
      }
      emit("      }");
    });
    emit("    }");
  });
  emit(`  }`);

  // ---- finish: Σp over the row's invocations, each output tile's orders through the S region ----
  for (let a = 0; a < S; a++) emit(`  red[wr + ${(2 + a) * MMA_SUBGROUP}u + lane] = bitcast<u32>(psum${a});`);
  emit(`  red[wr + ${MMA_SUBGROUP}u + lane] = select(0u, 1u, bad);
  workgroupBarrier();`);
  for (let a = 0; a < S; a++) {
    emit(
      `  let pt${a} = f32(${peers.map(({ p, x }) => `bitcast<i32>(${redOf(p, x, 2 + a)})`).join(" + ")});`,
    );
  }
  emit(`  let nan = (${peers.map(({ p, x }) => redOf(p, x, 1)).join(" | ")}) != 0u;
  let l = ${combine(range(S).map((a) => `pt${a}`))};
  let live = l > 0.0;
  let inv = select(0.0, 1.0 / l, live);
  let obase = b * P.o_sb + h * P.o_sh + row * P.o_ss;`);
  const perInv = N / 2, perRound = Math.floor(sRegion / (R * N));
  forEach("g", dVs / N, (g) => {
    emit(`    {`);
    // The orders' tiles through the S region, highest first, `perRound` at a time: y = A_o + y / F.
    for (let top = c.order; top >= 0; top -= perRound) {
      const os = range(perRound).map((i) => top - i).filter((o) => o >= 0);
      emit(`    workgroupBarrier();`);
      os.forEach((o, i) => emit("    " + mma.store(oAt, `ws + ${i * R * N}u`, tile(`acc${o}_`, g))));
      emit(`    workgroupBarrier();`);
      if (top === c.order) emit(`    let ob = ws + r * ${N}u + hh * ${perInv}u;`);
      os.forEach((o, i) => {
        for (const e of range(perInv)) {
          const v = `f32(ss[ob + ${i * R * N + e}u])`;
          emit(o === c.order ? `    var y${e} = ${v};` : `    y${e} = ${v} + y${e} * ${invF()};`);
        }
      });
    }
    emit(`    {
      let c0 = ${part(dVs / N, g)} * ${N}u + hh * ${perInv}u;`);
    for (let q = 0; q < perInv / 4; q++) {
      const vals = range(4).map((i) => {
        const e = 4 * q + i;
        return `select(select(y${e} * inv * scales[vsb + c0 + ${e}u], 0.0, !live), bitcast<f32>(NAN_BITS), nan)`;
      });
      const guard = dV > c.d ? `c0 + ${4 * q}u < ${c.d}u && ` : "";
      emit(
        `      if (${guard}row < P.s_q) { o[obase + c0 / 4u + ${q}u] = ${
          storeVec(c, `vec4<f32>(${vals.join(", ")})`)
        }; }`,
      );
    }
    emit(`    }
    }`);
  });
  if (c.lse) {
    // Σp counts P in units of 1/127.
    emit(`  if (row < P.s_q && cols == 0u) {
    lse[bh * P.s_q + row] = select(select(${NEG_INF}, (m + log2(l / ${SLICE_TOP}.0)) * LN2, live), bitcast<f32>(NAN_BITS), nan);
  }`);
  }
  emit(`}`);
  emit(mma.helpers());
  return {
    key: flashMmaKey(c),
    label: flashMmaKey(c),
    code: L.join("\n") + "\n",
    bindings,
    uniforms,
  };
}

// ---- pre-pass ---------------------------------------------------------------------------------

const SLICE_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["heads", "u32"],
  // Workgroups per head, and rows per head in the sliced layout (blocks · block rows).
  ["chunks", "u32"],
  ["total", "u32"],
  ["s", "u32"],
  // Strides of x in vec4 units (b, head, s).
  ["sb", "u32"],
  ["sh", "u32"],
  ["ss", "u32"],
  // Multiplies the stored scale (Q: softmax scale · log2 e).
  ["scale_mul", "f32"],
  // Where this tensor's scales start in `scales`.
  ["sc_off", "u32"],
];

/** Everything that changes a row-slicing kernel's text. */
export interface SliceConfig extends SageInput {
  /** Rows per block of the sliced layout (16 for Q, bc for K). */
  rows: number;
  slices: number;
}

/** Rows one workgroup of {@link flashMmaSliceKernel} slices (one invocation per vec4 of a row). */
export function sliceRowsPerGroup(d: number): number {
  return Math.floor(SAGE_THREADS / (sageMmaDims(d).dQ / 4));
}

/**
 * Splits the rows of Q or K into i8 slices under one scale per row (absmax / 127 · scale_mul),
 * laid out per block of `rows` rows as `[b, heads, blocks, slice, rows, dQ]` bytes (d padded to 32
 * with zeros, rows past s zeros), the scales as `[b, heads, blocks · rows]` at `sc_off` of
 * `scales`. One invocation per vec4 of a padded row, {@link sliceRowsPerGroup} rows per workgroup; the
 * row's absmax by an atomic maximum of the values' bits (a NaN's bits are the largest, so a NaN
 * makes the scale NaN, an Inf makes it Inf, and the row's slices zeros). Bindings: x, x8, scales.
 * Dispatch `b · heads · chunks` workgroups.
 */
export function flashMmaSliceKernel(c: SliceConfig): Kernel {
  const { dQ } = sageMmaDims(c.d);
  const d4 = c.d / 4, w4 = dQ / 4, rpg = sliceRowsPerGroup(c.d);
  const key = `flash-mma-slice:${c.dtype}:${c.f16}:d${c.d}:r${c.rows}:x${c.slices}`;
  const words = range(c.slices).map((a) =>
    `    x8[((blk * ${c.slices}u + ${a}u) * ${c.rows}u + row % ${c.rows}u) * ${w4}u + word] = ${
      packBytes(["x", "y", "z", "w"].map((f) => `v${a}.${f}`))
    };`
  ).join("\n");
  const code = sageInputHeader(c, SLICE_UNIFORMS) +
    `@group(0) @binding(2) var<storage, read_write> x8: array<i32>;
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;
var<workgroup> amax: array<atomic<u32>, ${rpg}>;
${sageLoader(c)}@compute @workgroup_size(${rpg * w4})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
  let bh = wg / P.chunks;
  let lr = lid / ${w4}u;
  let word = lid % ${w4}u;
  let row = (wg % P.chunks) * ${rpg}u + lr;
  let b = bh / P.heads;
  let h = bh % P.heads;
  var v = vec4<f32>(0.0);
  if (row < P.s && word < ${d4}u) { v = ld(b * P.sb + h * P.sh + row * P.ss + word); }
  if (lid < ${rpg}u) { atomicStore(&amax[lid], 0u); }
  workgroupBarrier();
  let bits = bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu);
  atomicMax(&amax[lr], max(max(bits.x, bits.y), max(bits.z, bits.w)));
  workgroupBarrier();
  let ab = atomicLoad(&amax[lr]);
  let finite = ab < 0x7f800000u;
  let inv = select(0.0, ${SLICE_TOP}.0 / bitcast<f32>(ab), finite && ab > 0u);
  if (row < P.total) {
    let blk = bh * (P.total / ${c.rows}u) + row / ${c.rows}u;
    if (word == 0u) { scales[P.sc_off + bh * P.total + row] = bitcast<f32>(ab) / ${SLICE_TOP}.0 * P.scale_mul; }
${sliceStatements("select(vec4<f32>(0.0), v * inv, vec4<bool>(finite))", "v", c.slices, true, "    ")}
${words}
  }
}
`;
  return { key, label: key, code, bindings: ["x", "x8", "scales"], uniforms: SLICE_UNIFORMS };
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

const V_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["cgroups", "u32"],
  // Chunks of rows per head of V's statistics (wgsl/sage.ts, sageStatsChunks).
  ["chunks", "u32"],
  // Tiles of V_TILE rows per head.
  ["tiles", "u32"],
  ["s", "u32"],
  // Keys per head in the sliced layout (k_blocks · bc): keys past s are zeros.
  ["rows", "u32"],
  ["heads", "u32"],
  // Strides of v in vec4 units (b, head, s).
  ["sb", "u32"],
  ["sh", "u32"],
  ["ss", "u32"],
  ["sc_off", "u32"],
];

/** vec4 columns of V one {@link flashMmaVKernel} workgroup covers. */
export const V_COLUMNS = 8;
/** Rows one {@link flashMmaVKernel} workgroup slices (four per invocation). */
export const V_TILE = 4 * (SAGE_THREADS / V_COLUMNS);

/**
 * Splits V into i8 slices per channel (one scale per channel over the sequence, absmax / 127, at
 * `sc_off` of `scales` as `[b, n_kv, dV]`), laid out per key tile as `[b, n_kv, tiles, slice, dV,
 * bc]` bytes (four keys of one channel per word). One workgroup per (batch, K/V head,
 * {@link V_COLUMNS} vec4 columns, {@link V_TILE} rows): the channel's absmax from the chunks'
 * extremes (wgsl/sage.ts, `sageStatsKernel` with `extremes`: chunks of rows side by side, a
 * non-finite value counting as +Inf, so the channel's scale is +Inf and its slices zeros, and its
 * outputs NaN), one chunk per invocation combined by a workgroup atomic; then each invocation's four
 * rows, loaded at once. The first form walked the whole sequence in one workgroup per 8 columns,
 * twice (Flux: 96 workgroups of 144 dependent loads). The first tile's workgroups write the scales.
 * Bindings: x, v8, scales, part (`[b · n_kv, chunks, 3, d / 4]` vec4<f32>). Dispatch
 * `b · n_kv · cgroups · tiles` workgroups, `cgroups = ceil(dV / 4 / V_COLUMNS)`,
 * `tiles = ceil(rows / V_TILE)`.
 */
export function flashMmaVKernel(c: SageInput & { bc: number; slices: number }): Kernel {
  const { dV } = sageMmaDims(c.d);
  const d4 = c.d / 4, w4 = dV / 4, cw = V_COLUMNS, bw = c.bc / 4;
  const key = `flash-mma-v:${c.dtype}:${c.f16}:d${c.d}:bc${c.bc}:x${c.slices}`;
  const stores = range(c.slices).map((a) => {
    const at = `((tile * ${c.slices}u + ${a}u) * ${dV}u + col * 4u) * ${bw}u + r4 % ${bw}u`;
    return `    {
      let at = ${at};
      v8[at] = bitcast<i32>(w${a}.x);
      v8[at + ${bw}u] = bitcast<i32>(w${a}.y);
      v8[at + ${2 * bw}u] = bitcast<i32>(w${a}.z);
      v8[at + ${3 * bw}u] = bitcast<i32>(w${a}.w);
    }`;
  }).join("\n");
  const rowSlices = range(4).map((i) =>
    `    let x${i} = select(vec4<f32>(0.0), ld(base + min(r4 * 4u + ${i}u, last) * P.ss), vec4<bool>(live && r4 * 4u + ${i}u < P.s));
${sliceStatements(`select(vec4<f32>(0.0), x${i} * inv, finite)`, `q${i}_`, c.slices, true, "    ")}
${
      range(c.slices).map((a) =>
        `    w${a} |= (bitcast<vec4<u32>>(q${i}_${a}) & vec4<u32>(0xffu)) << vec4<u32>(${8 * i}u);`
      )
        .join("\n")
    }`
  ).join("\n");
  const code = sageInputHeader(c, V_UNIFORMS) +
    `@group(0) @binding(2) var<storage, read_write> v8: array<i32>;
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;
@group(0) @binding(4) var<storage, read> part: array<vec4<f32>>;
var<workgroup> amax: array<atomic<u32>, ${4 * cw}>;
${sageLoader(c)}@compute @workgroup_size(${SAGE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
  let t = wg % P.tiles;
  let bg = wg / P.tiles;
  let bh = bg / P.cgroups;
  let cl = lid % ${cw}u;
  let col = (bg % P.cgroups) * ${cw}u + cl;
  let lane = lid / ${cw}u;
  let live = col < ${d4}u;
  let base = (bh / P.heads) * P.sb + (bh % P.heads) * P.sh + min(col, ${d4 - 1}u);
  // Lane j of a column takes chunk j's extremes (at most 32 chunks: sageStatsChunks); the absmax's
  // f32 bits, its sign cleared (-0), order as its values (a non-finite value made it +Inf).
  if (lane < P.chunks && live) {
    let at = (bh * P.chunks + lane) * ${3 * d4}u + col;
    let m = bitcast<vec4<u32>>(max(part[at + ${d4}u], -part[at + ${2 * d4}u])) & vec4<u32>(0x7fffffffu);
${range(4).map((i) => `    atomicMax(&amax[cl * 4u + ${i}u], m[${i}]);`).join("\n")}
  }
  workgroupBarrier();
  let ab = vec4<u32>(${range(4).map((i) => `atomicLoad(&amax[cl * 4u + ${i}u])`).join(", ")});
  let finite = ab < vec4<u32>(0x7f800000u);
  let inv = select(vec4<f32>(0.0), vec4<f32>(${SLICE_TOP}.0) / bitcast<vec4<f32>>(ab), finite & (ab > vec4<u32>(0u)));
  if (t == 0u && lane == 0u && col < ${w4}u) {
    let sc = select(vec4<f32>(0.0), bitcast<vec4<f32>>(ab) / ${SLICE_TOP}.0, vec4<bool>(live));
    let at = P.sc_off + bh * ${dV}u + col * 4u;
    scales[at] = sc.x;
    scales[at + 1u] = sc.y;
    scales[at + 2u] = sc.z;
    scales[at + 3u] = sc.w;
  }
  let r4 = t * ${V_TILE / 4}u + lane;
  let last = max(P.s, 1u) - 1u;
  if (col < ${w4}u && r4 < P.rows / 4u) {
${range(c.slices).map((a) => `    var w${a} = vec4<u32>(0u);`).join("\n")}
${rowSlices}
    let tile = bh * (P.rows / ${c.bc}u) + (r4 * 4u) / ${c.bc}u;
${stores}
  }
}
`;
  return { key, label: key, code, bindings: ["x", "v8", "scales", "part"], uniforms: V_UNIFORMS };
}
