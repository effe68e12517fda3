/**
 * Kernels of the `naive` backend: the formula as written, in three passes over a chunk of rows.
 * 1. scores[r, j] = scale * q[r]·k[j] (+ mask), -inf outside the causal/window band;
 * 2. row softmax in place (and the row's log-sum-exp);
 * 3. out[r] = scores[r] @ v.
 * Rows r are flattened (b, h, i); a chunk covers rows [r0, r0 + rows).
 */
import type { DType } from "../core/types.ts";
import { flexDeclarations, type FlexKernelConfig, flexKey, flexScoreStatements } from "./flex.ts";
import {
  BF16_PACK,
  type Kernel,
  LINEAR_WORKGROUP,
  NEG_INF,
  packPair,
  scalarLoader,
  storageDecl,
  storageElement,
  uniformBlock,
  type UniformType,
  WORKGROUP_BUILTINS,
} from "./common.ts";

/** What changes the naive kernels' text. */
export interface NaiveConfig {
  dtype: DType;
  /** shader-f16 is enabled: 16-bit f16 tensors use f16 storage. */
  f16: boolean;
  mask: "none" | "bool" | "additive";
  /** Causal or window limits apply. */
  band: boolean;
  lse: boolean;
  /** Attention sinks: the softmax pass binds `sinks` (f32 [n]), one more denominator term per row. */
  sinks?: boolean;
  /** 16-bit output written as packed pairs along d (needs d contiguous and even). */
  packedOut: boolean;
  /** scoreMod / maskMod applied in the scores pass (no block map: every score is computed). */
  flex?: FlexKernelConfig;
}

const ROW_FIELDS: [string, UniformType][] = [
  ["groups", "u32"],
  ["r0", "u32"],
  ["rows", "u32"],
  ["n", "u32"],
  ["s_q", "u32"],
  ["s_kv", "u32"],
];

const STRIDES = (t: string): [string, UniformType][] => [
  [`${t}_sb`, "u32"],
  [`${t}_sh`, "u32"],
  [`${t}_ss`, "u32"],
  [`${t}_sd`, "u32"],
];

const ROW_DECODE = `  let r = P.r0 + row;
  let i = r % P.s_q;
  let bh = r / P.s_q;
  let h = bh % P.n;
  let b = bh / P.n;
  let hk = h / P.group;
`;

function header(c: NaiveConfig): string {
  return c.f16 && c.dtype === "f16" ? "enable f16;\n" : "";
}

/** Pass 1: one invocation per score of the chunk. */
export function naiveScoresKernel(c: NaiveConfig): Kernel {
  const uniforms: [string, UniformType][] = [
    ...ROW_FIELDS,
    ["group", "u32"],
    ["d", "u32"],
    ["scale", "f32"],
    ["offset", "i32"],
    ["left", "i32"],
    ["right", "i32"],
    ...STRIDES("q"),
    ...STRIDES("k"),
    ["m_sb", "u32"],
    ["m_sh", "u32"],
    ["m_si", "u32"],
    ["m_sj", "u32"],
  ];
  const el = storageElement(c.dtype, c.f16);
  const bindings = ["q", "k", "scores", ...(c.mask !== "none" ? ["mask"] : [])];
  let code = header(c) + uniformBlock(uniforms);
  code += storageDecl("q", 1, el, "read") + storageDecl("k", 2, el, "read");
  code += storageDecl("scores", 3, "f32", "read_write");
  if (c.mask !== "none") code += storageDecl("mask", 4, c.mask === "bool" ? "u32" : "f32", "read");
  code += scalarLoader("q", c.dtype, c.f16) + scalarLoader("k", c.dtype, c.f16);
  let flexScore = "", flexMask = "";
  if (c.flex) {
    const decls = flexDeclarations({ ...c.flex, blockMap: false }, code + "fn main", bindings.length + 1);
    code += decls.code;
    bindings.push(...decls.bindings);
    const args = { b: "b", h: "h", q: "i", kv: "j" };
    flexScore = `    ${flexScoreStatements({ ...c.flex, maskMod: null }, "s", args, NEG_INF)}\n`;
    flexMask = `    ${flexScoreStatements({ ...c.flex, scoreMod: null }, "s", args, NEG_INF)}\n`;
  }
  code += `
@compute @workgroup_size(256)
fn main(${WORKGROUP_BUILTINS}) {
  ${LINEAR_WORKGROUP}
  let e = wg * 256u + lid;
  if (e >= P.rows * P.s_kv) { return; }
  let row = e / P.s_kv;
  let j = e % P.s_kv;
${ROW_DECODE}
  var s = ${NEG_INF};
  let rel = i32(j) - (i32(i) + P.offset);
  if (${c.band ? "rel >= -P.left && rel <= P.right" : "true"}) {
    let qb = b * P.q_sb + h * P.q_sh + i * P.q_ss;
    let kb = b * P.k_sb + hk * P.k_sh + j * P.k_ss;
    var dot = 0.0;
    for (var c = 0u; c < P.d; c++) {
      dot += ld_q(qb + c * P.q_sd) * ld_k(kb + c * P.k_sd);
    }
    s = dot * P.scale;
${flexScore}${
    c.mask === "none" ? "" : `    let mi = b * P.m_sb + h * P.m_sh + i * P.m_si + j * P.m_sj;
${
      c.mask === "bool"
        ? `    if (((mask[mi >> 2u] >> ((mi & 3u) * 8u)) & 0xffu) == 0u) { s = ${NEG_INF}; }`
        : `    s += mask[mi];`
    }
`
  }${flexMask}  }
  scores[e] = s;
}
`;
  return {
    key: `naive-scores:${c.dtype}:${c.f16}:${c.mask}:${c.band}${flexKey(c.flex)}`,
    label: "naive scores",
    code,
    bindings,
    uniforms,
  };
}

/** Pass 2: one workgroup of 64 per row; softmax in place, zeros for a fully masked row. */
export function naiveSoftmaxKernel(c: NaiveConfig): Kernel {
  const uniforms: [string, UniformType][] = [...ROW_FIELDS];
  const bindings = ["scores", ...(c.lse ? ["lse"] : []), ...(c.sinks ? ["sinks"] : [])];
  let code = uniformBlock(uniforms) + storageDecl("scores", 1, "f32", "read_write");
  if (c.lse) code += storageDecl("lse", 2, "f32", "read_write");
  if (c.sinks) code += storageDecl("sinks", bindings.length, "f32", "read");
  code += `
var<workgroup> red: array<f32, 64>;

fn reduce_max(x: f32, lid: u32) -> f32 {
  red[lid] = x;
  workgroupBarrier();
  for (var w = 32u; w > 0u; w >>= 1u) {
    if (lid < w) { red[lid] = max(red[lid], red[lid + w]); }
    workgroupBarrier();
  }
  let result = red[0];
  workgroupBarrier();
  return result;
}

fn reduce_sum(x: f32, lid: u32) -> f32 {
  red[lid] = x;
  workgroupBarrier();
  for (var w = 32u; w > 0u; w >>= 1u) {
    if (lid < w) { red[lid] = red[lid] + red[lid + w]; }
    workgroupBarrier();
  }
  let result = red[0];
  workgroupBarrier();
  return result;
}

@compute @workgroup_size(64)
fn main(${WORKGROUP_BUILTINS}) {
  ${LINEAR_WORKGROUP}
  let base = wg * P.s_kv;
  var m = ${NEG_INF};
  for (var j = lid; j < P.s_kv; j += 64u) { m = max(m, scores[base + j]); }
  m = reduce_max(m, lid);
  // A row with every key masked has m = -inf: its probabilities are all 0.
${
    c.sinks
      ? `  // The row's head's sink: one more denominator term exp(sink) with no value (-3e38 or below: none).
  let sk = max(sinks[((P.r0 + wg) / P.s_q) % P.n], -3.0e38);
  let has_sink = sk > -3.0e38;
  let live = m > -3.0e38 || has_sink;
  let mu = select(select(0.0, m, live), max(m, sk), has_sink);`
      : `  let live = m > -3.0e38;
  let mu = select(0.0, m, live);`
  }
  var sum = 0.0;
  for (var j = lid; j < P.s_kv; j += 64u) { sum += exp(scores[base + j] - mu); }
  sum = reduce_sum(sum, lid);
${
    c.sinks
      ? "  sum += select(0.0, exp(sk - mu), has_sink);\n"
      : ""
  }  let inv = select(0.0, 1.0 / sum, live && sum > 0.0);
  for (var j = lid; j < P.s_kv; j += 64u) { scores[base + j] = exp(scores[base + j] - mu) * inv; }
${
    // A NaN sum (from a NaN score) gives a NaN lse, not the -inf of a row with nothing to attend,
    // so that a merge cannot drop the row. NaN tested by its bits: comparisons with NaN are not
    // reliable across compilers.
    c.lse
      ? `  let nan_sum = (bitcast<u32>(sum) & 0x7fffffffu) > 0x7f800000u;
  if (lid == 0u) { lse[P.r0 + wg] = select(select(${NEG_INF}, mu + log(sum), live && sum > 0.0), sum, nan_sum); }\n`
      : ""}}
`;
  return {
    key: `naive-softmax:${c.lse}${c.sinks ? ":sk" : ""}`,
    label: "naive softmax",
    code,
    bindings,
    uniforms,
  };
}

/** Pass 3: one invocation per output element (or packed pair of 16-bit elements). */
export function naiveValuesKernel(c: NaiveConfig): Kernel {
  const uniforms: [string, UniformType][] = [
    ...ROW_FIELDS,
    ["group", "u32"],
    ["d_v", "u32"],
    ...STRIDES("v"),
    ...STRIDES("o"),
  ];
  const el = storageElement(c.dtype, c.f16);
  const outEl = c.packedOut ? "u32" : el;
  const per = c.packedOut ? 2 : 1;
  let code = header(c) + uniformBlock(uniforms);
  code += storageDecl("scores", 1, "f32", "read") + storageDecl("v", 2, el, "read");
  code += storageDecl("o", 3, outEl, "read_write") + scalarLoader("v", c.dtype, c.f16);
  if (c.packedOut && c.dtype === "bf16") code += BF16_PACK;
  // A key with zero weight (masked) adds nothing, even where v holds NaN or Inf (0 * NaN is NaN).
  const dot = (col: string, name: string) => `
  var ${name} = 0.0;
  for (var j = 0u; j < P.s_kv; j++) {
    let w = scores[sb + j];
    ${name} += select(w * ld_v(vb + j * P.v_ss + ${col} * P.v_sd), 0.0, w == 0.0);
  }`;
  const store = c.packedOut
    ? `  o[ob >> 1u] = ${packPair(c.dtype, "acc0", "acc1")};`
    : `  o[ob] = ${el === "f32" ? "acc0" : `${el}(acc0)`};`;
  code += `
@compute @workgroup_size(64)
fn main(${WORKGROUP_BUILTINS}) {
  ${LINEAR_WORKGROUP}
  let per_row = (P.d_v + ${per - 1}u) / ${per}u;
  let e = wg * 64u + lid;
  if (e >= P.rows * per_row) { return; }
  let row = e / per_row;
  let col = (e % per_row) * ${per}u;
${ROW_DECODE}
  let sb = row * P.s_kv;
  let vb = b * P.v_sb + hk * P.v_sh;
${dot("col", "acc0")}${c.packedOut ? dot("(col + 1u)", "acc1") : ""}
  let ob = b * P.o_sb + h * P.o_sh + i * P.o_ss + col * P.o_sd;
${store}
}
`;
  return {
    key: `naive-values:${c.dtype}:${c.f16}:${c.packedOut}`,
    label: "naive values",
    code,
    bindings: ["scores", "v", "o"],
    uniforms,
  };
}
