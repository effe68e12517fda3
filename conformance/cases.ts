/**
 * The one conformance suite every backend runs (in the manner of Hono's shared router tests): each
 * case is forced onto each backend with `options.backend` and compared with the float64 reference
 * of `reference.ts`. `tests/conformance_test.ts` registers it with `Deno.test`; `wgattn check` and
 * the browser test run it directly, so nothing here needs Deno or Node (a failure is a thrown
 * {@link CaseFailure}).
 */
import type { Backend } from "../backends/backend.ts";
import type { Capabilities } from "../core/device.ts";
import { resolveProblem } from "../core/problem.ts";
import type {
  AttentionOptions,
  DType,
  GpuTensor,
  HostTensor,
  MaskInput,
  OrtTensorLike,
  TensorInput,
} from "../core/types.ts";
import { attentionForward, attentionWithLse } from "../mod.ts";
import {
  type ErrorStats,
  errorStats,
  fromHostArray,
  fromLayout,
  layOut,
  type Logical,
  patternGroups,
  patternShape,
  randomLogical,
  referenceAttention,
  type RefMask,
  type RefOptions,
  rng,
  roundTo,
  type Sizes4,
  toHostArray,
} from "./reference.ts";

/** A mask of a case: its values are random, seeded, with one fully masked query row on request. */
export interface MaskSpec {
  kind: "bool" | "additive";
  /** Broadcastable to `[b, n, s_q, s_kv]`. */
  shape: number[];
  /** Host array type of an additive mask (default f32). */
  array?: "f32" | "f16";
  /** Query row (index along s_q, the mask's second-to-last axis) masked entirely. */
  emptyRow?: number;
  /** Share of masked entries (default 0.25 for bool, 0.1 `-Infinity` for additive). */
  masked?: number;
}

/** One conformance case. */
export interface ConformanceCase {
  b: number;
  n: number;
  /** k/v heads (default n). */
  nKv?: number;
  sQ: number;
  /** Default sQ. */
  sKv?: number;
  d: number;
  /** v's head dim (default d). */
  dV?: number;
  dtype?: DType;
  /** Patterns of q, k, v and the output (default "b n s d"). `dims` is derived. */
  layout?: { q?: string; k?: string; v?: string; out?: string };
  mask?: MaskSpec;
  /** Valid key count per batch (one entry: a `[1, s_kv]` mask). */
  keyPadding?: number[];
  isCausal?: boolean;
  windowSize?: number | [number, number];
  scale?: number;
  /** Tensors (and mask) as GPU buffers; the output is read back. */
  gpu?: boolean;
  /** Host tensors in ONNX Runtime's `{ data, dims, type }` form. */
  ort?: boolean;
  /** Call `attentionWithLse` and check the log-sum-exp too. */
  lse?: boolean;
  /** The case must contain fully masked rows (checked against the reference: a sanity check). */
  emptyRows?: boolean;
  /** Extra words for the test name. */
  note?: string;
}

/** A case's result off the reference, or of the wrong form. */
export class CaseFailure extends Error {
  override name = "CaseFailure";
}

function expect(condition: unknown, message: string): asserts condition {
  if (!condition) throw new CaseFailure(message);
}

const sameList = (a: readonly unknown[], b: readonly unknown[]) =>
  a.length === b.length && a.every((x, i) => x === b[i]);

const DEFAULT = "b n s d";

/** Output tolerances per dtype: max abs error (outputs are in [-1, 1]) and relative L2 error. */
export const TOLERANCE: Record<DType, { maxAbs: number; rel: number; lse: number }> = {
  f32: { maxAbs: 2e-5, rel: 1e-4, lse: 1e-4 },
  f16: { maxAbs: 4e-3, rel: 1e-3, lse: 1e-3 },
  bf16: { maxAbs: 2e-2, rel: 8e-3, lse: 1e-2 },
};

const SAGE_TOLERANCE = { maxAbs: 2.5e-2, rel: 1.5e-2, lse: 1e-2 };
/** `sage-mma` also quantizes P (per row and key tile) and V (per channel) to int8. */
const SAGE_MMA_TOLERANCE = { maxAbs: 5e-2, rel: 3e-2, lse: 1e-2 };

/**
 * Tolerances of approximate backends, by backend name and dtype (others use {@link TOLERANCE}).
 * `sage` computes Q·Kᵀ from int8 blocks, so its score error grows with the score scale: about
 * 2e-3 relative error at the default scale 1/√d, and up to 3.2e-2 max abs at 7.8x that (scale
 * -1.38, d 32, 8 keys: property seed 764728927#36). Its bound is widened by `sharpness / 4` past
 * 4x the default; its cosine and relative-L1 bounds are in tests/sage_test.ts.
 */
export const BACKEND_TOLERANCE: Record<string, Partial<Record<DType, typeof TOLERANCE[DType]>>> = {
  sage: { f32: SAGE_TOLERANCE, f16: SAGE_TOLERANCE, bf16: SAGE_TOLERANCE },
  "sage-mma": { f32: SAGE_MMA_TOLERANCE, f16: SAGE_MMA_TOLERANCE, bf16: SAGE_MMA_TOLERANCE },
};

/** Backends whose error grows with the score scale (int8 scores). */
const SCALE_SENSITIVE = new Set(["sage", "sage-mma"]);

/**
 * The output tolerances a backend is held to for a dtype; `sharpness` is |scale|·√d (1 at the
 * default scale).
 */
export function toleranceFor(backend: string, dtype: DType, sharpness = 1): typeof TOLERANCE[DType] {
  const tol = BACKEND_TOLERANCE[backend]?.[dtype] ?? TOLERANCE[dtype];
  const widen = SCALE_SENSITIVE.has(backend) ? Math.max(1, sharpness / 4) : 1;
  return { maxAbs: tol.maxAbs * widen, rel: tol.rel * widen, lse: tol.lse * widen };
}

/** A readable, unique name of a case. */
export function caseName(c: ConformanceCase): string {
  const nKv = c.nKv ?? c.n, sKv = c.sKv ?? c.sQ;
  const parts = [
    c.dtype ?? "f32",
    c.gpu ? "gpu" : c.ort ? "ort" : "host",
    `b${c.b} n${c.n}${nKv !== c.n ? `/kv${nKv}` : ""} s${c.sQ}${sKv !== c.sQ ? `x${sKv}` : ""} d${c.d}${
      c.dV !== undefined && c.dV !== c.d ? `/dv${c.dV}` : ""
    }`,
  ];
  const l = c.layout;
  if (l) {
    const same = l.q !== undefined && l.q === l.k && l.k === l.v && l.v === (l.out ?? l.q);
    if (same) parts.push(`"${l.q}"`);
    else {
      for (const t of ["q", "k", "v", "out"] as const) if (l[t]) parts.push(`${t}="${l[t]}"`);
    }
  }
  if (c.isCausal) parts.push("causal");
  if (c.windowSize !== undefined) parts.push(`window=${JSON.stringify(c.windowSize)}`);
  if (c.scale !== undefined) parts.push(`scale=${c.scale}`);
  if (c.mask) {
    const m = c.mask;
    parts.push(
      `${m.kind}${m.array === "f16" ? "(f16)" : ""} mask [${m.shape}]${
        m.emptyRow !== undefined ? " empty row" : ""
      }`,
    );
  }
  if (c.keyPadding) parts.push(`keyPadding [${c.keyPadding}]`);
  if (c.lse) parts.push("lse");
  if (c.note) parts.push(c.note);
  return parts.join(" ");
}

// ---- inputs -----------------------------------------------------------------------------------

/** A case's inputs, in the library's form and as the reference sees them. */
interface Built {
  q: Logical;
  k: Logical;
  v: Logical;
  patterns: { q: string; k: string; v: string; out: string };
  host: { q: HostTensor; k: HostTensor; v: HostTensor };
  mask?: { ref: RefMask; data: Uint8Array | Float32Array | Float16Array; shape: number[] };
  keyPadding?: { data: Uint8Array; shape: number[] };
  options: AttentionOptions;
  refOptions: RefOptions;
  outSizes: Sizes4;
}

const builtCache = new Map<ConformanceCase, Built>();
const referenceCache = new Map<ConformanceCase, { out: Float64Array; lse: Float64Array }>();

function seedOf(name: string): number {
  let h = 2166136261;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 16777619);
  return h >>> 0;
}

function build(c: ConformanceCase): Built {
  const hit = builtCache.get(c);
  if (hit) return hit;
  const dtype = c.dtype ?? "f32";
  const random = rng(seedOf(caseName(c)));
  const nKv = c.nKv ?? c.n, sKv = c.sKv ?? c.sQ, dV = c.dV ?? c.d;
  const round = (t: Logical): Logical => ({ data: roundTo(t.data, dtype), sizes: t.sizes });
  // The reference sees the inputs rounded to the dtype, as the kernels do.
  const q = round(randomLogical({ b: c.b, n: c.n, s: c.sQ, d: c.d }, random));
  const k = round(randomLogical({ b: c.b, n: nKv, s: sKv, d: c.d }, random));
  const v = round(randomLogical({ b: c.b, n: nKv, s: sKv, d: dV }, random));
  const patterns = {
    q: c.layout?.q ?? DEFAULT,
    k: c.layout?.k ?? DEFAULT,
    v: c.layout?.v ?? DEFAULT,
    out: c.layout?.out ?? DEFAULT,
  };
  const tensor = (t: Logical, pattern: string): HostTensor => {
    const laid = layOut(t, pattern);
    return { data: toHostArray(laid.data, dtype), shape: laid.shape, dtype };
  };
  const host = { q: tensor(q, patterns.q), k: tensor(k, patterns.k), v: tensor(v, patterns.v) };

  const options: AttentionOptions = {};
  const refOptions: RefOptions = {};
  const grouped = (p: string) => patternGroups(p).some((g) => g.length > 1);
  if (c.layout) {
    options.qPattern = patterns.q;
    options.kPattern = patterns.k;
    options.vPattern = patterns.v;
    options.outPattern = patterns.out;
    const dims: NonNullable<AttentionOptions["dims"]> = {};
    if (grouped(patterns.q) || grouped(patterns.out)) dims.n = c.n;
    if (grouped(patterns.k) && nKv !== c.n) dims.nKv = nKv;
    if (Object.keys(dims).length > 0) options.dims = dims;
  }
  if (c.isCausal) options.isCausal = refOptions.isCausal = true;
  if (c.windowSize !== undefined) options.windowSize = refOptions.windowSize = c.windowSize;
  if (c.scale !== undefined) options.scale = refOptions.scale = c.scale;

  let mask: Built["mask"];
  if (c.mask) {
    const m = c.mask;
    const count = m.shape.reduce((p, x) => p * x, 1);
    const values = new Float64Array(count);
    const share = m.masked ?? (m.kind === "bool" ? 0.25 : 0.1);
    for (let i = 0; i < count; i++) {
      const masked = random() < share;
      values[i] = m.kind === "bool" ? (masked ? 0 : 1) : masked ? -Infinity : random() * 4 - 3;
    }
    if (m.emptyRow !== undefined) {
      const cols = m.shape[m.shape.length - 1], rows = m.shape[m.shape.length - 2];
      for (let i = 0; i < count; i++) {
        if (Math.floor(i / cols) % rows === m.emptyRow) values[i] = m.kind === "bool" ? 0 : -Infinity;
      }
    }
    const data = m.kind === "bool"
      ? Uint8Array.from(values)
      : m.array === "f16"
      ? Float16Array.from(values)
      : Float32Array.from(values);
    const refValues = m.kind === "bool" ? values : roundTo(values, m.array === "f16" ? "f16" : "f32");
    mask = { ref: { kind: m.kind, data: refValues, shape: m.shape }, data, shape: m.shape };
    refOptions.attnMask = mask.ref;
  }
  let keyPadding: Built["keyPadding"];
  if (c.keyPadding) {
    const rows = c.keyPadding.length;
    const data = new Uint8Array(rows * sKv);
    c.keyPadding.forEach((len, r) => data.fill(1, r * sKv, r * sKv + len));
    keyPadding = { data, shape: [rows, sKv] };
    refOptions.keyPaddingMask = keyPadding;
  }
  const built: Built = {
    q,
    k,
    v,
    patterns,
    host,
    mask,
    keyPadding,
    options,
    refOptions,
    outSizes: { b: c.b, n: c.n, s: c.sQ, d: dV },
  };
  builtCache.set(c, built);
  return built;
}

function reference(c: ConformanceCase) {
  let r = referenceCache.get(c);
  if (!r) {
    const b = build(c);
    r = referenceAttention(b.q, b.k, b.v, b.refOptions);
    referenceCache.set(c, r);
  }
  return r;
}

/** Drops a case's cached inputs and reference (for generated cases: property_test.ts). */
export function forgetCase(c: ConformanceCase): void {
  builtCache.delete(c);
  referenceCache.delete(c);
}

// ---- GPU helpers ------------------------------------------------------------------------------

const BYTES: Record<DType, number> = { f32: 4, f16: 2, bf16: 2 };

/** A storage buffer holding `bytes` (padded to a multiple of 4). */
function gpuBuffer(device: GPUDevice, bytes: ArrayBufferView | number): GPUBuffer {
  const length = typeof bytes === "number" ? bytes : bytes.byteLength;
  const buffer = device.createBuffer({
    size: Math.max(4, Math.ceil(length / 4) * 4),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  if (typeof bytes !== "number") {
    const padded = new Uint8Array(Math.ceil(length / 4) * 4);
    padded.set(new Uint8Array(bytes.buffer, bytes.byteOffset, length));
    device.queue.writeBuffer(buffer, 0, padded);
  }
  return buffer;
}

/** Copies the first `bytes` of a buffer back to the host. */
export async function readBack(device: GPUDevice, src: GPUBuffer, bytes: number): Promise<ArrayBuffer> {
  const size = Math.ceil(bytes / 4) * 4;
  const staging = device.createBuffer({ size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const enc = device.createCommandEncoder();
  enc.copyBufferToBuffer(src, 0, staging, 0, size);
  device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const copy = staging.getMappedRange().slice(0, bytes);
  staging.unmap();
  staging.destroy();
  return copy;
}

function hostArrayOf(bytes: ArrayBuffer, dtype: DType): Float32Array | Float16Array | Uint16Array {
  if (dtype === "f32") return new Float32Array(bytes);
  if (dtype === "f16") return new Float16Array(bytes);
  return new Uint16Array(bytes);
}

// ---- running a case ---------------------------------------------------------------------------

/** The tensors and options of a case as one backend gets them; `release` frees GPU buffers. */
function inputsFor(
  c: ConformanceCase,
  b: Built,
  device: GPUDevice | null,
): { q: TensorInput; k: TensorInput; v: TensorInput; options: AttentionOptions; release: () => void } {
  const buffers: GPUBuffer[] = [];
  const options: AttentionOptions = { ...b.options };
  let q: TensorInput = b.host.q, k: TensorInput = b.host.k, v: TensorInput = b.host.v;
  let mask: MaskInput | undefined = b.mask ? { data: b.mask.data, shape: b.mask.shape } : undefined;
  if (c.ort) {
    const type = ({ f32: "float32", f16: "float16", bf16: "bfloat16" } as const)[c.dtype ?? "f32"];
    const ort = (t: HostTensor) => ({ data: t.data, dims: t.shape, type });
    q = ort(b.host.q);
    k = ort(b.host.k);
    v = ort(b.host.v);
  }
  if (c.gpu) {
    if (!device) throw new Error("a GPU case needs a device");
    const gpu = (t: HostTensor): GpuTensor => {
      const buffer = gpuBuffer(device, t.data);
      buffers.push(buffer);
      return { buffer, shape: t.shape, dtype: t.dtype! };
    };
    q = gpu(b.host.q);
    k = gpu(b.host.k);
    v = gpu(b.host.v);
    if (b.mask && !(b.mask.data instanceof Float16Array)) {
      const buffer = gpuBuffer(device, b.mask.data);
      buffers.push(buffer);
      mask = { buffer, shape: b.mask.shape, dtype: b.mask.data instanceof Uint8Array ? "bool" : "f32" };
    }
  }
  if (mask) options.attnMask = mask;
  if (b.keyPadding) options.keyPaddingMask = { data: b.keyPadding.data, shape: b.keyPadding.shape };
  return { q, k, v, options, release: () => buffers.forEach((x) => x.destroy()) };
}

/**
 * Why `backend` cannot run case `c` here (empty when it can): the backend's own reasons for the
 * call's problem, or a missing device or log-sum-exp.
 */
export function caseReasons(
  backend: Backend,
  c: ConformanceCase,
  caps: Capabilities | null,
  device: GPUDevice | null,
): string[] {
  if (c.lse && !backend.producesLse) return ["the backend does not produce the log-sum-exp"];
  if (c.gpu && !device) return ["no WebGPU device for GPU tensors"];
  const b = build(c);
  // Dummy buffers stand in for a GPU case's tensors, so that the problem has the real residency.
  const { q, k, v, options, release } = c.gpu && device ? emptyLike(c, b, device) : inputsFor(c, b, null);
  try {
    return backend.unsupportedReasons(resolveProblem(q, k, v, options), caps);
  } finally {
    release();
  }
}

/** Runs `f` on the problem of case `c` as the library resolves it (GPU cases on empty buffers). */
export function withCaseProblem<T>(
  c: ConformanceCase,
  device: GPUDevice | null,
  f: (p: ReturnType<typeof resolveProblem>) => T,
): T {
  const b = build(c);
  const { q, k, v, options, release } = c.gpu && device ? emptyLike(c, b, device) : inputsFor(c, b, null);
  try {
    return f(resolveProblem(q, k, v, options));
  } finally {
    release();
  }
}

function emptyLike(c: ConformanceCase, b: Built, device: GPUDevice) {
  const dtype = c.dtype ?? "f32";
  const buffers: GPUBuffer[] = [];
  const make = (t: HostTensor): GpuTensor => {
    const buffer = gpuBuffer(device, t.data.length * BYTES[dtype]);
    buffers.push(buffer);
    return { buffer, shape: t.shape, dtype };
  };
  const options: AttentionOptions = { ...b.options };
  if (b.mask) {
    if (b.mask.data instanceof Float16Array) options.attnMask = { data: b.mask.data, shape: b.mask.shape };
    else {
      const buffer = gpuBuffer(device, b.mask.data.byteLength);
      buffers.push(buffer);
      options.attnMask = {
        buffer,
        shape: b.mask.shape,
        dtype: b.mask.data instanceof Uint8Array ? "bool" : "f32",
      };
    }
  }
  if (b.keyPadding) options.keyPaddingMask = { data: b.keyPadding.data, shape: b.keyPadding.shape };
  return {
    q: make(b.host.q),
    k: make(b.host.k),
    v: make(b.host.v),
    options,
    release: () => buffers.forEach((x) => x.destroy()),
  };
}

/** Runs case `c` on `backend` (forced by name) and checks it against the reference. */
export async function runCase(
  backend: Backend,
  c: ConformanceCase,
  device: GPUDevice | null,
): Promise<{ out: ErrorStats; lse: ErrorStats | null }> {
  const dtype = c.dtype ?? "f32";
  const b = build(c);
  const ref = reference(c);
  const { q, k, v, options, release } = inputsFor(c, b, device);
  options.backend = backend.name;
  let outData: ArrayLike<number>, lseData: ArrayLike<number> | null = null;
  const outCount = b.outSizes.b * b.outSizes.n * b.outSizes.s * b.outSizes.d;
  const lseCount = c.b * c.n * c.sQ;
  try {
    const result = c.lse
      ? await attentionWithLse(q, k, v, options)
      : { out: await attentionForward(q, k, v, options), lse: null };
    if (c.ort) {
      // ONNX-style in, ONNX-style out: { data, dims, type }, for the output and the lse alike.
      const type = ({ f32: "float32", f16: "float16", bf16: "bfloat16" } as const)[dtype];
      for (const [t, expected] of [[result.out, type], [result.lse, "float32"]] as const) {
        if (!t) continue;
        const keys = Object.keys(t).sort();
        expect(sameList(keys, ["data", "dims", "type"]), `ONNX-style output has keys [${keys}]`);
        expect(
          (t as OrtTensorLike).type === expected,
          `ONNX-style type ${(t as OrtTensorLike).type}, want ${expected}`,
        );
      }
    }
    // Its type was checked above; from here on it is read as a host tensor.
    const asHost = (t: unknown) =>
      c.ort ? { data: (t as OrtTensorLike).data, shape: (t as OrtTensorLike).dims, dtype } : t;
    const out = asHost(result.out) as HostTensor | GpuTensor;
    const lse = (result.lse ? asHost(result.lse) : null) as HostTensor | GpuTensor | null;
    const want = patternShape(b.patterns.out, b.outSizes);
    expect(sameList([...out.shape], want), `output shape [${out.shape}], want [${want}]`);
    expect(out.dtype === dtype, `output dtype ${out.dtype}, want ${dtype}`);
    if (c.gpu) {
      expect("buffer" in out, "GPU input must give a GPU output");
      const gpuOut = out as GpuTensor;
      outData = hostArrayOf(await readBack(device!, gpuOut.buffer, outCount * BYTES[dtype]), dtype);
      gpuOut.buffer.destroy();
      if (lse) {
        expect("buffer" in lse, "GPU input must give a GPU log-sum-exp");
        lseData = new Float32Array(await readBack(device!, (lse as GpuTensor).buffer, lseCount * 4));
        (lse as GpuTensor).buffer.destroy();
      }
    } else {
      expect("data" in out, "host input must give a host output");
      outData = (out as HostTensor).data;
      if (lse) lseData = (lse as HostTensor).data;
    }
    if (lse) {
      expect(
        sameList([...lse.shape], [c.b, c.n, c.sQ]),
        `lse shape [${lse.shape}], want [${[c.b, c.n, c.sQ]}]`,
      );
    }
  } finally {
    release();
  }
  const actual = fromLayout(fromHostArray(outData, dtype), b.outSizes, b.patterns.out);
  const sharpness = c.scale === undefined ? 1 : Math.abs(c.scale) * Math.sqrt(c.d);
  const tol = toleranceFor(backend.name, dtype, sharpness);

  // Rows with nothing to attend must be exact zeros.
  const dV = b.outSizes.d;
  let emptyRows = 0;
  for (let row = 0; row < lseCount; row++) {
    if (ref.lse[row] !== -Infinity) continue;
    emptyRows++;
    for (let c2 = 0; c2 < dV; c2++) {
      const x = actual[row * dV + c2];
      if (x !== 0) {
        throw new CaseFailure(
          `row ${row} has nothing to attend, so must be zeros, but element ${c2} is ${x}`,
        );
      }
    }
  }
  if (c.emptyRows) expect(emptyRows > 0, "the case should contain fully masked rows");

  const e = errorStats(actual, ref.out);
  const scaleOut = Math.max(1, ...ref.out.map(Math.abs));
  const where = (i: number) => {
    const d = i % dV, r = Math.floor(i / dV);
    const s = r % c.sQ, h = Math.floor(r / c.sQ) % c.n, bb = Math.floor(r / (c.sQ * c.n));
    return `[b=${bb}, n=${h}, s=${s}, d=${d}]: got ${actual[i]}, want ${ref.out[i]}`;
  };
  if (!(e.maxAbs <= tol.maxAbs * scaleOut) || !(e.rel <= tol.rel)) {
    throw new CaseFailure(
      `${dtype} output off the reference: max abs ${e.maxAbs} (limit ${tol.maxAbs * scaleOut}), ` +
        `rel ${e.rel} (limit ${tol.rel}), ${e.bad} NaN/Inf; worst at ${e.worst >= 0 ? where(e.worst) : "-"}`,
    );
  }
  let l: ErrorStats | null = null;
  if (c.lse) {
    l = errorStats(fromHostArray(lseData!, "f32"), ref.lse);
    const scaleLse = Math.max(1, ...ref.lse.filter(Number.isFinite).map(Math.abs));
    if (!(l.maxAbs <= tol.lse * scaleLse)) {
      throw new CaseFailure(
        `log-sum-exp off the reference: max abs ${l.maxAbs} (limit ${
          tol.lse * scaleLse
        }), ${l.bad} NaN/Inf; ` +
          `worst at row ${l.worst}: got ${lseData![l.worst]}, want ${ref.lse[l.worst]}`,
      );
    }
  }
  return { out: e, lse: l };
}

// ---- the cases --------------------------------------------------------------------------------

const BSND = "b s n d", PACKED = "b s (n d)";
const all = (p: string) => ({ q: p, k: p, v: p, out: p });

/** The covering set of cases every backend runs. Keep them small: the software adapter is slow. */
export const CASES: readonly ConformanceCase[] = [
  // sizes and head dims
  { b: 1, n: 2, sQ: 1, d: 64 },
  { b: 2, n: 2, sQ: 77, d: 40 },
  { b: 2, n: 2, sQ: 77, d: 64 },
  { b: 1, n: 2, sQ: 128, d: 80 },
  { b: 1, n: 2, sQ: 120, sKv: 130, d: 96 },
  { b: 1, n: 2, sQ: 64, sKv: 128, d: 128 },
  { b: 1, n: 2, sQ: 77, d: 256 },
  { b: 1, n: 1, sQ: 1000, d: 64 },
  { b: 1, n: 2, sQ: 1, sKv: 77, d: 64, isCausal: true, note: "(decode step)" },
  { b: 1, n: 2, sQ: 33, d: 64, dV: 32 },
  // tile edges
  { b: 1, n: 2, sQ: 31, d: 64 },
  { b: 1, n: 2, sQ: 32, d: 64, isCausal: true },
  { b: 1, n: 2, sQ: 33, d: 64 },
  { b: 1, n: 2, sQ: 63, sKv: 65, d: 64, isCausal: true },
  { b: 1, n: 2, sQ: 64, d: 64 },
  { b: 1, n: 2, sQ: 65, sKv: 31, d: 64 },
  { b: 1, n: 2, sQ: 5, d: 64, note: "(shorter than a tile)" },
  // layouts
  { b: 2, n: 2, sQ: 33, d: 64, layout: all(BSND) },
  { b: 2, n: 3, sQ: 33, d: 40, layout: all(PACKED) },
  { b: 2, n: 2, sQ: 33, d: 64, layout: all("b (n d) s") },
  { b: 2, n: 2, sQ: 33, d: 64, layout: all("(b n) s d") },
  { b: 2, n: 2, sQ: 33, sKv: 40, d: 64, layout: { q: DEFAULT, k: BSND, v: PACKED, out: BSND } },
  { b: 1, n: 2, sQ: 17, d: 64, layout: { q: "s b n d", k: "n b s d", v: "d b n s", out: PACKED } },
  // grouped-query attention
  { b: 1, n: 4, nKv: 2, sQ: 33, d: 64 },
  { b: 2, n: 4, nKv: 1, sQ: 33, sKv: 47, d: 64, layout: all(PACKED) },
  { b: 1, n: 4, nKv: 2, sQ: 33, d: 64, isCausal: true, layout: all(BSND) },
  // masks
  { b: 2, n: 2, sQ: 33, d: 64, mask: { kind: "bool", shape: [33, 33] } },
  { b: 2, n: 2, sQ: 33, sKv: 40, d: 64, mask: { kind: "bool", shape: [2, 1, 1, 40] } },
  { b: 2, n: 2, sQ: 33, d: 64, mask: { kind: "bool", shape: [1, 2, 1, 1], masked: 0.4 } },
  { b: 2, n: 2, sQ: 33, sKv: 40, d: 64, mask: { kind: "additive", shape: [2, 2, 33, 40] } },
  { b: 2, n: 2, sQ: 33, d: 64, mask: { kind: "additive", shape: [33] } },
  { b: 1, n: 2, sQ: 33, d: 64, mask: { kind: "additive", shape: [1, 1, 33, 33], array: "f16" } },
  { b: 2, n: 4, nKv: 2, sQ: 33, sKv: 40, d: 64, keyPadding: [40, 13] },
  { b: 2, n: 2, sQ: 33, sKv: 40, d: 64, keyPadding: [21], isCausal: true },
  { b: 2, n: 2, sQ: 33, d: 64, keyPadding: [33, 0], emptyRows: true },
  { b: 1, n: 2, sQ: 33, d: 64, mask: { kind: "bool", shape: [33, 33], emptyRow: 5 }, emptyRows: true },
  { b: 1, n: 2, sQ: 33, d: 64, mask: { kind: "additive", shape: [2, 33, 33], emptyRow: 0 }, emptyRows: true },
  // causal and window, bottom-right aligned
  { b: 1, n: 2, sQ: 77, d: 64, isCausal: true },
  { b: 1, n: 2, sQ: 33, sKv: 77, d: 64, isCausal: true },
  { b: 1, n: 2, sQ: 77, sKv: 33, d: 64, isCausal: true, emptyRows: true },
  { b: 1, n: 2, sQ: 77, d: 64, windowSize: 8 },
  { b: 1, n: 2, sQ: 33, sKv: 77, d: 64, windowSize: [16, 4] },
  { b: 1, n: 2, sQ: 77, d: 64, windowSize: [-1, 5] },
  { b: 1, n: 2, sQ: 33, sKv: 77, d: 64, windowSize: [4, -1] },
  { b: 1, n: 2, sQ: 77, d: 64, windowSize: 0 },
  { b: 1, n: 2, sQ: 77, d: 64, isCausal: true, windowSize: 10 },
  { b: 1, n: 2, sQ: 65, sKv: 31, d: 64, windowSize: [3, 2], emptyRows: true },
  { b: 1, n: 2, sQ: 33, d: 64, isCausal: true, mask: { kind: "bool", shape: [33, 33] } },
  // scale
  { b: 1, n: 2, sQ: 33, d: 64, scale: 0.3 },
  { b: 1, n: 2, sQ: 33, d: 64, scale: -1 },
  // f16 and bf16
  { b: 2, n: 2, sQ: 77, d: 64, dtype: "f16" },
  { b: 2, n: 2, sQ: 77, d: 64, dtype: "bf16" },
  { b: 1, n: 2, sQ: 33, d: 40, dtype: "f16", isCausal: true },
  { b: 1, n: 2, sQ: 33, sKv: 50, d: 64, dtype: "bf16", isCausal: true },
  { b: 1, n: 2, sQ: 65, d: 64, dtype: "f16", windowSize: 7 },
  { b: 2, n: 4, nKv: 2, sQ: 33, d: 64, dtype: "f16", layout: all(PACKED) },
  { b: 2, n: 4, nKv: 1, sQ: 33, d: 64, dtype: "bf16", layout: all(BSND) },
  { b: 1, n: 2, sQ: 33, d: 64, dtype: "bf16", mask: { kind: "additive", shape: [33, 33] } },
  { b: 1, n: 2, sQ: 33, d: 63, dtype: "bf16", note: "(odd head dim)" },
  { b: 1, n: 2, sQ: 33, d: 64, dtype: "f16", layout: all("b (n d) s") },
  // ONNX-Runtime-style host tensors
  { b: 1, n: 2, sQ: 33, d: 64, ort: true },
  { b: 1, n: 2, sQ: 33, d: 64, dtype: "f16", ort: true },
  // GPU tensors
  { b: 2, n: 2, sQ: 33, d: 64, gpu: true },
  { b: 1, n: 2, sQ: 33, sKv: 65, d: 64, dtype: "f16", isCausal: true, gpu: true },
  { b: 2, n: 3, sQ: 33, d: 40, dtype: "bf16", layout: all(PACKED), gpu: true },
  { b: 2, n: 2, sQ: 33, d: 64, mask: { kind: "bool", shape: [2, 1, 1, 33] }, gpu: true },
  { b: 2, n: 2, sQ: 33, d: 64, mask: { kind: "additive", shape: [2, 2, 33, 33] }, gpu: true },
  // log-sum-exp
  { b: 2, n: 2, sQ: 77, d: 64, lse: true },
  { b: 1, n: 2, sQ: 77, sKv: 33, d: 64, isCausal: true, lse: true, emptyRows: true },
  { b: 2, n: 4, nKv: 2, sQ: 33, d: 64, dtype: "f16", keyPadding: [33, 9], lse: true },
  { b: 1, n: 2, sQ: 33, sKv: 65, d: 64, dtype: "bf16", layout: all(BSND), lse: true },
  { b: 2, n: 2, sQ: 33, d: 64, gpu: true, lse: true },
];

/**
 * The cases a browser's software adapter (SwiftShader) runs in a few minutes: no sliding windows
 * (SwiftShader spins for minutes compiling banded flash kernels), at most 77 queries and keys.
 */
export const QUICK_CASES: readonly ConformanceCase[] = CASES.filter((c) =>
  c.windowSize === undefined && Math.max(c.sQ, c.sKv ?? c.sQ) <= 77
);
