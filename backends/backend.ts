/**
 * The one interface every backend implements. The router knows backends only through this and
 * the registry: a new backend is one new file and one registry line.
 */
import type { Capabilities } from "../core/device.ts";
import type { GpuCall } from "../core/gpu.ts";
import type { AttentionProblem } from "../core/problem.ts";
import type { FlexKernelConfig } from "../wgsl/flex.ts";
import type { ModBufferData } from "../core/flex.ts";

/** GPU buffers of one call; strides and sizes are in the problem. */
export interface GpuIO {
  q: GPUBuffer;
  k: GPUBuffer;
  v: GPUBuffer;
  /** Written in the problem's output layout and q's dtype. */
  out: GPUBuffer;
  /** Bool masks are bytes; additive masks are f32. */
  mask: GPUBuffer | null;
  /** f32 [b, n, s_q] natural-log log-sum-exp of each row, when asked for. */
  lse: GPUBuffer | null;
  /** The call's mod buffers by name (flex calls), uploaded when they came from the host. */
  flex?: Record<string, GPUBuffer>;
  /** f32 [n] sink logits (calls with sinks). */
  sinks?: GPUBuffer;
  /** Int32 offsets of a packed batch (b + 1 each), as given or uploaded. */
  cuQ?: GPUBuffer;
  cuK?: GPUBuffer;
  /** Int32 block table [b, max_pages] and cache lengths [b] of a paged cache. */
  table?: GPUBuffer;
  seqlens?: GPUBuffer;
}

/** Host arrays of one call, as float64, in the problem's layouts. */
export interface HostIO {
  q: Float64Array;
  k: Float64Array;
  v: Float64Array;
  mask: Float64Array | null;
  out: Float64Array;
  lse: Float64Array | null;
  /** The call's mod buffers by name (flex calls), read back when they were on the GPU. */
  flex?: ModBufferData;
  /** Sink logits [n] (calls with sinks). */
  sinks?: Float32Array;
  /** Packed batch offsets, read back when they were on the GPU. */
  cuQ?: Int32Array;
  cuK?: Int32Array;
  /** Paged cache table [b, max_pages] and lengths [b]. */
  table?: Int32Array;
  seqlens?: Int32Array;
}

interface BackendCommon {
  /** Canonical name, as `WGATTN_IMPLEMENTATION` and `options.backend` take it. */
  readonly name: string;
  /** Other accepted names (DiffSynth's family names among them). */
  readonly aliases: readonly string[];
  /** One line on what it is. */
  readonly summary: string;
  /** Whether it writes the log-sum-exp. */
  readonly producesLse: boolean;
  /**
   * Why it cannot compute this call correctly on this device; empty when it can. `caps` is null
   * when there is no GPU.
   */
  unsupportedReasons(p: AttentionProblem, caps: Capabilities | null): string[];
  /** Why the router should not pick it on its own though it could run (e.g. slower here). */
  unsuitedReasons?(p: AttentionProblem, caps: Capabilities): string[];
}

/** A backend that records WGSL dispatches into a call's command encoder, never waiting. */
export interface GpuBackend extends BackendCommon {
  readonly kind: "gpu";
  encode(p: AttentionProblem, io: GpuIO, call: GpuCall): Promise<void>;
}

/** A backend that computes on the host. */
export interface CpuBackend extends BackendCommon {
  readonly kind: "cpu";
  compute(p: AttentionProblem, io: HostIO): void;
}

/** Any backend. */
export type Backend = GpuBackend | CpuBackend;

/** The reason every GPU backend gives when there is no adapter. */
export const NO_GPU = "no WebGPU adapter on this machine";

/** Common GPU checks: the adapter exists, and each bound tensor fits one storage binding. */
export function gpuBaseReasons(p: AttentionProblem, caps: Capabilities | null): string[] {
  if (!caps) return [NO_GPU];
  const reasons: string[] = [];
  const limit = caps.limits.maxStorageBufferBindingSize;
  const bytes = p.dtype === "f32" ? 4 : 2;
  // Paged k and v: the page pool.
  const kv = p.paged ? p.paged.numPages * p.paged.pageSize * p.nKv : p.b * p.nKv * p.sKv;
  const sizes: [string, number][] = [
    ["q", p.b * p.n * p.sQ * p.d * bytes],
    ["k", kv * p.d * bytes],
    ["v", kv * p.dV * bytes],
    ["output", p.b * p.n * p.sQ * p.dV * bytes],
  ];
  for (const [name, size] of sizes) {
    if (size > limit) reasons.push(`${name} is ${size} bytes, over maxStorageBufferBindingSize (${limit})`);
  }
  return reasons;
}

/**
 * The flex part of a kernel config for a call (undefined without flex options). Fused kernels that
 * skip key tiles (`tileSkipping`) read a block map whenever the call has a mask_mod.
 */
export function flexKernelConfig(p: AttentionProblem, tileSkipping: boolean): FlexKernelConfig | undefined {
  if (!p.flex) return undefined;
  return {
    scoreMod: p.flex.scoreMod?.wgsl ?? null,
    maskMod: p.flex.maskMod?.wgsl ?? null,
    buffers: p.flex.buffers,
    blockMap: tileSkipping && p.flex.maskMod !== null,
  };
}
