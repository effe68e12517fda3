/**
 * Flex attention on the GPU: 8 equal documents (a document mask, 7/8 of the tiles empty) with a
 * createBlockMask handle and with the per-call map, against the same call without a mask (goal:
 * >= 5x faster); ALiBi through scoreMod against the plain kernel (goal: within 10%); tanh soft-cap.
 * One JSON line per case: name, backend, ms (median GPU time by timestamp queries), TFLOP/s
 * (dense-equivalent: the unmasked call's FLOPs), speedup or ratio against plain, and the max abs
 * error against float64 on sampled rows (the TypeScript twins of the functions).
 *
 *   deno run -A bench/flex_bench.ts [--quick] [--backend flash-subgroup] [--s 8192] [--n 16] [--d 128] [--reps 20]
 */
import {
  alibi,
  attentionForward,
  type AttentionOptions,
  createBlockMask,
  deviceInfo,
  documentMask,
  explain,
  getDevice,
  type GpuTensor,
  softCap,
} from "../mod.ts";
import { randomBlock, randomGpuTensor, timeOnGpu } from "./common.ts";
import { readBuffer } from "../core/gpu.ts";

const args = Deno.args;
const quick = args.includes("--quick");
const arg = (name: string, fallback: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
};
const s = Number(arg("s", quick ? "1024" : "8192"));
const n = Number(arg("n", quick ? "4" : "16"));
const d = Number(arg("d", quick ? "64" : "128"));
const b = 1;
const reps = Number(arg("reps", quick ? "5" : "20"));
const documents = 8;
const sampleRows = Number(arg("rows", quick ? "8" : "16"));

const info = await deviceInfo();
if (!info) {
  console.log(JSON.stringify({ error: "no WebGPU adapter" }));
  Deno.exit(0);
}
const device = (await getDevice())!;
const shape = [b, n, s, d];
const inputs = {
  q: randomGpuTensor(device, shape, "f32", 1),
  k: randomGpuTensor(device, shape, "f32", 2),
  v: randomGpuTensor(device, shape, "f32", 3),
};
// The tensors repeat these blocks (bench/common.ts), so the host knows every value.
const period = Math.min(b * n * s * d, 1_000_004);
const hostBlocks = [randomBlock(period, 1), randomBlock(period, 2), randomBlock(period, 3)];
const at = (t: number, i: number) => hostBlocks[t][i % period];

const docLength = s / documents;
const ids = Int32Array.from({ length: s }, (_, i) => Math.floor(i / docLength));
const doc = documentMask(ids);
const ali = alibi(n);
const cap = softCap(20);
const flops = 4 * b * n * s * s * d;
const backend = arg("backend", "");

/** Float64 attention of sampled rows with the TypeScript twins, against the call's output. */
async function sampledError(out: GpuTensor, o: AttentionOptions): Promise<number> {
  const got = new Float32Array(await readBuffer(device, out.buffer, b * n * s * d * 4));
  const buffers = (o.modBuffers ?? {}) as Record<string, Float32Array | Int32Array | Uint32Array>;
  const score = typeof o.scoreMod === "object" ? o.scoreMod.ts : undefined;
  const mask = typeof o.maskMod === "object" ? o.maskMod.ts : undefined;
  let worst = 0;
  const scores = new Float64Array(s);
  for (let t = 0; t < sampleRows; t++) {
    const h = t % n, i = Math.floor(((t + 0.5) / sampleRows) * s + (t * 7919) % 13) % s;
    const qb = (h * s + i) * d;
    let m = -Infinity;
    for (let j = 0; j < s; j++) {
      let x = -Infinity;
      if (!mask || mask(0, h, i, j, buffers)) {
        let dot = 0;
        const kb = (h * s + j) * d;
        for (let c = 0; c < d; c++) dot += at(0, qb + c) * at(1, kb + c);
        x = dot / Math.sqrt(d);
        if (score) x = score(x, 0, h, i, j, buffers);
      }
      scores[j] = x;
      if (x > m) m = x;
    }
    let sum = 0;
    const acc = new Float64Array(d);
    for (let j = 0; j < s; j++) {
      if (scores[j] === -Infinity) continue;
      const e = Math.exp(scores[j] - m);
      sum += e;
      const vb = (h * s + j) * d;
      for (let c = 0; c < d; c++) acc[c] += e * at(2, vb + c);
    }
    for (let c = 0; c < d; c++) {
      const err = Math.abs(got[qb + c] - acc[c] / sum);
      worst = Number.isNaN(err) ? NaN : Math.max(worst, err);
    }
  }
  return worst;
}

const blockMask = await createBlockMask(doc.maskMod, { sQ: s, sKv: s, modBuffers: doc.modBuffers });
const cases: { name: string; options: AttentionOptions }[] = [
  { name: "plain", options: {} },
  { name: `documents ${documents} (createBlockMask)`, options: { ...doc, blockMask } },
  { name: `documents ${documents} (per-call block map)`, options: { ...doc } },
  { name: "alibi (scoreMod)", options: { ...ali } },
  { name: "soft-cap 20 (scoreMod)", options: { ...cap } },
];
let plainMs = NaN;
for (const c of cases) {
  const options: AttentionOptions = { ...c.options, ...(backend ? { backend } : {}) };
  const chosen = (await explain(inputs.q, inputs.k, inputs.v, options)).backend;
  // One untimed call compiles the kernels; its output is checked against float64.
  const first = await attentionForward(inputs.q, inputs.k, inputs.v, options);
  const maxAbsErr = await sampledError(first, options);
  first.buffer.destroy();
  const { ms } = await timeOnGpu(inputs, options, reps);
  if (c.name === "plain") plainMs = ms;
  const line: Record<string, unknown> = {
    name: c.name,
    backend: chosen,
    shape: [b, n, s, d],
    dtype: "f32",
    ms: Number(ms.toFixed(4)),
    tflops: Number((flops / ms / 1e9).toPrecision(4)),
  };
  if (c.name.startsWith("documents")) line.speedupVsPlain = Number((plainMs / ms).toFixed(2));
  else if (c.name !== "plain") line.ratioVsPlain = Number((ms / plainMs).toFixed(3));
  line.maxAbsErr = maxAbsErr;
  line.sampledRows = sampleRows;
  if (c.name.includes("createBlockMask")) line.blocks = await blockMask.counts();
  line.adapter = info.adapter;
  line.engine = info.engine;
  console.log(JSON.stringify(line));
}
blockMask.destroy();
for (const t of Object.values(inputs)) t.buffer.destroy();
