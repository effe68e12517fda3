/**
 * Accuracy of `sage` (int8 Q·Kᵀ) against a float64 reference: cosine similarity and relative L1
 * error of the output, on random inputs and on inputs whose K has outlier channels (a constant
 * offset plus noise on a few channels: the case K smoothing exists for), full and causal. On large
 * shapes the reference is computed on sampled query rows.
 *
 *   deno run -A bench/sage_accuracy.ts                                 # small shape (software adapters)
 *   deno run -A bench/sage_accuracy.ts --s 4608 --d 128 --n 2          # on a big GPU
 *   options: --b 1  --dtype f32,f16  --rows 256 (0 = every row)  --backend sage
 */
import { attentionForward } from "../mod.ts";

/** How close an output is to the reference. */
export interface Similarity {
  /** Cosine similarity of the two as flat vectors. */
  cosine: number;
  /** sum |actual - expected| / sum |expected|. */
  relL1: number;
  /** max |actual - expected|. */
  maxAbs: number;
  /** sqrt(sum (actual - expected)² / sum expected²). */
  relL2: number;
}

/** Cosine similarity, relative L1 and L2 errors and the max abs error (NaN anywhere gives NaN). */
export function similarity(actual: ArrayLike<number>, expected: ArrayLike<number>): Similarity {
  let dot = 0, na = 0, ne = 0, diff = 0, norm = 0, diff2 = 0, maxAbs = 0, nan = false;
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i], e = expected[i];
    dot += a * e;
    na += a * a;
    ne += e * e;
    diff += Math.abs(a - e);
    norm += Math.abs(e);
    diff2 += (a - e) * (a - e);
    const dd = Math.abs(a - e);
    if (Number.isNaN(dd)) nan = true;
    else if (dd > maxAbs) maxAbs = dd;
  }
  return {
    cosine: dot / Math.sqrt(na * ne),
    relL1: diff / norm,
    maxAbs: nan ? NaN : maxAbs,
    relL2: Math.sqrt(diff2 / ne),
  };
}

/** Offset of the outlier channels of K. */
export const OUTLIER_OFFSET = 24;

/** The outlier channels of K for head dim d (four, spread over d). */
export function outlierChannels(d: number): number[] {
  return [...new Set([3, Math.floor(d / 4) + 1, Math.floor(d / 2) + 5, Math.floor((3 * d) / 4) + 2])]
    .filter((c) => c < d);
}

/** One accuracy run. */
export interface SageAccuracyOptions {
  b?: number;
  n?: number;
  s: number;
  d: number;
  dtype?: "f32" | "f16";
  causal?: boolean;
  /** K gets ±{@link OUTLIER_OFFSET} on {@link outlierChannels}. */
  outliers?: boolean;
  /** Query rows checked (spread over the call); 0 checks every row. */
  rows?: number;
  backend?: string;
  seed?: number;
}

/** The result of one run: the options, the rows checked and the similarity. */
export interface SageAccuracy extends Similarity {
  backend: string;
  shape: number[];
  dtype: "f32" | "f16";
  causal: boolean;
  outliers: boolean;
  rowsChecked: number;
}

/** Runs attention on `backend` (default sage) and compares sampled rows with float64. */
export async function sageAccuracy(o: SageAccuracyOptions): Promise<SageAccuracy> {
  const b = o.b ?? 1, n = o.n ?? 2, s = o.s, d = o.d, dtype = o.dtype ?? "f32";
  const causal = o.causal === true, outliers = o.outliers === true, backend = o.backend ?? "sage";
  let x = (o.seed ?? 12345) >>> 0 || 1;
  const rand = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return (x / 4294967296) * 2 - 1;
  };
  const count = b * n * s * d;
  const make = (extra?: (c: number) => number) => {
    const a = Float32Array.from({ length: count }, (_, i) => rand() + (extra ? extra(i % d) : 0));
    return dtype === "f32" ? a : Float16Array.from(a);
  };
  const offsets = new Float64Array(d);
  if (outliers) {
    outlierChannels(d).forEach((c, i) => offsets[c] = i % 2 === 0 ? OUTLIER_OFFSET : -OUTLIER_OFFSET);
  }
  const q = make(), k = make((c) => offsets[c]), v = make();
  const shape = [b, n, s, d];
  const out = await attentionForward({ data: q, shape }, { data: k, shape }, { data: v, shape }, {
    backend,
    isCausal: causal,
  });
  const total = b * n * s;
  const rows = o.rows && o.rows < total ? o.rows : total;
  const actual = new Float64Array(rows * d), expected = new Float64Array(rows * d);
  const scores = new Float64Array(s), acc = new Float64Array(d);
  const scale = 1 / Math.sqrt(d);
  for (let t = 0; t < rows; t++) {
    const row = rows === total ? t : Math.min(total - 1, Math.floor(((t + 0.5) / rows) * total));
    const bh = Math.floor(row / s), i = row % s;
    const qb = row * d;
    const last = causal ? i : s - 1;
    let m = -Infinity;
    for (let j = 0; j <= last; j++) {
      const kb = (bh * s + j) * d;
      let dot = 0;
      for (let c = 0; c < d; c++) dot += q[qb + c] * k[kb + c];
      scores[j] = dot * scale;
      m = Math.max(m, scores[j]);
    }
    let sum = 0;
    acc.fill(0);
    for (let j = 0; j <= last; j++) {
      const e = Math.exp(scores[j] - m);
      sum += e;
      const vb = (bh * s + j) * d;
      for (let c = 0; c < d; c++) acc[c] += e * v[vb + c];
    }
    for (let c = 0; c < d; c++) {
      expected[t * d + c] = acc[c] / sum;
      actual[t * d + c] = out.data[qb + c];
    }
  }
  return { backend, shape, dtype, causal, outliers, rowsChecked: rows, ...similarity(actual, expected) };
}

if (import.meta.main) {
  const arg = (name: string, fallback: string) => {
    const i = Deno.args.indexOf(`--${name}`);
    return i >= 0 ? Deno.args[i + 1] : fallback;
  };
  const s = Number(arg("s", "256")), d = Number(arg("d", "64"));
  const b = Number(arg("b", "1")), n = Number(arg("n", "2"));
  const rows = Number(arg("rows", s * b * n <= 2048 ? "0" : "256"));
  const backend = arg("backend", "sage");
  const dtypes = arg("dtype", "f32,f16").split(",") as ("f32" | "f16")[];
  for (const dtype of dtypes) {
    for (const outliers of [false, true]) {
      for (const causal of [false, true]) {
        const r = await sageAccuracy({ b, n, s, d, dtype, causal, outliers, rows, backend });
        console.log(JSON.stringify(r));
        console.log(
          `  ${backend} ${dtype} b${b} n${n} s${s} d${d}${causal ? " causal" : ""}${
            outliers ? " K outliers" : " random"
          }: cosine ${r.cosine.toFixed(6)}, relative L1 ${r.relL1.toFixed(5)} (${r.rowsChecked} rows)`,
        );
      }
    }
  }
}
