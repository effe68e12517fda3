/**
 * The `sage` pre-pass (SageAttention's quantization in WGSL): small kernels that run before the
 * flash kernel's int8 mode (`qk: "int8"` in wgsl/flash.ts), in the same compute pass.
 *
 * 1. {@link sageStatsKernel} then {@link sageStatsFinalKernel}: the mean of K over the sequence per
 *    (batch, K/V head, channel), from partial sums over chunks of rows.
 *    Subtracting it from every key ("smoothing") adds the same constant `q . mean` to every score
 *    of a query row, which the softmax ignores, and removes the channel offsets (outlier channels)
 *    that would otherwise spend K's int8 range.
 * 2. {@link sageQuantKernel}: quantizes one block of rows (br query rows of Q, or bc keys of K,
 *    minus the mean) per workgroup to int8 with one f32 scale per block (absmax / 127), packed four
 *    to a u32 along d. Rows are padded to whole blocks and d to a multiple of 16 with zeros, so the
 *    main kernel reads whole vec4<u32> words without bounds checks. Q's scale carries the softmax
 *    scale and log2 e. With the log-sum-exp, Q's pass also writes each row's `scale * q . mean`,
 *    which the main kernel adds back to the lse (the smoothing shifted it).
 *
 * Layouts: packed `[b, heads, blocks * rows, dQ / 4]` u32, scales `[b, heads, blocks]`, the mean
 * `[b, n_kv, d]` f32, the lse bias `[b, n, s_q]` f32. A packed batch (`varlen`, b = 1) is quantized
 * in blocks aligned to each sequence's start, so none straddles two sequences and each lines up with
 * the flash kernel's tiles: block `i` of a head is entry `i` of a work list (each sequence's blocks
 * prefix-summed, as the kernel's), packed `[heads, blocks, rows, dQ / 4]` and scales `[heads,
 * blocks]`; the mean is over all packed keys of a head and the lse bias `[n, total_q]` by packed row.
 */
import type { DType } from "../core/types.ts";
import { type Kernel, NEG_INF, POS_INF, uniformBlock, type UniformType } from "./common.ts";
import { workListSearch } from "./serving.ts";

/** Threads of the pre-pass workgroups (the WebGPU minimum for maxComputeInvocationsPerWorkgroup). */
export const SAGE_THREADS = 256;

/** vec4 columns of K one mean workgroup covers. */
export const SAGE_MEAN_COLUMNS = 8;

/** Rows each invocation of {@link sageStatsKernel} loads at once. */
const STATS_UNROLL = 8;

/**
 * Head dim padded for the packed int8 layout: to 16 (one vec4<u32> word holds 16 values), or to
 * `multiple` (32 for the K of `sage-mma`'s 16x16x32 matrix tiles).
 */
export function sagePaddedDim(d: number, multiple = 16): number {
  return Math.ceil(d / multiple) * multiple;
}

/** How a tensor is read: dtype and whether f16 is native (shader-f16). */
export interface SageInput {
  dtype: DType;
  f16: boolean;
  /** Head dim (a multiple of 4). */
  d: number;
}

/** Everything that changes the quantization kernel's text. */
export interface SageQuantConfig extends SageInput {
  /** Rows per block (the flash kernel's br for Q, bc for K). */
  rows: number;
  /** Subtract the K mean before quantizing (K). */
  smooth: boolean;
  /** Write each row's `bias_scale * x . mean` (Q, when the lse is wanted). */
  bias: boolean;
  /** Pad d to this multiple in the packed rows (default 16; see {@link sagePaddedDim}). */
  pad?: 16 | 32;
  /**
   * Packed batch (b = 1): blocks aligned to each sequence's start, bindings `cu` (i32 offsets) and
   * `wl` (u32, each sequence's first block, its blocks prefix-summed; `wl[seqs]` the total).
   */
  varlen?: boolean;
}

/** WGSL type of one vec4 of an input of this dtype, as the pre-pass kernels bind it. */
function element(c: SageInput): string {
  if (c.dtype === "f32") return "vec4<f32>";
  if (c.dtype === "f16" && c.f16) return "vec4<f16>";
  return "vec2<u32>";
}

/** `ld` (four values of x as f32) and `finite4` (false for NaN and ±Inf, by the exponent bits). */
/** WGSL `ld` (vec4 `i` of the input `x` as f32) and `finite4`, for the pre-pass kernels. */
export function sageLoader(c: SageInput): string {
  return loadFn(c) +
    "fn finite4(x: vec4<f32>) -> vec4<bool> {\n" +
    "  return (bitcast<vec4<u32>>(x) & vec4<u32>(0x7f800000u)) != vec4<u32>(0x7f800000u);\n}\n";
}

/** WGSL `fn ld(i: u32) -> vec4<f32>` reading vec4 `i` of the input `x`. */
function loadFn(c: SageInput): string {
  if (c.dtype === "f32") return "fn ld(i: u32) -> vec4<f32> { return x[i]; }\n";
  if (c.dtype === "f16" && c.f16) return "fn ld(i: u32) -> vec4<f32> { return vec4<f32>(x[i]); }\n";
  if (c.dtype === "f16") {
    return "fn ld(i: u32) -> vec4<f32> { let w = x[i]; return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }\n";
  }
  return `fn ld(i: u32) -> vec4<f32> {
  let w = x[i];
  return vec4<f32>(bitcast<f32>(w.x << 16u), bitcast<f32>(w.x & 0xffff0000u),
                   bitcast<f32>(w.y << 16u), bitcast<f32>(w.y & 0xffff0000u));
}
`;
}

/**
 * The start of a pre-pass kernel reading one input: `enable f16;` where needed, the uniform block,
 * and binding 1, the input `x` (read by {@link sageLoader}'s `ld`).
 */
export function sageInputHeader(c: SageInput, uniforms: [string, UniformType][]): string {
  return (c.dtype === "f16" && c.f16 ? "enable f16;\n" : "") + uniformBlock(uniforms) +
    `@group(0) @binding(1) var<storage, read> x: array<${element(c)}>;\n`;
}

/**
 * Rows of a head that one column-statistics workgroup covers ({@link sageStatsKernel}), and how many
 * such chunks a head has: at least 256 rows (8 per lane), and at most 32 chunks, so that the mean's
 * serial loop over them stays short. The chunks of a head run side by side: one workgroup per head
 * walking the whole sequence (the first form) left most SMs idle behind a long chain of loads
 * (Flux: 96 workgroups of 144 steps each, three times over for V).
 */
export function sageStatsChunks(s: number): { chunk: number; chunks: number } {
  const lanes = SAGE_THREADS / SAGE_MEAN_COLUMNS;
  const chunk = Math.max(8 * lanes, Math.ceil(s / 32 / lanes) * lanes);
  return { chunk, chunks: Math.max(1, Math.ceil(s / chunk)) };
}

const STATS_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["heads", "u32"],
  ["cgroups", "u32"],
  ["chunks", "u32"],
  ["chunk", "u32"],
  ["s", "u32"],
  // Strides of x in vec4 units (b, head, s).
  ["sb", "u32"],
  ["sh", "u32"],
  ["ss", "u32"],
];

/** What {@link sageStatsKernel} gathers: sums (K's mean), or also the extremes (V's absmax). */
export interface SageStatsConfig extends SageInput {
  extremes: boolean;
}

/**
 * Partial column statistics of x over one chunk of rows ({@link sageStatsChunks}) per (batch, head,
 * {@link SAGE_MEAN_COLUMNS} vec4 columns, chunk): the sum of the finite values and, with `extremes`,
 * the largest and smallest value (a non-finite value counts as +Inf in both, which makes the
 * channel's absmax +Inf). Non-finite values are left out of the sum: any finite offset is exact
 * (the softmax ignores it), and a NaN mean would spread one bad key to every key of the head.
 * Bindings x, part (`[b * heads, chunks, 1 or 3, d / 4]` vec4). Dispatch `b * heads * cgroups *
 * chunks` workgroups, `cgroups = ceil(d / 4 / SAGE_MEAN_COLUMNS)`.
 */
export function sageStatsKernel(c: SageStatsConfig): Kernel {
  const d4 = c.d / 4, cw = SAGE_MEAN_COLUMNS, lanes = SAGE_THREADS / cw, t = SAGE_THREADS;
  const parts = c.extremes ? 3 : 1;
  const key = `sage-stats:${c.dtype}:${c.f16}:d${c.d}${c.extremes ? ":x" : ""}`;
  const tree = (name: string, op: (a: string, b: string) => string) =>
    `  ${name}_red[lid] = ${name};
  workgroupBarrier();
  for (var st = ${lanes / 2}u; st > 0u; st >>= 1u) {
    if (lane < st) { ${name}_red[lid] = ${op(`${name}_red[lid]`, `${name}_red[lid + st * ${cw}u]`)}; }
    workgroupBarrier();
  }
`;
  const extremes = c.extremes
    ? {
      decls:
        `var<workgroup> hi_red: array<vec4<f32>, ${t}>;\nvar<workgroup> lo_red: array<vec4<f32>, ${t}>;\n`,
      init: `  var hi = vec4<f32>(${NEG_INF});\n  var lo = vec4<f32>(${POS_INF});\n`,
      step:
        `      let y = select(vec4<f32>(${POS_INF}), x, ok);\n      hi = max(hi, y);\n      lo = min(lo, y);\n`,
      tree: tree("hi", (a, b) => `max(${a}, ${b})`) + tree("lo", (a, b) => `min(${a}, ${b})`),
      store: `    part[at + ${d4}u] = hi_red[lid];\n    part[at + ${2 * d4}u] = lo_red[lid];\n`,
    }
    : { decls: "", init: "", step: "", tree: "", store: "" };
  const code = sageInputHeader(c, STATS_UNIFORMS) + sageLoader(c) +
    `@group(0) @binding(2) var<storage, read_write> part: array<vec4<f32>>;
var<workgroup> acc_red: array<vec4<f32>, ${t}>;
${extremes.decls}@compute @workgroup_size(${t})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
  let chunk = wg % P.chunks;
  let bg = wg / P.chunks;
  let bh = bg / P.cgroups;
  let col = (bg % P.cgroups) * ${cw}u + lid % ${cw}u;
  let lane = lid / ${cw}u;
  let live = col < ${d4}u;
  let base = (bh / P.heads) * P.sb + (bh % P.heads) * P.sh + min(col, ${d4 - 1}u);
  let r_end = min(P.s, (chunk + 1u) * P.chunk);
  var acc = vec4<f32>(0.0);
${extremes.init}  if (live) {
    // ${STATS_UNROLL} rows loaded at once per step: a loop waiting on each load in turn kept too few
    // bytes in flight to fill the memory bus (bench/RESULTS.md, run 19).
    for (var r = chunk * P.chunk + lane; r < r_end; r += ${STATS_UNROLL * lanes}u) {
${
      Array.from({ length: STATS_UNROLL }, (_, u) =>
        `      let x${u} = ld(base + min(r + ${u * lanes}u, r_end - 1u) * P.ss);
`).join("")
    }${
      Array.from({ length: STATS_UNROLL }, (_, u) =>
        `      if (r + ${u * lanes}u < r_end) {
        let x = x${u};
        let ok = finite4(x);
        acc += select(vec4<f32>(0.0), x, ok);
${extremes.step.replace(/^(?=.)/gm, "  ")}      }
`).join("")
    }    }
  }
${tree("acc", (a, b) => `${a} + ${b}`)}${extremes.tree}  if (lane == 0u && live) {
    let at = (bh * P.chunks + chunk) * ${parts * d4}u + col;
    part[at] = acc_red[lid];
${extremes.store}  }
}
`;
  return { key, label: key, code, bindings: ["x", "part"], uniforms: STATS_UNIFORMS };
}

const FINAL_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["columns", "u32"],
  ["chunks", "u32"],
  ["s", "u32"],
];

/** What {@link sageStatsFinalKernel} writes: K's mean, or V's scale and mean (`extremes`). */
export interface SageStatsFinalConfig {
  d: number;
  /** The partial statistics carry the extremes: write `[scale, mean]` per head instead of the mean. */
  extremes: boolean;
  /** vec4 columns per head of the output (at least d / 4; those past d / 4 get zeros). */
  width: number;
}

/**
 * A tensor's per-channel statistics from {@link sageStatsKernel}'s partials, one invocation per vec4
 * column of the output. Sums only: the mean (`[b, heads, d]` f32, K's smoothing offset). With the
 * extremes: `[b, heads, 2, 4 · width]`, the scale (absmax / 127 of x - mean) then the mean (V's, for
 * sage-mma). That absmax is max(max - mean, mean - min): rounding is monotonic, so it equals the
 * largest |x - mean| that a pass over the values would find; a non-finite value made the channel's
 * maximum +Inf, so its absmax and scale are +Inf (it quantizes to 0 and that channel's outputs of the
 * head are NaN). Bindings part, out. Dispatch `ceil(columns / SAGE_THREADS)` workgroups,
 * `columns = b * heads * width`.
 */
export function sageStatsFinalKernel(c: SageStatsFinalConfig): Kernel {
  const d4 = c.d / 4, w = c.width, parts = c.extremes ? 3 : 1;
  const key = `sage-stats-final:d${c.d}:w${w}${c.extremes ? ":x" : ""}`;
  const sums = c.extremes
    ? `    var acc = vec4<f32>(0.0);
    var hi = vec4<f32>(${NEG_INF});
    var lo = vec4<f32>(${POS_INF});
    for (var ch = 0u; ch < P.chunks; ch++) {
      let at = (bh * P.chunks + ch) * ${parts * d4}u + col;
      acc += part[at];
      hi = max(hi, part[at + ${d4}u]);
      lo = min(lo, part[at + ${2 * d4}u]);
    }
    mean = acc / f32(P.s);
    scale = max(vec4<f32>(0.0), max(hi - mean, mean - lo)) / 127.0;`
    : `    var acc = vec4<f32>(0.0);
    for (var ch = 0u; ch < P.chunks; ch++) { acc += part[(bh * P.chunks + ch) * ${d4}u + col]; }
    mean = acc / f32(P.s);`;
  const store = c.extremes
    ? `  out[bh * ${2 * w}u + col] = scale;
  out[bh * ${2 * w}u + ${w}u + col] = mean;`
    : `  out[i] = mean;`;
  const code = uniformBlock(FINAL_UNIFORMS) +
    `@group(0) @binding(1) var<storage, read> part: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@compute @workgroup_size(${SAGE_THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.x + wid.y * nwg.x) * ${SAGE_THREADS}u + lid;
  if (i >= P.columns) { return; }
  let bh = i / ${w}u;
  let col = i % ${w}u;
  var mean = vec4<f32>(0.0);
${c.extremes ? "  var scale = vec4<f32>(0.0);\n" : ""}  if (col < ${d4}u) {
${sums}
  }
${store}
}
`;
  return { key, label: key, code, bindings: ["part", "out"], uniforms: FINAL_UNIFORMS };
}

const QUANT_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["heads", "u32"],
  // Heads per mean head (Q: the GQA group; K: 1) and the mean's head count.
  ["group", "u32"],
  ["n_kv", "u32"],
  ["blocks", "u32"],
  ["s", "u32"],
  // Strides of x in vec4 units (b, head, s).
  ["sb", "u32"],
  ["sh", "u32"],
  ["ss", "u32"],
  // Multiplies the stored scale (Q: softmax scale * log2 e).
  ["scale_mul", "f32"],
  // Multiplies the row bias (Q: the softmax scale).
  ["bias_scale", "f32"],
];

/** Uniforms of the packed-batch form: the sequence count. */
const QUANT_VARLEN_UNIFORMS: [string, UniformType][] = [...QUANT_UNIFORMS, ["seqs", "u32"]];

/** A stable cache key for a quantization config. */
export function sageQuantKey(c: SageQuantConfig): string {
  return `sage-quant:${c.dtype}:${c.f16}:d${c.d}:r${c.rows}:${c.smooth ? "smooth" : "plain"}:${
    c.bias ? "bias" : "nobias"
  }${c.pad === 32 ? ":p32" : ""}${c.varlen ? ":vl" : ""}`;
}

/**
 * The packed-batch prologue: workgroup `wg` is block `wg % blocks` of head `wg / blocks` (blocks: the
 * work list's total, or its bound for GPU offsets; those past the total return at once). The block's
 * sequence by binary search over `wl`, its rows from the sequence's start, offsets clamped into the
 * tensor as the flash kernel clamps them. Every value here is workgroup-uniform (read-only storage
 * at uniform indices), as the barriers below need.
 */
function varlenQuantPrologue(rows: number, d4: number): string {
  return `  let h = wg / P.blocks;
  let item = wg % P.blocks;
  if (item >= wl[P.seqs]) { return; }
${workListSearch()}  let c0 = u32(clamp(cu[lo_s], 0i, i32(P.s)));
  let c1 = u32(clamp(cu[lo_s + 1u], i32(c0), i32(P.s)));
  let r0 = min(c0 + (item - wl[lo_s]) * ${rows}u, c1);
  let bh = h;
  let base = h * P.sh;
  let mb = (h / P.group) * ${d4}u;
  let rows = min(c1 - r0, ${rows}u);`;
}

/**
 * Quantizes blocks of `rows` rows to packed int8, one workgroup per (batch, head, block): each
 * invocation loads its share of the block into registers at once, the absmax (after smoothing) by
 * one workgroup atomic, then `round(x * 127 / absmax)` packed four to a word. Dispatch
 * `b * heads * blocks` workgroups. Bindings: `x`, `x8` (packed out), `x_scale`,
 * then `mean` (smooth or bias), `bias` (bias), and `cu`, `wl` (varlen; uniform `seqs`; `blocks` is
 * the work list's total or a bound of it, workgroups past the total return at once).
 */
export function sageQuantKernel(c: SageQuantConfig): Kernel {
  const d4 = c.d / 4, words = sagePaddedDim(c.d, c.pad ?? 16) / 4, t = SAGE_THREADS;
  const bindings = ["x", "x8", "x_scale"];
  let decls = `@group(0) @binding(2) var<storage, read_write> x8: array<u32>;
@group(0) @binding(3) var<storage, read_write> x_scale: array<f32>;
`;
  if (c.smooth || c.bias) {
    decls += `@group(0) @binding(${bindings.length + 1}) var<storage, read> mean: array<vec4<f32>>;\n`;
    bindings.push("mean");
  }
  if (c.bias) {
    decls += `@group(0) @binding(${bindings.length + 1}) var<storage, read_write> bias: array<f32>;\n`;
    bindings.push("bias");
  }
  if (c.varlen) {
    // Read-only: reads at uniform indices are uniform (the exit and the rows steer the barriers).
    for (const [name, type] of [["cu", "i32"], ["wl", "u32"]]) {
      decls += `@group(0) @binding(${bindings.length + 1}) var<storage, read> ${name}: array<${type}>;\n`;
      bindings.push(name);
    }
  }
  const value = (e: string) => {
    const at = `row0 + (${e} / ${d4}u) * P.ss + ${e} % ${d4}u`;
    return c.smooth ? `(ld(${at}) - mean[mb + ${e} % ${d4}u])` : `ld(${at})`;
  };
  // Every invocation's share of the block (vec4 e = lid + i·t) loaded at once and kept in registers:
  // the first form looped over loads it waited on one by one, read the block a second time to
  // quantize it, and reduced through a tree of 8 barriers (Flux: Q's and K's quantization 82 µs,
  // now 61 to 65; bench/RESULTS.md run 19). Workgroups of 2 to 8 blocks were slower (83 to 86).
  const per = Math.ceil((c.rows * d4) / t);
  const loads = Array.from({ length: per }, (_, i) =>
    `  let e${i} = lid + ${i * t}u;
  let v${i} = select(vec4<f32>(0.0), ${value(`min(e${i}, last)`)}, e${i} < live);
`).join("");
  const absmax = Array.from(
    { length: per },
    (_, i) =>
      `  let a${i} = select(vec4<f32>(${POS_INF}), abs(v${i}), finite4(v${i}));
  mx = max(mx, max(max(a${i}.x, a${i}.y), max(a${i}.z, a${i}.w)));
`,
  ).join("");
  const full = per * t === c.rows * d4;
  const stores = Array.from({ length: per }, (_, i) => {
    const store = `x8[out0 + (e${i} / ${d4}u) * ${words}u + e${i} % ${d4}u] = pack${i};`;
    return `  let q${i} = vec4<i32>(clamp(round(select(vec4<f32>(0.0), v${i} * inv, finite4(v${i}))), vec4<f32>(-127.0), vec4<f32>(127.0)));
  let pack${i} = (u32(q${i}.x) & 0xffu) | ((u32(q${i}.y) & 0xffu) << 8u) | ((u32(q${i}.z) & 0xffu) << 16u) | (u32(q${i}.w) << 24u);
  ${full ? store : `if (e${i} < ${c.rows * d4}u) { ${store} }`}
`;
  }).join("");
  // d padded to `words` with zero words (rows past the block's end are zeros already).
  const padding = words > d4
    ? `  for (var e = lid; e < ${c.rows * (words - d4)}u; e += ${t}u) {
    x8[out0 + (e / ${words - d4}u) * ${words}u + ${d4}u + e % ${words - d4}u] = 0u;
  }
`
    : "";
  const uniforms = c.varlen ? QUANT_VARLEN_UNIFORMS : QUANT_UNIFORMS;
  const code = sageInputHeader(c, uniforms) + sageLoader(c) + decls +
    `// The block's absmax as f32 bits: for values >= 0 (and +Inf) the u32 order is the f32 order.
var<workgroup> amax_bits: atomic<u32>;
@compute @workgroup_size(${t})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
${
      c.varlen ? varlenQuantPrologue(c.rows, d4) : `  let bh = wg / P.blocks;
  let r0 = (wg % P.blocks) * ${c.rows}u;
  let b = bh / P.heads;
  let h = bh % P.heads;
  let base = b * P.sb + h * P.sh;
  let mb = (b * P.n_kv + h / P.group) * ${d4}u;
  let rows = min(P.s - r0, ${c.rows}u);`
    }
  let row0 = base + r0 * P.ss;
  let live = rows * ${d4}u;
  let last = max(live, 1u) - 1u;
  let out0 = wg * ${c.rows * words}u;
${loads}  // A NaN or Inf in the block makes absmax, and so the block's scale, +Inf, and its values
  // quantize to 0: every score of the block is then 0 * Inf = NaN, and the NaN reaches exactly the
  // rows that attend the block (max() with a NaN is unspecified in WGSL, hence the bit test).
  var mx = 0.0;
${absmax}  // One atomic per invocation: a subgroup maximum first left the time where it was (run 19).
  atomicMax(&amax_bits, bitcast<u32>(mx));
  workgroupBarrier();
  let amax = bitcast<f32>(atomicLoad(&amax_bits));
  let inv = select(0.0, 127.0 / amax, amax > 0.0);
  if (lid == 0u) { x_scale[wg] = amax / 127.0 * P.scale_mul; }
${stores}${padding}${
      c.bias
        ? `  for (var r = lid; r < rows; r += ${t}u) {
    let row = base + (r0 + r) * P.ss;
    var acc = 0.0;
    for (var col = 0u; col < ${d4}u; col++) { acc += dot(ld(row + col), mean[mb + col]); }
    bias[bh * P.s + r0 + r] = acc * P.bias_scale;
  }
`
        : ""
    }}
`;
  const key = sageQuantKey(c);
  return { key, label: key, code, bindings, uniforms };
}
