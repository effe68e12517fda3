import { WgattnError } from "./errors.ts";
import type { Engine } from "../engines/engine.ts";
import { chosenEngine, engineFor, lockEngine } from "../engines/select.ts";

/** One matrix tile shape the device multiplies on its matrix units (WebGPU subgroup matrices). */
export interface SubgroupMatrixConfig {
  /** Element type of the left and right operands, e.g. "i8", "u8", "f16". */
  componentType: string;
  /** Element type of the result (accumulator), e.g. "i32", "u32", "f32". */
  resultComponentType: string;
  /** Left operand rows (result rows). */
  M: number;
  /** Right operand columns (result columns). */
  N: number;
  /** Inner dimension. */
  K: number;
}

/** What the GPU adapter offers, probed once per device. */
export interface Capabilities {
  /** The WebGPU engine the device belongs to. */
  engine: "deno" | "dawn";
  /** Adapter description, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)". */
  adapter: string;
  /** True for software adapters (lavapipe, SwiftShader, llvmpipe). */
  isFallbackAdapter: boolean;
  /** Device features, `subgroups` included when it was requested successfully. */
  features: ReadonlySet<string>;
  /** `shader-f16`: f16 arithmetic and storage in WGSL. */
  shaderF16: boolean;
  /** Subgroup operations compile and run; `subgroupDirective` says whether WGSL needs `enable subgroups;`. */
  subgroups: boolean;
  subgroupDirective: "" | "enable subgroups;\n";
  /** Subgroup size reported by the adapter (lower bound), or 0 when unknown. */
  subgroupMinSize: number;
  /** Subgroup size reported by the adapter (upper bound); absent or 0 when unknown. */
  subgroupMaxSize?: number;
  /** WGSL `dot4I8Packed` (language feature `packed_4x8_integer_dot_product`). */
  packedInt8Dot: boolean;
  /** `timestamp-query`, for timing kernels on the GPU. */
  timestamps: boolean;
  /**
   * Matrix tiles of `chromium-experimental-subgroup-matrix` (Dawn); empty where the device has no
   * subgroup matrices. WGSL using them needs `enable chromium_experimental_subgroup_matrix;`.
   */
  subgroupMatrixConfigs: readonly SubgroupMatrixConfig[];
  limits: {
    maxStorageBufferBindingSize: number;
    maxBufferSize: number;
    maxComputeWorkgroupStorageSize: number;
    maxComputeInvocationsPerWorkgroup: number;
    maxComputeWorkgroupSizeX: number;
    maxComputeWorkgroupsPerDimension: number;
    maxStorageBuffersPerShaderStage: number;
  };
}

/** A device in use, its capabilities and its compiled pipelines. */
export interface GpuRuntime {
  device: GPUDevice;
  /** The engine the device belongs to: pipeline creation and waiting go through it. */
  engine: Engine;
  caps: Capabilities;
  /** Pipelines by cache key; insertion order is recency (LRU). */
  pipelines: Map<string, Promise<GPUComputePipeline>>;
  /** Why a kernel failed to compile, by backend name; such backends are skipped. */
  broken: Map<string, string>;
  /** True when wgattn acquired the device (and may replace it when it is lost). */
  owned: boolean;
  lost: boolean;
}

/** Pipelines kept per device before the least recently used is dropped. */
export const PIPELINE_CACHE_LIMIT = 256;

const LIMIT_KEYS = [
  "maxStorageBufferBindingSize",
  "maxBufferSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupSizeY",
  "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage",
] as const;

let current: Promise<GpuRuntime | null> | null = null;
const runtimes = new WeakMap<GPUDevice, Promise<GpuRuntime>>();
/** Runtimes already probed, by device, for synchronous lookups ({@link runtimeNow}). */
const probed = new WeakMap<GPUDevice, GpuRuntime>();
/** What `current` resolved to, once it did. */
let currentNow: GpuRuntime | null = null;

/** Makes `device` the one wgattn uses by default. */
export function setDefaultDevice(device: GPUDevice | null): void {
  current = device ? follow(runtimeFor(device, false)) : null;
  currentNow = device ? probed.get(device) ?? null : null;
}

/** Makes `made` the default runtime, and {@link runtimeNow}'s answer once it resolves. */
function follow(made: Promise<GpuRuntime | null>): Promise<GpuRuntime | null> {
  made.then((rt) => {
    if (current === made) currentNow = rt;
  }, () => {});
  return made;
}

/** The runtime for a caller's device (probed once per device). */
export function runtimeFor(device: GPUDevice, owned = false): Promise<GpuRuntime> {
  let r = runtimes.get(device);
  if (!r) {
    r = probe(device, engineFor(device), owned);
    runtimes.set(device, r);
  }
  return r;
}

/**
 * The default runtime, acquired on first use; null when there is no WebGPU adapter. When the device
 * wgattn acquired itself was lost, the next call acquires a new one (once, however many calls ask
 * at the same time); a device the caller gave stays, and calls on it fail with DEVICE_LOST.
 */
export function defaultRuntime(): Promise<GpuRuntime | null> {
  if (!current) current = follow(acquire());
  const seen = current;
  return seen.then((rt) => {
    if (rt && rt.lost && rt.owned) {
      if (current === seen) current = follow(acquire());
      return current!;
    }
    return rt;
  });
}

/**
 * The runtime of `device`, or of the default device, if it was probed already; null otherwise.
 * Never acquires anything.
 */
export function runtimeNow(device?: GPUDevice): GpuRuntime | null {
  if (device) return probed.get(device) ?? null;
  return currentNow;
}

async function acquire(): Promise<GpuRuntime | null> {
  const { engine } = await chosenEngine();
  const adapter = await engine.requestAdapter();
  if (!adapter) return null;
  lockEngine();
  const optional = [
    "shader-f16",
    "timestamp-query",
    "chromium-experimental-subgroup-matrix",
  ] as GPUFeatureName[];
  const wanted = optional.filter((f) => adapter.features.has(f));
  const requiredLimits: Record<string, number> = {};
  for (const key of LIMIT_KEYS) {
    requiredLimits[key] = (adapter.limits as unknown as Record<string, number>)[key];
  }
  // Subgroups work on some adapters that do not list them (see the notes in shared/gpu): try asking.
  const withSubgroups = [...wanted, "subgroups" as GPUFeatureName];
  let device: GPUDevice;
  try {
    device = await engine.hold(adapter.requestDevice({ requiredFeatures: withSubgroups, requiredLimits }));
  } catch {
    device = await engine.hold(adapter.requestDevice({ requiredFeatures: wanted, requiredLimits }));
  }
  const rt = await probe(device, engine, true, adapter);
  runtimes.set(device, Promise.resolve(rt));
  return rt;
}

async function compiles(device: GPUDevice, engine: Engine, code: string): Promise<boolean> {
  device.pushErrorScope("validation");
  const module = device.createShaderModule({ code });
  const diagnostics = engine.hold(device.popErrorScope().catch(() => null));
  try {
    await engine.createComputePipeline(device, { layout: "auto", compute: { module, entryPoint: "main" } });
    return (await diagnostics) === null;
  } catch {
    return false;
  }
}

const SUBGROUP_PROBE = `@group(0) @binding(0) var<storage, read_write> o: array<u32>;
@compute @workgroup_size(32) fn main(@builtin(local_invocation_index) i: u32, @builtin(subgroup_size) n: u32) {
  let x = subgroupAdd(i) + subgroupShuffleXor(i, 1u) + n; o[i] = x; }`;
const DOT4_PROBE = `@group(0) @binding(0) var<storage, read_write> o: array<i32>;
@compute @workgroup_size(1) fn main() { o[0] = dot4I8Packed(0x01020304u, 0x01010101u); }`;

async function probe(
  device: GPUDevice,
  engine: Engine,
  owned: boolean,
  adapter?: GPUAdapter,
): Promise<GpuRuntime> {
  const info = adapter?.info ?? (device as unknown as { adapterInfo?: GPUAdapterInfo }).adapterInfo;
  const features = new Set<string>(device.features);
  let subgroupDirective: "" | "enable subgroups;\n" = "";
  let subgroups = false;
  if (features.has("subgroups")) {
    if (await compiles(device, engine, SUBGROUP_PROBE)) subgroups = true;
    else if (await compiles(device, engine, "enable subgroups;\n" + SUBGROUP_PROBE)) {
      subgroups = true;
      subgroupDirective = "enable subgroups;\n";
    }
  }
  if (!subgroups) features.delete("subgroups");
  // Compiled rather than looked up: a device the caller made may come from an engine whose list of
  // WGSL language features wgattn cannot see.
  const packedInt8Dot = await compiles(device, engine, DOT4_PROBE);
  const l = device.limits as unknown as Record<string, number>;
  const caps: Capabilities = {
    adapter: info?.description || info?.device || info?.vendor || "unknown adapter",
    isFallbackAdapter: (info as { isFallbackAdapter?: boolean } | undefined)?.isFallbackAdapter === true,
    features,
    shaderF16: features.has("shader-f16"),
    subgroups,
    subgroupDirective,
    subgroupMinSize: (info as { subgroupMinSize?: number } | undefined)?.subgroupMinSize ?? 0,
    subgroupMaxSize: (info as { subgroupMaxSize?: number } | undefined)?.subgroupMaxSize ?? 0,
    packedInt8Dot,
    timestamps: features.has("timestamp-query"),
    engine: engine.name,
    subgroupMatrixConfigs: features.has("chromium-experimental-subgroup-matrix")
      ? [
        ...((info as { subgroupMatrixConfigs?: Iterable<SubgroupMatrixConfig> } | undefined)
          ?.subgroupMatrixConfigs ?? []),
      ].map((c) => ({
        componentType: c.componentType,
        resultComponentType: c.resultComponentType,
        M: c.M,
        N: c.N,
        K: c.K,
      }))
      : [],
    limits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
      maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    },
  };
  const rt: GpuRuntime = {
    device,
    engine,
    caps,
    pipelines: new Map(),
    broken: new Map(),
    owned,
    lost: false,
  };
  device.lost.then(() => {
    rt.lost = true;
  });
  probed.set(device, rt);
  return rt;
}

/**
 * Whether the runtime's device is lost, for an error path: `device.lost` settles in a callback
 * that may not have run yet when an operation on a just-destroyed device fails, so this gives it
 * one macrotask to do so.
 */
export async function confirmLost(rt: GpuRuntime): Promise<boolean> {
  if (rt.lost) return true;
  await new Promise((resolve) => setTimeout(resolve, 0));
  return rt.lost;
}

/** A compiled pipeline from the runtime's LRU cache. */
export function cachedPipeline(
  rt: GpuRuntime,
  key: string,
  code: () => string,
  label: string,
): Promise<GPUComputePipeline> {
  const hit = rt.pipelines.get(key);
  if (hit) {
    rt.pipelines.delete(key);
    rt.pipelines.set(key, hit);
    return hit;
  }
  // The shader's own diagnostics go to an error scope (pushed and popped with no await between, so
  // that concurrent calls do not mix them up); the pipeline's rejection only says "invalid".
  rt.device.pushErrorScope("validation");
  let module: GPUShaderModule;
  try {
    module = rt.device.createShaderModule({ code: code(), label });
  } catch (e) {
    rt.device.popErrorScope().catch(() => null);
    throw e;
  }
  const diagnostics = rt.engine.hold(rt.device.popErrorScope().catch(() => null));
  const made: Promise<GPUComputePipeline> = rt.engine.createComputePipeline(rt.device, {
    layout: "auto",
    label,
    compute: { module, entryPoint: "main" },
  })
    .catch(async (e) => {
      if (rt.pipelines.get(key) === made) rt.pipelines.delete(key);
      const message = (e as Error)?.message ?? String(e);
      if (rt.lost || /\blost\b/i.test(message)) {
        throw new WgattnError("DEVICE_LOST", `the GPU device was lost while kernel ${label} was built`, {
          expected: "a live device (the next call acquires a new one, unless the device is yours)",
          actual: message,
        });
      }
      const lines = ((await diagnostics)?.message ?? message).split("\n").map((l) => l.trim())
        .filter((l) => l && !/^(\d+\s*)?[│┌└─^=]/.test(l));
      // Tint lists warnings (e.g. deprecated builtins) before the error: lead with the error.
      const at = lines.findIndex((l) => /\d+:\d+ error:/.test(l));
      const detail = (at >= 0 ? [lines[at], ...lines.slice(at + 1, at + 2)] : lines.slice(0, 2)).join(" ")
        .slice(0, 300);
      throw new WgattnError("GPU_ERROR", `kernel ${label} failed to compile: ${detail}`);
    });
  rt.pipelines.set(key, made);
  while (rt.pipelines.size > PIPELINE_CACHE_LIMIT) {
    rt.pipelines.delete(rt.pipelines.keys().next().value!);
  }
  return made;
}

/**
 * Test hook: makes wgattn plan its work for `device` as if the device's limits were at most these
 * (`GpuCall.dispatch` then refuses any binding past them). Deno's WebGPU raises limits requested
 * below the WebGPU defaults back to the defaults, so a device with small limits cannot be asked for.
 * Use a device of its own: the change lasts as long as the device.
 */
export async function restrictLimits(
  device: GPUDevice,
  limits: Partial<Capabilities["limits"]>,
): Promise<void> {
  const rt = await runtimeFor(device);
  const current = rt.caps.limits as Record<string, number>;
  for (const [key, value] of Object.entries(limits)) {
    if (typeof value === "number" && key in current) current[key] = Math.min(current[key], value);
  }
}
