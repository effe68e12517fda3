/**
 * Small kernels of the serving paths: the work list of a packed batch built on the GPU from GPU
 * offsets, and the append of new K/V rows into a paged cache.
 */
import { type Kernel, uniformBlock, type UniformType } from "./common.ts";

/**
 * WGSL finding work item `item`'s sequence `lo_s` in a packed batch's work list `wl` (binding) of
 * `P.seqs` sequences: the last s with `wl[s] <= item`, by binary search. Workgroup-uniform when
 * `item` is (the list is read-only storage).
 */
export function workListSearch(): string {
  return `  var lo_s = 0u;
  var hi_s = P.seqs;
  loop {
    if (hi_s - lo_s <= 1u) { break; }
    let mid = (lo_s + hi_s) / 2u;
    if (wl[mid] <= item) { lo_s = mid; } else { hi_s = mid; }
  }
`;
}

/**
 * WGSL of packed sequence `b`'s query rows `[cq0, cq0 + sq_)` and keys `[ck0, ck0 + skv_)` from the
 * offsets `cuq`, `cuk` (bindings), clamped into the tensors (`P.s_q`, `P.s_kv`): a bad GPU offset gives
 * wrong rows, never a read outside the buffers.
 */
export function sequenceRange(): string {
  return `  let cq0 = u32(clamp(cuq[b], 0i, i32(P.s_q)));
  let sq_ = u32(clamp(cuq[b + 1u], i32(cq0), i32(P.s_q))) - cq0;
  let ck0 = u32(clamp(cuk[b], 0i, i32(P.s_kv)));
  let skv_ = u32(clamp(cuk[b + 1u], i32(ck0), i32(P.s_kv))) - ck0;
`;
}

const WORK_LIST_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["seqs", "u32"],
  ["total", "u32"],
];

/**
 * The work list of a packed batch: `wl[s]` = the query blocks of `br` rows of the sequences before
 * s, `wl[seqs]` their total. One thread scans the offsets (b is small; this is microseconds), each
 * clamped into `[0, total]` as the flash kernel clamps them.
 */
export function workListKernel(br: number): Kernel {
  const code = `${uniformBlock(WORK_LIST_UNIFORMS)}
@group(0) @binding(1) var<storage, read> cuq: array<i32>;
@group(0) @binding(2) var<storage, read_write> wl: array<u32>;
@compute @workgroup_size(1)
fn main() {
  var acc = 0u;
  wl[0] = 0u;
  for (var s = 0u; s < P.seqs; s++) {
    let a = clamp(cuq[s], 0i, i32(P.total));
    let e = clamp(cuq[s + 1u], a, i32(P.total));
    acc += (u32(e - a) + ${br - 1}u) / ${br}u;
    wl[s + 1u] = acc;
  }
}
`;
  return {
    key: `varlen-work-list:${br}`,
    label: `varlen work list ${br}`,
    code,
    bindings: ["cuq", "wl"],
    uniforms: WORK_LIST_UNIFORMS,
  };
}

const APPEND_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["b", "u32"],
  ["s_new", "u32"],
  ["k_words", "u32"],
  ["v_words", "u32"],
  ["max_pages", "u32"],
  ["num_pages", "u32"],
];

/**
 * Appends new rows to a paged cache: new k and v `[b, s_new, n_kv, d]` (rows of `k_words` and
 * `v_words` u32 words: n_kv·d values) go to positions `cache_len[b] + i` through the table. One workgroup per
 * (batch, new row), threads over the row's words. Rows whose position falls past the table are
 * dropped, and table entries are clamped into the pool: a bad GPU entry writes a wrong page,
 * never outside the buffers. With `advance`, a second kernel adds s_new to each length.
 */
export function appendKernel(page: number): Kernel {
  // 16-bit values move as u32 words (pairs), f32 as words: a copy, no arithmetic.
  const code = `${uniformBlock(APPEND_UNIFORMS)}
@group(0) @binding(1) var<storage, read> k_new: array<u32>;
@group(0) @binding(2) var<storage, read> v_new: array<u32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> tbl: array<i32>;
@group(0) @binding(6) var<storage, read> cache_len: array<i32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= P.groups) { return; }
  let b = wg / P.s_new;
  let i = wg % P.s_new;
  let pos = u32(max(cache_len[b], 0i)) + i;
  if (pos >= P.max_pages * ${page}u) { return; }
  let pg = u32(clamp(tbl[b * P.max_pages + pos / ${page}u], 0i, i32(P.num_pages) - 1i));
  let row = pg * ${page}u + pos % ${page}u;
  for (var w = lid; w < P.k_words; w += 64u) { k_cache[row * P.k_words + w] = k_new[wg * P.k_words + w]; }
  for (var w = lid; w < P.v_words; w += 64u) { v_cache[row * P.v_words + w] = v_new[wg * P.v_words + w]; }
}
`;
  return {
    key: `paged-append:${page}`,
    label: `paged append ${page}`,
    code,
    bindings: ["k_new", "v_new", "k_cache", "v_cache", "tbl", "cache_len"],
    uniforms: APPEND_UNIFORMS,
  };
}

const ADVANCE_UNIFORMS: [string, UniformType][] = [["groups", "u32"], ["b", "u32"], ["s_new", "u32"]];

/** Adds `s_new` to each of the b cache lengths in place (after the append has read them). */
export function advanceKernel(): Kernel {
  const code = `${uniformBlock(ADVANCE_UNIFORMS)}
@group(0) @binding(1) var<storage, read_write> cache_len: array<i32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let i = wid.x * 64u + lid;
  if (i < P.b) { cache_len[i] = cache_len[i] + i32(P.s_new); }
}
`;
  return {
    key: "paged-advance",
    label: "paged advance",
    code,
    bindings: ["cache_len"],
    uniforms: ADVANCE_UNIFORMS,
  };
}
