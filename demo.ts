/**
 * The demo: attention over q, k, v of shape [32, 8, 128, 64], computed the obvious way in plain
 * TypeScript and with `attentionForward`, compared and timed.
 *
 *   deno task demo        (or: npx -y deno@2.9.6 task demo)
 */
import { attentionForward, deviceInfo, explain } from "./mod.ts";

const [B, N, S, D] = [32, 8, 128, 64];
const shape = [B, N, S, D];
const count = B * N * S * D;
const random = () => Float32Array.from({ length: count }, () => Math.random() * 2 - 1);
const q = { data: random(), shape };
const k = { data: random(), shape };
const v = { data: random(), shape };

/** softmax(q kᵀ / sqrt(d)) v, row by row, in float64. */
function obvious(q: Float32Array, k: Float32Array, v: Float32Array): Float64Array {
  const out = new Float64Array(count);
  const scores = new Float64Array(S);
  const scale = 1 / Math.sqrt(D);
  for (let bh = 0; bh < B * N; bh++) {
    const base = bh * S * D;
    for (let i = 0; i < S; i++) {
      let max = -Infinity;
      for (let j = 0; j < S; j++) {
        let dot = 0;
        for (let c = 0; c < D; c++) dot += q[base + i * D + c] * k[base + j * D + c];
        scores[j] = dot * scale;
        if (scores[j] > max) max = scores[j];
      }
      let sum = 0;
      for (let j = 0; j < S; j++) {
        scores[j] = Math.exp(scores[j] - max);
        sum += scores[j];
      }
      for (let j = 0; j < S; j++) {
        const p = scores[j] / sum;
        for (let c = 0; c < D; c++) out[base + i * D + c] += p * v[base + j * D + c];
      }
    }
  }
  return out;
}

const ms = (t: number) => `${(performance.now() - t).toFixed(1)} ms`;

console.log(`wgattn demo: q, k, v of shape [${shape}] (f32, uniform in [-1, 1))\n`);
const info = await deviceInfo();
console.log(
  `adapter: ${
    info ? `${info.adapter}${info.isFallbackAdapter ? " (software)" : ""}` : "none (the cpu backend runs)"
  }`,
);
if (info) console.log(`  shader-f16: ${info.shaderF16}, subgroups: ${info.subgroups}`);

const why = await explain(q, k, v);
console.log(`\nrouter:\n${why.text}\n`);

let t = performance.now();
const expected = obvious(q.data, k.data, v.data);
const tPlain = ms(t);

t = performance.now();
const first = await attentionForward(q, k, v);
const tFirst = ms(t);
t = performance.now();
const second = await attentionForward(q, k, v);
const tSecond = ms(t);

let diff = 0, worst = 0;
for (let i = 0; i < count; i++) {
  const e = Math.abs(Number(second.data[i]) - expected[i]);
  diff += e;
  if (e > worst) worst = e;
}
let same = true;
for (let i = 0; i < count && same; i++) same = first.data[i] === second.data[i];

console.log(`plain TypeScript (float64 loops):      ${tPlain}`);
console.log(
  `attentionForward, first call:          ${tFirst}  (includes pipeline compilation)`,
);
console.log(`attentionForward, second call:         ${tSecond}  (upload, kernels, one readback)`);
console.log(`\nmean |difference|: ${(diff / count).toExponential(3)}, max: ${worst.toExponential(3)}`);
console.log(`the two calls agree bit for bit: ${same}`);
