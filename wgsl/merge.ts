/**
 * Kernels that combine attention computed over disjoint key sets, and move tensors between
 * bindings: both used by `mergeAttention` and by the core's splitting of calls past the binding
 * limits.
 *
 * Merge: for each query row, parts `(o_p, lse_p)` combine as
 *   `M = max_p lse_p`, `w_p = exp(lse_p - M)`, `o = sum_p w_p o_p / sum_p w_p`, `lse = M + log(sum_p w_p)`;
 * a row whose every part has `lse = -inf` (nothing attended) gives zeros and `-inf`. A running
 * f32 accumulator (`acc` [rows, d_v] with its lse) lets any number of parts be merged a few per pass.
 *
 * Gather: copies a strided box of a tensor (any element size: 1, 2 or 4 bytes) into a dense
 * buffer, one u32 word per invocation, from a source bound at an aligned offset plus an element
 * base: what a binding offset cannot express (offsets must be multiples of 256 bytes).
 */
import type { DType } from "../core/types.ts";
import {
  BF16_PACK,
  type Kernel,
  LINEAR_WORKGROUP,
  NEG_INF,
  packPair,
  scalarLoader,
  uniformBlock,
  type UniformType,
  WORKGROUP_BUILTINS,
} from "./common.ts";

/** What changes the merge kernel's text. */
export interface MergeConfig {
  /** dtype of the parts and of the output. */
  dtype: DType;
  /** f16 parts and output as `array<f16>` (shader-f16); otherwise 16-bit values in u32 words. */
  f16: boolean;
  /** Parts read by this pass. */
  parts: number;
  /** Read the running accumulator (`acc`, `acc_lse_in`). */
  accIn: boolean;
  /** Write the accumulator (`acc` in place, `acc_lse_out`) instead of the output. */
  toAcc: boolean;
  /** Weigh parts by their lse. False: one part copied into place, without lse. */
  weighted: boolean;
  /** Write the output's lse (binding `lse`); always on with `toAcc`. */
  lseOut: boolean;
  /** Two output elements per invocation, written as one packed u32 (16-bit output without f16). */
  pairs: boolean;
}

const MERGE_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["rows", "u32"],
  ["n", "u32"],
  ["s_q", "u32"],
  ["d_v", "u32"],
  // Element strides of the parts (all parts share one layout).
  ["p_sb", "u32"],
  ["p_sh", "u32"],
  ["p_ss", "u32"],
  ["p_sd", "u32"],
  // Element strides and base of the output; base of the output lse.
  ["o_sb", "u32"],
  ["o_sh", "u32"],
  ["o_ss", "u32"],
  ["o_sd", "u32"],
  ["o_base", "u32"],
  ["l_base", "u32"],
];

/** Invocations per workgroup of the merge kernel. */
export const MERGE_THREADS = 64;

/** The binding names of a merge pass, in binding order. */
export function mergeBindings(c: MergeConfig): string[] {
  const names: string[] = [];
  if (c.accIn || c.toAcc) names.push("acc");
  if (c.accIn) names.push("acc_lse_in");
  for (let i = 0; i < c.parts; i++) {
    names.push(`p${i}`);
    if (c.weighted) names.push(`l${i}`);
  }
  if (c.toAcc) names.push("acc_lse_out");
  else {
    names.push("o");
    if (c.lseOut) names.push("lse");
  }
  return names;
}

/** Generates a merge pass. */
export function mergeKernel(c: MergeConfig): Kernel {
  const names = mergeBindings(c);
  const el = c.dtype === "f32" ? "f32" : c.f16 ? "f16" : "u32";
  const L: string[] = [];
  if (c.f16) L.push("enable f16;");
  L.push(uniformBlock(MERGE_UNIFORMS));
  names.forEach((name, i) => {
    const type = name === "o" ? el : /^p\d+$/.test(name) ? el : "f32";
    const rw = name === "acc" || name === "acc_lse_out" || name === "o" || name === "lse";
    L.push(
      `@group(0) @binding(${i + 1}) var<storage, ${rw ? "read_write" : "read"}> ${name}: array<${type}>;`,
    );
  });
  for (let i = 0; i < c.parts; i++) L.push(scalarLoader(`p${i}`, c.dtype, c.f16));
  if (c.pairs && c.dtype === "bf16") L.push(BF16_PACK);
  const per = c.pairs ? 2 : 1;
  const body: string[] = [];
  const lses = [
    ...(c.accIn ? ["acc_lse_in[row]"] : []),
    ...(c.weighted ? Array.from({ length: c.parts }, (_, i) => `l${i}[row]`) : []),
  ];
  const vals = (col: string) => [
    ...(c.accIn ? [`acc[row * P.d_v + ${col}]`] : []),
    ...Array.from({ length: c.parts }, (_, i) => `ld_p${i}(pb + ${col} * P.p_sd)`),
  ];
  if (c.weighted || c.accIn) {
    body.push(...lses.map((x, i) => `  let x${i} = ${x};`));
    let mx = "x0";
    for (let i = 1; i < lses.length; i++) mx = `max(${mx}, x${i})`;
    body.push(`  let m = ${mx};`);
    body.push(`  let live = m > -3.0e38;`);
    body.push(...lses.map((_, i) => `  let w${i} = select(0.0, exp(x${i} - m), x${i} > -3.0e38);`));
    body.push(`  let total = ${lses.map((_, i) => `w${i}`).join(" + ")};`);
    body.push(`  let inv = select(0.0, 1.0 / total, live && total > 0.0);`);
    body.push(`  let lse_row = select(${NEG_INF}, m + log(total), live && total > 0.0);`);
    for (let e = 0; e < per; e++) {
      const col = e === 0 ? "col" : "(col + 1u)";
      const terms = vals(col).map((v, i) => `w${i} * ${v}`);
      body.push(`  let y${e} = (${terms.join(" + ")}) * inv;`);
    }
  } else {
    // A plain copy into place (one part, no lse: with an lse, use `weighted` and one part).
    if (c.lseOut || c.toAcc || c.parts !== 1) throw new Error("an unweighted merge copies one part, no lse");
    body.push(`  let lse_row = 0.0;`);
    for (let e = 0; e < per; e++) body.push(`  let y${e} = ${vals(e === 0 ? "col" : "(col + 1u)")[0]};`);
  }
  let store: string;
  if (c.toAcc) {
    store = `  acc[row * P.d_v + col] = y0;\n  if (col == 0u) { acc_lse_out[row] = lse_row; }`;
  } else {
    const oi = `P.o_base + b * P.o_sb + h * P.o_sh + i * P.o_ss + col * P.o_sd`;
    const value = c.pairs ? packPair(c.dtype, "y0", "y1") : el === "f32" ? "y0" : `${el}(y0)`;
    store = `  o[(${oi})${c.pairs ? " >> 1u" : ""}] = ${value};`;
    if (c.lseOut) store += `\n  if (col == 0u) { lse[P.l_base + row] = lse_row; }`;
  }
  L.push(`
@compute @workgroup_size(${MERGE_THREADS})
fn main(${WORKGROUP_BUILTINS}) {
  ${LINEAR_WORKGROUP}
  let per_row = (P.d_v + ${per - 1}u) / ${per}u;
  let e = wg * ${MERGE_THREADS}u + lid;
  if (e >= P.rows * per_row) { return; }
  let row = e / per_row;
  let col = (e % per_row) * ${per}u;
  let i = row % P.s_q;
  let bh = row / P.s_q;
  let h = bh % P.n;
  let b = bh / P.n;
  let pb = b * P.p_sb + h * P.p_sh + i * P.p_ss;
${body.join("\n")}
${store}
}
`);
  const key =
    `merge:${c.dtype}:${c.f16}:p${c.parts}:${c.accIn}:${c.toAcc}:${c.weighted}:${c.lseOut}:${c.pairs}`;
  return { key, label: key, code: L.join("\n"), bindings: names, uniforms: MERGE_UNIFORMS };
}

/** What changes the gather kernel's text. */
export interface GatherConfig {
  /** Bytes per element: 1 (bool masks), 2 (f16/bf16) or 4 (f32). */
  bytes: 1 | 2 | 4;
}

const GATHER_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["count", "u32"],
  ["base", "u32"],
  // Box sizes (outermost first) and source element strides.
  ["n0", "u32"],
  ["n1", "u32"],
  ["n2", "u32"],
  ["n3", "u32"],
  ["s0", "u32"],
  ["s1", "u32"],
  ["s2", "u32"],
  ["s3", "u32"],
];

/** Generates the gather kernel: `dst` (dense u32 words) from a strided box of `src`. */
export function gatherKernel(c: GatherConfig): Kernel {
  const per = 4 / c.bytes;
  const bits = c.bytes * 8;
  const mask = c.bytes === 4 ? "0xffffffffu" : c.bytes === 2 ? "0xffffu" : "0xffu";
  const lines: string[] = [];
  for (let t = 0; t < per; t++) {
    lines.push(`  {
    let e = w * ${per}u + ${t}u;
    if (e < P.count) {
      let x3 = e % P.n3;
      let r3 = e / P.n3;
      let x2 = r3 % P.n2;
      let r2 = r3 / P.n2;
      let x1 = r2 % P.n1;
      let x0 = r2 / P.n1;
      let si = P.base + x0 * P.s0 + x1 * P.s1 + x2 * P.s2 + x3 * P.s3;
      ${
      c.bytes === 4
        ? "word = src[si];"
        : `word |= ((src[si / ${per}u] >> ((si % ${per}u) * ${bits}u)) & ${mask}) << ${t * bits}u;`
    }
    }
  }`);
  }
  const code = `${uniformBlock(GATHER_UNIFORMS)}
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(64)
fn main(${WORKGROUP_BUILTINS}) {
  ${LINEAR_WORKGROUP}
  let w = wg * 64u + lid;
  if (w * ${per}u >= P.count) { return; }
  var word = 0u;
${lines.join("\n")}
  dst[w] = word;
}
`;
  return {
    key: `gather:${c.bytes}`,
    label: `gather ${c.bytes}-byte elements`,
    code,
    bindings: ["src", "dst"],
    uniforms: GATHER_UNIFORMS,
  };
}
