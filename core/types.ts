import type { FlexOptions } from "./flex.ts";

/** Element types wgattn computes with. bf16 travels as the upper 16 bits of an f32 in a `Uint16Array`. */
export type DType = "f32" | "f16" | "bf16";

/** The typed arrays a host tensor may hold: f32, f16, or bf16 bits (with `dtype: "bf16"`). */
export type HostData = Float32Array | Float16Array | Uint16Array;

/** A tensor in host memory. `dtype` defaults from the array type (`Uint16Array` needs `"bf16"`). */
export interface HostTensor {
  /** Elements in row-major order of `shape`. */
  data: HostData;
  /** Sizes of each axis, outermost first. */
  shape: readonly number[];
  /** Element type; inferred from `data` when left out. */
  dtype?: DType;
}

/** A tensor as ONNX Runtime Web hands them out: `{ data, dims, type }`. */
export interface OrtTensorLike {
  /** Elements in row-major order of `dims`. */
  data: HostData;
  /** Sizes of each axis, outermost first. */
  dims: readonly number[];
  /** ONNX element type. */
  type: "float32" | "float16" | "bfloat16";
}

/** A tensor that lives in a `GPUBuffer` of the device wgattn uses; dense, row-major in `shape`. */
export interface GpuTensor {
  /** Needs `STORAGE` usage; `COPY_SRC` too if you want to read it back. */
  buffer: GPUBuffer;
  /** Sizes of each axis, outermost first. */
  shape: readonly number[];
  /** Element type of the buffer's contents. */
  dtype: DType;
}

/** Any tensor `attentionForward` accepts. */
export type TensorInput = HostTensor | OrtTensorLike | GpuTensor;

/** Mask element types: `bool` (one byte per element, nonzero = attend) or an additive float. */
export type MaskDType = "bool" | "f32" | "f16";

/** A host mask: `Uint8Array` (or `dtype: "bool"`) is boolean, float arrays are added to the scores. */
export interface HostMask {
  /** Boolean bytes (nonzero = attend), or additive f32 / f16 values (`-Infinity` masks a key). */
  data: Uint8Array | Float32Array | Float16Array;
  /** Broadcastable to `[b, n, s_q, s_kv]` (numpy rules, aligned at the right). */
  shape: readonly number[];
  /** Inferred from `data` when left out. */
  dtype?: MaskDType;
}

/** A mask in a `GPUBuffer`: bool is one byte per element, additive is f32. */
export interface GpuMask {
  /** Needs `STORAGE` usage. */
  buffer: GPUBuffer;
  /** Broadcastable to `[b, n, s_q, s_kv]`. */
  shape: readonly number[];
  /** `bool` bytes or additive `f32`. */
  dtype: "bool" | "f32";
}

/** A mask as ONNX Runtime Web hands them out. */
export interface OrtMaskLike {
  /** Elements. */
  data: Uint8Array | Float32Array | Float16Array;
  /** Sizes. */
  dims: readonly number[];
  /** ONNX element type. */
  type: "bool" | "float32" | "float16";
}

/** Any mask `attentionForward` accepts. */
export type MaskInput = HostMask | GpuMask | OrtMaskLike;

/** Int32 indices in a `GPUBuffer` (offsets, page tables, lengths); needs `STORAGE` usage. */
export interface GpuIndexTensor {
  /** Needs `STORAGE` usage. */
  buffer: GPUBuffer;
  /** Sizes of each axis, outermost first. */
  shape: readonly number[];
  /** Always `"i32"`. */
  dtype: "i32";
}

/** Int32 indices on the host with a shape (for 2-D tables such as `blockTable`). */
export interface HostIndexTensor {
  /** Elements in row-major order of `shape`. */
  data: Int32Array;
  /** Sizes of each axis, outermost first. */
  shape: readonly number[];
}

/** Int32 indices: a 1-D `Int32Array`, a host tensor, or a GPU tensor. */
export type IndexInput = Int32Array | HostIndexTensor | GpuIndexTensor;

/**
 * Options of {@link attentionForward}, named after DiffSynth's `attention_forward`; the flex options
 * (`scoreMod`, `maskMod`, `modBuffers`, `blockMask`) are PyTorch FlexAttention's.
 */
export interface AttentionOptions extends FlexOptions {
  /** Axis order of q, einops style over `b n s d` with at most one group: `"b s (n d)"`. Default `"b n s d"`. */
  qPattern?: string;
  /** Axis order of k. Default `"b n s d"`. */
  kPattern?: string;
  /** Axis order of v. Default `"b n s d"`. */
  vPattern?: string;
  /** Axis order of the output. Default `"b n s d"`. */
  outPattern?: string;
  /**
   * Host calls: the array the output is written into, returned as the result's `data`, instead of a
   * new one. It must be the array kind the output would have (q's: `Float32Array` for f32; for
   * 16-bit q, q's `Float16Array` or `Uint16Array`) with exactly its element count, and share no
   * bytes with q, k, v or a mask. One array reused across a loop of calls spares each call the
   * allocation of its result (zero-filled on the calling thread) and the garbage collections such
   * allocations bring; calls in flight at once need arrays of their own. GPU calls return a new GPU
   * tensor and take no `out`.
   */
  out?: HostData;
  /** Sizes for grouped axes, e.g. `{ n: 24 }` for `"b s (n d)"`; `nKv` for k/v heads when they differ. */
  dims?: { b?: number; n?: number; s?: number; d?: number; nKv?: number };
  /** Multiplies q·k. Default `1 / sqrt(d)`. */
  scale?: number;
  /** Query i sees key j only if j <= i + (s_kv - s_q): aligned bottom-right, as FlashAttention >= 2.1. */
  isCausal?: boolean;
  /**
   * Sliding window: query i sees key j only if |i + (s_kv - s_q) - j| <= w. A pair `[left, right]`
   * bounds each side separately. With `isCausal` the right side is 0.
   */
  windowSize?: number | readonly [number, number];
  /** Boolean (true = attend) or additive mask, broadcastable to `[b, n, s_q, s_kv]`. */
  attnMask?: MaskInput;
  /** Boolean `[b, s_kv]`, true = a real key; for batches of unequal lengths. */
  keyPaddingMask?: MaskInput;
  /** Force the plain three-pass path, as DiffSynth's `compatibility_mode`. */
  compatibilityMode?: boolean;
  /** Pick a backend for this call (strict: an error if it cannot serve the call). */
  backend?: string;
  /** The `GPUDevice` to run on; by default wgattn acquires one (see {@link setDevice}). */
  device?: GPUDevice;
  /**
   * Attention sinks (gpt-oss): one f32 logit per query head, added to each row's softmax
   * denominator as a key with no value: `out = sum_j exp(s_j) v_j / (exp(sink_h) + sum_j exp(s_j))`.
   * The log-sum-exp includes it. A `Float32Array` or `number[]` of n, or an f32 GPU tensor `[n]`.
   */
  sinks?: Float32Array | readonly number[] | GpuTensor;
  /**
   * Packed batch (flash-attn's `cu_seqlens_q`): b + 1 offsets into q `[total_q, n, d]`; sequence i
   * is rows `cuSeqlensQ[i] .. cuSeqlensQ[i + 1]`. With `cuSeqlensK`; the output is
   * `[total_q, n, d]` and the log-sum-exp `[n, total_q]`. Causal and window limits are aligned
   * bottom-right within each sequence. No patterns, masks or flex functions with it.
   */
  cuSeqlensQ?: IndexInput;
  /** Packed batch: b + 1 offsets into k and v `[total_k, n_kv, d]` (flash-attn's `cu_seqlens_k`). */
  cuSeqlensK?: IndexInput;
  /**
   * Paged KV cache (flash-attn's `block_table`): int32 `[b, max_pages]`; key j of batch i is row
   * `j % page_size` of page `blockTable[i][floor(j / page_size)]` of k and v, which are then
   * `[num_pages, page_size, n_kv, d]` (page_size a multiple of 16). With `cacheSeqlens`.
   * A GPU table's entries are clamped into `[0, num_pages)`: a bad entry reads a wrong page, never
   * outside the buffers.
   */
  blockTable?: IndexInput;
  /**
   * Paged KV cache: int32 `[b]`, the keys of each batch's cache to attend (flash-attn's
   * `cache_seqlens`); q's s_q rows are the last s_q positions (causal aligned bottom-right against
   * each length). GPU lengths are clamped into `[0, max_pages * page_size]`.
   */
  cacheSeqlens?: IndexInput;
}

/**
 * The dtype of a tensor input, as its type says it: `type` for ONNX-style tensors, else `dtype`,
 * else the array's (`DType` when the type does not tell).
 */
export type DTypeOf<Q> = Q extends { type: "float32" } ? "f32"
  : Q extends { type: "float16" } ? "f16"
  : Q extends { type: "bfloat16" } ? "bf16"
  : Q extends { dtype: infer D extends DType } ? D
  : Q extends { data: Float32Array } ? "f32"
  : Q extends { data: Float16Array } ? "f16"
  : DType;

/** The array an output holds for host input `Q`: the same kind as q's (`HostData` when the type does not tell). */
export type HostDataOf<Q> = Q extends { data: Float32Array } ? Float32Array<ArrayBuffer>
  : Q extends { data: Float16Array } ? Float16Array<ArrayBuffer>
  : Q extends { data: Uint16Array } ? Uint16Array<ArrayBuffer>
  : HostData;

/** The ONNX element type of each dtype. */
export type OrtTypeOf<D extends DType> = D extends "f32" ? "float32"
  : D extends "f16" ? "float16"
  : "bfloat16";

/**
 * Output of {@link attentionForward} for q of type `Q`: in q's form, dtype and residency. GPU q:
 * a GPU tensor; ONNX-style q (`{ data, dims, type }`): the same form; host q: `{ data, shape,
 * dtype }` with q's kind of array (f32 in, `Float32Array` out).
 *
 * @example
 * ```ts
 * import { attentionForward } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(2 * 8 * 16).fill(0.5), shape: [1, 2, 8, 16] };
 * const out = await attentionForward(t, t, t);
 * const first: number = out.data[0]; // out.data is a Float32Array
 * ```
 */
export type AttentionOutput<Q extends TensorInput> = Q extends GpuTensor
  ? { buffer: GPUBuffer; shape: readonly number[]; dtype: DTypeOf<Q> }
  : Q extends OrtTensorLike ? { data: HostDataOf<Q>; dims: readonly number[]; type: OrtTypeOf<DTypeOf<Q>> }
  : { data: HostDataOf<Q>; shape: readonly number[]; dtype: DTypeOf<Q> };

/** The log-sum-exp of {@link attentionWithLse} for q of type `Q`: f32 `[b, n, s_q]`, in q's form and residency. */
export type LseOutput<Q extends TensorInput> = Q extends GpuTensor
  ? { buffer: GPUBuffer; shape: readonly number[]; dtype: "f32" }
  : Q extends OrtTensorLike ? { data: Float32Array<ArrayBuffer>; dims: readonly number[]; type: "float32" }
  : { data: Float32Array<ArrayBuffer>; shape: readonly number[]; dtype: "f32" };
