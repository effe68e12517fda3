/**
 * Accuracy of a backend at a large shape against a float64 reference on sampled rows
 * (the full reference would take minutes on the host).
 *
 *   deno run -A bench/accuracy.ts [--backend flash] [--s 4096] [--d 128] [--rows 48]
 */
import { attentionForward } from "../mod.ts";

const arg = (name: string, fallback: string) => {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : fallback;
};
const backend = arg("backend", "flash");
const s = Number(arg("s", "4096")), d = Number(arg("d", "128")), n = 2;
const sampleRows = Number(arg("rows", "48"));
const count = n * s * d;
let x = 12345;
const rand = () => {
  x ^= x << 13;
  x >>>= 0;
  x ^= x >>> 17;
  x ^= x << 5;
  x >>>= 0;
  return (x / 4294967296) * 2 - 1;
};
for (const dtype of ["f32", "f16"] as const) {
  for (const causal of [false, true]) {
    const make = () => {
      const a = Float32Array.from({ length: count }, rand);
      return dtype === "f32" ? a : Float16Array.from(a);
    };
    const q = make(), k = make(), v = make();
    const shape = [1, n, s, d];
    const out = await attentionForward({ data: q, shape }, { data: k, shape }, { data: v, shape }, {
      backend,
      isCausal: causal,
    });
    let maxErr = 0, maxRef = 0;
    const scores = new Float64Array(s);
    for (let t = 0; t < sampleRows; t++) {
      const h = t % n;
      const i = Math.floor((t / sampleRows) * s + (t * 7919) % 97) % s;
      const qb = (h * s + i) * d;
      let m = -Infinity;
      const last = causal ? i : s - 1;
      for (let j = 0; j <= last; j++) {
        let dot = 0;
        const kb = (h * s + j) * d;
        for (let c = 0; c < d; c++) dot += q[qb + c] * k[kb + c];
        scores[j] = dot / Math.sqrt(d);
        m = Math.max(m, scores[j]);
      }
      let sum = 0;
      const acc = new Float64Array(d);
      for (let j = 0; j <= last; j++) {
        const e = Math.exp(scores[j] - m);
        sum += e;
        const vb = (h * s + j) * d;
        for (let c = 0; c < d; c++) acc[c] += e * v[vb + c];
      }
      for (let c = 0; c < d; c++) {
        const ref = acc[c] / sum;
        maxRef = Math.max(maxRef, Math.abs(ref));
        const err = Math.abs(out.data[qb + c] - ref);
        maxErr = Number.isNaN(err) ? NaN : Math.max(maxErr, err);
      }
    }
    console.log(
      JSON.stringify({
        backend,
        dtype,
        causal,
        shape,
        sampledRows: sampleRows,
        maxAbsErr: maxErr,
        maxAbsRef: maxRef,
      }),
    );
  }
}
