import { WgattnError } from "./errors.ts";
import { envAccess, readEnvIfGranted } from "./env.ts";
import { defaultRuntime, type GpuRuntime, runtimeFor, setDefaultDevice } from "./device.ts";
import {
  checkMemory,
  type EarlyUploads,
  earlyUploadsApply,
  execute,
  type RawResult,
  splitFor,
  startUploads,
} from "./execute.ts";
import { firstPiece, pieceCount } from "./split.ts";
import { type AttentionProblem, resolveProblem } from "./problem.ts";
import { checkGpuOperands } from "./validate.ts";
import { checkOptions, GPU_DEVICE_RULE } from "./options.ts";
import { type ChainEntry, decide, type Decision, type DecisionSource, lookupBackend } from "./router.ts";
import { describeEmptyWork, emptyResultOnGpu, emptyResultOnHost, isEmptyWork } from "./empty.ts";
import type { AttentionOptions, AttentionOutput, LseOutput, TensorInput } from "./types.ts";
import { inFormOf } from "./tensor.ts";
import { BACKENDS } from "../backends/registry.ts";
import { chosenEngine, ENGINE_VARIABLE } from "../engines/select.ts";
import type { EngineName } from "../engines/engine.ts";

/** The environment variable that picks a backend by name, as DiffSynth's `DIFFSYNTH_ATTENTION_IMPLEMENTATION`. */
export const IMPLEMENTATION_VARIABLE = "WGATTN_IMPLEMENTATION";

export { readEnvIfGranted };

/** Reads {@link IMPLEMENTATION_VARIABLE} if env access is already granted. */
export function readImplementationVariable(): string | undefined {
  return readEnvIfGranted(IMPLEMENTATION_VARIABLE);
}

function runtimeOf(options: AttentionOptions | undefined): Promise<GpuRuntime | null> {
  if (options?.device) return runtimeFor(options.device);
  return defaultRuntime();
}

function decideFor(
  p: AttentionProblem,
  rt: GpuRuntime | null,
  options: AttentionOptions | undefined,
  wantLse: boolean,
): Decision {
  return decide(p, rt?.caps ?? null, BACKENDS, {
    requested: options?.backend,
    variable: readImplementationVariable(),
    broken: rt?.broken,
    wantLse,
  });
}

/**
 * An empty call runs no backend, so none is refused for it; a name that names no backend is still
 * an error, as for any call.
 */
function checkBackendNames(options: AttentionOptions | undefined): void {
  if (options?.backend !== undefined) lookupBackend(BACKENDS, options.backend, "options.backend");
  else if (!options?.compatibilityMode) {
    const variable = readImplementationVariable(); // as decide() reads it: after the option and compatibility
    if (variable !== undefined) lookupBackend(BACKENDS, variable, IMPLEMENTATION_VARIABLE);
  }
}

async function run(
  q: TensorInput,
  k: TensorInput,
  v: TensorInput,
  options: AttentionOptions | undefined,
  wantLse: boolean,
) {
  const p = resolveProblem(q, k, v, options);
  const rt = await runtimeOf(options);
  await checkGpuOperands(p, rt); // before anything is created or queued
  if (isEmptyWork(p)) {
    checkBackendNames(options);
    return p.residency === "host"
      ? intoOut(p, emptyResultOnHost(p, wantLse))
      : await emptyResultOnGpu(p, rt!, wantLse);
  }
  // A host call routed to a GPU backend starts its uploads now, beside its checks and encoding. The
  // router decides first: a call it refuses queues nothing.
  let decided: Decision | null = null;
  let early: EarlyUploads | null = null;
  if (earlyUploadsApply(p, rt, wantLse)) {
    decided = decideFor(p, rt, options, wantLse);
    if (decided.backend.kind === "gpu") early = startUploads(p, rt!, wantLse);
  }
  for (;;) {
    // The router decides per piece when the call is split past the binding limits.
    let last: Decision | null = null;
    const choose = (piece: AttentionProblem, lse: boolean) => {
      if (decided && piece === p && lse === wantLse) [last, decided] = [decided, null];
      else last = decideFor(piece, rt, options, lse);
      return last.backend;
    };
    try {
      return intoOut(p, await execute(p, choose, rt, wantLse, early));
    } catch (e) {
      // Uploads that no GPU run took over are released before the error reaches the caller.
      if (early && !early.taken) await early.call.abandon();
      early = decided = null;
      // A kernel that does not compile on this device retires its backend (explain() and
      // availableBackends() give the reason); the router moves on, unless the caller insisted on
      // that backend. A lost device is not the kernel's fault.
      const compileFailure = e instanceof WgattnError && e.code === "GPU_ERROR" &&
        /failed to compile/.test(e.message);
      const decision = last as Decision | null;
      if (!compileFailure || !rt || rt.lost || !decision || rt.broken.has(decision.backend.name)) throw e;
      rt.broken.set(decision.backend.name, e.message.replace(/^\[GPU_ERROR\] /, ""));
      if (decision.source === "option") throw e;
    }
  }
}

/**
 * A host result in `options.out` when the call gave one: the GPU path reads back into it directly;
 * the others (the CPU backend, an empty call) are copied in, bit for bit.
 */
function intoOut(p: AttentionProblem, raw: RawResult): RawResult {
  const into = p.into;
  if (!into || !("data" in raw.out) || raw.out.data === into) return raw;
  const src = raw.out.data;
  new Uint8Array(into.buffer, into.byteOffset, into.byteLength)
    .set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength));
  return { ...raw, out: { ...raw.out, data: into } };
}

/**
 * Scaled-dot-product attention, `softmax(q @ kᵀ · scale) @ v`, on the fastest backend that can
 * serve the call. Host tensors in, host tensor out (one GPU round trip); GPU tensors in, a new GPU
 * tensor out, queued without waiting. The output has q's form and dtype, in its type too (see
 * {@link AttentionOutput}): f32 in, `Float32Array` out; ONNX-style `{ data, dims, type }` in, the
 * same out.
 *
 * Causal and window limits are aligned bottom-right when `s_q != s_kv`. A query row with no key
 * to attend (all masked) gives zeros, not NaN. b, n, s_q or s_kv may be 0: no kernel runs, and the
 * output is empty, or zeros when `s_kv = 0`.
 *
 * @example
 * ```ts
 * import { attentionForward } from "jsr:@wgattn/attention";
 * const shape = [1, 2, 16, 64];
 * const rand = () => Float32Array.from({ length: 2048 }, () => Math.random() - 0.5);
 * const out = await attentionForward({ data: rand(), shape }, { data: rand(), shape }, { data: rand(), shape }, { isCausal: true });
 * console.log(out.shape); // [1, 2, 16, 64]
 * ```
 */
export async function attentionForward<Q extends TensorInput>(
  q: Q,
  k: TensorInput,
  v: TensorInput,
  options?: AttentionOptions,
): Promise<AttentionOutput<Q>> {
  const { out } = await run(q, k, v, options, false);
  return inFormOf(q, out) as AttentionOutput<Q>;
}

/** Output and per-row log-sum-exp of {@link attentionWithLse}. */
export interface AttentionWithLse<T, L = T> {
  /** The attention output, as {@link attentionForward} returns it. */
  out: T;
  /** f32 `[b, n, s_q]` (`[n, total_q]` for a packed batch): `log(sum_j exp(scale · q·k_j + mask))` (plus the sink's `exp` with sinks); `-Infinity` for a fully masked row. */
  lse: L;
}

/**
 * Like {@link attentionForward}, and also returns each row's log-sum-exp, so that attention over
 * disjoint key sets can be merged exactly.
 *
 * @example
 * ```ts
 * import { attentionWithLse } from "jsr:@wgattn/attention";
 * const shape = [1, 1, 4, 8];
 * const t = () => ({ data: Float32Array.from({ length: 32 }, () => Math.random()), shape });
 * const { out, lse } = await attentionWithLse(t(), t(), t());
 * console.log(out.shape, lse.shape); // [1, 1, 4, 8] [1, 1, 4]
 * ```
 */
export async function attentionWithLse<Q extends TensorInput>(
  q: Q,
  k: TensorInput,
  v: TensorInput,
  options?: AttentionOptions,
): Promise<AttentionWithLse<AttentionOutput<Q>, LseOutput<Q>>> {
  const { out, lse } = await run(q, k, v, options, true);
  return { out: inFormOf(q, out), lse: inFormOf(q, lse!) } as AttentionWithLse<
    AttentionOutput<Q>,
    LseOutput<Q>
  >;
}

/** What {@link explain} reports. */
export interface Explanation {
  /** The backend that would run; `none` for an empty call (b, n, s_q or s_kv of 0), which runs none. */
  backend: string;
  /**
   * `option`, `variable` (WGATTN_IMPLEMENTATION), `compatibility` or `priority`; `empty` for an
   * empty call, whose output (empty, or zeros for rows that see no key) needs no kernel.
   */
  source: DecisionSource | "empty";
  /** The name the option or the variable asked for, if any. */
  requested?: string;
  /** Every backend the router considered, in order, with why it was passed over. */
  chain: ChainEntry[];
  /** The GPU adapter in use, or null without one. */
  adapter: string | null;
  /**
   * The WebGPU engine of the device in use (null without one), and why it is not the one
   * `WGATTN_WEBGPU` asked for when Dawn could not load.
   */
  engine: { name: EngineName; version: string; fallback?: string } | null;
  /** The call's sizes as the router saw them. */
  shape: { b: number; n: number; nKv: number; sQ: number; sKv: number; d: number; dV: number; dtype: string };
  /**
   * Set when a tensor exceeds one storage binding: the call runs as this many pieces, cut down to
   * this axis, and `backend` is the choice for the first piece.
   */
  split?: { pieces: number; level: "batch" | "head" | "query" | "key" };
  /**
   * Variables that would steer this call but that wgattn could not read, for want of env permission
   * (`WGATTN_IMPLEMENTATION`; `WGATTN_WEBGPU` while it would pick the engine). Whether they are set
   * cannot be known without that permission, and wgattn never prompts for it: grant it with
   * `--allow-env=WGATTN_IMPLEMENTATION,WGATTN_WEBGPU`.
   */
  unreadVariables: string[];
  /** The same, as a few lines of text. */
  text: string;
}

/**
 * Which backend {@link attentionForward} would run for these arguments, and why: the variable or
 * option that chose it, and each backend passed over with its reasons. Runs nothing on the GPU.
 * A call that attentionForward would refuse (bad input, no backend, buffers over the device's
 * `maxBufferSize`: `OUT_OF_MEMORY`) makes explain() throw the same {@link WgattnError}.
 *
 * @example
 * ```ts
 * import { explain } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(1 * 2 * 8 * 40).fill(0.5), shape: [1, 2, 8, 40] };
 * console.log((await explain(t, t, t)).text);
 * ```
 */
export async function explain(
  q: TensorInput,
  k: TensorInput,
  v: TensorInput,
  options?: AttentionOptions,
): Promise<Explanation> {
  const p = resolveProblem(q, k, v, options);
  const rt = await runtimeOf(options);
  await checkGpuOperands(p, rt);
  const empty = isEmptyWork(p);
  const plan = empty ? null : splitFor(p, rt, false);
  let d: Decision | null = null;
  if (empty) {
    checkBackendNames(options);
    // The same admission checks as the call: GPU tensors in, output buffers made on the device.
    if (p.residency === "gpu" && rt) checkMemory(p, rt, false);
  } else {
    d = decideFor(plan ? firstPiece(p, plan) : p, rt, options, false);
    // The same admission checks as the call: what it would refuse, explain() refuses alike.
    if (d.backend.kind === "gpu" && rt) checkMemory(p, rt, false);
  }
  const shape = { b: p.b, n: p.n, nKv: p.nKv, sQ: p.sQ, sKv: p.sKv, d: p.d, dV: p.dV, dtype: p.dtype };
  const why = d
    ? {
      option: `options.backend = ${JSON.stringify(d.requested)}`,
      variable: `${IMPLEMENTATION_VARIABLE} = ${JSON.stringify(d.requested)}`,
      compatibility: "compatibilityMode forces the plain path",
      priority: d.requested ? `priority order (after ${IMPLEMENTATION_VARIABLE}'s choice)` : "priority order",
    }[d.source]
    : describeEmptyWork(p);
  const choice = await chosenEngine();
  const fallback = !options?.device && choice.fallback
    ? `${ENGINE_VARIABLE} asked for ${choice.requested}, which cannot load: ${choice.fallback}`
    : undefined;
  const engine = rt
    ? { name: rt.engine.name, version: rt.engine.version, ...(fallback ? { fallback } : {}) }
    : null;
  const chain = d?.chain ?? [];
  // The engine variable counts only while it picks the engine: no device given, none chosen in code.
  const steering = [
    IMPLEMENTATION_VARIABLE,
    ...(options?.device || choice.source === "code" ? [] : [ENGINE_VARIABLE]),
  ];
  const unreadVariables = steering.filter((name) => envAccess(name) === "no-permission");
  const lines = [
    `backend: ${d?.backend.name ?? "none"} (${why})`,
    `adapter: ${rt?.caps.adapter ?? "none"}`,
    ...(engine ? [`engine: ${engine.name} (${engine.version})${fallback ? `; ${fallback}` : ""}`] : []),
    ...(plan
      ? [`split: ${pieceCount(plan)} pieces by ${plan.level} (a tensor exceeds maxStorageBufferBindingSize)`]
      : []),
    ...chain.map((c) =>
      `  ${c.chosen ? "->" : "  "} ${c.backend}${c.reasons.length ? `: ${c.reasons.join("; ")}` : ""}`
    ),
    ...unreadVariables.map((name) =>
      `${name}: not read: no env permission (whether it is set is unknown; --allow-env=${name} reads it)`
    ),
  ];
  return {
    backend: d?.backend.name ?? "none",
    source: d?.source ?? "empty",
    requested: d?.requested,
    chain,
    adapter: rt?.caps.adapter ?? null,
    engine,
    shape,
    ...(plan ? { split: { pieces: pieceCount(plan), level: plan.level } } : {}),
    unreadVariables,
    text: lines.join("\n"),
  };
}

const DEVICE_OPTION = { device: GPU_DEVICE_RULE };

/** One backend as {@link availableBackends} lists it. */
export interface BackendInfo {
  /** Canonical name, as `options.backend` and `WGATTN_IMPLEMENTATION` take it. */
  name: string;
  /** Other names it answers to (DiffSynth's family names among them). */
  aliases: readonly string[];
  /** One line on what it is. */
  summary: string;
  /** Whether it can run on this machine at all (some calls may still fall to another). */
  available: boolean;
  /** Why not, when it is not available. */
  reasons: string[];
}

/**
 * The registered backends in priority order, and whether this machine can run each.
 *
 * @example
 * ```ts
 * import { availableBackends } from "jsr:@wgattn/attention";
 * for (const b of await availableBackends()) console.log(b.name, b.available, b.reasons.join("; "));
 * ```
 */
export async function availableBackends(options?: { device?: GPUDevice }): Promise<BackendInfo[]> {
  checkOptions(options, DEVICE_OPTION);
  const rt = await runtimeOf(options);
  // A small, plain call: what a backend rejects for it, it cannot do here at all.
  const t = { data: new Float32Array(64), shape: [1, 1, 1, 64] };
  const p = resolveProblem(t, t, t);
  return BACKENDS.map((b) => {
    const reasons = b.unsupportedReasons(p, rt?.caps ?? null);
    const broken = rt?.broken.get(b.name);
    if (broken) reasons.push(`its kernel failed on this device: ${broken}`);
    return { name: b.name, aliases: b.aliases, summary: b.summary, available: reasons.length === 0, reasons };
  });
}

/**
 * Makes wgattn use your `GPUDevice` (GPU tensors must live on it); `null` goes back to acquiring
 * one on first use. A device of either engine is accepted: one from Deno's `navigator.gpu` or one
 * from Dawn (the npm package `webgpu`, any copy of it); wgattn detects which.
 *
 * @example
 * ```ts
 * import { setDevice } from "jsr:@wgattn/attention";
 * const adapter = await navigator.gpu.requestAdapter();
 * if (adapter) setDevice(await adapter.requestDevice());
 * ```
 */
export function setDevice(device: GPUDevice | null): void {
  setDefaultDevice(device);
}

/**
 * The `GPUDevice` wgattn uses (acquiring it on first call), or null when there is no adapter. Create
 * GPU tensors on it.
 *
 * @example
 * ```ts
 * import { getDevice } from "jsr:@wgattn/attention";
 * const device = await getDevice();
 * console.log(device ? "GPU" : "CPU only");
 * ```
 */
export async function getDevice(): Promise<GPUDevice | null> {
  return (await defaultRuntime())?.device ?? null;
}

/** What the adapter offers, as wgattn probed it. */
export interface DeviceInfo {
  /** Adapter description, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)". */
  adapter: string;
  /** The WebGPU engine of the device: Deno's own (wgpu) or Dawn (npm `webgpu`). */
  engine: EngineName;
  /** What runs the engine, e.g. `deno 2.9.6` or `webgpu@0.6.2 (dawn.node)`. */
  engineVersion: string;
  /** True for a software adapter. */
  isFallbackAdapter: boolean;
  /** WGSL f16 arithmetic and storage (`shader-f16`). */
  shaderF16: boolean;
  /** Subgroup operations compile and run. */
  subgroups: boolean;
  /** WGSL `dot4I8Packed`. */
  packedInt8Dot: boolean;
  /** `timestamp-query`, for timing kernels on the GPU. */
  timestamps: boolean;
  /** Matrix tiles the device multiplies on its matrix units (Dawn's subgroup matrices); empty without. */
  subgroupMatrixConfigs: {
    componentType: string;
    resultComponentType: string;
    M: number;
    N: number;
    K: number;
  }[];
  /** The device limits wgattn requested (the adapter's own). */
  limits: Record<string, number>;
}

/**
 * The capabilities wgattn probed on the device in use (null without a GPU).
 *
 * @example
 * ```ts
 * import { deviceInfo } from "jsr:@wgattn/attention";
 * console.log(await deviceInfo());
 * ```
 */
export async function deviceInfo(options?: { device?: GPUDevice }): Promise<DeviceInfo | null> {
  checkOptions(options, DEVICE_OPTION);
  const rt = await runtimeOf(options);
  if (!rt) return null;
  const c = rt.caps;
  return {
    adapter: c.adapter,
    engine: rt.engine.name,
    engineVersion: rt.engine.version,
    isFallbackAdapter: c.isFallbackAdapter,
    shaderF16: c.shaderF16,
    subgroups: c.subgroups,
    packedInt8Dot: c.packedInt8Dot,
    timestamps: c.timestamps,
    subgroupMatrixConfigs: c.subgroupMatrixConfigs.map((m) => ({ ...m })),
    limits: { ...c.limits },
  };
}
