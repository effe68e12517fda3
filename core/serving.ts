/**
 * Options for serving language models: packed batches of unequal sequences (`cuSeqlensQ`,
 * `cuSeqlensK`, as flash-attn's `flash_attn_varlen_func`), paged KV caches (`blockTable`,
 * `cacheSeqlens`, as `flash_attn_with_kvcache`) and per-head attention sinks (`sinks`, as gpt-oss).
 * Host index arrays are checked here, before any work; GPU ones cannot be, and the kernels clamp
 * what they read from them so that a bad entry never reads outside the buffers.
 */
import { isGpuBuffer } from "../engines/engine.ts";
import { WgattnError } from "./errors.ts";
import { describeValue } from "./options.ts";
import { checkGpuBuffer } from "./tensor.ts";
import type { AttentionOptions, GpuIndexTensor, IndexInput } from "./types.ts";

/** Int32 indices on the host or in a GPU buffer, with their element count. */
export type IndexView =
  | { residency: "host"; data: Int32Array; length: number }
  | { residency: "gpu"; buffer: GPUBuffer; length: number };

/** A packed (variable-length) batch: sequence `i` is rows `cu[i] .. cu[i + 1]` of q and of k/v. */
export interface VarlenView {
  /** Number of sequences (b). */
  seqs: number;
  cuQ: IndexView;
  cuK: IndexView;
  /** Longest query and key sequence; for GPU offsets, the totals (bounds). */
  maxSq: number;
  maxSkv: number;
}

/** A paged KV cache: key j of batch b is row `j % pageSize` of page `table[b, floor(j / pageSize)]`. */
export interface PagedView {
  table: IndexView;
  /** Keys of each batch's cache that attention reads. */
  seqlens: IndexView;
  pageSize: number;
  maxPages: number;
  numPages: number;
}

/** Per-query-head sink logits. */
export type SinkView =
  | { residency: "host"; data: Float32Array }
  | { residency: "gpu"; buffer: GPUBuffer };

/** Page sizes must be multiples of this (kernels read keys in tiles of 16). */
export const PAGE_MULTIPLE = 16;

const isObject = (x: unknown): x is Record<string, unknown> =>
  typeof x === "object" && x !== null && !Array.isArray(x);

/** Reads an index option: an Int32Array, `{ data: Int32Array, shape }` or `{ buffer, shape, dtype: "i32" }`. */
export function toIndexView(
  input: IndexInput,
  argument: string,
  shape: readonly number[] | null,
): { view: IndexView; shape: readonly number[] } {
  const fail = (actual: string): never => {
    throw new WgattnError("INVALID_OPTION", `${argument} must be int32 indices`, {
      argument,
      expected: `an Int32Array, { data: Int32Array, shape } or { buffer, shape, dtype: "i32" }${
        shape ? ` of shape [${shape}]` : ""
      }`,
      actual,
    });
  };
  let view: IndexView, got: readonly number[];
  if (input instanceof Int32Array) {
    view = { residency: "host", data: input, length: input.length };
    got = [input.length];
  } else if (isObject(input) && "buffer" in input && isGpuBuffer(input.buffer)) {
    const t = input as unknown as GpuIndexTensor;
    if (t.dtype !== "i32") fail(`dtype ${describeValue(t.dtype)}`);
    if (!Array.isArray(t.shape) || t.shape.some((x) => !Number.isInteger(x) || x < 0)) {
      fail(`shape ${describeValue(t.shape)}`);
    }
    const length = t.shape.reduce((a, x) => a * x, 1);
    checkGpuBuffer(t, length * 4, argument);
    view = { residency: "gpu", buffer: t.buffer, length };
    got = t.shape;
  } else if (isObject(input) && input.data instanceof Int32Array) {
    const s = input.shape as unknown;
    if (!Array.isArray(s) || s.some((x) => !Number.isInteger(x) || x < 0)) fail(`shape ${describeValue(s)}`);
    const length = (s as number[]).reduce((a, x) => a * x, 1);
    if (length !== input.data.length) fail(`${input.data.length} elements for shape [${s}]`);
    view = { residency: "host", data: input.data, length };
    got = s as number[];
  } else {
    return fail(describeValue(input));
  }
  if (shape && (got.length !== shape.length || got.some((x, i) => x !== shape[i]))) {
    throw new WgattnError("INVALID_OPTION", `${argument} has the wrong shape`, {
      argument,
      expected: `shape [${shape}]`,
      actual: `[${got}]`,
    });
  }
  return { view, shape: got };
}

/** Checks host offsets: b + 1 of them, from 0, non-decreasing, ending at the tensor's length. */
function checkOffsets(cu: Int32Array, total: number, argument: string, tensor: string): number {
  let max = 0;
  if (cu[0] !== 0) {
    throw new WgattnError("INVALID_OPTION", `${argument} must start at 0`, {
      argument,
      expected: "cu[0] = 0",
      actual: `cu[0] = ${cu[0]}`,
    });
  }
  for (let i = 1; i < cu.length; i++) {
    if (cu[i] < cu[i - 1]) {
      throw new WgattnError("INVALID_OPTION", `${argument} must not decrease`, {
        argument,
        expected: "cu[i] <= cu[i + 1] (sequence lengths >= 0)",
        actual: `cu[${i - 1}] = ${cu[i - 1]}, cu[${i}] = ${cu[i]}`,
      });
    }
    max = Math.max(max, cu[i] - cu[i - 1]);
  }
  if (cu[cu.length - 1] !== total) {
    throw new WgattnError("INVALID_OPTION", `${argument} must end at ${tensor}'s length`, {
      argument,
      expected: `cu[${cu.length - 1}] = ${total} (${tensor}'s first axis)`,
      actual: `cu[${cu.length - 1}] = ${cu[cu.length - 1]}`,
    });
  }
  return max;
}

/** Validates cuSeqlensQ/K against q's and k's token counts. */
export function resolveVarlen(
  options: AttentionOptions,
  totalQ: number,
  totalK: number,
): VarlenView {
  if (options.cuSeqlensQ === undefined || options.cuSeqlensK === undefined) {
    const missing = options.cuSeqlensQ === undefined ? "options.cuSeqlensQ" : "options.cuSeqlensK";
    throw new WgattnError("INVALID_OPTION", "a packed batch needs both cuSeqlensQ and cuSeqlensK", {
      argument: missing,
      expected: "b + 1 int32 offsets",
      actual: "undefined",
    });
  }
  const q = toIndexView(options.cuSeqlensQ, "options.cuSeqlensQ", null);
  const k = toIndexView(options.cuSeqlensK, "options.cuSeqlensK", null);
  for (const [x, name] of [[q, "options.cuSeqlensQ"], [k, "options.cuSeqlensK"]] as const) {
    if (x.shape.length !== 1 || x.view.length < 2) {
      throw new WgattnError("INVALID_OPTION", `${name} must hold b + 1 >= 2 offsets`, {
        argument: name,
        expected: "shape [b + 1] with b >= 1",
        actual: `[${x.shape}]`,
      });
    }
  }
  if (q.view.length !== k.view.length) {
    throw new WgattnError("INVALID_OPTION", "cuSeqlensQ and cuSeqlensK must hold as many offsets", {
      argument: "options.cuSeqlensK",
      expected: `${q.view.length} offsets (as cuSeqlensQ)`,
      actual: `${k.view.length}`,
    });
  }
  const maxSq = q.view.residency === "host"
    ? checkOffsets(q.view.data, totalQ, "options.cuSeqlensQ", "q")
    : totalQ;
  const maxSkv = k.view.residency === "host"
    ? checkOffsets(k.view.data, totalK, "options.cuSeqlensK", "k")
    : totalK;
  return { seqs: q.view.length - 1, cuQ: q.view, cuK: k.view, maxSq, maxSkv };
}

/**
 * Validates a paged cache: k and v `[num_pages, page_size, n_kv, d]`, blockTable `[b, max_pages]`,
 * cacheSeqlens `[b]`. Host lengths must be within the table; host table entries a call reads must
 * name pages (all entries when the lengths are on the GPU). Returns the view and the longest
 * cache length (the table's span for GPU lengths).
 */
export function resolvePaged(
  options: AttentionOptions,
  b: number,
  kShape: readonly number[],
): { view: PagedView; maxLen: number } {
  if (options.blockTable === undefined || options.cacheSeqlens === undefined) {
    const missing = options.blockTable === undefined ? "options.blockTable" : "options.cacheSeqlens";
    throw new WgattnError("INVALID_OPTION", "a paged cache needs both blockTable and cacheSeqlens", {
      argument: missing,
      expected: "blockTable [b, max_pages] and cacheSeqlens [b], int32",
      actual: "undefined",
    });
  }
  const [numPages, pageSize] = kShape;
  if (pageSize % PAGE_MULTIPLE !== 0 || pageSize === 0) {
    throw new WgattnError("INVALID_SHAPE", "the page size must be a multiple of 16", {
      argument: "k",
      expected: "k and v of shape [num_pages, page_size, n_kv, d] with page_size a multiple of 16",
      actual: `page_size ${pageSize} in k of shape [${kShape}]`,
    });
  }
  const table = toIndexView(options.blockTable, "options.blockTable", null);
  if (table.shape.length !== 2 || table.shape[0] !== b) {
    throw new WgattnError("INVALID_OPTION", "options.blockTable must be [b, max_pages]", {
      argument: "options.blockTable",
      expected: `shape [${b}, max_pages]`,
      actual: `[${table.shape}]`,
    });
  }
  const maxPages = table.shape[1];
  const seqlens = toIndexView(options.cacheSeqlens, "options.cacheSeqlens", [b]).view;
  const span = maxPages * pageSize;
  let maxLen = span;
  if (seqlens.residency === "host") {
    maxLen = 0;
    for (let i = 0; i < b; i++) {
      const len = seqlens.data[i];
      if (len < 0 || len > span) {
        throw new WgattnError("INVALID_OPTION", "a cache length is outside its block table", {
          argument: "options.cacheSeqlens",
          expected: `0 <= cacheSeqlens[i] <= max_pages * page_size = ${span}`,
          actual: `cacheSeqlens[${i}] = ${len}`,
        });
      }
      maxLen = Math.max(maxLen, len);
    }
  }
  if (table.view.residency === "host") {
    const t = table.view.data;
    for (let i = 0; i < b; i++) {
      const used = seqlens.residency === "host" ? Math.ceil(seqlens.data[i] / pageSize) : maxPages;
      for (let j = 0; j < used; j++) {
        const page = t[i * maxPages + j];
        if (page < 0 || page >= numPages) {
          throw new WgattnError("INVALID_OPTION", "a block table entry names no page", {
            argument: "options.blockTable",
            expected: `page indices in [0, ${numPages}) for the pages the cache lengths cover`,
            actual: `blockTable[${i}][${j}] = ${page}`,
          });
        }
      }
    }
  }
  return { view: { table: table.view, seqlens, pageSize, maxPages, numPages }, maxLen };
}

/** Validates `options.sinks`: one f32 per query head, host array or GPU tensor. */
export function resolveSinks(input: unknown, n: number): SinkView {
  const argument = "options.sinks";
  if (isObject(input) && "buffer" in input && isGpuBuffer(input.buffer)) {
    const shape = input.shape as unknown;
    if (input.dtype !== "f32" || !Array.isArray(shape) || shape.length !== 1 || shape[0] !== n) {
      throw new WgattnError("INVALID_OPTION", `${argument} must be f32 [n]`, {
        argument,
        expected: `{ buffer, shape: [${n}], dtype: "f32" }`,
        actual: `dtype ${describeValue(input.dtype)}, shape ${JSON.stringify(shape)}`,
      });
    }
    checkGpuBuffer(input as { buffer: GPUBuffer }, n * 4, argument);
    return { residency: "gpu", buffer: input.buffer as GPUBuffer };
  }
  const data = input instanceof Float32Array
    ? input
    : Array.isArray(input) && input.every((x) => typeof x === "number")
    ? Float32Array.from(input)
    : null;
  if (!data || data.length !== n) {
    throw new WgattnError("INVALID_OPTION", `${argument} must hold one logit per query head`, {
      argument,
      expected: `a Float32Array or number[] of ${n} (n) values, or an f32 GPU tensor [${n}]`,
      actual: data ? `${data.length} values` : describeValue(input),
    });
  }
  if (data.some((x) => Number.isNaN(x) || x === Infinity)) {
    throw new WgattnError("INVALID_OPTION", `${argument} must be finite or -Infinity`, {
      argument,
      expected: "finite logits (-Infinity: no sink for that head)",
      actual: `[${Array.from(data).slice(0, 8)}${data.length > 8 ? ", ..." : ""}]`,
    });
  }
  return { residency: "host", data };
}
