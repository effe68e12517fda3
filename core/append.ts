/**
 * `appendKvCache`: writes new k/v rows into a paged cache in place, on the GPU (flash-attn's
 * `flash_attn_with_kvcache(k=..., v=...)` append, as its own step), so that a decode loop never
 * takes the cache through the host.
 */
import { WgattnError } from "./errors.ts";
import { defaultRuntime, runtimeFor } from "./device.ts";
import { GpuCall } from "./gpu.ts";
import { checkOptions, GPU_DEVICE_RULE } from "./options.ts";
import { resolvePaged } from "./serving.ts";
import { DTYPE_BYTES, type Operand, toOperand } from "./tensor.ts";
import type { GpuTensor, IndexInput, TensorInput } from "./types.ts";
import { advanceKernel, appendKernel } from "../wgsl/serving.ts";

/** Options of {@link appendKvCache}. */
export interface AppendKvCacheOptions {
  /** int32 `[b, max_pages]`: the pages of each batch's cache, as for attention. */
  blockTable: IndexInput;
  /** int32 `[b]`: each batch's length before the append; new row i goes to position `cacheSeqlens[b] + i`. */
  cacheSeqlens: IndexInput;
  /**
   * Add s_new to each of `cacheSeqlens` in place after the append (a GPU tensor on the GPU, after
   * the copy; a host `Int32Array` at once), ready for the attention call. Default false.
   */
  advance?: boolean;
  /** The `GPUDevice` to run on; by default wgattn's. */
  device?: GPUDevice;
}

const APPEND_OPTIONS = {
  blockTable: "object",
  cacheSeqlens: "object",
  advance: "boolean",
  device: GPU_DEVICE_RULE,
} as const;

/**
 * Appends new keys and values `[b, s_new, n_kv, d]` (host or GPU tensors) to a paged KV cache
 * `[num_pages, page_size, n_kv, d]` (GPU tensors, written in place) at each batch's
 * `cacheSeqlens[b]`, through `blockTable`. Encodes and submits without waiting. Host tables and
 * lengths are checked first (the rows must land on pages of the pool, within the table); GPU ones
 * are clamped in the kernel: rows past the table are dropped, a bad entry writes a wrong page,
 * never outside the buffers.
 *
 * @example
 * ```ts
 * import { appendKvCache, attentionForward, getDevice } from "jsr:@wgattn/attention";
 * const device = (await getDevice())!;
 * const [pages, page, nKv, d] = [8, 16, 2, 32];
 * const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
 * const pool = () => device.createBuffer({ size: pages * page * nKv * d * 4, usage });
 * const kCache = { buffer: pool(), shape: [pages, page, nKv, d], dtype: "f32" as const };
 * const vCache = { buffer: pool(), shape: [pages, page, nKv, d], dtype: "f32" as const };
 * const blockTable = { data: Int32Array.from([3, 5, 0, 1]), shape: [2, 2] };
 * const cacheSeqlens = new Int32Array([0, 0]);
 * const rows = (s: number) => ({ data: Float32Array.from({ length: 2 * s * nKv * d }, Math.random), shape: [2, s, nKv, d] });
 * await appendKvCache(rows(20), rows(20), kCache, vCache, { blockTable, cacheSeqlens, advance: true });
 * // cacheSeqlens is now [20, 20]: one decode step attends the 20 cached keys of each batch.
 * const q = { data: Float32Array.from({ length: 2 * 4 * d }, Math.random), shape: [2, 4, 1, d] };
 * const out = await attentionForward(q, kCache, vCache, { blockTable, cacheSeqlens });
 * console.log(out.shape); // [2, 4, 1, 32]
 * ```
 */
export async function appendKvCache(
  kNew: TensorInput,
  vNew: TensorInput,
  kCache: GpuTensor,
  vCache: GpuTensor,
  options: AppendKvCacheOptions,
): Promise<void> {
  checkOptions(options, APPEND_OPTIONS);
  const kn = toOperand(kNew, "kNew"), vn = toOperand(vNew, "vNew");
  const kc = toOperand(kCache, "kCache"), vc = toOperand(vCache, "vCache");
  for (const [name, t] of [["kCache", kc], ["vCache", vc]] as const) {
    if (t.residency !== "gpu") {
      throw new WgattnError("INVALID_BUFFER", `${name} must be a GPU tensor (it is written in place)`, {
        argument: name,
        expected: "{ buffer, shape: [num_pages, page_size, n_kv, d], dtype }",
        actual: "host data",
      });
    }
  }
  const rank4 = (t: Operand, name: string) => {
    if (t.shape.length !== 4) {
      throw new WgattnError("INVALID_SHAPE", `${name} must have 4 axes`, {
        argument: name,
        expected: name.endsWith("Cache") ? "[num_pages, page_size, n_kv, d]" : "[b, s_new, n_kv, d]",
        actual: `[${t.shape}]`,
      });
    }
  };
  [[kn, "kNew"], [vn, "vNew"], [kc, "kCache"], [vc, "vCache"]].forEach(([t, n]) =>
    rank4(t as Operand, n as string)
  );
  for (const [name, t] of [["vNew", vn], ["kCache", kc], ["vCache", vc]] as const) {
    if (t.dtype !== kn.dtype) {
      throw new WgattnError("DTYPE_MISMATCH", `${name} must have kNew's dtype`, {
        argument: name,
        expected: kn.dtype,
        actual: t.dtype,
      });
    }
  }
  const [b, sNew, nKv] = kn.shape;
  const same = (x: readonly number[], y: readonly number[]) =>
    x.length === y.length && x.every((v, i) => v === y[i]);
  const checks: [string, readonly number[], readonly number[]][] = [
    ["vNew", vn.shape, [b, sNew, nKv, vc.shape[3]]],
    ["kCache", kc.shape.slice(2), [nKv, kn.shape[3]]],
    ["vCache", vc.shape.slice(0, 3), kc.shape.slice(0, 3)],
  ];
  for (const [name, got, want] of checks) {
    if (!same(got, want)) {
      throw new WgattnError("SHAPE_MISMATCH", `${name} does not match the other tensors`, {
        argument: name,
        expected: `[${want}] (new rows [b, s_new, n_kv, d], pages [num_pages, page_size, n_kv, d])`,
        actual: `[${got}]`,
      });
    }
  }
  const bytes = DTYPE_BYTES[kn.dtype];
  const kRow = nKv * kn.shape[3] * bytes, vRow = nKv * vn.shape[3] * bytes;
  if (kRow % 4 !== 0 || vRow % 4 !== 0) {
    throw new WgattnError("INVALID_SHAPE", "a row of n_kv x d values must fill whole 4-byte words", {
      argument: "kNew",
      expected: "n_kv * d even for 16-bit dtypes",
      actual: `n_kv ${nKv}, d ${kn.shape[3]}/${vn.shape[3]}, ${kn.dtype}`,
    });
  }
  const { view } = resolvePaged(
    { blockTable: options.blockTable, cacheSeqlens: options.cacheSeqlens },
    b,
    kc.shape,
  );
  const span = view.maxPages * view.pageSize;
  if (view.seqlens.residency === "host") {
    for (let i = 0; i < b; i++) {
      const end = view.seqlens.data[i] + sNew;
      if (end > span) {
        throw new WgattnError("INVALID_OPTION", "the new rows do not fit the block table", {
          argument: "options.cacheSeqlens",
          expected: `cacheSeqlens[i] + s_new <= max_pages * page_size = ${span}`,
          actual: `cacheSeqlens[${i}] + ${sNew} = ${end}`,
        });
      }
      if (view.table.residency === "host") {
        for (
          let j = Math.floor(view.seqlens.data[i] / view.pageSize);
          j < Math.ceil(end / view.pageSize);
          j++
        ) {
          const page = view.table.data[i * view.maxPages + j];
          if (page < 0 || page >= view.numPages) {
            throw new WgattnError("INVALID_OPTION", "a block table entry names no page", {
              argument: "options.blockTable",
              expected: `page indices in [0, ${view.numPages}) for the pages the new rows go to`,
              actual: `blockTable[${i}][${j}] = ${page}`,
            });
          }
        }
      }
    }
  }
  if (b * sNew === 0) return;
  const rt = await (options.device ? runtimeFor(options.device) : defaultRuntime());
  if (!rt) throw new WgattnError("NO_BACKEND", "appendKvCache needs a WebGPU device");
  const call = new GpuCall(rt, "wgattn appendKvCache");
  try {
    const bind = (t: Operand, label: string) => t.residency === "gpu" ? t.buffer : call.upload(t.data, label);
    const index = (x: typeof view.table, label: string) =>
      x.residency === "gpu" ? x.buffer : call.upload(x.data, label);
    const seqlens = index(view.seqlens, "wgattn cacheSeqlens");
    const kernel = appendKernel(view.pageSize);
    call.dispatch(await call.pipeline(kernel), kernel, {
      k_new: bind(kn, "wgattn kNew"),
      v_new: bind(vn, "wgattn vNew"),
      k_cache: (kc as { buffer: GPUBuffer }).buffer,
      v_cache: (vc as { buffer: GPUBuffer }).buffer,
      tbl: index(view.table, "wgattn blockTable"),
      cache_len: seqlens,
    }, {
      b,
      s_new: sNew,
      k_words: kRow / 4,
      v_words: vRow / 4,
      max_pages: view.maxPages,
      num_pages: view.numPages,
    }, b * sNew);
    if (options.advance && view.seqlens.residency === "gpu") {
      // A dispatch of its own: it must see the lengths only after every append row has read them.
      const adv = advanceKernel();
      call.dispatch(
        await call.pipeline(adv),
        adv,
        { cache_len: seqlens },
        { b, s_new: sNew },
        Math.ceil(b / 64),
      );
    }
  } catch (e) {
    call.abandon();
    throw e;
  }
  const { outOfMemory, validation } = await call.errors();
  const problem = outOfMemory ?? validation;
  if (problem) {
    call.abandon();
    throw new WgattnError("GPU_ERROR", `appendKvCache could not be recorded: ${problem.message}`);
  }
  const refused = await call.submit();
  if (refused) throw new WgattnError("GPU_ERROR", `the device refused appendKvCache: ${refused.message}`);
  if (options.advance && view.seqlens.residency === "host") {
    for (let i = 0; i < b; i++) view.seqlens.data[i] += sNew;
  }
}
