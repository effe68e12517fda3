/**
 * Calls past the binding limits on a big GPU (issue 4): the Wan-like [1, 40, 32760, 128] f32 (q, k
 * and v 670 MB each) and a batch whose q alone exceeds maxStorageBufferBindingSize (2 GiB on the
 * H200): [4, 40, 32760, 128] f32, q 2.68 GB, run as pieces by the core. Each is timed on the GPU
 * and checked on sampled rows against float64; then a call past maxBufferSize must be
 * OUT_OF_MEMORY before any work is queued.
 *
 *   source .gpu/setup.sh && deno run -A bench/limits_h200.ts 2>&1 | tee $OUT/limits.log
 *
 * Options: --rows 12 (sampled rows per case), --skip-oom (the last check allocates 5.4 GB on the host),
 * --small (tiny shapes on any adapter: checks the script).
 */
import { attentionForward, deviceInfo, explain, getDevice, type GpuTensor, WgattnError } from "../mod.ts";
import { gpuStats, Profiler, setProfiler } from "../core/gpu.ts";
import { restrictLimits } from "../core/device.ts";
import { fillRepeating, randomBlock } from "./common.ts";

const arg = (name: string, fallback: string) => {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : fallback;
};
const ROWS = Number(arg("rows", "12"));
const device = await getDevice();
const info = await deviceInfo();
const SMALL = Deno.args.includes("--small");
if (!device || !info || (info.isFallbackAdapter && !SMALL)) {
  console.log("skipped: needs a big GPU");
  Deno.exit(0);
}
// --small: bindings of 256 KiB, so that the small shapes are split as the big ones are on the H200.
if (SMALL) await restrictLimits(device, { maxStorageBufferBindingSize: 1 << 18 });
console.log(`adapter: ${info.adapter}; limits: ${JSON.stringify(info.limits)}`);

/** A repeating xorshift block per tensor (the reference below reads the same blocks). */
const PERIOD = 1_000_003;
const blocks = [randomBlock(PERIOD, 1), randomBlock(PERIOD, 2), randomBlock(PERIOD, 3)];

function tensor(shape: number[], seed: number): GpuTensor {
  const count = shape.reduce((a, b) => a * b, 1);
  const buffer = device!.createBuffer({
    size: Math.ceil((count * 4) / 16) * 16,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  const b = blocks[seed - 1];
  fillRepeating(device!, buffer, new Uint8Array(b.buffer as ArrayBuffer, 0, Math.min(count, PERIOD) * 4));
  return { buffer, shape, dtype: "f32" };
}

/** Reads `d` floats at element `at` of a GPU buffer (one host wait per call). */
async function readRow(buffer: GPUBuffer, at: number, d: number): Promise<Float32Array> {
  const staging = device!.createBuffer({
    size: d * 4,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  const enc = device!.createCommandEncoder();
  enc.copyBufferToBuffer(buffer, at * 4, staging, 0, d * 4);
  device!.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const row = new Float32Array(staging.getMappedRange().slice(0));
  staging.destroy();
  return row;
}

/** Float64 attention of one row (b, h, i) of [b, n, s, d] inputs made by `tensor`. */
function referenceRow(n: number, s: number, d: number, b: number, h: number, i: number, causal: boolean) {
  const [q, k, v] = blocks;
  const at = (t: Float32Array, idx: number) => t[idx % PERIOD];
  const qb = ((b * n + h) * s + i) * d;
  const last = causal ? i : s - 1;
  const scores = new Float64Array(last + 1);
  let m = -Infinity;
  for (let j = 0; j <= last; j++) {
    const kb = ((b * n + h) * s + j) * d;
    let dot = 0;
    for (let c = 0; c < d; c++) dot += at(q, qb + c) * at(k, kb + c);
    scores[j] = dot / Math.sqrt(d);
    if (scores[j] > m) m = scores[j];
  }
  let sum = 0;
  const acc = new Float64Array(d);
  for (let j = 0; j <= last; j++) {
    const e = Math.exp(scores[j] - m);
    sum += e;
    const vb = ((b * n + h) * s + j) * d;
    for (let c = 0; c < d; c++) acc[c] += e * at(v, vb + c);
  }
  return acc.map((x) => x / sum);
}

const SHAPES = SMALL ? [[1, 4, 300, 64], [2, 4, 300, 64]] : [[1, 40, 32760, 128], [4, 40, 32760, 128]];
const started = performance.now();
/** Progress on stderr with seconds since start (a slow step shows where a run spent its time). */
const progress = (what: string) =>
  console.error(`[${((performance.now() - started) / 1000).toFixed(1)} s] ${what}`);
for (const shape of SHAPES) {
  const [B, N, S, D] = shape;
  progress(`creating q, k, v ${JSON.stringify(shape)}`);
  const q = tensor(shape, 1), k = tensor(shape, 2), v = tensor(shape, 3);
  progress("created");
  for (const isCausal of [false, true]) {
    const ex = await explain(q, k, v, { isCausal });
    progress(`explained: ${ex.backend}, split ${JSON.stringify(ex.split ?? null)}`);
    const profiler = new Profiler(device, 16);
    setProfiler(profiler);
    let out: GpuTensor;
    const t0 = performance.now();
    try {
      out = await attentionForward(q, k, v, { isCausal });
    } finally {
      setProfiler(null);
    }
    progress("queued");
    const passes = await profiler.read();
    progress(`ran: ${passes.length} passes`);
    const wall = performance.now() - t0;
    profiler.destroy();
    const gpuMs = passes.reduce((a, p) => a + p.ms, 0);
    let maxErr = 0;
    for (let t = 0; t < ROWS; t++) {
      const b = t % B, h = (t * 7) % N, i = Math.floor(((t + 0.5) / ROWS) * S);
      const got = await readRow(out.buffer, ((b * N + h) * S + i) * D, D);
      const want = referenceRow(N, S, D, b, h, i, isCausal);
      for (let c = 0; c < D; c++) maxErr = Math.max(maxErr, Math.abs(got[c] - want[c]));
    }
    progress("checked sampled rows");
    const flops = 4 * B * N * S * S * D * (isCausal ? 0.5 : 1);
    console.log(JSON.stringify({
      bench: "limits",
      shape,
      isCausal,
      qBytes: B * N * S * D * 4,
      backend: ex.backend,
      split: ex.split ?? null,
      gpuMs: +gpuMs.toFixed(2),
      wallMsWithReadback: Math.round(wall),
      tflops: +(flops / gpuMs / 1e9).toFixed(2),
      sampledRows: ROWS,
      maxAbsErr: maxErr,
    }));
    out.buffer.destroy();
  }
  for (const t of [q, k, v]) t.buffer.destroy();
}

if (!Deno.args.includes("--skip-oom") && !SMALL) {
  // q past maxBufferSize: refused before anything is created or queued.
  const shape = [8, 40, 32760, 128];
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  const live = gpuStats.liveBuffers;
  try {
    await attentionForward({ data, shape }, { data, shape }, { data, shape });
    console.log(JSON.stringify({ bench: "limits", oom: "NOT REFUSED" }));
  } catch (e) {
    console.log(JSON.stringify({
      bench: "limits",
      shape,
      oom: e instanceof WgattnError ? e.code : String(e),
      message: (e as Error).message,
      buffersLeft: gpuStats.liveBuffers - live,
    }));
  }
}
