/**
 * Kernels of the `split-kv` backend (flash-decoding), generated as straight-line WGSL.
 *
 * Pass 1 (`splitKvKernel`): one workgroup per (batch, kv head, block of query rows, key chunk).
 * The query rows of a kv head are every (query position i, query head of its GQA group) pair,
 * flattened i-major (`r = i * group + hl`), so all query heads sharing a K/V head are served by one
 * read of K and V. The workgroup's threads form `threads / lanes` key groups of `lanes` lanes:
 * lane `l` of a key group owns head-dim vectors `l + lanes * g` (vector loads of 4 or 8 elements
 * along d, so one key row is read by consecutive lanes, coalesced). Each step a key group takes
 * `unroll` consecutive keys: it loads their K and V rows, forms partial dot products with the
 * query rows held in registers (pre-scaled by `scale * log2(e)`), sums them across its lanes
 * (subgroup shuffles, or workgroup memory without subgroups), and updates its online softmax
 * (running max `m`, sum `l`, output accumulators). At the end the key groups are combined in
 * workgroup memory and the chunk's normalised partial output (f32) and log-sum-exp go to scratch.
 *
 * Pass 2 (`splitKvCombineKernel`): one workgroup per output row merges the chunks' partials by
 * their log-sum-exp (each thread a strided subset as an online merge, then the subsets in workgroup
 * memory) and writes the output in its layout and dtype (and the row's lse).
 *
 * Packed batches (`varlen`): the batch index of pass 1 is the sequence, its rows and keys found
 * through the offsets `cuq`, `cuk`; the partials are laid out by packed row, so pass 2 serves them
 * unchanged with b = 1 and s_q = total_q (output `[total_q, n, dV]`, lse `[n, total_q]`).
 */
import type { DType } from "../core/types.ts";
import { flexDeclarations, type FlexKernelConfig, flexKey } from "./flex.ts";
import { sequenceRange } from "./serving.ts";
import {
  BF16_PACK,
  isMinusInfExpr,
  isNanExpr,
  type Kernel,
  NEG_INF,
  uniformBlock,
  type UniformType,
} from "./common.ts";

/** Everything that changes the split-kv kernel's text. */
export interface SplitKvConfig {
  dtype: DType;
  /** f16 tensors as `array<vec4<f16>>` (shader-f16); otherwise 16-bit values travel in u32 words. */
  f16: boolean;
  /** Elements per vector load along d: 4, or 8 for 16-bit values in `vec4<u32>` words. */
  vw: 4 | 8;
  /** Head dim of q and k. */
  d: number;
  /** Head dim of v and the output. */
  dV: number;
  /** Query rows (of the GQA group x s_q) per workgroup. */
  rows: number;
  /** Lanes sharing one key (a power of two, at most the subgroup size when subgroups are used). */
  lanes: number;
  /** Threads per workgroup (a multiple of lanes; threads / lanes a power of two). */
  threads: number;
  /** Keys each key group takes per step. */
  unroll: number;
  /** Causal or window limits apply. */
  band: boolean;
  /** A key-padding mask (bool bytes, `[b, s_kv]` with strides) applies. */
  keyPadding: boolean;
  /** Lane sums by subgroup shuffles ("" or the directive WGSL needs), or false: workgroup memory. */
  subgroups: false | "" | "enable subgroups;\n";
  /** Flex: score_mod on each score, mask_mod as one more mask (no block map: decode steps). */
  flex?: FlexKernelConfig;
  /**
   * Paged K/V with this page size (a multiple of 16): bindings `tbl` (i32 [b, max_pages]) and
   * `cache_len` (i32 [b]); each batch attends its own length, its band aligned bottom-right to it.
   */
  page?: number;
  /**
   * Steps ahead whose K and V rows are loaded into registers (0, 1 or 2): the loads are in flight
   * while the steps before compute (WGSL has no asynchronous copies). (Paged, reading the table
   * entries one step before their rows measured slower on the H200: they are read with the rows.)
   */
  prefetch?: 0 | 1 | 2;
  /**
   * Packed batch: bindings `cuq`, `cuk` (i32 offsets, seqs + 1 each; uniforms `seqs`, `s_kv`). The
   * dispatch's batch index is the sequence: its query rows `[cuq[s], cuq[s + 1])` and keys
   * `[cuk[s], cuk[s + 1])` (offsets clamped into the tensors), its band aligned bottom-right within
   * it. `rows` (uniform) is the capacity (group x the longest sequence, or a bound of it): row blocks
   * and rows past a sequence's own do nothing, chunks past its keys write empty partials (lse -inf).
   * Partials are laid out by packed row, `(h * s_q + cq0 + i)`, as the combine pass reads them with
   * b = 1 and s_q = total_q. No key padding, flex or paged K/V.
   */
  varlen?: boolean;
}

/** Derived sizes of a config. */
export function splitKvShape(c: SplitKvConfig) {
  const qw = c.vw / 4; // vec4<f32> quads per loaded vector
  const dvec = c.d / c.vw, dvecV = c.dV / c.vw;
  const g = Math.ceil(dvec / c.lanes), gv = Math.ceil(dvecV / c.lanes);
  const kg = c.threads / c.lanes; // key groups
  const step = kg * c.unroll; // keys per step of the workgroup
  const dq = c.lanes * gv * qw; // accumulator quads per row, padded
  const scoresPerLane = c.rows * c.unroll;
  const sharedBytes = (kg > 1 ? (kg / 2) * c.rows * dq * 16 + kg * c.rows * 8 : 0) +
    (c.subgroups === false ? c.threads * scoresPerLane * 4 : 0);
  /** Registers per lane for q and the accumulators, in f32. */
  const registers = c.rows * (g + gv) * c.vw;
  return { qw, dvec, dvecV, g, gv, kg, step, dq, sharedBytes, registers };
}

/** Why a config is not valid for a device with these limits (empty when valid). */
export function splitKvConfigProblems(
  c: SplitKvConfig,
  limits: { storage: number; invocations: number; subgroupSize: number },
): string[] {
  const s = splitKvShape(c);
  const problems: string[] = [];
  const pow2 = (x: number) => Number.isInteger(x) && x >= 1 && (x & (x - 1)) === 0;
  if (c.d % c.vw !== 0 || c.dV % c.vw !== 0) problems.push(`head dims must be multiples of ${c.vw}`);
  if (c.vw === 8 && c.dtype === "f32") problems.push("8-wide loads are for 16-bit types");
  if (c.f16 && c.dtype !== "f16") problems.push("f16 storage is for f16 tensors");
  if (c.f16 && c.vw !== 4) problems.push("f16 storage loads 4 values at a time");
  if (!pow2(c.lanes) || !pow2(s.kg)) problems.push("lanes and key groups must be powers of two");
  if (c.subgroups !== false && c.lanes > limits.subgroupSize) {
    problems.push(`${c.lanes} lanes > subgroup size ${limits.subgroupSize}`);
  }
  if (c.threads > limits.invocations) problems.push(`${c.threads} threads > ${limits.invocations}`);
  if (s.sharedBytes > limits.storage) {
    problems.push(`${s.sharedBytes} B workgroup memory > ${limits.storage}`);
  }
  if (c.rows < 1 || c.unroll < 1) problems.push("rows and unroll must be >= 1");
  return problems;
}

/** Uniform fields of the split-kv kernel. */
const UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["n", "u32"],
  ["n_kv", "u32"],
  ["group", "u32"],
  ["s_q", "u32"],
  ["rows", "u32"],
  ["row_blocks", "u32"],
  ["splits", "u32"],
  ["chunk", "u32"],
  ["j_start", "u32"],
  ["j_end", "u32"],
  ["scale_log2", "f32"],
  ["offset", "i32"],
  ["left", "i32"],
  ["right", "i32"],
  // Strides of q, k, v in vector units (b, head, s); d is contiguous.
  ["q_sb", "u32"],
  ["q_sh", "u32"],
  ["q_ss", "u32"],
  ["k_sb", "u32"],
  ["k_sh", "u32"],
  ["k_ss", "u32"],
  ["v_sb", "u32"],
  ["v_sh", "u32"],
  ["v_ss", "u32"],
  // Key-padding mask strides in bytes (b, key).
  ["m_sb", "u32"],
  ["m_sj", "u32"],
];

function storageVec(c: { dtype: DType; f16: boolean; vw: number }): string {
  if (c.dtype === "f32") return "vec4<f32>";
  if (c.f16) return "vec4<f16>";
  return c.vw === 8 ? "vec4<u32>" : "vec2<u32>";
}

/** WGSL expressions of the vec4<f32> quads held by the loaded vector `x`. */
function quads(c: SplitKvConfig, x: string): string[] {
  if (c.dtype === "f32") return [x];
  if (c.f16) return [`vec4<f32>(${x})`];
  const words = c.vw === 8 ? [["x", "y"], ["z", "w"]] : [["x", "y"]];
  if (c.dtype === "f16") {
    return words.map(([a, b]) => `vec4<f32>(unpack2x16float(${x}.${a}), unpack2x16float(${x}.${b}))`);
  }
  return words.map(([a, b]) =>
    `vec4<f32>(bitcast<f32>(${x}.${a} << 16u), bitcast<f32>(${x}.${a} & 0xffff0000u), ` +
    `bitcast<f32>(${x}.${b} << 16u), bitcast<f32>(${x}.${b} & 0xffff0000u))`
  );
}

/** A stable cache key for a config. */
export function splitKvKey(c: SplitKvConfig): string {
  return `splitkv:${c.dtype}:${c.f16}:v${c.vw}:d${c.d}/${c.dV}:r${c.rows}:l${c.lanes}:t${c.threads}:` +
    `u${c.unroll}:${c.band}:${c.keyPadding}:${c.subgroups === false ? "wg" : "sg"}${
      c.page ? `:pg${c.page}` : ""
    }${c.prefetch ? `:pf${c.prefetch}` : ""}${c.varlen ? ":vl" : ""}${flexKey(c.flex)}`;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/** Sums of terms as a balanced expression (shorter dependency chains than a left fold). */
function sum(terms: string[]): string {
  if (terms.length === 1) return terms[0];
  const mid = Math.ceil(terms.length / 2);
  return `(${sum(terms.slice(0, mid))} + ${sum(terms.slice(mid))})`;
}

/** Generates pass 1 for `c`. Bindings: q, k, v, partial outputs, partial lse, [mask]. */
export function splitKvKernel(c: SplitKvConfig): Kernel {
  const s = splitKvShape(c);
  const { qw, dvec, dvecV, g: G, gv: GV, kg: KG, step, dq } = s;
  const L = c.lanes, R = c.rows, U = c.unroll, T = c.threads;
  const out: string[] = [];
  const emit = (line: string) => out.push(line);

  if (c.varlen && (c.page || c.keyPadding || c.flex)) {
    throw new Error("split-kv: packed batches take no key padding, flex functions or paged K/V");
  }
  if (c.subgroups) emit(c.subgroups);
  if (c.f16) emit("enable f16;");
  const uniforms: [string, UniformType][] = c.page
    ? [...UNIFORMS, ["max_pages", "u32"], ["num_pages", "u32"]]
    : c.varlen
    ? [...UNIFORMS, ["seqs", "u32"], ["s_kv", "u32"]]
    : UNIFORMS;
  emit(uniformBlock(uniforms));
  const el = storageVec(c);
  emit(`@group(0) @binding(1) var<storage, read> q: array<${el}>;`);
  emit(`@group(0) @binding(2) var<storage, read> k: array<${el}>;`);
  emit(`@group(0) @binding(3) var<storage, read> v: array<${el}>;`);
  emit(`@group(0) @binding(4) var<storage, read_write> po: array<vec4<f32>>;`);
  emit(`@group(0) @binding(5) var<storage, read_write> plse: array<f32>;`);
  const bindings = ["q", "k", "v", "po", "plse"];
  if (c.keyPadding) {
    emit(`@group(0) @binding(6) var<storage, read> mask: array<u32>;`);
    bindings.push("mask");
  }
  if (c.page) {
    // Read-only storage: the lengths read at uniform indices are uniform (loop bounds below).
    emit(`@group(0) @binding(${bindings.length + 1}) var<storage, read> tbl: array<i32>;`);
    emit(`@group(0) @binding(${bindings.length + 2}) var<storage, read> cache_len: array<i32>;`);
    bindings.push("tbl", "cache_len");
    // The row of the page pool holding key `key` of batch `bb`; table entries clamped to the pool.
    emit(`fn page_row(bb: u32, key: u32) -> u32 {
  let pg = u32(clamp(tbl[bb * P.max_pages + key / ${c.page}u], 0i, i32(P.num_pages) - 1i));
  return pg * ${c.page}u + key % ${c.page}u;
}`);
  }
  if (c.varlen) {
    // Read-only storage: the offsets read at uniform indices are uniform (loop bounds below).
    emit(`@group(0) @binding(${bindings.length + 1}) var<storage, read> cuq: array<i32>;`);
    emit(`@group(0) @binding(${bindings.length + 2}) var<storage, read> cuk: array<i32>;`);
    bindings.push("cuq", "cuk");
  }
  if (KG > 1) {
    emit(`var<workgroup> sm_ml: array<vec2<f32>, ${KG * R}>;`);
    emit(`var<workgroup> sm_acc: array<vec4<f32>, ${(KG / 2) * R * dq}>;`);
  }
  if (c.subgroups === false) emit(`var<workgroup> red: array<f32, ${T * R * U}>;`);
  emit(`const NEG: f32 = -3.0e38;`);
  emit(`const LN2: f32 = 0.6931471805599453;`);
  emit(`@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
  let rb = wg % P.row_blocks;
  let t1 = wg / P.row_blocks;
  let split = t1 % P.splits;
  let bhk = t1 / P.splits;
  let hk = bhk % P.n_kv;
  let b = bhk / P.n_kv;
  let lane = lid % ${L}u;
  let kg = lid / ${L}u;
  let r0 = rb * ${R}u;
  let c0 = P.j_start + split * P.chunk;
${
    c.page
      ? `  // Each batch attends its own cache length, clamped into its table's span.
  let skv_ = u32(clamp(cache_len[b], 0i, i32(P.max_pages * ${c.page}u)));
  let off_ = i32(skv_) - i32(P.s_q);
  let c1 = min(min(c0 + P.chunk, P.j_end), skv_);`
      : c.varlen
      ? `  // Sequence b's query rows and keys, the offsets clamped into the tensors.
  if (b >= P.seqs) { return; }
${sequenceRange()}  // Its rows, at most the dispatch's capacity: row blocks past them have nothing to do.
  let rows_ = min(sq_ * P.group, P.rows);
  if (r0 >= rows_) { return; }
  let off_ = i32(skv_) - i32(sq_);
  let c1 = min(min(c0 + P.chunk, P.j_end), skv_);`
      : `  let off_ = P.offset;
  let c1 = min(c0 + P.chunk, P.j_end);`
  }`);
  // The rows of this call (packed: of this sequence).
  const rowsOf = c.varlen ? "rows_" : "P.rows";
  for (const r of range(R)) {
    emit(`  let ra${r} = min(r0 + ${r}u, ${rowsOf} - 1u);
  let i${r} = ra${r} / P.group;
  let h${r} = hk * P.group + ra${r} % P.group;`);
  }
  emit(`  var k_lo = i32(c0);
  var k_hi = i32(c1);`);
  if (c.band) {
    emit(`  k_lo = max(k_lo, i32(i0) + off_ - P.left);
  k_hi = min(k_hi, i32(min(r0 + ${R - 1}u, ${rowsOf} - 1u) / P.group) + off_ + P.right + 1i);`);
  }
  emit(`  let nsteps = select(0u, u32(k_hi - k_lo + ${step - 1}i) / ${step}u, k_hi > k_lo);`);

  // Query rows in registers, pre-scaled into the log2 domain.
  const col = (
    g: number,
    n: number,
  ) => (L * (g + 1) > n ? `min(lane + ${L * g}u, ${n - 1}u)` : `lane + ${L * g}u`);
  for (const r of range(R)) {
    emit(
      c.varlen
        ? `  let qb${r} = h${r} * P.q_sh + (cq0 + i${r}) * P.q_ss;`
        : `  let qb${r} = b * P.q_sb + h${r} * P.q_sh + i${r} * P.q_ss;`,
    );
    for (const g of range(G)) {
      emit(`  let qr${r}_${g} = q[qb${r} + ${col(g, dvec)}];`);
      const live = L * (g + 1) > dvec
        ? `select(0.0, P.scale_log2, lane + ${L * g}u < ${dvec}u)`
        : "P.scale_log2";
      quads(c, `qr${r}_${g}`).forEach((e, w) => emit(`  let q${r}_${g}_${w} = ${e} * ${live};`));
    }
    emit(`  var m${r} = NEG;`);
    emit(`  var l${r} = 0.0;`);
    for (const g of range(GV)) for (const w of range(qw)) emit(`  var o${r}_${g}_${w} = vec4<f32>(0.0);`);
  }
  if (c.varlen) {
    // The sequence's first key row, kept inside k and v: with no keys (nothing attended) prefetched
    // loads still read key 0.
    emit(`  let kb0_ = min(ck0, max(P.s_kv, 1u) - 1u);
  let k_base = hk * P.k_sh + kb0_ * P.k_ss;
  let v_base = hk * P.v_sh + kb0_ * P.v_ss;`);
  } else {
    emit(`  let k_base = ${c.page ? "hk * P.k_sh" : "b * P.k_sb + hk * P.k_sh"};
  let v_base = ${c.page ? "hk * P.v_sh" : "b * P.v_sb + hk * P.v_sh"};`);
  }
  // The row of the pool (or cache) holding key `kc`; the key clamped into [0, k_hi) first.
  const row = (kc: string) => (c.page ? `page_row(b, ${kc})` : kc);
  const loads = (decl: string, suffix: string, rowOf: (u: number) => string) => {
    for (const u of range(U)) {
      for (const g of range(G)) {
        emit(`    ${decl}kr${u}_${g}${suffix} = k[k_base + ${rowOf(u)} * P.k_ss + ${col(g, dvec)}];`);
      }
    }
    for (const u of range(U)) {
      for (const g of range(GV)) {
        emit(`    ${decl}vr${u}_${g}${suffix} = v[v_base + ${rowOf(u)} * P.v_ss + ${col(g, dvecV)}];`);
      }
    }
  };
  // Paged without a band, a key group's U keys of a step start at a multiple of U (chunks are whole
  // steps), so they lie in one page: one table read for all U (a read and its index arithmetic per
  // key measured 9% of the paged kernel's time on the H200). A last group past k_hi reads the rest
  // of its page (inside the pool); those keys are masked.
  const onePage = c.page !== undefined && !c.band;
  const pageRows = (indent: string, name: string, first: string) => {
    emit(`${indent}let ${name} = page_row(b, u32(max(min(${first}, k_hi - 1i), 0i)) & ${~(U - 1) >>> 0}u);`);
    return (u: number) => (u === 0 ? name : `(${name} + ${u}u)`);
  };
  if (c.prefetch) {
    // Rows of steps st+1 .. st+D in registers (sets n0 .. n{D-1}); each step takes set n0, shifts
    // the others down and starts the loads of step st+D into the last.
    const D = c.prefetch;
    const key = (ahead: number, u: number) => `u32(max(min(j0 + ${ahead * step + u}i, k_hi - 1i), 0i))`;
    emit(`  var j0 = k_lo + i32(kg * ${U}u);`);
    for (let a = 0; a < D; a++) {
      if (onePage) {
        loads("var ", `n${a}`, pageRows("  ", `kp${a}`, `j0 + ${a * step}i`));
        continue;
      }
      for (const u of range(U)) emit(`  let kp${a}_${u} = ${row(key(a, u))};`);
      loads("var ", `n${a}`, (u) => `kp${a}_${u}`);
    }
    emit(`  for (var st = 0u; st < nsteps; st++) {`);
    for (const u of range(U)) {
      emit(`    let key${u} = j0 + ${u}i;
    let kc${u} = u32(min(key${u}, k_hi - 1i));`);
    }
    for (const u of range(U)) {
      for (const g of range(G)) emit(`    let kr${u}_${g} = kr${u}_${g}n0;`);
      for (const g of range(GV)) emit(`    let vr${u}_${g} = vr${u}_${g}n0;`);
    }
    for (let a = 1; a < D; a++) {
      for (const u of range(U)) {
        for (const g of range(G)) emit(`    kr${u}_${g}n${a - 1} = kr${u}_${g}n${a};`);
        for (const g of range(GV)) emit(`    vr${u}_${g}n${a - 1} = vr${u}_${g}n${a};`);
      }
    }
    if (onePage) loads("", `n${D - 1}`, pageRows("    ", "kn", `j0 + ${D * step}i`));
    else {
      for (const u of range(U)) emit(`    let kn${u} = ${row(key(D, u))};`);
      loads("", `n${D - 1}`, (u) => `kn${u}`);
    }
    emit(`    j0 += ${step}i;`);
  } else {
    emit(`  for (var st = 0u; st < nsteps; st++) {
    let j0 = k_lo + i32(st * ${step}u + kg * ${U}u);`);
    for (const u of range(U)) {
      emit(`    let key${u} = j0 + ${u}i;
    let kc${u} = u32(min(key${u}, k_hi - 1i));`);
      if (!onePage) emit(`    let kr${u} = ${row(`kc${u}`)};`);
    }
    // Every load of the step first, so they are in flight together.
    loads("let ", "", onePage ? pageRows("    ", "kr", "j0") : (u) => `kr${u}`);
  }
  if (c.keyPadding) {
    for (const u of range(U)) {
      emit(`    let mi${u} = b * P.m_sb + kc${u} * P.m_sj;
    let mk${u} = ((mask[mi${u} >> 2u] >> ((mi${u} & 3u) * 8u)) & 0xffu) != 0u;`);
    }
  }
  // Partial scores over this lane's slice of d.
  for (const u of range(U)) {
    for (const g of range(G)) {
      quads(c, `kr${u}_${g}`).forEach((e, w) => emit(`    let k${u}_${g}_${w} = ${e};`));
    }
    for (const r of range(R)) {
      const terms = range(G).flatMap((g) => range(qw).map((w) => `dot(q${r}_${g}_${w}, k${u}_${g}_${w})`));
      emit(`    var s${r}_${u} = ${sum(terms)};`);
    }
  }
  // Sum across the key group's lanes.
  if (L > 1) {
    if (c.subgroups !== false) {
      for (let w = L / 2; w >= 1; w /= 2) {
        for (const r of range(R)) {
          for (const u of range(U)) emit(`    s${r}_${u} += subgroupShuffleXor(s${r}_${u}, ${w}u);`);
        }
      }
    } else {
      const nv = R * U;
      for (const r of range(R)) {
        for (const u of range(U)) emit(`    red[lid * ${nv}u + ${r * U + u}u] = s${r}_${u};`);
      }
      emit(`    workgroupBarrier();`);
      for (const r of range(R)) {
        for (const u of range(U)) {
          const terms = range(L).map((l) => `red[(kg * ${L}u + ${l}u) * ${nv}u + ${r * U + u}u]`);
          emit(`    s${r}_${u} = ${sum(terms)};`);
        }
      }
      emit(`    workgroupBarrier();`);
    }
  }
  // Masks: keys past the range, key padding, the causal/window band. Whether row r attends key u
  // is the boolean a{r}_{u}, never a comparison of the score: a NaN score must stay NaN (a NaN q
  // row gives a NaN output row), while a masked key weighs exactly 0 and its v (clamped or padded,
  // maybe NaN) is replaced by zeros, since 0 * NaN would leak it into rows that do not attend it.
  for (const u of range(U)) {
    emit(`    let ok${u} = key${u} < k_hi${c.keyPadding ? ` && mk${u}` : ""};`);
  }
  for (const r of range(R)) {
    if (c.band) emit(`    let d${r} = i32(i${r}) + off_;`);
    for (const u of range(U)) {
      const band = c.band ? ` && key${u} - d${r} >= -P.left && key${u} - d${r} <= P.right` : "";
      // score_mod in natural-log units (q was pre-scaled into log2 units).
      if (c.flex?.scoreMod) {
        emit(`    s${r}_${u} = score_mod(s${r}_${u} * LN2, b, h${r}, i${r}, kc${u}) * ${Math.LOG2E};`);
      }
      const flexMask = c.flex?.maskMod ? ` && mask_mod(b, h${r}, i${r}, kc${u})` : "";
      emit(`    let a${r}_${u} = ok${u}${band}${flexMask};`);
      emit(`    s${r}_${u} = select(NEG, s${r}_${u}, a${r}_${u});`);
    }
  }
  // Online softmax.
  for (const u of range(U)) {
    for (const g of range(GV)) {
      quads(c, `vr${u}_${g}`).forEach((e, w) =>
        emit(`    let v${u}_${g}_${w} = select(vec4<f32>(0.0), ${e}, ok${u});`)
      );
    }
  }
  for (const r of range(R)) {
    let mx = `s${r}_0`;
    for (const u of range(U).slice(1)) mx = `max(${mx}, s${r}_${u})`;
    emit(`    let mn${r} = max(m${r}, ${mx});
    let al${r} = exp2(m${r} - mn${r});
    m${r} = mn${r};`);
    for (const u of range(U)) {
      emit(`    let p${r}_${u} = select(0.0, exp2(s${r}_${u} - mn${r}), a${r}_${u});`);
    }
    emit(`    l${r} = l${r} * al${r} + ${sum(range(U).map((u) => `p${r}_${u}`))};`);
    for (const g of range(GV)) {
      for (const w of range(qw)) {
        let e = `o${r}_${g}_${w} * al${r}`;
        for (const u of range(U)) {
          // Keys outside row r's band (the same key may be inside another row's) add nothing.
          const vv = c.band ? `select(vec4<f32>(0.0), v${u}_${g}_${w}, a${r}_${u})` : `v${u}_${g}_${w}`;
          e = `fma(vec4<f32>(p${r}_${u}), ${vv}, ${e})`;
        }
        emit(`    o${r}_${g}_${w} = ${e};`);
      }
    }
  }
  emit(`  }`);

  // Combine the key groups of the workgroup.
  if (KG > 1) {
    emit(`  if (lane == 0u) {`);
    for (const r of range(R)) emit(`    sm_ml[kg * ${R}u + ${r}u] = vec2<f32>(m${r}, l${r});`);
    emit(`  }
  workgroupBarrier();`);
    // Loops over the key groups, not straight-line code: they run once per workgroup, and spelled
    // out they grew as rows x key groups (3,000 terms at d = 4: a minute of compiling on lavapipe).
    for (const r of range(R)) emit(`  var mt${r} = NEG;\n  var lt${r} = 0.0;`);
    emit(`  for (var x = 0u; x < ${KG}u; x++) {`);
    for (const r of range(R)) emit(`    mt${r} = max(mt${r}, sm_ml[x * ${R}u + ${r}u].x);`);
    emit(`  }
  for (var x = 0u; x < ${KG}u; x++) {`);
    for (const r of range(R)) {
      emit(`    let e${r} = sm_ml[x * ${R}u + ${r}u];\n    lt${r} += e${r}.y * exp2(e${r}.x - mt${r});`);
    }
    emit(`  }`);
    for (const r of range(R)) {
      emit(`  let f${r} = exp2(m${r} - mt${r});`);
      for (const g of range(GV)) for (const w of range(qw)) emit(`  o${r}_${g}_${w} *= f${r};`);
    }
    const slot = (base: string, r: number, g: number, w: number) =>
      `sm_acc[(${base} * ${R}u + ${r}u) * ${dq}u + (lane + ${L * g}u) * ${qw}u + ${w}u]`;
    // A loop of halving rounds, not one spelled out per round: each barrier is a suspension point
    // on CPU adapters (lavapipe), where every one spelled out costs compile time in proportion to
    // the live accumulators (16 key groups, 8 rows: 7 s to compile, against 1 s without).
    emit(`  for (var half = ${KG / 2}u; half >= 1u; half = half >> 1u) {
    if (kg >= half && kg < 2u * half) {`);
    for (const r of range(R)) {
      for (const g of range(GV)) {
        for (const w of range(qw)) emit(`      ${slot("(kg - half)", r, g, w)} = o${r}_${g}_${w};`);
      }
    }
    emit(`    }
    workgroupBarrier();
    if (kg < half) {`);
    for (const r of range(R)) {
      for (const g of range(GV)) {
        for (const w of range(qw)) emit(`      o${r}_${g}_${w} += ${slot("kg", r, g, w)};`);
      }
    }
    emit(`    }
    workgroupBarrier();
  }`);
  } else {
    for (const r of range(R)) emit(`  let mt${r} = m${r};\n  let lt${r} = l${r};`);
  }

  // Key group 0 writes the chunk's normalised partial output and log-sum-exp.
  const dqv = c.dV / 4;
  emit(`  if (kg == 0u) {`);
  for (const r of range(R)) {
    emit(`    if (r0 + ${r}u < ${rowsOf}) {
      let slot = ${
      c.varlen ? `(h${r} * P.s_q + cq0 + i${r})` : `((b * P.n + h${r}) * P.s_q + i${r})`
    } * P.splits + split;
      let inv = select(0.0, 1.0 / lt${r}, lt${r} > 0.0);`);
    for (const g of range(GV)) {
      for (const w of range(qw)) {
        const colq = `(lane + ${L * g}u) * ${qw}u + ${w}u`;
        const guard = L * (g + 1) > dvecV ? `if (lane + ${L * g}u < ${dvecV}u) ` : "";
        emit(`      ${guard}{ po[slot * ${dqv}u + ${colq}] = o${r}_${g}_${w} * inv; }`);
      }
    }
    emit(`      if (lane == 0u) {
        plse[slot] = select(select(${NEG_INF}, (mt${r} + log2(lt${r})) * LN2, lt${r} > 0.0), lt${r}, ${
      isNanExpr(`lt${r}`)
    });
      }
    }`);
  }
  emit(`  }
}`);
  if (c.flex) {
    const decls = flexDeclarations({ ...c.flex, blockMap: false }, out.join("\n"), bindings.length + 1);
    emit(decls.code);
    bindings.push(...decls.bindings);
  }
  return {
    key: splitKvKey(c),
    label: `split-kv ${splitKvKey({ ...c, flex: undefined })}${c.flex ? " flex" : ""}`,
    code: out.join("\n") + "\n",
    bindings,
    uniforms,
  };
}

/** What changes the combine kernel's text. */
export interface SplitKvCombineConfig {
  dtype: DType;
  /** f16 output as `array<vec4<f16>>` (shader-f16); otherwise packed u32 pairs. */
  f16: boolean;
  dV: number;
  lse: boolean;
  /** Attention sinks: binding `sinks` (f32 [n]), one more denominator term per row. */
  sinks?: boolean;
}

const COMBINE_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["n", "u32"],
  ["s_q", "u32"],
  ["splits", "u32"],
  // Output strides in units of 4 elements (b, head, s); d is contiguous.
  ["o_sb", "u32"],
  ["o_sh", "u32"],
  ["o_ss", "u32"],
];

/** Threads of the combine kernel. */
export const COMBINE_THREADS = 128;

/** Chunks whose loads each combine thread issues together. */
const COMBINE_IN_FLIGHT = 8;

/** Generates pass 2. Bindings: partial outputs, partial lse, output, [lse]. */
export function splitKvCombineKernel(c: SplitKvCombineConfig): Kernel {
  const T = COMBINE_THREADS;
  const cw = c.dV / 4; // output quads per row
  const subs = Math.max(1, Math.floor(T / cw));
  const outEl = c.dtype === "f32" ? "vec4<f32>" : c.f16 ? "vec4<f16>" : "vec2<u32>";
  const store = (x: string) => {
    if (c.dtype === "f32") return x;
    if (c.f16) return `vec4<f16>(${x})`;
    if (c.dtype === "f16") return `vec2<u32>(pack2x16float(${x}.xy), pack2x16float(${x}.zw))`;
    return `vec2<u32>(pack_bf16(${x}.x, ${x}.y), pack_bf16(${x}.z, ${x}.w))`;
  };
  const L: string[] = [];
  if (c.f16) L.push("enable f16;");
  L.push(uniformBlock(COMBINE_UNIFORMS));
  L.push(`@group(0) @binding(1) var<storage, read> po: array<vec4<f32>>;`);
  L.push(`@group(0) @binding(2) var<storage, read> plse: array<f32>;`);
  L.push(`@group(0) @binding(3) var<storage, read_write> o: array<${outEl}>;`);
  const bindings = ["po", "plse", "o"];
  if (c.lse) {
    L.push(`@group(0) @binding(4) var<storage, read_write> lse: array<f32>;`);
    bindings.push("lse");
  }
  if (c.sinks) {
    L.push(`@group(0) @binding(${bindings.length + 1}) var<storage, read> sinks: array<f32>;`);
    bindings.push("sinks");
  }
  if (c.dtype === "bf16" && !c.f16) L.push(BF16_PACK);
  const G = COMBINE_IN_FLIGHT;
  const NEG = "-3.0e38";
  // Each thread merges its own chunks (c = sub, sub + subs, ...) as an online softmax merge, with
  // G chunks' loads issued before their math, so a row of up to subs * G chunks costs one memory
  // round trip; then the subs partial merges of a column meet in workgroup memory (one barrier).
  const loads = range(G).map((g) =>
    `      let c${g} = c0 + ${g * subs}u;
      let ok${g} = c${g} < P.splits;
      let cc${g} = base + min(c${g}, P.splits - 1u);
      let x${g} = select(${NEG}, plse[cc${g}], ok${g});
      let v${g} = po[cc${g} * ${cw}u + col];`
  ).join("\n");
  const merges = range(G).map((g) =>
    `      {
        let mn = max(m, x${g});
        let keep = exp(m - mn);
        let w = select(0.0, exp(x${g} - mn), ok${g} && !${isMinusInfExpr(`x${g}`)});
        l = l * keep + w;
        acc = acc * keep + w * v${g};
        m = mn;
      }`
  ).join("\n");
  L.push(`var<workgroup> pm: array<f32, ${subs * cw}>;
var<workgroup> pl: array<f32, ${subs * cw}>;
var<workgroup> pacc: array<vec4<f32>, ${subs * cw}>;
@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let rg = wid.x + wid.y * nwg.x;
  if (rg >= P.groups) { return; }
  let base = rg * P.splits;
  let col = lid % ${cw}u;
  let sub = lid / ${cw}u;
  if (sub < ${subs}u) {
    var m = ${NEG};
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var c0 = sub; c0 < P.splits; c0 += ${subs * G}u) {
${loads}
${merges}
    }
    pm[lid] = m;
    pl[lid] = l;
    pacc[lid] = acc;
  }
  workgroupBarrier();
  let i = rg % P.s_q;
  let bh = rg / P.s_q;
  let h = bh % P.n;
  let b = bh / P.n;
  if (lid < ${cw}u) {
    // Loops over the subsets (once per row), not straight-line code: spelled out they grew as
    // 128 / (d / 4) blocks, 128 at d = 4.
    var mx = ${NEG};
    for (var u = 0u; u < ${subs}u; u++) { mx = max(mx, pm[u * ${cw}u + lid]); }
${
    c.sinks
      ? `    // The sink joins the merge as one more term exp(sink) with no value (NEG or below: none).
    let sk = max(sinks[h], ${NEG});
    mx = max(mx, sk);
`
      : ""
  }    var sum = ${c.sinks ? `select(exp(sk - mx), 0.0, sk <= ${NEG})` : "0.0"};
    var x = vec4<f32>(0.0);
    for (var u = 0u; u < ${subs}u; u++) {
      let e = exp(pm[u * ${cw}u + lid] - mx);
      sum += pl[u * ${cw}u + lid] * e;
      x += pacc[u * ${cw}u + lid] * e;
    }
    let y = x * select(0.0, 1.0 / sum, sum > 0.0);
    o[b * P.o_sb + h * P.o_sh + i * P.o_ss + lid] = ${store("y")};
${
    c.lse
      ? `    if (lid == 0u) { lse[rg] = select(select(${NEG_INF}, mx + log(sum), sum > 0.0), sum, ${
        isNanExpr("sum")
      }); }\n`
      : ""
  }  }
}
`);
  const key = `splitkv-combine:${c.dtype}:${c.f16}:d${c.dV}:${c.lse}${c.sinks ? ":sk" : ""}`;
  return { key, label: key, code: L.join("\n"), bindings, uniforms: COMBINE_UNIFORMS };
}
