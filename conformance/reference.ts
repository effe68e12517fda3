/**
 * An independent float64 reference for the conformance cases (tests and `wgattn check`): plain loops over logical `[b, n, s, d]` arrays,
 * written without reading any backend. Also seeded random inputs, layouts by pattern, rounding to
 * f16/bf16 and an error metric.
 */

/** Element types as the library names them. */
export type RefDType = "f32" | "f16" | "bf16";

/** Logical sizes of one operand, `[b, n, s, d]`. */
export interface Sizes4 {
  b: number;
  n: number;
  s: number;
  d: number;
}

/** A logical tensor: `data` in `b n s d` order. */
export interface Logical {
  data: Float64Array;
  sizes: Sizes4;
}

/** A mask as the reference takes it: dense data of `shape`, broadcast to `[b, n, s_q, s_kv]`. */
export interface RefMask {
  kind: "bool" | "additive";
  /** bool: nonzero attends; additive: added to the scaled score (`-Infinity` masks). */
  data: ArrayLike<number>;
  shape: readonly number[];
}

/** Options of the reference, named as the library's. */
export interface RefOptions {
  /** Default `1 / sqrt(d)`. */
  scale?: number;
  isCausal?: boolean;
  /** `w` keeps `|i + off - j| <= w`; `[l, r]` keeps `i + off - l <= j <= i + off + r`; -1 = unbounded. */
  windowSize?: number | readonly [number, number];
  attnMask?: RefMask;
  /** Boolean `[b, s_kv]` or `[1, s_kv]`, nonzero = a real key. */
  keyPaddingMask?: { data: ArrayLike<number>; shape: readonly number[] };
  /** Flex: replaces each scaled score (natural-log units) before the masks apply. */
  scoreMod?: (score: number, b: number, h: number, i: number, j: number) => number;
  /** Flex: false masks the pair (after every other mask). */
  maskMod?: (b: number, h: number, i: number, j: number) => boolean;
}

/** Output `[b, n, s_q, d_v]` and log-sum-exp `[b, n, s_q]` (`-Infinity` where nothing is attended). */
export interface RefResult {
  out: Float64Array;
  lse: Float64Array;
}

// ---- random numbers ---------------------------------------------------------------------------

/** A seeded generator of uniform numbers in [0, 1) (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * `count` values uniform in [-1, 1), never zero (nor small enough to round to zero or to an f16
 * subnormal), so that an element the kernel forgets to read shows up.
 */
export function randomValues(count: number, random: () => number): Float64Array {
  const out = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    let x = 0;
    while (Math.abs(x) < 1 / 1024) x = random() * 2 - 1;
    out[i] = x;
  }
  return out;
}

/** A random logical tensor of `sizes`. */
export function randomLogical(sizes: Sizes4, random: () => number): Logical {
  return { data: randomValues(sizes.b * sizes.n * sizes.s * sizes.d, random), sizes };
}

// ---- dtypes -----------------------------------------------------------------------------------

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The bf16 bits of `x`: round the f32 value to nearest even in the upper 16 bits. */
export function toBf16Bits(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  if (Number.isNaN(f32[0])) return 0x7fc0;
  const lower = bits & 0xffff;
  let upper = bits >>> 16;
  if (lower > 0x8000 || (lower === 0x8000 && (upper & 1) === 1)) upper += 1;
  return upper & 0xffff;
}

/** The value of bf16 bits. */
export function fromBf16Bits(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
}

/** `values` rounded to what `dtype` can hold. */
export function roundTo(values: ArrayLike<number>, dtype: RefDType): Float64Array {
  const out = new Float64Array(values.length);
  if (dtype === "f32") { for (let i = 0; i < out.length; i++) out[i] = Math.fround(values[i]); }
  else if (dtype === "f16") { for (let i = 0; i < out.length; i++) out[i] = Math.f16round(values[i]); }
  else for (let i = 0; i < out.length; i++) out[i] = fromBf16Bits(toBf16Bits(values[i]));
  return out;
}

/** A host array of `dtype` holding `values`: Float32Array, Float16Array or bf16 bits in a Uint16Array. */
export function toHostArray(
  values: ArrayLike<number>,
  dtype: RefDType,
): Float32Array | Float16Array | Uint16Array {
  if (dtype === "f32") return Float32Array.from(values);
  if (dtype === "f16") return Float16Array.from(values);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = toBf16Bits(values[i]);
  return out;
}

/** Reads a host array of `dtype` as numbers. */
export function fromHostArray(data: ArrayLike<number>, dtype: RefDType): Float64Array {
  const out = new Float64Array(data.length);
  if (dtype === "bf16") { for (let i = 0; i < out.length; i++) out[i] = fromBf16Bits(data[i]); }
  else for (let i = 0; i < out.length; i++) out[i] = data[i];
  return out;
}

// ---- layouts ----------------------------------------------------------------------------------

type AxisName = "b" | "n" | "s" | "d";

/** Splits `"b s (n d)"` into groups of axis names, memory order, outermost first. */
export function patternGroups(pattern: string): AxisName[][] {
  const groups: AxisName[][] = [];
  const re = /\(([^)]*)\)|(\S+)/g;
  for (const m of pattern.matchAll(re)) {
    const names = (m[1] ?? m[2]).trim().split(/\s+/);
    groups.push(names as AxisName[]);
  }
  const flat = groups.flat().sort().join("");
  if (flat !== "bdns") throw new Error(`reference: bad pattern ${pattern}`);
  return groups;
}

/** The dense shape of a tensor of `sizes` laid out by `pattern`. */
export function patternShape(pattern: string, sizes: Sizes4): number[] {
  return patternGroups(pattern).map((g) => g.reduce((p, a) => p * sizes[a], 1));
}

/** Row-major element strides of each logical axis for `pattern`. */
function patternStrides(pattern: string, sizes: Sizes4): Record<AxisName, number> {
  const order = patternGroups(pattern).flat();
  const strides = {} as Record<AxisName, number>;
  let stride = 1;
  for (let i = order.length - 1; i >= 0; i--) {
    strides[order[i]] = stride;
    stride *= sizes[order[i]];
  }
  return strides;
}

/** Lays a logical tensor out in `pattern` (dense, row-major); returns the data and its shape. */
export function layOut(t: Logical, pattern: string): { data: Float64Array; shape: number[] } {
  const { b: B, n: N, s: S, d: D } = t.sizes;
  const st = patternStrides(pattern, t.sizes);
  const data = new Float64Array(t.data.length);
  let src = 0;
  for (let b = 0; b < B; b++) {
    for (let n = 0; n < N; n++) {
      for (let s = 0; s < S; s++) {
        for (let d = 0; d < D; d++) data[b * st.b + n * st.n + s * st.s + d * st.d] = t.data[src++];
      }
    }
  }
  return { data, shape: patternShape(pattern, t.sizes) };
}

/** Reads data laid out in `pattern` back into logical `b n s d` order. */
export function fromLayout(data: ArrayLike<number>, sizes: Sizes4, pattern: string): Float64Array {
  const { b: B, n: N, s: S, d: D } = sizes;
  const st = patternStrides(pattern, sizes);
  const out = new Float64Array(B * N * S * D);
  let dst = 0;
  for (let b = 0; b < B; b++) {
    for (let n = 0; n < N; n++) {
      for (let s = 0; s < S; s++) {
        for (let d = 0; d < D; d++) out[dst++] = data[b * st.b + n * st.n + s * st.s + d * st.d];
      }
    }
  }
  return out;
}

// ---- the reference ----------------------------------------------------------------------------

/** Reads element [b, h, i, j] of a mask broadcast (numpy rules, right-aligned) to `full`. */
function maskReader(
  shape: readonly number[],
  full: readonly number[],
): (b: number, h: number, i: number, j: number) => number {
  if (shape.length > 4) throw new Error("reference: mask has more than 4 axes");
  const padded = [...Array(4 - shape.length).fill(1), ...shape];
  const strides = [0, 0, 0, 0];
  let stride = 1;
  for (let a = 3; a >= 0; a--) {
    if (padded[a] !== 1 && padded[a] !== full[a]) throw new Error("reference: mask does not broadcast");
    strides[a] = padded[a] === 1 ? 0 : stride;
    stride *= padded[a];
  }
  return (b, h, i, j) => b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3];
}

/**
 * `softmax(q kᵀ · scale + mask) v` in float64, with bottom-right aligned causal/window limits
 * (`off = s_kv - s_q`) and grouped-query heads (`n_kv` divides `n`). A row with nothing to attend
 * gives zeros and log-sum-exp `-Infinity`. NaN follows IEEE arithmetic over the keys a row attends:
 * a NaN score makes the row NaN; a NaN in v reaches that column of the rows that attend its key.
 */
export function referenceAttention(q: Logical, k: Logical, v: Logical, options: RefOptions = {}): RefResult {
  const { b: B, n: N, s: SQ, d: D } = q.sizes;
  const { n: NKV, s: SKV } = k.sizes;
  const DV = v.sizes.d;
  if (k.sizes.b !== B || v.sizes.b !== B || k.sizes.d !== D || v.sizes.n !== NKV || v.sizes.s !== SKV) {
    throw new Error("reference: inconsistent sizes");
  }
  if (N % NKV !== 0) throw new Error("reference: n_kv does not divide n");
  const scale = options.scale ?? 1 / Math.sqrt(D);
  const off = SKV - SQ;
  let left = Infinity, right = Infinity;
  if (options.windowSize !== undefined) {
    const w = options.windowSize;
    const [l, r] = typeof w === "number" ? [w, w] : w;
    left = l === -1 ? Infinity : l;
    right = r === -1 ? Infinity : r;
  }
  if (options.isCausal) right = Math.min(right, 0);
  const full = [B, N, SQ, SKV];
  const mask = options.attnMask;
  const maskAt = mask ? maskReader(mask.shape, full) : null;
  const pad = options.keyPaddingMask;
  const padAt = pad ? maskReader([pad.shape[0], 1, 1, pad.shape[1]], full) : null;

  const out = new Float64Array(B * N * SQ * DV);
  const lse = new Float64Array(B * N * SQ);
  const scores = new Float64Array(SKV);
  const groupSize = N / NKV;
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < N; h++) {
      const hk = Math.floor(h / groupSize);
      for (let i = 0; i < SQ; i++) {
        let max = -Infinity;
        let nan = false; // a NaN score (a NaN in q, k or the mask) makes the whole row NaN
        for (let j = 0; j < SKV; j++) {
          let keep = j >= i + off - left && j <= i + off + right;
          if (keep && padAt && pad!.data[padAt(b, h, i, j)] === 0) keep = false;
          let s = -Infinity;
          if (keep) {
            let dot = 0;
            const qRow = ((b * N + h) * SQ + i) * D;
            const kRow = ((b * NKV + hk) * SKV + j) * D;
            for (let c = 0; c < D; c++) dot += q.data[qRow + c] * k.data[kRow + c];
            s = dot * scale;
            if (options.scoreMod) s = options.scoreMod(s, b, h, i, j);
            if (mask && maskAt) {
              const m = mask.data[maskAt(b, h, i, j)];
              if (mask.kind === "bool") {
                if (m === 0) s = -Infinity;
              } else s += m;
            }
            if (options.maskMod && !options.maskMod(b, h, i, j)) s = -Infinity;
          }
          scores[j] = s;
          if (s > max) max = s;
          if (Number.isNaN(s)) nan = true;
        }
        const row = (b * N + h) * SQ + i;
        if (nan) {
          out.fill(NaN, row * DV, (row + 1) * DV);
          lse[row] = NaN;
          continue;
        }
        if (max === -Infinity) {
          lse[row] = -Infinity; // nothing to attend: zeros (out is already zero)
          continue;
        }
        let sum = 0;
        const acc = new Float64Array(DV);
        for (let j = 0; j < SKV; j++) {
          if (scores[j] === -Infinity) continue;
          const p = Math.exp(scores[j] - max);
          sum += p;
          const vRow = ((b * NKV + hk) * SKV + j) * DV;
          for (let c = 0; c < DV; c++) acc[c] += p * v.data[vRow + c];
        }
        for (let c = 0; c < DV; c++) out[row * DV + c] = acc[c] / sum;
        lse[row] = max + Math.log(sum);
      }
    }
  }
  return { out, lse };
}

// ---- error metric -----------------------------------------------------------------------------

/** How far `actual` is from `expected`. NaN anywhere makes both measures NaN. */
export interface ErrorStats {
  /** Largest |actual - expected|; equal infinities count as exact. */
  maxAbs: number;
  /** ||actual - expected|| / ||expected|| (L2), or the absolute norm when the reference is zero. */
  rel: number;
  /** Index of the worst element. */
  worst: number;
  /** Elements that are NaN (or infinite where the reference is finite). */
  bad: number;
}

/** Compares element by element. */
export function errorStats(actual: ArrayLike<number>, expected: ArrayLike<number>): ErrorStats {
  if (actual.length !== expected.length) {
    throw new Error(`length ${actual.length} differs from the reference's ${expected.length}`);
  }
  let maxAbs = 0, worst = -1, diff2 = 0, norm2 = 0, bad = 0;
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i], e = expected[i];
    if (Number.isFinite(e)) norm2 += e * e;
    if (a === e) continue; // also equal infinities
    const d = Math.abs(a - e);
    if (!Number.isFinite(d)) {
      if (bad === 0) worst = i;
      bad++;
      continue;
    }
    if (bad === 0 && d > maxAbs) {
      maxAbs = d;
      worst = i;
    }
    diff2 += d * d;
  }
  if (bad > 0) return { maxAbs: NaN, rel: NaN, worst, bad };
  return { maxAbs, rel: norm2 > 0 ? Math.sqrt(diff2 / norm2) : Math.sqrt(diff2), worst, bad };
}
