/**
 * wgattn: scaled-dot-product attention on WebGPU compute kernels, routed to the fastest kernel the
 * GPU can run. The Deno/WebGPU counterpart of DiffSynth-Studio's `attention_forward`.
 *
 * @example
 * ```ts
 * import { attentionForward } from "jsr:@wgattn/attention";
 * const shape = [1, 8, 128, 64];
 * const rand = () => Float32Array.from({ length: 8 * 128 * 64 }, () => Math.random() - 0.5);
 * const out = await attentionForward({ data: rand(), shape }, { data: rand(), shape }, { data: rand(), shape });
 * console.log(out.shape);
 * ```
 *
 * @module
 */
export {
  attentionForward,
  type AttentionWithLse,
  attentionWithLse,
  availableBackends,
  type BackendInfo,
  type DeviceInfo,
  deviceInfo,
  explain,
  type Explanation,
  getDevice,
  IMPLEMENTATION_VARIABLE,
  setDevice,
} from "./core/api.ts";
export { type Stats, stats } from "./core/stats.ts";
export { appendKvCache, type AppendKvCacheOptions } from "./core/append.ts";
export {
  BlockMask,
  type FlexBuffer,
  type FlexOptions,
  type GpuModBuffer,
  type MaskMod,
  type MaskModFunction,
  type ModBufferData,
  type ModBufferDType,
  type ModBufferInput,
  type ScoreMod,
  type ScoreModFunction,
} from "./core/flex.ts";
export { type BlockMaskOptions, createBlockMask } from "./core/flex_gpu.ts";
export {
  alibi,
  alibiSlopes,
  documentMask,
  type MaskModBundle,
  prefixLm,
  relativePositionBias,
  type ScoreModBundle,
  slidingWindow,
  softCap,
  wanAnimateLogScale,
} from "./wgsl/flex_library.ts";
export { ENGINE_VARIABLE, useEngine, type UseEngineOptions } from "./engines/select.ts";
export type { EngineName } from "./engines/engine.ts";
export { type AttentionPart, mergeAttention, type MergedAttention, type MergeOptions } from "./core/merge.ts";
export type { ChainEntry, DecisionSource } from "./core/router.ts";
export { WgattnError, type WgattnErrorCode, type WgattnErrorDetails } from "./core/errors.ts";
export type {
  AttentionOptions,
  AttentionOutput,
  DType,
  DTypeOf,
  GpuIndexTensor,
  GpuMask,
  GpuTensor,
  HostData,
  HostDataOf,
  HostIndexTensor,
  HostMask,
  HostTensor,
  IndexInput,
  LseOutput,
  MaskDType,
  MaskInput,
  OrtMaskLike,
  OrtTensorLike,
  OrtTypeOf,
  TensorInput,
} from "./core/types.ts";
