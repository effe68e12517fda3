/**
 * `sage-mma`'s two-pass kernel: every row's exact maximum first, then P·V accumulated in integer
 * matrix tiles across the whole key loop.
 *
 * Why. The one-pass kernel (wgsl/sage_mma.ts) rescales its output every key tile by the online
 * softmax's factors, and a matrix result cannot be scaled per row in WGSL: each tile's P·V goes
 * through workgroup memory into f32 registers (16 KB of traffic and 64 FMAs per invocation per
 * tile), which measured 10x slower than its count. Here a first pass over the key tiles computes
 * S = Q·Kᵀ on the matrix units and keeps only each row's maximum (integer maxima of the tile times
 * its one dequantization factor). With the maximum known, every P = exp2(s - max) lies in [0, 1]
 * under one fixed scale, so the second pass (S again, then P quantized and P·V) accumulates integer
 * tiles that never leave the matrix registers until the end: no per-tile rescale, no round trip.
 * The price is Q·Kᵀ twice (the matrix units' cheapest work).
 *
 * P·V runs on u8 tiles (P·255, V centred and offset by 128: O = Σ p·v_u8 - 128·Σ p, exact in u32
 * up to 65,793 keys) or, past that, i8 tiles (P·127, V signed). The output is
 * (Σ p·v) / Σ p per channel times V's scale plus V's mean; the row sum is the integer Σ p.
 *
 * Flex functions (wgsl/flex.ts) apply in both passes alike, so the maximum is that of the scores the
 * second pass exponentiates: mask_mod on the scores of partial tiles, the empty tiles of a block map
 * skipped by both key loops, and score_mod on every score in natural-log units with the row's
 * `scale * q . mean(k)` (`lse_bias`) added back first (K's smoothing shifted the row's scores by it;
 * the maximum is then taken over the functions' results instead of the tile's integers).
 */
import type { Kernel, UniformType } from "./common.ts";
import { isNanExpr, NEG_INF, uniformBlock } from "./common.ts";
import { BLOCK_MAP_UNIFORMS, flexDeclarations, flexKey } from "./flex.ts";
import { storeVec } from "./flash.ts";
import { MMA_SUBGROUP, MmaEmitter, mmaLoops, type MmaPlace, type MmaShape } from "./mma.ts";
import {
  MMA_ROWS,
  mmaConfigProblems,
  SAGE_MMA_UNIFORMS,
  sageMmaBindings,
  type SageMmaConfig,
  sageMmaDims,
  sageMmaPrologue,
} from "./sage_mma.ts";

/** Keys up to which u8 P·V fits u32 accumulators (255 · 255 · keys < 2^32). */
export const U8_PV_MAX_KEYS = 65793;

/** The two-pass kernel's extra parameters. */
export interface TwoPassConfig extends SageMmaConfig {
  /** P·V operands: u8 (P·255, V offset by 128) or i8 (P·127). */
  pv: "u8" | "i8";
  /** Two S regions per subgroup, alternating by tile: one barrier per tile instead of two. */
  doubleS: boolean;
  /**
   * K and V tiles staged in workgroup memory by all invocations with 16-byte loads, prefetched one
   * or two tiles ahead into registers, the matrix loads then reading workgroup memory: a matrix load
   * from a storage buffer waits for the memory each time, and a barrier right after exposes it.
   * One S region (doubleS is ignored).
   */
  stage?: boolean;
  /**
   * S tiles stored column-major (a column of 16 rows is 20 words apart): the invocations reading
   * their row then touch 2-way instead of 4-way conflicting banks (a matrix stride must be a multiple
   * of 16 bytes, so a row-major tile's rows repeat banks every 8).
   */
  sColMajor?: boolean;
  /**
   * Conversions on the FP32 pipes instead of the quarter-rate I2F, FRND and F2I per score (default
   * on; false is the ablation): the S tiles accumulate from 1.5·2^23's bits, so each score's word is
   * already the f32 1.5·2^23 + s (exact: |s| < 2^22 for d up to 256), dequantized by one fma with the
   * tile's constant; P·pmax + 2^23 holds round(P·pmax) in its low byte; the row sum by dot4U8Packed
   * over the packed P words; the maximum pass keeps one integer extreme (the largest, or with a
   * negative softmax scale the smallest).
   */
  fastMath?: boolean;
  /** The softmax scale is negative (the largest score is then the smallest integer). */
  negativeScale?: boolean;
  /**
   * Words of padding per row of a row-major S tile (default 4; a multiple of 4, as a matrix stride
   * must be): which banks the matrix stores and the invocations' row reads meet (bench/RESULTS.md,
   * run 17).
   */
  sPad?: number;
  /**
   * The maximum pass by pairs of subgroups: each takes two blocks of 16 rows (32) and one tile of
   * each pair of key tiles, so every K matrix it loads serves two multiplies (the K tile's matrix
   * loads were the largest share of the pass's workgroup-memory traffic, counted in
   * bench/RESULTS.md, run 17). Two K tiles staged at once; the two blocks' S go through the
   * subgroup's one S region in turn (the same four barriers per two tiles). Applies with staging,
   * fast math, an even number of subgroups and no packed batch or flex function (see
   * {@link pairedMaxPass}); otherwise ignored.
   */
  maxPairs?: boolean;
  /**
   * The second pass with the subgroups in two halves one phase apart: while one half multiplies (the
   * previous tile's P·V, this tile's S) the other turns its S into P, so the matrix units and the
   * exponentials overlap inside one workgroup (with one workgroup a streaming multiprocessor the
   * default pass runs them one after the other, all subgroups in step between barriers). K and V
   * staged in two slots each, the output tiles through V's slots. Applies with staging, fast math,
   * an even number of subgroups and no packed batch or flex function (see {@link skewedPass2}).
   */
  skew?: boolean;
  /**
   * The maximum pass in the same two halves one phase apart (one half multiplies S while the other
   * takes its maxima), K staged in two slots; replaces maxPairs. Applies as skew does (see
   * {@link skewedMaxPass}).
   */
  skewMax?: boolean;
  /** Benchmark ablation: skip the maximum pass (wrong results; times the second pass alone). */
  skipMaxPass?: boolean;
  /**
   * A packed batch: q, k and v are [1, total, heads, d] with sequences at offsets `cuq`, `cuk` (i32,
   * b + 1 each); each row attends its own sequence's keys, its band aligned bottom-right within it.
   */
  varlen?: boolean;
}

/** Uniforms a packed batch adds: the number of sequences. */
export const PACKED_UNIFORMS: [string, UniformType][] = [["seqs", "u32"]];

/**
 * WGSL, after the prologue, of a packed batch's positions: the sequences of the block's first and last
 * rows (`sq_a`, `sq_z`; `one_seq` when they are one), the block's diagonal offset `off` and keys
 * [sk_lo, sk_hi) (those of `sq_a`), and this row's keys [rk_lo, rk_hi) and diagonal `ri`. Every value
 * but the row's is workgroup-uniform (offsets read at uniform indices of read-only storage).
 */
export function packedPrologue(): string {
  return `  let sq_a = seq_of(q0);
  let sq_z = seq_of(q0 + rows_here - 1u);
  let one_seq = sq_a == sq_z;
  let sk_lo = cuk[sq_a];
  let sk_hi = cuk[sq_a + 1u];
  let off = sk_hi - cuq[sq_a + 1u];
  let sq_r = seq_of(min(row, P.s_q - 1u));
  let rk_lo = cuk[sq_r];
  let rk_hi = cuk[sq_r + 1u];
  let ri = i32(row) + rk_hi - cuq[sq_r + 1u];`;
}

/**
 * WGSL of each invocation's row diagonal `ri` (key index of the row's bottom-right-aligned diagonal)
 * and, for a packed batch, the positions of {@link packedPrologue}.
 */
export function rowDiagonal(c: { varlen?: boolean }): string {
  return c.varlen ? packedPrologue() : `  let ri = i32(row) + P.offset;`;
}

/**
 * WGSL of the keys a query block visits, [j_lo, j_hi) (shared by the matrix kernels): all keys, or
 * the band's; a packed batch's block visits its sequences' keys, narrowed by the band when the block
 * is one sequence (across a boundary its rows' bands do not bound the union: each row masks its own).
 */
export function blockKeyRange(c: { band: boolean; varlen?: boolean }): string {
  const lines: string[] = [];
  if (c.varlen) {
    // Clamped into the tensor: GPU offsets are not checked (a bad entry gives wrong rows, never a
    // read outside the buffers or a key loop past s_kv).
    lines.push(`  var j_lo = max(sk_lo, 0i);
  var j_hi = min(cuk[sq_z + 1u], i32(P.s_kv));`);
    if (c.band) {
      lines.push(`  if (one_seq) {
    j_lo = max(j_lo, i32(q0) + off - P.left);
    j_hi = min(j_hi, i32(q0 + rows_here) - 1i + off + P.right + 1i);
  }`);
    }
  } else {
    lines.push(`  var j_lo = 0i;
  var j_hi = i32(P.s_kv);`);
    if (c.band) {
      lines.push(`  j_lo = max(j_lo, i32(q0) + P.offset - P.left);
  j_hi = min(j_hi, i32(q0 + rows_here) - 1i + P.offset + P.right + 1i);`);
    }
  }
  return lines.join("\n");
}

/** The packed batch's bindings and the sequence of a row (the last i with cuq[i] <= t). */
export function packedDeclarations(first: number): string {
  return `@group(0) @binding(${first}) var<storage, read> cuq: array<i32>;
@group(0) @binding(${first + 1}) var<storage, read> cuk: array<i32>;
fn seq_of(t: u32) -> u32 {
  var lo = 0u;
  var hi = P.seqs;
  loop {
    if (hi - lo <= 1u) { break; }
    let mid = (lo + hi) / 2u;
    if (u32(cuq[mid]) <= t) { lo = mid; } else { hi = mid; }
  }
  return lo;
}`;
}

/**
 * WGSL steps that stage a tile in workgroup memory through registers (shared by the matrix
 * kernels): `loadTile` fetches `vecs` 16-byte words of tile `tileIdx` (tiles `stride` words apart,
 * default `vecs`) into registers `${reg}0..${n - 1}`, `n` a thread; `storeTile` writes them to `dst`
 * as rows of `row4` words, rows `strideWords` i32 apart from `base`, each component through `word`.
 */
export function stagedTileCopy(threads: number, emit: (line: string) => void): {
  loadTile: (
    reg: string,
    n: number,
    vecs: number,
    src: string,
    base: string,
    tileIdx: string,
    stride?: number,
  ) => void;
  storeTile: (
    reg: string,
    n: number,
    vecs: number,
    dst: string,
    row4: number,
    strideWords: number,
    word?: (x: string) => string,
    base?: number | string,
  ) => void;
} {
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  const loadTile = (
    reg: string,
    n: number,
    vecs: number,
    src: string,
    base: string,
    tileIdx: string,
    stride = vecs,
  ) =>
    range(n).forEach((i) => {
      const j = vecs % threads === 0 ? `lid + ${i * threads}u` : `min(lid + ${i * threads}u, ${vecs - 1}u)`;
      emit(`    ${reg}${i} = ${src}[${base} + (${tileIdx}) * ${stride}u + ${j}];`);
    });
  const storeTile = (
    reg: string,
    n: number,
    vecs: number,
    dst: string,
    row4: number,
    strideWords: number,
    word: (x: string) => string = (x) => x,
    base: number | string = 0,
  ) =>
    range(n).forEach((i) => {
      const guard = vecs % threads === 0 ? "" : `if (lid + ${i * threads}u < ${vecs}u) `;
      emit(`    ${guard}{
      let j = lid + ${i * threads}u;
      let at = ${
        typeof base === "string" ? `${base} + ` : base ? `${base}u + ` : ""
      }(j / ${row4}u) * ${strideWords}u + (j % ${row4}u) * 4u;
      ${dst}[at] = ${word(`${reg}${i}.x`)};
      ${dst}[at + 1u] = ${word(`${reg}${i}.y`)};
      ${dst}[at + 2u] = ${word(`${reg}${i}.z`)};
      ${dst}[at + 3u] = ${word(`${reg}${i}.w`)};
    }`);
    });
  return { loadTile, storeTile };
}

/**
 * WGSL of a key loop in two halves of the workgroup's subgroups one phase apart (shared by the matrix
 * kernels' skewed passes). Per key tile p two intervals between barriers: in the first the leading
 * half (lag 0) runs `multiply` (tile p; its staged operands in slot (p - t_lo) % 2, `slot`) while the
 * lagging half runs `read` of tile p - 1 (S read back: P or maxima); in the second the lagging half
 * multiplies tile p and the leading one reads it. `stageFirst` stages tile t_lo (slot 0) and ends
 * with a barrier; `stageNext`, between the intervals, stages tile p + 1 into the other slot, whose
 * last reads ended at the previous barrier. The loop runs one tile past the last for the lagging
 * half. The halves are warp / (warps / 2): NVIDIA spreads a workgroup's warps over an SM's four
 * schedulers by warp % 4, so with 8 subgroups each scheduler holds one of each half.
 */
export function skewedKeyLoop(
  emit: (line: string) => void,
  warps: number,
  steps: { stageFirst: () => void; multiply: () => void; read: (t: string) => void; stageNext: () => void },
): void {
  emit(`  {
  let lag = warp / ${warps / 2}u;`);
  steps.stageFirst();
  emit(`  for (var p = t_lo; p <= t_hi; p++) {
    let slot = (p - t_lo) & 1u;
    if (lag == 0u) {`);
  steps.multiply();
  emit(`    } else if (p > t_lo) {`);
  steps.read("p - 1u");
  emit(`    }`);
  steps.stageNext();
  emit(`    workgroupBarrier();
    if (lag == 1u) {`);
  steps.multiply();
  emit(`    } else if (p < t_hi) {`);
  steps.read("p");
  emit(`    }
    workgroupBarrier();
  }
  }`);
}

/** Whether a config's passes can run skewed: staged, fast math, even subgroups, no packed batch or flex. */
function skewable(c: TwoPassConfig): boolean {
  return c.stage === true && c.fastMath !== false && c.warps % 2 === 0 && !c.varlen && !c.flex;
}

/** Whether a config's second pass runs in two halves one phase apart ({@link TwoPassConfig.skew}). */
export function skewedPass2(c: TwoPassConfig): boolean {
  return c.skew === true && skewable(c);
}

/** Whether a config's maximum pass runs in two halves one phase apart ({@link TwoPassConfig.skewMax}). */
export function skewedMaxPass(c: TwoPassConfig): boolean {
  return c.skewMax === true && skewable(c) && !c.skipMaxPass;
}

/** Whether a config's maximum pass runs by pairs of subgroups ({@link TwoPassConfig.maxPairs}). */
export function pairedMaxPass(c: TwoPassConfig): boolean {
  return c.maxPairs === true && c.stage === true && c.fastMath !== false && c.warps % 2 === 0 &&
    !c.varlen && !c.flex && !c.skipMaxPass && !skewedMaxPass(c);
}

/** Derived sizes of the two-pass kernel. */
export function twoPassShape(c: TwoPassConfig) {
  const { dQ, dV } = sageMmaDims(c.d);
  const br = MMA_ROWS * c.warps, threads = MMA_SUBGROUP * c.warps;
  // S stride: words between rows (row-major, +4 against bank conflicts) or columns (column-major).
  const ss = c.sColMajor ? MMA_ROWS + 4 : c.bc + (c.sPad ?? 4);
  const sWords = c.sColMajor ? c.bc * ss : MMA_ROWS * ss;
  const doubleS = c.doubleS && !c.stage;
  const sRegion = sWords * (doubleS ? 2 : 1);
  // Staged tiles: rows padded by 16 bytes against bank conflicts (strides in bytes).
  const ksStride = dQ + 16, vsStride = c.bc + 16;
  // Paired maximum pass and skewed second pass: two K tiles staged at once; skewed, two V tiles.
  const skew = skewedPass2(c);
  const kTiles = pairedMaxPass(c) || skew || skewedMaxPass(c) ? 2 : 1, vTiles = skew ? 2 : 1;
  const staged = c.stage ? (kTiles * c.bc * ksStride + vTiles * dV * vsStride) / 4 : 0;
  // The 16 x N output tiles at the end go through V's slots when they fit there, else the P region.
  const outInV = skew && c.warps * MMA_ROWS * c.shape.N * 4 <= vTiles * dV * vsStride;
  const pRegion = Math.max((MMA_ROWS * c.bc) / 4, outInV ? 0 : MMA_ROWS * c.shape.N);
  const perWarp = sRegion + pRegion + 2 * MMA_SUBGROUP;
  return {
    dQ,
    dV,
    br,
    threads,
    ss,
    sWords,
    sRegion,
    pRegion,
    doubleS,
    ksStride,
    vsStride,
    kTiles,
    vTiles,
    outInV,
    sharedBytes: 4 * (perWarp * c.warps + staged),
  };
}

/** Why a two-pass config is not valid for a device with these limits (empty when valid). */
export function twoPassConfigProblems(
  c: TwoPassConfig,
  limits: { storage: number; invocations: number },
): string[] {
  const problems = mmaConfigProblems(c, twoPassShape(c), limits);
  if (c.bc % 32 !== 0 || c.bc % c.shape.N !== 0) problems.push("bc must be a multiple of 32");
  if (c.sPad !== undefined && (c.sPad % 4 !== 0 || c.sPad < 4)) problems.push("sPad must be a multiple of 4");
  return problems;
}

/** A stable cache key. */
export function twoPassKey(c: TwoPassConfig): string {
  const t = c.shape;
  return `sage-mma-2p:${c.dtype}:${c.f16}:d${c.d}:w${c.warps}:bc${c.bc}:${t.component}${t.M}x${t.N}x${t.K}:` +
    `${c.pv}:${c.stage ? "stage" : c.doubleS ? "ds" : "ss"}${c.sColMajor ? ":scol" : ""}${
      c.fastMath === false ? ":i2f" : ""
    }${c.negativeScale ? ":neg" : ""}:${c.band}:${c.keyPadding}:${c.lse}:${c.emulate ? "emu" : "real"}${
      c.skipMaxPass ? ":skip1" : ""
    }${c.sPad !== undefined && c.sPad !== 4 && !c.sColMajor ? `:sp${c.sPad}` : ""}${
      pairedMaxPass(c) ? ":pairs" : ""
    }${skewedPass2(c) ? ":skew" : ""}${skewedMaxPass(c) ? ":skewmax" : ""}${c.varlen ? ":packed" : ""}${
      flexKey(c.flex)
    }`;
}

/**
 * WGSL expressions of which keys of tile t an invocation's half row takes part in (shared with
 * wgsl/flash_mma.ts): `fullTile`, true when every key of the tile does (not past s_kv, inside the
 * band, no key padding or mask function to test), and `liveExpr(e)`, whether column e of the half row
 * does. In scope: kv0, q0, rows_here, ri, hh, b, P (s_kv, offset, left, right, m_sb, m_sj), [mask],
 * [tile_state], [fr and mask_mod].
 */
export function keyMaskExprs(
  c: {
    bc: number;
    band: boolean;
    keyPadding: boolean;
    blockMap: boolean;
    maskMod: boolean;
    varlen?: boolean;
    /** WGSL of the invocation's first column within a tile (default `hh * bc/2`). */
    cols?: string;
  },
): { fullTile: string; liveExpr: (e: number) => string } {
  const { bc, blockMap, maskMod } = c;
  const half = bc / 2;
  // A packed batch (varlen): the block's diagonal offset `off`, its one sequence's keys [sk_lo,
  // sk_hi) when `one_seq`, and each row's own keys [rk_lo, rk_hi) (see packedPrologue).
  const offset = c.varlen ? "off" : "P.offset";
  // Which of the invocation's columns of tile t take part (not past s_kv, not masked, in the band).
  const fullTile = `kv0 + ${bc}u <= P.s_kv${
    c.varlen ? ` && one_seq && i32(kv0) >= sk_lo && i32(kv0 + ${bc}u) <= sk_hi` : ""
  }${
    c.band
      ? ` && i32(kv0) - (i32(q0 + rows_here) - 1i + ${offset}) >= -P.left && i32(kv0) + ${
        bc - 1
      }i - (i32(q0) + ${offset}) <= P.right`
      : ""
  }${c.keyPadding ? " && false" : ""}${blockMap ? " && tile_state == 2u" : maskMod ? " && false" : ""}`;
  const liveExpr = (e: number) => {
    const col = `(kv0 + ${c.cols ?? `hh * ${half}u`} + ${e}u)`;
    let ok = `${col} < P.s_kv`;
    if (c.varlen) ok += ` && i32(${col}) >= rk_lo && i32(${col}) < rk_hi`;
    if (c.keyPadding) {
      ok +=
        ` && ((mask[(b * P.m_sb + min(${col}, P.s_kv - 1u) * P.m_sj) >> 2u] >> (((b * P.m_sb + min(${col}, P.s_kv - 1u) * P.m_sj) & 3u) * 8u)) & 0xffu) != 0u`;
    }
    if (c.band) ok += ` && i32(${col}) - ri >= -P.left && i32(${col}) - ri <= P.right`;
    // A full tile of the map needs no test (its band and key checks still apply).
    if (maskMod) {
      ok += ` && (${blockMap ? "tile_state == 2u || " : ""}mask_mod(b, h, fr, min(${col}, P.s_kv - 1u)))`;
    }
    return ok;
  };
  return { fullTile, liveExpr };
}

/**
 * The two-pass main kernel. Bindings as the one-pass kernel's: q8, k8, v8 (u8 bytes for `pv: u8`,
 * laid out per key tile as [channels, bc keys]), o, [mask], [lse], q_scale, k_scale, v_stat,
 * [lse_bias] (with the lse or a score_mod), then the flex bindings (mod buffers, [flex_blocks]).
 */
export function sageMmaTwoPassKernel(c: TwoPassConfig): Kernel {
  const s = twoPassShape(c);
  const { dQ, dV, br, ss, ksStride, vsStride } = s;
  const stage = c.stage === true;
  const { N } = c.shape;
  const R = MMA_ROWS, half = c.bc / 2, bc = c.bc;
  const u8 = c.pv === "u8";
  const fast = c.fastMath !== false;
  const paired = pairedMaxPass(c);
  const skew = skewedPass2(c);
  // An S word as the f32 of its integer: fast math's words carry the 1.5·2^23 bias.
  const intValue = (word: string) => fast ? `(bitcast<f32>(${word}) - 12582912.0)` : `f32(${word})`;
  const pvShape: MmaShape = { component: c.pv, result: u8 ? "u32" : "i32", M: 16, N, K: 32 };
  const qk = new MmaEmitter(c.shape, c.emulate, "lane");
  const pv = new MmaEmitter(pvShape, c.emulate, "lane");
  const pWord = u8 ? "u32" : "i32";
  const pmax = u8 ? 255 : 127;
  const L: string[] = [];
  const emit = (line: string) => L.push(line);
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  const flex = c.flex ?? null;
  const blockMap = flex?.blockMap === true;
  const maskMod = flex?.maskMod != null;
  // K smoothing shifted each row's scores; a score_mod gets them back exact (`lse_bias`).
  const rowBias = flex?.scoreMod != null;
  const uniforms: [string, UniformType][] = [
    ...SAGE_MMA_UNIFORMS,
    ...(blockMap ? BLOCK_MAP_UNIFORMS : []),
    ...(c.varlen ? PACKED_UNIFORMS : []),
  ];
  const { forEach, tile } = mmaLoops(c.emulate, emit);
  const tiles = (e: MmaEmitter, name: string, n: number) => {
    if (c.emulate) emit(`  ${e.zeroArray(name, n)}`);
    else range(n).forEach((i) => emit(`  ${e.zero(`${name}${i}`)}`));
  };

  if (c.dtype === "f16" && c.f16) emit("enable f16;");
  emit(qk.header() + uniformBlock(uniforms));
  // Staged K and V are copied as 16-byte words; unstaged ones are matrix-loaded from storage.
  const bindings = sageMmaBindings(c, {
    k8: stage ? "vec4<u32>" : "i32",
    v8: stage ? "vec4<u32>" : pWord,
    rowBias,
  }, emit);
  if (c.varlen) {
    emit(packedDeclarations(bindings.length + 1));
    bindings.push("cuq", "cuk");
  }
  emit(`var<workgroup> ss: array<i32, ${c.warps * s.sRegion}>;
var<workgroup> sp: array<${pWord}, ${c.warps * s.pRegion}>;
var<workgroup> red: array<u32, ${c.warps * 2 * MMA_SUBGROUP}>;${
    stage
      ? `
var<workgroup> ks: array<i32, ${(s.kTiles * bc * ksStride) / 4}>;
var<workgroup> vs: array<${pWord}, ${(s.vTiles * dV * vsStride) / 4}>;`
      : ""
  }
const NEG: f32 = -3.0e38;
const LN2: f32 = 0.6931471805599453;`);
  const qAt: MmaPlace = { array: "q8", colMajor: false, stride: dQ };
  // Kᵀ: key j's column is its row.
  const kAt: MmaPlace = stage
    ? { array: "ks", colMajor: true, stride: ksStride }
    : { array: "k8", colMajor: true, stride: dQ };
  const kOffset = (j: string, k: string) =>
    stage ? `${j} * ${N * ksStride}u + ${k} * 32u` : `k8_base + (kv0 + ${j} * ${N}u) * ${dQ}u + ${k} * 32u`;
  const sAt: MmaPlace = { array: "ss", colMajor: c.sColMajor === true, stride: ss };
  // Word offset of S element (row, col) from a region's start, and of tile j.
  const sTile = (j: string) => c.sColMajor ? `${j} * ${N * ss}u` : `${j} * ${N}u`;
  const pAt: MmaPlace = { array: "sp", colMajor: false, stride: bc };
  // V per key tile as [channels, bc keys].
  const vAt: MmaPlace = stage
    ? { array: "vs", colMajor: true, stride: vsStride }
    : { array: "v8", colMajor: true, stride: bc };
  const vOffset = (g: string, kk: string) =>
    stage
      ? `${g} * ${N * vsStride}u + ${kk} * 32u`
      : `v8_base + kv0 * ${dV}u + ${g} * ${N * bc}u + ${kk} * 32u`;
  // The output tiles at the end: the subgroup's P region or its share of V's slots.
  const oAt: MmaPlace = { array: s.outInV ? "vs" : "sp", colMajor: false, stride: N };
  const oBase = s.outInV ? `warp * ${MMA_ROWS * N}u` : "wp";

  emit(sageMmaPrologue({ threads: s.threads, br, band: c.band, bc, dQ, dV, warps: c.warps }));
  emit(`  let ws = warp * ${s.sRegion}u;
  let wp = warp * ${s.pRegion}u;
  let wr = warp * ${2 * MMA_SUBGROUP}u;`);
  emit(rowDiagonal(c));
  if (flex) {
    emit(`  let fr = min(row, P.s_q - 1u); // the row for the flex functions, clamped into the sequence`);
  }
  if (rowBias) emit(`  let rb = lse_bias[bh * P.s_q + fr];`);
  if (!c.emulate) {
    for (const k of range(dQ / 32)) emit("  " + qk.loadLeft(`qa${k}`, qAt, `q8_base + ${k * 32}u`));
  }
  // Fast math: every S tile starts from 1.5·2^23's bits (see fastMath).
  if (fast) emit(`  let s_bias = ${qk.splat("1262485504i")};`);
  emit(blockKeyRange(c));
  emit(`  let t_lo = u32(max(j_lo, 0i)) / ${bc}u;
  let t_hi = select(0u, (u32(max(j_hi, 0i)) + ${bc - 1}u) / ${bc}u, j_hi > j_lo);`);

  // S = Q Kᵀ of tile t into this subgroup's S region (the one of t's parity with doubleS), and the
  // invocation's half row of it as i32 values `y0..`, dequantized by `dq` later.
  // With a block map consecutive live tiles may share a parity: the regions alternate by iteration.
  const sRegionOf = s.doubleS ? `ws + (${blockMap ? "it" : "t"} & 1u) * ${s.sWords}u` : "ws";
  // This invocation's element e of its half row: sb + e * sStep.
  const sStep = c.sColMajor ? ss : 1;
  // Staging (stage: true): K tile t's bc·dQ bytes and V tile t's dV·bc bytes as 16-byte words,
  // `nk` and `nv` per invocation, through registers kr*, vr* into ks, vs.
  const threads = s.threads, kVecs = (bc * dQ) / 16, vVecs = (dV * bc) / 16;
  const nk = Math.ceil(kVecs / threads), nv = Math.ceil(vVecs / threads);
  const { loadTile, storeTile } = stagedTileCopy(threads, emit);
  const loadK = (t: string) => loadTile("kr", nk, kVecs, "k8", "k4_base", `min(${t}, t_last)`);
  const loadV = (t: string) => loadTile("vr", nv, vVecs, "v8", "v4_base", `min(${t}, t_last)`);
  const storeK = () => storeTile("kr", nk, kVecs, "ks", dQ / 16, ksStride / 4, (x) => `bitcast<i32>(${x})`);
  const storeV = () =>
    storeTile("vr", nv, vVecs, "vs", bc / 16, vsStride / 4, (x) => u8 ? x : `bitcast<i32>(${x})`);
  if (stage) {
    emit(`  let k4_base = k8_base / 16u;
  let v4_base = v8_base / 16u;
  let t_last = max(k_blocks, 1u) - 1u;`);
    range(nk).forEach((i) => emit(`  var kr${i}: vec4<u32>;`));
    if (paired) range(nk).forEach((i) => emit(`  var kq${i}: vec4<u32>;`));
    range(nv).forEach((i) => emit(`  var vr${i}: vec4<u32>;`));
  }

  /**
   * S of tile t stored to the subgroup's S region, then a barrier; `afterBarrier` emits what runs
   * right after it (the staged tiles' stores and next loads).
   */
  // The start of this invocation's half row in its subgroup's S region (wst).
  const sBase = `wst + ${c.sColMajor ? `hh * ${half * ss}u + r` : `r * ${ss}u + hh * ${half}u`}`;
  /**
   * S = Q Kᵀ of tile t into the S region starting at word `region`, K tile t staged at byte `kSlot`
   * (a WGSL prefix ending in " + ", for the skewed passes' two slots).
   */
  function multiplyS(region: string, kSlot = "") {
    if (fast) {
      if (c.emulate) emit(`    ${qk.copyArray("s", bc / N, "s_bias")}`);
      else range(bc / N).forEach((j) => emit(`    var s${j} = s_bias;`));
    } else if (c.emulate) emit(`    ${qk.zeroArray("s", bc / N)}`);
    else range(bc / N).forEach((j) => emit(`    ${qk.zero(`s${j}`)}`));
    forEach("k", dQ / 32, (k) => {
      if (c.emulate) emit("    " + qk.loadLeft("qa", qAt, `q8_base + ${k} * 32u`));
      forEach("j", bc / N, (j) => {
        emit("    {");
        emit("      " + qk.loadRight("kb", kAt, `${kSlot}${kOffset(j, k)}`));
        emit("      " + qk.mma(tile("s", j), c.emulate ? "qa" : `qa${parseInt(k)}`, qAt, "kb", kAt));
        emit("    }");
      });
    });
    forEach("j", bc / N, (j) => emit("    " + qk.store(sAt, `${region} + ${sTile(j)}`, tile("s", j))));
  }
  const computeS = (barrierFirst: boolean, afterBarrier: () => void = () => {}) => {
    emit(`    let kv0 = t * ${bc}u;
    let wst = ${sRegionOf};`);
    if (barrierFirst) emit(`    workgroupBarrier();`); // the previous tile's reads of the region are done
    multiplyS("wst");
    emit(`    workgroupBarrier();`);
    afterBarrier();
    emit(`    let dq = q_sc * k_scale[ks_base + t];
    let sb = ${sBase};`);
  };
  const { fullTile, liveExpr } = keyMaskExprs({
    bc,
    band: c.band,
    keyPadding: c.keyPadding,
    blockMap,
    maskMod,
    varlen: c.varlen,
  });
  /**
   * Fast math's maximum pass over the invocation's half row of one S tile into `acc`: the integer
   * extreme of the live keys (the biased words are positive, over 2^30: 0 marks "no live key" for
   * the largest, i32's maximum for the smallest, a negative scale's largest score), times the tile's
   * dequantization factor `dq`; `gate` (a WGSL bool) leaves the whole tile out when false.
   */
  const fastTileMax = (acc: string, dq: string, gate?: string) => {
    const [op, none, some] = c.negativeScale
      ? ["min", "2147483647i", "x < 2147483647i"]
      : ["max", "0i", "x > 0i"];
    const g = (x: string) => gate ? `${gate} && (${x})` : x;
    emit(`    {
      let full = ${g(fullTile)};
      var x = ${none};`);
    for (const e of range(half)) {
      const live = gate ? `${gate} && (${liveExpr(e)})` : liveExpr(e);
      emit(`      x = select(x, ${op}(x, ss[sb + ${e * sStep}u]), full || (${live}));`);
    }
    emit(`      if (${some}) { ${acc} = max(${acc}, ${intValue("x")} * ${dq}); }
    }`);
  };
  // Score e of the invocation's half row in log2 units: with a score_mod, the function's result on
  // the score in natural-log units (the same expression in both passes, so the maximum is exact).
  const scoreExpr = (e: number) => {
    const raw = `${intValue(`ss[sb + ${e * sStep}u]`)} * dq`;
    if (!rowBias) return raw;
    return `score_mod(${raw} * LN2 + rb, b, h, fr, min(kv0 + hh * ${half}u + ${e}u, P.s_kv - 1u)) * ${Math.LOG2E}`;
  };
  // Fast math: score e minus the row maximum plus log2(pmax), in log2 units, so that exp2 gives
  // p·pmax: the biased word's f32 times dq plus the tile's constant dc (its rounding, a shift of the
  // whole tile under 2^-23 of 1.5·2^23·dq, is far below the int8 scores' own error).
  const fastScoreExpr = (e: number) =>
    rowBias ? `${scoreExpr(e)} + lp` : `fma(bitcast<f32>(ss[sb + ${e * sStep}u]), dq, dc)`;
  // The tiles the loops visit and the staged prefetches fetch: every tile from t_lo, or with a block
  // map its live ones only (t_first, t_second; in the loop tn1 and tn2 follow t).
  const first = blockMap ? "t_first" : "t_lo", second = blockMap ? "t_second" : "t_lo + 1u";
  const next1 = blockMap ? "tn1" : "t + 1u", next2 = blockMap ? "tn2" : "t + 2u";
  if (blockMap) {
    // Every value here is workgroup-uniform (the map is read-only storage), as barriers and matrix
    // steps need.
    emit(
      `  let t_first = flex_next(b, h, q0, q0 + rows_here, t_lo, t_hi);${
        stage ? "\n  let t_second = flex_next(b, h, q0, q0 + rows_here, t_first + 1u, t_hi);" : ""
      }
  var tn1 = t_first;
  var it = 0u;`,
    );
  }
  /** The key loop's head. */
  const loopHead = () => {
    if (!blockMap) return emit(`  for (var t = t_lo; t < t_hi; t++) {`);
    emit(`  it = 0u;
  for (var t = t_first; t < t_hi; t = tn1) {
    let tile_state = flex_tile(b, h, q0, q0 + rows_here, t);
    tn1 = flex_next(b, h, q0, q0 + rows_here, t + 1u, t_hi);${
      stage ? "\n    let tn2 = flex_next(b, h, q0, q0 + rows_here, tn1 + 1u, t_hi);" : ""
    }`);
  };
  const loopTail = () =>
    emit(
      blockMap
        ? `    it++;
  }`
        : `  }`,
    );

  /** The maximum pass by pairs of subgroups (see TwoPassConfig.maxPairs). */
  function emitPairedMaxPass() {
    const W2 = c.warps / 2, kSlot = (bc * ksStride) / 4;
    const loadPair = (t: string) => {
      loadTile("kr", nk, kVecs, "k8", "k4_base", `min(${t}, t_last)`);
      loadTile("kq", nk, kVecs, "k8", "k4_base", `min(${t} + 1u, t_last)`);
    };
    const storePair = () => {
      const w = (x: string) => `bitcast<i32>(${x})`;
      storeTile("kr", nk, kVecs, "ks", dQ / 16, ksStride / 4, w);
      storeTile("kq", nk, kVecs, "ks", dQ / 16, ksStride / 4, w, kSlot);
    };
    // Subgroup (hp, pp): tile hp of each pair of tiles, row blocks 2pp and 2pp + 1 of the workgroup.
    emit(`  let hp = warp / ${W2}u;
  let pp = warp % ${W2}u;
  let qb_a = bh * P.q_blocks + blk * ${c.warps}u + 2u * pp;
  let q_sc_a = q_scale[qb_a];
  let q_sc_b = q_scale[qb_a + 1u];
  let ri_a = i32(q0 + 2u * pp * ${R}u + r) + P.offset;
  var m_a = NEG;
  var m_b = NEG;`);
    const qOff = (blockVar: string, k: string) => `(${blockVar}) * ${R * dQ}u + ${k} * 32u`;
    if (!c.emulate) {
      for (const k of range(dQ / 32)) {
        emit("  " + qk.loadLeft(`qpa${k}`, qAt, qOff("qb_a", `${k}u`)));
        emit("  " + qk.loadLeft(`qpb${k}`, qAt, qOff("qb_a + 1u", `${k}u`)));
      }
    }
    loadPair("t_lo");
    storePair();
    emit(`  workgroupBarrier();`);
    loadPair("t_lo + 2u");
    emit(`  for (var tp = t_lo; tp < t_hi; tp += 2u) {
    let t = tp + hp;
    let kv0 = t * ${bc}u;
    let tile_ok = t < t_hi;
    let wst = ws;`);
    for (const name of ["sra", "srb"]) {
      if (c.emulate) emit(`    ${qk.copyArray(name, bc / N, "s_bias")}`);
      else range(bc / N).forEach((j) => emit(`    var ${name}${j} = s_bias;`));
    }
    forEach("k", dQ / 32, (k) => {
      if (c.emulate) {
        emit("    " + qk.loadLeft("qpa", qAt, qOff("qb_a", k)));
        emit("    " + qk.loadLeft("qpb", qAt, qOff("qb_a + 1u", k)));
      }
      forEach("j", bc / N, (j) => {
        emit("    {");
        emit("      " + qk.loadRight("kb", kAt, `hp * ${kSlot * 4}u + ${kOffset(j, k)}`));
        const qa = c.emulate ? "qpa" : `qpa${parseInt(k)}`, qb = c.emulate ? "qpb" : `qpb${parseInt(k)}`;
        emit("      " + qk.mma(tile("sra", j), qa, qAt, "kb", kAt));
        emit("      " + qk.mma(tile("srb", j), qb, qAt, "kb", kAt));
        emit("    }");
      });
    });
    // The default pass's product order (q scale times k scale first): the same maximum, bit for bit.
    const readMax = (acc: string, scale: string, ri: string) => {
      emit(`    {
    let ri = ${ri};`);
      fastTileMax(acc, `(${scale} * dk)`, "tile_ok");
      emit(`    }`);
    };
    forEach("j", bc / N, (j) => emit("    " + qk.store(sAt, `wst + ${sTile(j)}`, tile("sra", j))));
    emit(`    workgroupBarrier();`);
    // Both staged tiles' reads are done: the next pair goes in, the one after is fetched.
    storePair();
    loadPair("tp + 4u");
    emit(`    let dk = k_scale[ks_base + min(t, t_last)];
    let sb = ${sBase};`);
    readMax("m_a", "q_sc_a", "ri_a");
    emit(`    workgroupBarrier();`);
    forEach("j", bc / N, (j) => emit("    " + qk.store(sAt, `wst + ${sTile(j)}`, tile("srb", j))));
    emit(`    workgroupBarrier();`);
    readMax("m_b", "q_sc_b", `ri_a + ${R}i`);
    emit(`    workgroupBarrier();
  }`);
    // Each row's maximum over both halves of each tile and both tiles of each pair: subgroup w's
    // block is block w % 2 of pair w % W2 (the pairs' subgroups are w and w + W2).
    emit(`  red[wr + lane] = bitcast<u32>(m_a);
  red[wr + ${MMA_SUBGROUP}u + lane] = bitcast<u32>(m_b);
  workgroupBarrier();
  {
    let src = (warp / 2u) * ${2 * MMA_SUBGROUP}u + (warp % 2u) * ${MMA_SUBGROUP}u + r;
    let other = src + ${W2 * 2 * MMA_SUBGROUP}u;
    m = max(max(bitcast<f32>(red[src]), bitcast<f32>(red[src + ${R}u])),
            max(bitcast<f32>(red[other]), bitcast<f32>(red[other + ${R}u])));
  }
  workgroupBarrier();`);
  }

  /**
   * A skewed pass (TwoPassConfig.skew, skewMax; the loop is {@link skewedKeyLoop}): the multiply step
   * is P·V of tile p - 1 (second pass) and S of tile p, the read step P (second pass) or the maxima.
   * Slot (p - t_lo) % 2 holds K tile p and V tile p - 1.
   */
  function emitSkewedPass(multiplyPV: ((vSlot: string) => void) | null) {
    const kSlot = (bc * ksStride) / 4, vSlot = (dV * vsStride) / 4; // words
    skewedKeyLoop(emit, c.warps, {
      stageFirst: () => {
        loadK("t_lo");
        storeK();
        loadK("t_lo + 1u");
        if (multiplyPV) loadV("t_lo");
        emit(`  workgroupBarrier();`);
      },
      multiply: () => {
        if (multiplyPV) {
          emit(`    if (p > t_lo) {`);
          multiplyPV(`slot * ${vSlot * 4}u + `); // byte offsets (V's elements are bytes)
          emit(`    }`);
        }
        emit(`    if (p < t_hi) {`);
        multiplyS("ws", `slot * ${kSlot * 4}u + `);
        emit(`    }`);
      },
      read: (t) => {
        emit(`    {
    let t = ${t};
    let kv0 = t * ${bc}u;
    let wst = ws;
    let dq = q_sc * k_scale[ks_base + t];
    let sb = ${sBase};`);
        if (multiplyPV) {
          emit(`    let full = ${fullTile};`);
          emitP(pWords, "psum");
        } else fastTileMax("m", "dq");
        emit(`    }`);
      },
      stageNext: () => {
        storeTile(
          "kr",
          nk,
          kVecs,
          "ks",
          dQ / 16,
          ksStride / 4,
          (x) => `bitcast<i32>(${x})`,
          `(slot ^ 1u) * ${kSlot}u`,
        );
        loadK("p + 2u");
        if (multiplyPV) {
          storeTile(
            "vr",
            nv,
            vVecs,
            "vs",
            bc / 16,
            vsStride / 4,
            (x) => u8 ? x : `bitcast<i32>(${x})`,
            `(slot ^ 1u) * ${vSlot}u`,
          );
          loadV("p + 1u");
        }
      },
    });
  }

  // ---- pass 1: each row's maximum (log2 units) ----
  emit(`  var m = NEG;`);
  if (skewedMaxPass(c)) {
    emitSkewedPass(null);
    emit(`  red[wr + lane] = bitcast<u32>(m);
  workgroupBarrier();
  m = max(bitcast<f32>(red[wr + lane]), bitcast<f32>(red[wr + (lane ^ ${R}u)]));`);
  } else if (paired) {
    emitPairedMaxPass();
  } else if (!c.skipMaxPass) {
    if (stage) {
      // K tile t_lo in ks, t_lo + 1 in registers.
      loadK(first);
      storeK();
      emit(`  workgroupBarrier();`);
      loadK(second);
    }
    loopHead();
    // One S region: the previous tile's reads must end before this store; two: they alternate.
    // Staged: ks is rewritten after the S barrier, so the tile ends with a barrier too.
    computeS(!s.doubleS && !stage, () => {
      if (!stage) return;
      storeK();
      loadK(next2);
    });
    if (rowBias) {
      // The functions' results have no order the integers keep: the maximum of the values.
      emit(`    let full = ${fullTile};`);
      for (const e of range(half)) {
        emit(`    m = select(m, max(m, ${scoreExpr(e)}), full || (${liveExpr(e)}));`);
      }
    } else if (fast) {
      fastTileMax("m", "dq");
    } else {
      emit(`    var hi = -2147483647i;
    var lo = 2147483647i;
    let full = ${fullTile};`);
      for (const e of range(half)) {
        emit(`    {
      let y = ss[sb + ${e * sStep}u];
      let ok = full || (${liveExpr(e)});
      hi = select(hi, max(hi, y), ok);
      lo = select(lo, min(lo, y), ok);
    }`);
      }
      // dq may be negative (a negative softmax scale): the largest score is then the smallest integer.
      emit(`    if (hi >= lo) { m = max(m, max(f32(hi) * dq, f32(lo) * dq)); }`);
    }
    if (stage) emit(`    workgroupBarrier();`);
    loopTail();
    emit(`  red[wr + lane] = bitcast<u32>(m);
  workgroupBarrier();
  m = max(bitcast<f32>(red[wr + lane]), bitcast<f32>(red[wr + (lane ^ ${R}u)]));`);
  } else {
    emit(`  m = 8.0;`);
  }

  // ---- pass 2: P = exp2(s - m) quantized under one scale, P·V accumulated in integer tiles ----
  /**
   * P of the invocation's half row of the S tile at `sb` (with dq, lp and full in scope) as packed
   * bytes into the P words at `pb`, their sum into `psum`.
   */
  const emitP = (pb: string, psum: string) => {
    if (fast && !rowBias) emit(`    let dc = fma(-12582912.0, dq, lp);`);
    for (const e of range(half)) {
      const live = `full || (${liveExpr(e)})`;
      if (fast) {
        // p·pmax + 2^23 is 2^23 + round(p·pmax) exactly (ties to even, as round()): the low byte.
        emit(
          `    let p${e} = bitcast<u32>(select(0.0, min(exp2(${
            fastScoreExpr(e)
          }), ${pmax}.0), ${live}) + 8388608.0);`,
        );
      } else {
        // min(·, 1): the maximum was taken over the same integers, so only rounding can pass 1.
        emit(
          `    let p${e} = select(0u, u32(round(min(exp2(${scoreExpr(e)} - m), 1.0) * ${pmax}.0)), ${live});`,
        );
      }
    }
    for (const w of range(half / 4)) {
      const e = 4 * w;
      const word = fast
        ? `(p${e} & 0xffu) | ((p${e + 1} & 0xffu) << 8u) | ((p${e + 2} & 0xffu) << 16u) | (p${e + 3} << 24u)`
        : `p${e} | (p${e + 1} << 8u) | (p${e + 2} << 16u) | (p${e + 3} << 24u)`;
      emit(`    let pw${w} = ${word};
    sp[${pb} + ${w}u] = ${u8 ? `pw${w}` : `i32(pw${w})`};`);
    }
    emit(
      fast
        ? `    ${psum} += ${range(half / 4).map((w) => `dot4U8Packed(pw${w}, 0x01010101u)`).join(" + ")};`
        : `    ${psum} += ${range(half).map((e) => `p${e}`).join(" + ")};`,
    );
  };
  // This invocation's P words in its subgroup's P region.
  const pWords = `wp + r * ${bc / 4}u + hh * ${half / 4}u`;
  emit(`  var psum = 0u;`);
  if (fast) emit(`  let lp = ${Math.log2(pmax)} - m;`);
  tiles(pv, "acc", dV / N);
  /** P·V of the P tile in this subgroup's P region with V's staged tile at byte `vSlot`. */
  const multiplyPV = (vSlot = "") => {
    forEach("kk", bc / 32, (kk) => {
      emit("    {");
      emit("      " + pv.loadLeft("pa", pAt, `wp * 4u + ${kk} * 32u`)); // bytes: wp counts words
      forEach("g", dV / N, (g) => {
        emit("      {");
        emit("        " + pv.loadRight("vb", vAt, `${vSlot}${vOffset(g, kk)}`));
        emit("        " + pv.mma(tile("acc", g), "pa", pAt, "vb", vAt));
        emit("      }");
      });
      emit("    }");
    });
  };
  if (skew) emitSkewedPass(multiplyPV);
  else {
    if (stage) {
      // K tile t_lo in ks, t_lo + 1 and V tile t_lo in registers. (The maximum pass's last reads of
      // ks were before its last barriers.)
      loadK(first);
      storeK();
      loadV(first);
      emit(`  workgroupBarrier();`);
      loadK(second);
    }
    loopHead();
    // The barrier after the previous tile's P writes already ordered its S reads before this store.
    // Staged: after the S barrier every subgroup is done with ks (this tile's S) and vs (the
    // previous tile's P·V): V tile t and K tile t + 1 go in, and the next ones are fetched.
    computeS(false, () => {
      if (!stage) return;
      storeV();
      storeK();
      loadK(next2);
      loadV(next1);
    });
    emit(`    let full = ${fullTile};`);
    emitP(pWords, "psum");
    emit(`    workgroupBarrier();`);
    multiplyPV();
    loopTail();
  }

  // ---- finish: the row's Σp over both halves; each output tile through the P region ----
  emit(`  red[wr + ${MMA_SUBGROUP}u + lane] = psum;
  workgroupBarrier();
  let ptot = red[wr + ${MMA_SUBGROUP}u + lane] + red[wr + ${MMA_SUBGROUP}u + (lane ^ ${R}u)];
  let inv = select(0.0, 1.0 / f32(ptot), ptot > 0u);
  let vst = bhk * ${2 * dV}u;
  let obase = b * P.o_sb + h * P.o_sh + row * P.o_ss;`);
  // Each invocation writes N/2 channels of its row per output tile (two vec4 for N 16, one for 8).
  const perInv = N / 2;
  const out = oAt.array;
  forEach("g", dV / N, (g) => {
    emit(`    workgroupBarrier();`);
    emit("    " + pv.store(oAt, oBase, tile("acc", g)));
    emit(`    workgroupBarrier();
    {
      let c0 = ${g} * ${N}u + hh * ${perInv}u;
      let ob = ${oBase} + r * ${N}u + hh * ${perInv}u;`);
    for (let q = 0; q < perInv / 4; q++) {
      const vals = range(4).map((i) => {
        const e = 4 * q + i;
        const a = u8 ? `(f32(${out}[ob + ${e}u]) - 128.0 * f32(ptot))` : `f32(${out}[ob + ${e}u])`;
        return `select(${a} * inv * v_stat[vst + c0 + ${e}u] + v_stat[vst + ${dV}u + c0 + ${e}u], 0.0, ptot == 0u)`;
      });
      const guard = dV > c.d ? `c0 + ${4 * q}u < ${c.d}u && ` : "";
      emit(
        `      if (${guard}row < P.s_q) { o[obase + c0 / 4u + ${q}u] = ${
          storeVec(c, `vec4<f32>(${vals.join(", ")})`)
        }; }`,
      );
    }
    emit(`    }`);
  });
  if (c.lse) {
    // K was smoothed: lse_bias adds back the row's scale * q . mean(k) (with a score_mod the scores
    // had it added already). Σp counts P in 1/pmax units.
    emit(`  if (row < P.s_q && hh == 0u) {
    let l = f32(ptot) / ${pmax}.0;
    let li = bh * P.s_q + row;
    lse[li] = select(select(${NEG_INF}, (m + log2(l)) * LN2${
      rowBias ? "" : " + lse_bias[li]"
    }, ptot > 0u), m, ${isNanExpr("m")});
  }`);
  }
  emit(`}`);
  emit(qk.helpers() + pv.helpers());
  if (flex) {
    const decls = flexDeclarations(flex, L.join("\n"), bindings.length + 1, c.bc);
    emit(decls.code);
    bindings.push(...decls.bindings);
  }
  const key = twoPassKey(c);
  const label = `sage-mma ${twoPassKey({ ...c, flex: undefined })}${flex ? " flex" : ""}`;
  return { key, label, code: L.join("\n") + "\n", bindings, uniforms };
}
