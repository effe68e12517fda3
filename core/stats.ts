import { PIPELINE_CACHE_LIMIT, runtimeNow } from "./device.ts";
import { gpuStats } from "./gpu.ts";

/** What {@link stats} reports. */
export interface Stats {
  /**
   * GPU buffers wgattn created and still holds (temporaries of calls being recorded). Outputs
   * handed to you are yours and not counted; between calls this returns to its baseline.
   */
  liveBuffers: number;
  /** Their bytes. */
  liveBytes: number;
  /**
   * Large temporaries of finished calls kept for the next call of the same sizes (uploads and host
   * calls' outputs of at least 1 MiB; at most 8 and 256 MiB per device), on all devices.
   */
  keptBuffers: number;
  /** Their bytes. */
  keptBytes: number;
  /** Compiled pipelines cached for the device (0 before the first call). */
  cachedPipelines: number;
  /** The most pipelines kept per device; past it the least recently used is dropped. */
  pipelineCacheLimit: number;
}

/**
 * wgattn's own GPU resources, for leak checks in a serving process: live buffers and bytes, and the
 * pipeline cache of the default device (or `options.device`). Waits for nothing, acquires nothing.
 *
 * @example
 * ```ts
 * import { attentionForward, stats } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(2 * 8 * 16).fill(0.5), shape: [1, 2, 8, 16] };
 * await attentionForward(t, t, t);
 * const { liveBuffers, liveBytes, cachedPipelines, pipelineCacheLimit } = stats();
 * console.log(liveBuffers, liveBytes, `${cachedPipelines} of ${pipelineCacheLimit} pipelines`);
 * ```
 */
export function stats(options?: { device?: GPUDevice }): Stats {
  const rt = runtimeNow(options?.device);
  return {
    liveBuffers: gpuStats.liveBuffers,
    liveBytes: gpuStats.liveBytes,
    keptBuffers: gpuStats.keptBuffers,
    keptBytes: gpuStats.keptBytes,
    cachedPipelines: rt?.pipelines.size ?? 0,
    pipelineCacheLimit: PIPELINE_CACHE_LIMIT,
  };
}
