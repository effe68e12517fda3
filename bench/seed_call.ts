/**
 * The seed call [32, 8, 128, 64] f32 from host arrays to a host result, end to end, and where its
 * time goes, for host-copy thread counts 1 (one JavaScript thread) and more (engines/host_copy.ts).
 * Run on each engine; `--cpu-prof` shows the host work around the kernel:
 *
 *   source .gpu/setup.sh && WGATTN_WEBGPU=dawn WGATTN_DAWN_MODULE=$PWD/.gpu/webgpu/index.js \
 *     deno run -A bench/seed_call.ts [--threads 8,16] [--back-to-back 200 [--heat MS] [--out]] [--trace]
 */
import { attentionForward, getDevice, type GpuTensor, stats } from "../mod.ts";
import { engineFor } from "../engines/select.ts";
import { hostCopy, hostCopyTuning } from "../engines/host_copy.ts";
import { readBuffer } from "../core/gpu.ts";
import { heat } from "./heater.ts";

const device = await getDevice();
if (!device) throw new Error("no GPU");
const engine = engineFor(device);
const shape = [32, 8, 128, 64];
const count = shape.reduce((a, b) => a * b, 1);
const rand = (seed: number) => {
  let x = seed;
  return Float32Array.from({ length: count }, () => ((x = (x * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1);
};
const [q, k, v] = [1, 2, 3].map((s) => ({ data: rand(s), shape }));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const wait = () => engine.hold(device.queue.onSubmittedWorkDone());
const gpu = async (data: Float32Array<ArrayBuffer>): Promise<GpuTensor> => {
  const buffer = device.createBuffer({
    size: data.byteLength,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
  });
  await engine.writeBuffer(device, buffer, new Uint8Array(data.buffer));
  return { buffer, shape, dtype: "f32" };
};
// `--trace`: where one host call's time goes, from hooks on the engine (medians over 40 calls, ms
// from the call's start): first upload asked, uploads copied, kernel submitted, read-back mapped,
// copied out, returned.
if (Deno.args.includes("--trace")) {
  const marks: Record<string, number[]> = {};
  let t0 = 0, firstWrite = -1, lastWriteDone = 0, mapped = 0, copiedOut = 0;
  const e = engine as { -readonly [K in keyof typeof engine]: (typeof engine)[K] };
  const { writeBuffer, copyOut } = e;
  e.writeBuffer = (d, b, bytes) => {
    if (firstWrite < 0) firstWrite = performance.now() - t0;
    const r = writeBuffer(d, b, bytes);
    if (r) r.then(() => (lastWriteDone = Math.max(lastWriteDone, performance.now() - t0)));
    return r;
  };
  e.copyOut = (dst, src) => {
    mapped = performance.now() - t0;
    const r = copyOut(dst, src);
    const done = () => (copiedOut = performance.now() - t0);
    if (r) r.then(done);
    else done();
    return r;
  };
  let submits: number[] = [];
  const queue = device.queue as GPUQueue & { submit: GPUQueue["submit"] };
  const submit = queue.submit.bind(queue);
  try {
    queue.submit = (b: GPUCommandBuffer[]) => {
      submits.push(performance.now() - t0);
      return submit(b);
    };
  } catch { /* a native queue may refuse: no submit marks */ }
  const push = (name: string, x: number) => (marks[name] ??= []).push(x);
  for (let i = 0; i < 45; i++) {
    firstWrite = -1, lastWriteDone = 0, submits = [];
    t0 = performance.now();
    await attentionForward(q, k, v);
    const end = performance.now() - t0;
    if (i < 5) continue;
    push("firstUploadAsked", firstWrite);
    push("uploadsCopied", lastWriteDone);
    push("submits", submits.length);
    push("lastSubmitBeforeReadback", submits.length >= 2 ? submits[submits.length - 2] : NaN);
    push("readbackSubmitted", submits.length >= 1 ? submits[submits.length - 1] : NaN);
    push("readbackMapped", mapped);
    push("copiedOut", copiedOut);
    push("returned", end);
  }
  console.log(JSON.stringify({
    bench: "seed-call-trace",
    engine: engine.name,
    ...Object.fromEntries(Object.entries(marks).map(([k, v]) => [k, +median(v).toFixed(3)])),
  }));
  e.writeBuffer = writeBuffer;
  e.copyOut = copyOut;
}
const threads = Deno.args.includes("--threads")
  ? Deno.args[Deno.args.indexOf("--threads") + 1].split(",").map(Number)
  : [1, 4, 8, 16];
const calls = 40;
const [gq, gk, gv] = await Promise.all([q, k, v].map((t) => gpu(t.data)));
// `--back-to-back N`: N host calls in a row per thread count (what a loop of calls sees), nothing
// measured between them. `--heat MS` first keeps the GPU busy that long (a loop of 0.07 ms kernels
// leaves it near idle clocks, which the copies and the kernel then run at).
if (Deno.args.includes("--back-to-back")) {
  const n = Number(Deno.args[Deno.args.indexOf("--back-to-back") + 1]);
  const heatMs = Deno.args.includes("--heat") ? Number(Deno.args[Deno.args.indexOf("--heat") + 1]) : 0;
  // `--out`: every call writes into one reused array (options.out) instead of a new one.
  const reuse = Deno.args.includes("--out") ? { out: new Float32Array(count) } : undefined;
  for (const t of threads) {
    hostCopyTuning.threads = t;
    for (let i = 0; i < 5; i++) await attentionForward(q, k, v, reuse);
    if (heatMs > 0) await heat(device, heatMs);
    const ends: number[] = [];
    for (let i = 0; i < n; i++) {
      const t0 = performance.now();
      await attentionForward(q, k, v, reuse);
      ends.push(performance.now() - t0);
    }
    const sorted = [...ends].sort((a, b) => a - b);
    const at = (f: number) => +sorted[Math.floor(f * (n - 1))].toFixed(3);
    console.log(JSON.stringify({
      bench: "seed-call-back-to-back",
      engine: engine.name,
      copyThreads: t,
      heatMs,
      out: reuse !== undefined,
      medianMs: at(0.5),
      p10Ms: at(0.1),
      p90Ms: at(0.9),
      calls: n,
    }));
  }
}
for (const t of threads) {
  hostCopyTuning.threads = t;
  for (let i = 0; i < 5; i++) await attentionForward(q, k, v);
  const ends: number[] = [], kernel: number[] = [], upload: number[] = [], readback: number[] = [];
  for (let i = 0; i < calls; i++) {
    let t0 = performance.now();
    const r = await attentionForward(q, k, v);
    ends.push(performance.now() - t0);
    if (r.data.length !== count) throw new Error("wrong result length");
    t0 = performance.now();
    const out = await attentionForward(gq, gk, gv);
    await wait();
    kernel.push(performance.now() - t0);
    t0 = performance.now();
    const up = await Promise.all([q, k, v].map((x) => gpu(x.data)));
    await wait();
    upload.push(performance.now() - t0);
    up.forEach((x) => x.buffer.destroy());
    t0 = performance.now();
    await readBuffer(device, out.buffer, count * 4);
    readback.push(performance.now() - t0);
    out.buffer.destroy();
  }
  console.log(JSON.stringify({
    bench: "seed-call",
    engine: engine.name,
    copyThreads: t,
    endToEndMedianMs: +median(ends).toFixed(3),
    endToEndMinMs: +Math.min(...ends).toFixed(3),
    gpuTensorsAndWaitMs: +median(kernel).toFixed(3),
    upload25MBMs: +median(upload).toFixed(3),
    readback8MBMs: +median(readback).toFixed(3),
    calls,
  }));
}
// Host work around the kernel: many calls on GPU tensors, one wait at the end.
{
  const n = 200;
  const outs: GpuTensor[] = [];
  const t0 = performance.now();
  for (let i = 0; i < n; i++) outs.push(await attentionForward(gq, gk, gv));
  const t1 = performance.now();
  await wait();
  const t2 = performance.now();
  outs.forEach((o) => o.buffer.destroy());
  console.log(JSON.stringify({
    bench: "seed-call-host-work",
    engine: engine.name,
    perCallEncodeSubmitMs: +((t1 - t0) / n).toFixed(3),
    drainMs: +(t2 - t1).toFixed(3),
    stats: stats(),
  }));
}
// The read-back's parts: the copy and map, a fresh result array, the copy out (threads as tuned).
{
  hostCopyTuning.threads = 8;
  const src = (await attentionForward(gq, gk, gv)).buffer;
  const bytes = count * 4;
  const staging = device.createBuffer({
    size: bytes,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  const touched = new Uint8Array(bytes).fill(1);
  const parts = {
    copyAndMapMs: [] as number[],
    allocMs: [] as number[],
    copyOutFreshMs: [] as number[],
    copyOutTouchedMs: [] as number[],
  };
  for (let i = 0; i < 20; i++) {
    let t0 = performance.now();
    const enc = device.createCommandEncoder();
    enc.copyBufferToBuffer(src, 0, staging, 0, bytes);
    device.queue.submit([enc.finish()]);
    await engine.hold(staging.mapAsync(GPUMapMode.READ));
    parts.copyAndMapMs.push(performance.now() - t0);
    const mapped = new Uint8Array(staging.getMappedRange());
    t0 = performance.now();
    const fresh = new Uint8Array(new ArrayBuffer(bytes));
    parts.allocMs.push(performance.now() - t0);
    t0 = performance.now();
    await hostCopy(fresh, mapped);
    parts.copyOutFreshMs.push(performance.now() - t0);
    t0 = performance.now();
    await hostCopy(touched, mapped);
    parts.copyOutTouchedMs.push(performance.now() - t0);
    staging.unmap();
  }
  console.log(JSON.stringify({
    bench: "seed-call-readback-parts",
    engine: engine.name,
    ...Object.fromEntries(Object.entries(parts).map(([k, v]) => [k, +median(v).toFixed(3)])),
  }));
}
