import { WgattnError } from "./errors.ts";
import { checkOptions, closestKey, describeValue, GPU_DEVICE_RULE, type OptionSchema } from "./options.ts";
import {
  type Axis,
  type AxisRecord,
  type KnownSize,
  resolveLayout,
  shapeFor,
  type SizeHelp,
} from "./layout.ts";
import { type MaskOperand, type Operand, toMaskOperand, toOperand } from "./tensor.ts";
import type { AttentionOptions, DType, HostData, TensorInput } from "./types.ts";
import { type FlexView, resolveFlex } from "./flex.ts";
import {
  type PagedView,
  resolvePaged,
  resolveSinks,
  resolveVarlen,
  type SinkView,
  type VarlenView,
} from "./serving.ts";

/** Element strides of a mask over [b, n, s_q, s_kv]; 0 where the mask broadcasts. */
export interface MaskStrides {
  b: number;
  n: number;
  i: number;
  j: number;
}

/** A mask as kernels see it. */
export interface MaskView {
  operand: MaskOperand;
  /** `bool`: nonzero attends; `additive`: added to the scaled score. */
  kind: "bool" | "additive";
  strides: MaskStrides;
  /** True when the mask depends only on (batch, key): a key-padding mask. */
  keyPadding: boolean;
  /** The option it came from, for error messages. */
  argument?: "options.attnMask" | "options.keyPaddingMask";
}

/** One of q, k, v with its element strides by logical axis (n is its own head axis). */
export interface OperandView {
  operand: Operand;
  strides: AxisRecord;
}

/**
 * One validated attention call: sizes, operands with strides, and the resolved options.
 * Backends read only this.
 */
export interface AttentionProblem {
  b: number;
  /** Query heads. */
  n: number;
  /** Key/value heads; divides n. */
  nKv: number;
  sQ: number;
  sKv: number;
  /** Head dim of q and k. */
  d: number;
  /** Head dim of v and the output. */
  dV: number;
  dtype: DType;
  scale: number;
  isCausal: boolean;
  /**
   * Keys j that query i may see satisfy `i + offset - left <= j <= i + offset + right`, where
   * `offset = sKv - sQ` (bottom-right alignment). Infinity when a side is unbounded.
   */
  left: number;
  right: number;
  /**
   * The diagonal offset of the band: `sKv - sQ` for a call; a piece of a split call (core/split.ts)
   * keeps its rows and keys aligned as in the whole call.
   */
  offset: number;
  q: OperandView;
  k: OperandView;
  v: OperandView;
  mask: MaskView | null;
  out: { pattern: string; shape: number[]; strides: AxisRecord };
  /** A host call's `options.out`, validated: the array the output is written into; null without. */
  into: HostData | null;
  residency: "host" | "gpu";
  compatibilityMode: boolean;
  /** scoreMod / maskMod / modBuffers / blockMask, validated; null when the call uses none. */
  flex: FlexView | null;
  /** Per-head sink logits added to each row's softmax denominator; null without. */
  sinks: SinkView | null;
  /**
   * A packed batch: then b is 1, sQ and sKv are the token totals, q/k/v/out are `[1, total, heads,
   * d]` ("b s n d") and each sequence's band is aligned bottom-right within it.
   */
  varlen: VarlenView | null;
  /**
   * A paged cache: k and v are pages `[num_pages, page_size, n_kv, d]` (strides: s = a row of a
   * page, n = a head, b unused), sKv the longest cache length (a bound for GPU lengths).
   */
  paged: PagedView | null;
}

/** Shape of the log-sum-exp: `[b, n, s_q]`, or `[n, total_q]` for a packed batch (as flash-attn's). */
export function lseShape(p: AttentionProblem): number[] {
  return p.varlen ? [p.n, p.sQ] : [p.b, p.n, p.sQ];
}

/** Why a backend that reads dense K/V of whole sequences cannot serve a serving call (empty if it can). */
export function servingReasons(
  p: AttentionProblem,
  serves: { sinks?: boolean; varlen?: boolean; paged?: boolean },
): string[] {
  const reasons: string[] = [];
  if (p.sinks && !serves.sinks) reasons.push("it has no attention sinks (options.sinks)");
  if (p.varlen && !serves.varlen) reasons.push("it does not read packed batches (options.cuSeqlensQ/K)");
  if (p.paged && !serves.paged) reasons.push("it does not read paged caches (options.blockTable)");
  return reasons;
}

/** Diagonal offset used by causal and window masks. */
export function diagonalOffset(p: AttentionProblem): number {
  return p.offset;
}

/** True when the call restricts keys by position (causal or window). */
export function hasBand(p: AttentionProblem): boolean {
  return Number.isFinite(p.left) || Number.isFinite(p.right);
}

/** Floating-point operations of one call (4·b·n·s_q·s_kv·d, halved for causal), as benchmarks count them. */
export function flopCount(
  p: { b: number; n: number; sQ: number; sKv: number; d: number; isCausal?: boolean },
) {
  return 4 * p.b * p.n * p.sQ * p.sKv * p.d * (p.isCausal ? 0.5 : 1);
}

const DEFAULT_PATTERN = "b n s d";
/** A packed batch's tensors `[total, heads, d]`, seen as b = 1. */
const PACKED_PATTERN = "b s n d";

const objectOrNull = (expected: string) => ({
  test: (x: unknown) => typeof x === "object" && !Array.isArray(x),
  expected,
});

const INDEX_RULE = {
  test: (x: unknown) => typeof x === "object" && x !== null && !Array.isArray(x),
  expected: 'an Int32Array, { data: Int32Array, shape } or { buffer, shape, dtype: "i32" }',
};

/** Options that a packed batch or a paged cache cannot take, with why. */
const SERVING_EXCLUDES = [
  "attnMask",
  "keyPaddingMask",
  "scoreMod",
  "maskMod",
  "modBuffers",
  "blockMask",
] as const;

/** Every key of {@link AttentionOptions} and what its value must be (deeper checks follow). */
const ATTENTION_OPTIONS: OptionSchema = {
  qPattern: "string",
  kPattern: "string",
  vPattern: "string",
  outPattern: "string",
  out: {
    test: (x) => x instanceof Float32Array || x instanceof Float16Array || x instanceof Uint16Array,
    expected: "a Float32Array, Float16Array or Uint16Array (host calls)",
  },
  dims: "object",
  scale: "number",
  isCausal: "boolean",
  windowSize: {
    test: (x) => x === null || typeof x === "number" || Array.isArray(x),
    expected: "an integer >= 0, or [left, right] of integers >= 0 (-1 = unbounded)",
  },
  attnMask: objectOrNull("a mask { data, shape, dtype? }, { buffer, shape, dtype } or null"),
  keyPaddingMask: objectOrNull("a bool mask [b, s_kv] or null"),
  compatibilityMode: "boolean",
  backend: "string",
  device: GPU_DEVICE_RULE,
  scoreMod: {
    test: (x) => typeof x === "string" || (typeof x === "object" && x !== null && !Array.isArray(x)),
    expected: "WGSL text defining fn score_mod, or { wgsl, ts? }",
  },
  maskMod: {
    test: (x) => typeof x === "string" || (typeof x === "object" && x !== null && !Array.isArray(x)),
    expected: "WGSL text defining fn mask_mod, or { wgsl, ts? }",
  },
  modBuffers: "object",
  blockMask: "object",
  sinks: {
    test: (x) => typeof x === "object" && x !== null,
    expected: "a Float32Array or number[] of n, or an f32 GPU tensor [n]",
  },
  cuSeqlensQ: INDEX_RULE,
  cuSeqlensK: INDEX_RULE,
  blockTable: INDEX_RULE,
  cacheSeqlens: INDEX_RULE,
};

const DIMS_KEYS = ["b", "n", "s", "d", "nKv"];

/** Validates q, k, v and options into an {@link AttentionProblem}. Throws {@link WgattnError}. */
export function resolveProblem(
  qIn: TensorInput,
  kIn: TensorInput,
  vIn: TensorInput,
  options: AttentionOptions = {},
): AttentionProblem {
  checkOptions(options, ATTENTION_OPTIONS);
  let q = toOperand(qIn, "q");
  let k = toOperand(kIn, "k");
  let v = toOperand(vIn, "v");
  const packed = options.cuSeqlensQ !== undefined || options.cuSeqlensK !== undefined;
  const paging = options.blockTable !== undefined || options.cacheSeqlens !== undefined;
  if (packed || paging) {
    const what = packed ? "options.cuSeqlensQ" : "options.blockTable";
    if (packed && paging) {
      throw new WgattnError("INVALID_OPTION", "a call is a packed batch or reads a paged cache, not both", {
        argument: "options.blockTable",
        expected: "cuSeqlensQ/K or blockTable/cacheSeqlens",
        actual: "both",
      });
    }
    const excluded = [
      ...SERVING_EXCLUDES,
      ...(packed ? ["qPattern", "kPattern", "vPattern", "outPattern", "dims"] as const : []),
      ...(paging ? ["kPattern", "vPattern"] as const : []),
    ];
    for (const key of excluded) {
      if (options[key] !== undefined && options[key] !== null) {
        throw new WgattnError("INVALID_OPTION", `options.${key} does not combine with ${what}`, {
          argument: `options.${key}`,
          expected: packed
            ? "q [total_q, n, d], k and v [total_k, n_kv, d], without masks, patterns or flex functions"
            : "k and v [num_pages, page_size, n_kv, d], without masks or flex functions",
          actual: describeValue(options[key]),
        });
      }
    }
    const dense = packed ? [["q", q], ["k", k], ["v", v]] as const : [["k", k], ["v", v]] as const;
    for (const [name, t] of dense) {
      const rank = packed ? 3 : 4;
      if (t.shape.length !== rank) {
        throw new WgattnError(
          "INVALID_SHAPE",
          `${name} must have ${rank} axes in a ${packed ? "packed batch" : "paged cache"}`,
          {
            argument: name,
            expected: packed
              ? `[total_${name === "q" ? "q" : "k"}, heads, d]`
              : "[num_pages, page_size, n_kv, d]",
            actual: `[${t.shape}]`,
          },
        );
      }
    }
    if (packed) {
      // As "b s n d" with b = 1: every dense layout path below applies unchanged.
      q = { ...q, shape: [1, ...q.shape] };
      k = { ...k, shape: [1, ...k.shape] };
      v = { ...v, shape: [1, ...v.shape] };
    } else if (k.shape.slice(0, 3).some((x, i) => x !== v.shape[i])) {
      throw new WgattnError("SHAPE_MISMATCH", "k and v pages must have the same first three axes", {
        argument: "v",
        expected: `[${k.shape.slice(0, 3)}, d_v]`,
        actual: `[${v.shape}]`,
      });
    }
  }
  for (const [name, t] of [["k", k], ["v", v]] as const) {
    if (t.dtype !== q.dtype) {
      throw new WgattnError("DTYPE_MISMATCH", `${name} must have q's dtype`, {
        argument: name,
        expected: q.dtype,
        actual: t.dtype,
      });
    }
  }
  const dims = options.dims ?? {};
  for (const [key, value] of Object.entries(dims)) {
    if (!DIMS_KEYS.includes(key)) {
      const near = closestKey(key, DIMS_KEYS);
      throw new WgattnError(
        "INVALID_DIMS",
        `options.dims has an unknown key${near ? ` (did you mean ${near}?)` : ""}`,
        {
          argument: `options.dims.${key}`,
          expected: near ? `${near}, or one of b, n, s, d, nKv` : "b, n, s, d or nKv",
          actual: JSON.stringify(key),
        },
      );
    }
    if (value !== undefined && (!Number.isInteger(value) || value < 1)) {
      throw new WgattnError("INVALID_DIMS", `options.dims.${key} must be a positive integer`, {
        argument: `options.dims.${key}`,
        expected: "an integer >= 1",
        actual: describeValue(value),
      });
    }
  }
  const fromDims = (value: number | undefined): KnownSize | undefined =>
    value === undefined ? undefined : { value, from: "dims" };

  const given = `options.dims = ${JSON.stringify(dims)}`;
  const dimsWay = (key: string, what: string) => ({
    option: `options.dims.${key}`,
    text: `options.dims.${key} (${what})`,
  });
  const qHelp: SizeHelp = {
    ways: {
      b: dimsWay("b", "the batch"),
      n: dimsWay("n", "q's head count"),
      s: dimsWay("s", "q's sequence length"),
      d: dimsWay("d", "the head dim of q and k"),
    },
    given,
  };
  const kHelp: SizeHelp = {
    ways: {
      n: dimsWay("nKv", "k and v's head count; options.dims.n sets q's only"),
      s: { text: "k's sequence length, which no option sets: keep s outside the group in options.kPattern" },
    },
    given,
  };
  const qPattern = packed ? PACKED_PATTERN : options.qPattern ?? DEFAULT_PATTERN;
  const kPattern = packed ? PACKED_PATTERN : options.kPattern ?? DEFAULT_PATTERN;
  const vPattern = packed ? PACKED_PATTERN : options.vPattern ?? DEFAULT_PATTERN;
  const outPattern = packed ? PACKED_PATTERN : options.outPattern ?? DEFAULT_PATTERN;
  const ql = resolveLayout(
    qPattern,
    q.shape,
    {
      b: fromDims(dims.b),
      n: fromDims(dims.n),
      s: fromDims(dims.s),
      d: fromDims(dims.d),
    },
    "q",
    "options.qPattern",
    qHelp,
  );
  const paged = paging ? resolvePaged(options, ql.sizes.b, k.shape) : null;
  const pagedLayout = (t: Operand) => ({
    sizes: { b: ql.sizes.b, n: t.shape[2], s: paged!.maxLen, d: t.shape[3] },
    strides: { b: 0, n: t.shape[3], s: t.shape[2] * t.shape[3], d: 1 },
  });
  const kl = paged ? pagedLayout(k) : resolveLayout(
    kPattern,
    k.shape,
    {
      b: { value: ql.sizes.b, from: "q" },
      d: { value: ql.sizes.d, from: "q" },
      n: dims.nKv === undefined ? undefined : { value: dims.nKv, from: "dims", dimsKey: "nKv" },
    },
    "k",
    "options.kPattern",
    kHelp,
  );
  if (paged && kl.sizes.d !== ql.sizes.d) {
    throw new WgattnError("SHAPE_MISMATCH", "k's head dim must be q's", {
      argument: "k",
      expected: `d = ${ql.sizes.d}`,
      actual: `[${k.shape}]`,
    });
  }
  const vl = paged ? pagedLayout(v) : resolveLayout(
    vPattern,
    v.shape,
    {
      b: { value: ql.sizes.b, from: "q" },
      n: { value: kl.sizes.n, from: "k" },
      s: { value: kl.sizes.s, from: "k" },
    },
    "v",
    "options.vPattern",
  );

  for (const [name, size, layout] of [["q", ql.sizes.d, qPattern], ["v", vl.sizes.d, vPattern]] as const) {
    // An empty b, n or s is an empty call; an empty head dim is not (q·k over nothing).
    if (size === 0) {
      throw new WgattnError("INVALID_SHAPE", `${name}'s head dim must be at least 1`, {
        argument: name,
        expected: "d >= 1 (b, n, s_q and s_kv may be 0)",
        actual: `d = 0 in ${name} of shape [${(name === "q" ? q : v).shape}] with pattern "${layout}"`,
      });
    }
  }
  const n = ql.sizes.n, nKv = kl.sizes.n;
  // n = 0 query heads over any k/v heads (0 included) is an empty call.
  if (n > 0 && (nKv === 0 || n % nKv !== 0)) {
    throw new WgattnError(
      "HEAD_COUNT",
      "k/v head count must divide q's head count (grouped-query attention)",
      {
        argument: "k",
        expected: `a divisor of n = ${n}`,
        actual: `n_kv = ${nKv}`,
      },
    );
  }
  const outSizes: AxisRecord = { b: ql.sizes.b, n, s: ql.sizes.s, d: vl.sizes.d };
  const outShape = shapeFor(outPattern, outSizes, "options.outPattern");
  const known = (a: Axis): KnownSize => ({ value: outSizes[a], from: a === "d" ? "v" : "q" });
  const outLayout = resolveLayout(
    outPattern,
    outShape,
    { b: known("b"), n: known("n"), s: known("s"), d: known("d") },
    "output",
    "options.outPattern",
  );

  const d = ql.sizes.d;
  const scale = options.scale ?? 1 / Math.sqrt(d);
  if (typeof scale !== "number" || !Number.isFinite(scale)) {
    throw new WgattnError("INVALID_OPTION", "options.scale must be a finite number", {
      argument: "options.scale",
      expected: "a finite number",
      actual: describeValue(scale),
    });
  }
  let left = Infinity, right = Infinity;
  if (options.windowSize !== undefined && options.windowSize !== null) {
    const w = options.windowSize;
    const pair = typeof w === "number" ? [w, w] : w;
    const ok = Array.isArray(pair) && pair.length === 2 &&
      pair.every((x) => Number.isInteger(x) && x >= 0 || x === Infinity || x === -1);
    if (!ok) {
      throw new WgattnError("INVALID_OPTION", "options.windowSize must be a non-negative integer or a pair", {
        argument: "options.windowSize",
        expected: "an integer >= 0, or [left, right] of integers >= 0 (-1 = unbounded)",
        actual: JSON.stringify(w),
      });
    }
    left = pair[0] === -1 ? Infinity : pair[0];
    right = pair[1] === -1 ? Infinity : pair[1];
  }
  const isCausal = options.isCausal === true;
  if (isCausal) right = Math.min(right, 0);
  const sQ = ql.sizes.s, sKv = kl.sizes.s, b = ql.sizes.b;
  const varlen = packed ? resolveVarlen(options, sQ, sKv) : null;
  const sinks = options.sinks === undefined ? null : resolveSinks(options.sinks, n);

  if (options.attnMask !== undefined && options.keyPaddingMask !== undefined) {
    throw new WgattnError("INVALID_MASK", "pass attnMask or keyPaddingMask, not both", {
      argument: "options.keyPaddingMask",
      expected: "one mask; fold key padding into attnMask of shape [b, 1, 1, s_kv]",
      actual: "both given",
    });
  }
  let mask: MaskView | null = null;
  if (options.attnMask !== undefined && options.attnMask !== null) {
    mask = {
      ...broadcastMask(
        toMaskOperand(options.attnMask, "options.attnMask"),
        [b, n, sQ, sKv],
        "options.attnMask",
      ),
      argument: "options.attnMask",
    };
  } else if (options.keyPaddingMask !== undefined && options.keyPaddingMask !== null) {
    const m = toMaskOperand(options.keyPaddingMask, "options.keyPaddingMask");
    if (
      m.dtype !== "bool" || m.shape.length !== 2 || (m.shape[0] !== b && m.shape[0] !== 1) ||
      m.shape[1] !== sKv
    ) {
      throw new WgattnError("INVALID_MASK", "options.keyPaddingMask must be boolean [b, s_kv]", {
        argument: "options.keyPaddingMask",
        expected: `bool of shape [${b}, ${sKv}]`,
        actual: `${m.dtype} of shape [${m.shape}]`,
      });
    }
    mask = {
      operand: m,
      kind: "bool",
      strides: { b: m.shape[0] === 1 ? 0 : sKv, n: 0, i: 0, j: 1 },
      keyPadding: true,
      argument: "options.keyPaddingMask",
    };
  }
  return {
    b,
    n,
    nKv,
    sQ,
    sKv,
    d,
    dV: vl.sizes.d,
    dtype: q.dtype,
    scale,
    isCausal,
    left,
    right,
    offset: sKv - sQ,
    q: { operand: q, strides: ql.strides },
    k: { operand: k, strides: kl.strides },
    v: { operand: v, strides: vl.strides },
    mask,
    // A packed batch's output is [total_q, n, d_v], as q.
    out: { pattern: outPattern, shape: packed ? outShape.slice(1) : outShape, strides: outLayout.strides },
    into: resolveInto(options.out, qIn, q, [k, v, ...(mask ? [mask.operand] : [])], outShape),
    residency: q.residency,
    compatibilityMode: options.compatibilityMode === true,
    flex: resolveFlex(options, { b, n, sQ, sKv }),
    sinks,
    varlen,
    paged: paged?.view ?? null,
  };
}

/**
 * Checks a host call's `options.out`: a host call, the array kind its output would have (see
 * core/tensor.ts `inFormOf`), the output's element count, no bytes shared with an input.
 */
function resolveInto(
  out: HostData | undefined,
  qIn: TensorInput,
  q: Operand,
  others: { residency: "host" | "gpu"; data?: unknown }[],
  shape: number[],
): HostData | null {
  if (out === undefined) return null;
  if (q.residency !== "host") {
    throw new WgattnError("INVALID_OPTION", "options.out is for host calls", {
      argument: "options.out",
      expected: "no out: a call on GPU tensors returns a new GPU tensor",
      actual: describeValue(out),
    });
  }
  const given = (qIn as { data?: unknown }).data;
  const kind = q.dtype === "f32"
    ? Float32Array
    : q.dtype === "bf16" || given instanceof Uint16Array
    ? Uint16Array
    : Float16Array;
  if (!(out instanceof kind)) {
    throw new WgattnError("INVALID_OPTION", "options.out must be the array kind of the output", {
      argument: "options.out",
      expected: `a ${kind.name} (q is ${q.dtype}${given instanceof Uint16Array ? " in a Uint16Array" : ""})`,
      actual: out.constructor.name,
    });
  }
  const count = shape.reduce((a, b) => a * b, 1);
  if (out.length !== count) {
    throw new WgattnError("INVALID_OPTION", "options.out must hold exactly the output's elements", {
      argument: "options.out",
      expected: `${count} elements ([${shape}])`,
      actual: `${out.length}`,
    });
  }
  const overlaps = (x: unknown) =>
    ArrayBuffer.isView(x) && x.buffer === out.buffer && x.byteOffset < out.byteOffset + out.byteLength &&
    out.byteOffset < x.byteOffset + x.byteLength;
  for (const o of [q, ...others]) {
    if (o.residency === "host" && overlaps(o.data)) {
      throw new WgattnError("INVALID_OPTION", "options.out shares memory with an input", {
        argument: "options.out",
        expected: "an array of its own (the output is written while the inputs may still be read)",
        actual: "bytes shared with q, k, v or a mask",
      });
    }
  }
  return out;
}

/** Broadcasts a mask to [b, n, s_q, s_kv] by numpy rules (aligned at the right). */
function broadcastMask(m: MaskOperand, target: number[], argument: string): MaskView {
  const shape = m.shape;
  const fail = () => {
    throw new WgattnError("INVALID_MASK", `${argument} does not broadcast to [b, n, s_q, s_kv]`, {
      argument,
      expected: `a shape broadcastable to [${target}] (each axis equal or 1, at most 4 axes)`,
      actual: `[${shape}]`,
    });
  };
  if (shape.length > 4) fail();
  const full = [...Array(4 - shape.length).fill(1), ...shape];
  const strides = [0, 0, 0, 0];
  let stride = 1;
  for (let axis = 3; axis >= 0; axis--) {
    if (full[axis] !== target[axis] && full[axis] !== 1) fail();
    strides[axis] = full[axis] === 1 ? 0 : stride;
    stride *= full[axis];
  }
  const view: MaskStrides = { b: strides[0], n: strides[1], i: strides[2], j: strides[3] };
  return {
    operand: m,
    kind: m.dtype === "bool" ? "bool" : "additive",
    strides: view,
    keyPadding: m.dtype === "bool" && view.n === 0 && view.i === 0,
  };
}
