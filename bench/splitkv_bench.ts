/**
 * Flash-decoding (`split-kv`) on the decode shape of issue 4: b=1, n=32, n_kv=8, s_q=1,
 * s_kv=32768, d=128, f16. Reading K and V (134 MB) is the floor; the target is 40% of the H200's
 * 4.3 TB/s copy bandwidth, and PyTorch's best SDPA backend on the same shape in the same command:
 *
 *   source .gpu/setup.sh && deno bench -A bench/splitkv_bench.ts 2>&1 | tee $OUT/splitkv.log && \
 *     python3 .gpu/torch_sdpa.py --shapes "1,32,1,128,32768,8" --dtypes fp16 | tee -a $OUT/splitkv.log
 *
 * Before the `deno bench` table it prints JSON lines timed on the GPU (timestamp queries): every
 * backend on the decode shape with its bandwidth, a sweep of split-kv's tuning knobs, and the
 * crossover against flash as s_q x group grows (what `SPLITKV_MAX_ROWS` should be). The bench
 * itself queues CALLS calls per host wait. Skipped on software adapters and small devices.
 */
import { attentionForward, deviceInfo, getDevice, type GpuTensor } from "../mod.ts";
import {
  chooseSplitKvConfig,
  SPLITKV_MAX_ROWS,
  SPLITKV_MAX_SQ,
  splitKvPlan,
  splitKvTuning,
} from "../backends/splitkv.ts";
import { defaultRuntime } from "../core/device.ts";
import { resolveProblem } from "../core/problem.ts";
import { readEnvIfGranted } from "../core/api.ts";
import { readBuffer } from "../core/gpu.ts";
import { type BenchShape, shapeInputs, timeOnGpu } from "./common.ts";

/** `WGATTN_BENCH_DRY=1`: every shape 16x shorter, run on any adapter (checks the script itself). */
const DRY = readEnvIfGranted("WGATTN_BENCH_DRY") === "1";
const kv = (s: number) => (DRY ? s / 16 : s);
/** `WGATTN_BENCH_PARTS=decode,sweep,crossover` (default all): which parts of the report to run. */
const PARTS = (readEnvIfGranted("WGATTN_BENCH_PARTS") ?? "decode,sweep,crossover").split(",");
const wants = (part: "decode" | "sweep" | "crossover") => PARTS.includes(part);
const DECODE: BenchShape = { name: "decode", b: 1, n: 32, nKv: 8, s: 1, sKv: kv(32768), d: 128 };
/** Device-to-device copy bandwidth measured on the H200, bytes/s. */
const PEAK = 4.3e12;
const CALLS = DRY ? 4 : 200;
const DEFAULT_TARGET = splitKvTuning.targetWorkgroups;
const BACKENDS = ["split-kv", "flash", "flash-subgroup", "naive"];

const device = await getDevice();
const info = await deviceInfo();
const skip = !device
  ? "no GPU"
  : !DRY && (info!.isFallbackAdapter || info!.limits.maxStorageBufferBindingSize < (256 << 20))
  ? "needs a big GPU (a software adapter or small device takes seconds per call)"
  : "";

/** Bytes of K and V a call must read. */
function kvBytes(s: BenchShape, bytes: number): number {
  return 2 * s.b * (s.nKv ?? s.n) * (s.sKv ?? s.s) * s.d * bytes;
}

async function gpuTime(
  inputs: { q: GpuTensor; k: GpuTensor; v: GpuTensor },
  backend: string,
  reps = 40,
): Promise<number | string> {
  if (DRY) reps = 2;
  try {
    const warm = await attentionForward(inputs.q, inputs.k, inputs.v, { backend });
    await readBuffer(device!, warm.buffer, 16); // compile and first run
    warm.buffer.destroy();
    const trials: number[] = [];
    for (let t = 0; t < 3; t++) trials.push((await timeOnGpu(inputs, { backend }, reps)).ms);
    return Math.min(...trials);
  } catch (e) {
    return (e as Error).message.slice(0, 160);
  }
}

function line(fields: Record<string, unknown>): void {
  console.log(JSON.stringify({ bench: "splitkv", ...fields }));
}

async function report(): Promise<void> {
  console.log(`adapter: ${info!.adapter}; deno ${Deno.version.deno}; date ${new Date().toISOString()}`);
  const dims = (s: BenchShape) => `b${s.b} n${s.n}/kv${s.nKv} s${s.s}x${s.sKv} d${s.d}`;
  const inputs = shapeInputs(device!, DECODE, "f16");
  const bytes = kvBytes(DECODE, 2);

  if (wants("decode")) await decodeReport(inputs, bytes, dims);
  if (wants("sweep")) await sweepReport(inputs, bytes, dims);
  for (const t of Object.values(inputs)) t.buffer.destroy();
  if (wants("crossover")) await crossoverReport(dims);
}

async function decodeReport(
  inputs: { q: GpuTensor; k: GpuTensor; v: GpuTensor },
  bytes: number,
  dims: (s: BenchShape) => string,
): Promise<void> {
  // Agreement with flash on the H200 (the tests run on the software adapter only).
  {
    const outs = [];
    for (const backend of ["split-kv", "flash"]) {
      const o = await attentionForward(inputs.q, inputs.k, inputs.v, { backend });
      outs.push(new Float16Array(await readBuffer(device!, o.buffer, 32 * 128 * 2)));
      o.buffer.destroy();
    }
    let diff = 0;
    for (let i = 0; i < outs[0].length; i++) diff = Math.max(diff, Math.abs(outs[0][i] - outs[1][i]));
    line({ check: "split-kv vs flash, decode f16", maxAbsDiff: diff });
  }

  // What split-kv runs on this device for the decode shape.
  {
    const caps = (await defaultRuntime())!.caps;
    const p = resolveProblem(inputs.q, inputs.k, inputs.v);
    const c = chooseSplitKvConfig(p, caps);
    line({ config: c, plan: typeof c === "string" ? null : splitKvPlan(p, c, caps) });
  }

  // Every backend on the decode shape.
  for (const backend of BACKENDS) {
    const ms = await gpuTime(inputs, backend);
    if (typeof ms === "string") line({ shape: dims(DECODE), dtype: "f16", backend, note: ms });
    else {
      line({
        shape: dims(DECODE),
        dtype: "f16",
        backend,
        us: +(ms * 1000).toFixed(2),
        GBps: Math.round(bytes / ms / 1e6),
        ofPeak: +(bytes * 1e3 / ms / PEAK).toFixed(3),
      });
    }
  }

  // Where split-kv's time goes: a cold chip (no heating), and the two passes timed apart.
  {
    const cold = await timeOnGpu(inputs, { backend: "split-kv" }, DRY ? 2 : 40, 0);
    splitKvTuning.separatePasses = true;
    const apart = await timeOnGpu(inputs, { backend: "split-kv" }, DRY ? 2 : 40);
    splitKvTuning.separatePasses = false;
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    const us = (ms: number) => +(ms * 1000).toFixed(2);
    line({
      diagnose: "split-kv decode",
      coldChipUs: us(cold.ms),
      pass1Us: us(median(apart.all.filter((_, i) => i % 2 === 0))),
      combineUs: us(median(apart.all.filter((_, i) => i % 2 === 1))),
    });
  }
  // Bandwidth as the cache grows (fixed costs vs streaming).
  for (const sKv of [4096, 8192, 131072]) {
    const shape = { ...DECODE, sKv: kv(sKv) };
    const input = shapeInputs(device!, shape, "f16");
    const ms = await gpuTime(input, "split-kv");
    if (typeof ms === "number") {
      const b = kvBytes(shape, 2);
      line({
        shape: dims(shape),
        backend: "split-kv",
        us: +(ms * 1000).toFixed(2),
        GBps: Math.round(b / ms / 1e6),
      });
    }
    for (const t of Object.values(input)) t.buffer.destroy();
  }
}

async function sweepReport(
  inputs: { q: GpuTensor; k: GpuTensor; v: GpuTensor },
  bytes: number,
  dims: (s: BenchShape) => string,
): Promise<void> {
  // split-kv's knobs: workgroups aimed for, keys per step, threads, lanes, f16 vs packed loads.
  const variants: { targetWorkgroups?: number; override?: typeof splitKvTuning.override }[] = [
    { targetWorkgroups: 264 },
    { targetWorkgroups: 396 },
    { targetWorkgroups: 528 },
    { targetWorkgroups: 792 },
    { targetWorkgroups: 1056 },
    { targetWorkgroups: 2112 },
    { targetWorkgroups: 4224 },
    { targetWorkgroups: 528, override: { unroll: 8 } },
    { targetWorkgroups: 528, override: { threads: 64 } },
    { targetWorkgroups: 1056, override: { threads: 64 } },
    { targetWorkgroups: 2112, override: { threads: 64 } },
    { override: { unroll: 2 } },
    { override: { unroll: 8 } },
    { override: { threads: 64 } },
    { override: { threads: 256 } },
    { override: { lanes: 8 } },
    { override: { lanes: 32, threads: 256 } },
    { override: { vw: 4 } },
    { override: { vw: 4, f16: true } },
    { override: { subgroups: false } },
  ];
  for (const v of variants) {
    splitKvTuning.targetWorkgroups = v.targetWorkgroups ?? DEFAULT_TARGET;
    splitKvTuning.override = v.override ?? null;
    const ms = await gpuTime(inputs, "split-kv", 30);
    line({
      sweep: v,
      ...(typeof ms === "string" ? { note: ms } : {
        us: +(ms * 1000).toFixed(2),
        ofPeak: +(bytes * 1e3 / ms / PEAK).toFixed(3),
      }),
    });
  }
  splitKvTuning.targetWorkgroups = DEFAULT_TARGET;
  splitKvTuning.override = null;

  // Chunk count against waves of workgroups: 8 sequences (64 (batch, kv head) pairs before any
  // split) and a 131072-key cache, with the number of chunks forced.
  const planShapes: [BenchShape, number[]][] = [
    [{ ...DECODE, b: 8, sKv: kv(8192) }, [4, 8, 9, 12, 16, 24, 32]],
    [{ ...DECODE, sKv: kv(131072) }, [65, 98, 130, 195, 256]],
  ];
  const caps = (await defaultRuntime())!.caps;
  for (const [shape, counts] of planShapes) {
    const shapeInputsF16 = shapeInputs(device!, shape, "f16");
    const shapeBytes = kvBytes(shape, 2);
    const p = resolveProblem(shapeInputsF16.q, shapeInputsF16.k, shapeInputsF16.v);
    const c = chooseSplitKvConfig(p, caps);
    for (const splits of [null, ...counts]) {
      splitKvTuning.splits = splits;
      const ms = await gpuTime(shapeInputsF16, "split-kv", 30);
      const plan = typeof c === "string" ? null : splitKvPlan(p, c, caps);
      line({
        planSweep: dims(shape),
        splits: plan?.splits,
        chunk: plan?.chunk,
        workgroups: plan?.workgroups,
        ...(typeof ms === "string" ? { note: ms } : {
          us: +(ms * 1000).toFixed(2),
          GBps: Math.round(shapeBytes / ms / 1e6),
        }),
      });
    }
    splitKvTuning.splits = null;
    for (const t of Object.values(shapeInputsF16)) t.buffer.destroy();
  }
}

async function crossoverReport(dims: (s: BenchShape) => string): Promise<void> {
  // The crossover with flash: query rows per K/V head (s_q x group) growing.
  const cross: BenchShape[] = [
    ...[1, 2, 4, 8, 16, 32].map((s) => ({ name: "gqa", b: 1, n: 32, nKv: 8, s, sKv: kv(8192), d: 128 })),
    ...[1, 4, 8, 16, 32, 64].map((s) => ({ name: "mha", b: 1, n: 32, nKv: 32, s, sKv: kv(8192), d: 128 })),
    ...[1, 2, 4, 8].map((s) => ({ name: "gqa-long", b: 1, n: 32, nKv: 8, s, sKv: kv(32768), d: 128 })),
    // Where flash should win: more rows, and batches that fill the chip with flash's query tiles.
    { name: "gqa", b: 1, n: 32, nKv: 8, s: 64, sKv: kv(8192), d: 128 },
    { name: "mha", b: 1, n: 32, nKv: 32, s: 128, sKv: kv(8192), d: 128 },
    ...[1, 4, 8].map((s) => ({ name: "batch-gqa", b: 8, n: 32, nKv: 8, s, sKv: kv(8192), d: 128 })),
    { name: "batch-mha", b: 8, n: 32, nKv: 32, s: 8, sKv: kv(8192), d: 128 },
    { name: "batch-mha", b: 8, n: 32, nKv: 32, s: 32, sKv: kv(8192), d: 128 },
    { name: "batch-gqa", b: 8, n: 32, nKv: 8, s: 32, sKv: kv(8192), d: 128 },
    { name: "batch-mha", b: 8, n: 32, nKv: 32, s: 64, sKv: kv(8192), d: 128 },
  ];
  for (const s of cross) {
    const input = shapeInputs(device!, s, "f16");
    const rows = s.s * (s.n / (s.nKv ?? s.n));
    const times: Record<string, number | string> = {};
    for (const backend of ["split-kv", "flash", "flash-subgroup"]) {
      const ms = await gpuTime(input, backend, 20);
      times[backend] = typeof ms === "string" ? ms.slice(0, 60) : +(ms * 1000).toFixed(2);
    }
    const fastestFlash = Math.min(
      ...["flash", "flash-subgroup"].map((b) => typeof times[b] === "number" ? times[b] as number : Infinity),
    );
    line({
      crossover: dims(s),
      rows,
      us: times,
      splitKvWins: typeof times["split-kv"] === "number" && times["split-kv"] < fastestFlash,
      routerPicksSplitKv: rows <= SPLITKV_MAX_ROWS && s.s <= SPLITKV_MAX_SQ,
    });
    for (const t of Object.values(input)) t.buffer.destroy();
  }
}

if (!skip) await report();

const benchInputs = skip ? null : shapeInputs(device!, DECODE, "f16");
for (const backend of BACKENDS) {
  Deno.bench({
    name: `decode f16 ${backend} (${CALLS} calls per wait)${skip ? ` [skipped: ${skip}]` : ""}`,
    group: "decode b1 n32/kv8 s1x32768 d128 f16",
    baseline: backend === "split-kv",
    ignore: skip !== "",
    n: 5,
    warmup: 1,
    async fn(b) {
      const outs: GpuTensor[] = [];
      b.start();
      for (let i = 0; i < CALLS; i++) {
        outs.push(await attentionForward(benchInputs!.q, benchInputs!.k, benchInputs!.v, { backend }));
      }
      await readBuffer(device!, outs[outs.length - 1].buffer, 16);
      b.end();
      for (const o of outs) o.buffer.destroy();
    },
  });
}
