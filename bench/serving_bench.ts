/**
 * The two speed goals of issue 16 on the H200, as JSON lines:
 *
 * 1. Packed batch: 16 causal sequences of 256, 512, ..., 4096 tokens (n 32/8, d 128, f16), packed
 *    with cuSeqlensQ/K (host and GPU offsets), against the same batch padded to 4096 with
 *    keyPaddingMask. Goal: packed >= 1.5x faster than padded.
 * 2. Paged decode: b 16, n 32/8, s_kv 8192, d 128, f16, pages of 64 in a shuffled pool; K and V
 *    bytes read per second against the 4.3 TB/s copy bandwidth (goal >= 70%), with the dense
 *    cache of the same shape and one appendKvCache step beside it.
 *
 * Each part checks its outputs against float64 on sampled rows (`check` lines). Run from the repo
 * root on the H200, PyTorch's figures in the same command:
 *
 *   source .gpu/setup.sh && deno run -A bench/serving_bench.ts | tee $OUT/serving.log && \
 *     python3 bench/serving_torch.py | tee -a $OUT/serving.log
 *
 * `--packed-decode` times one decode step of a packed batch instead (see packedDecodePart).
 * `WGATTN_BENCH_DRY=1` shrinks every shape 16x so the script runs on any adapter.
 */
import { appendKvCache, attentionForward, deviceInfo, explain, getDevice, type GpuTensor } from "../mod.ts";
import { readEnvIfGranted } from "../core/api.ts";
import { readBuffer } from "../core/gpu.ts";
import { fillRepeating, randomBlock, timeOnGpu } from "./common.ts";
import { splitKvTuning } from "../backends/splitkv.ts";

const DRY = readEnvIfGranted("WGATTN_BENCH_DRY") === "1";
const scale = (x: number) => (DRY ? x / 16 : x);
const PEAK = 4.3e12;
const REPS = DRY ? 3 : 30;
const PERIOD = 1_000_004;
const [N, NKV, D] = [32, 8, 128];

const device = (await getDevice())!;
const info = await deviceInfo();
if (!device) throw new Error("no GPU");
const USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

function line(fields: Record<string, unknown>): void {
  console.log(JSON.stringify({ bench: "serving", ...fields }));
}

/** An f16 GPU tensor repeating a seeded block, and that block (f16-rounded) for the host reference. */
function tensor(shape: number[], seed: number): { t: GpuTensor; block: Float16Array } {
  const count = shape.reduce((a, b) => a * b, 1);
  const block = Float16Array.from(randomBlock(Math.min(count, PERIOD), seed));
  const buffer = device.createBuffer({ size: Math.ceil((count * 2) / 16) * 16, usage: USAGE });
  fillRepeating(device, buffer, new Uint8Array(block.buffer as ArrayBuffer));
  return { t: { buffer, shape, dtype: "f16" }, block };
}

function indices(data: Int32Array, shape: number[]) {
  const buffer = device.createBuffer({
    size: Math.max(16, Math.ceil(data.byteLength / 16) * 16),
    usage: USAGE,
  });
  device.queue.writeBuffer(buffer, 0, data as Int32Array<ArrayBuffer>);
  return { buffer, shape, dtype: "i32" as const };
}

/** Reads `rows` rows of `rowBytes` at byte offsets from a buffer (copied into one small buffer). */
async function readRows(src: GPUBuffer, offsets: number[], rowBytes: number): Promise<Float16Array> {
  const dst = device.createBuffer({ size: offsets.length * rowBytes, usage: USAGE });
  const enc = device.createCommandEncoder();
  offsets.forEach((o, i) => enc.copyBufferToBuffer(src, o, dst, i * rowBytes, rowBytes));
  device.queue.submit([enc.finish()]);
  const out = new Float16Array(await readBuffer(device, dst, offsets.length * rowBytes));
  dst.destroy();
  return out;
}

/** float64 attention of one query row over keys `keyIndex(j)` (element offsets of rows of d). */
function refRow(
  qAt: (c: number) => number,
  keys: number,
  kAt: (j: number, c: number) => number,
  vAt: (j: number, c: number) => number,
): Float64Array {
  const s = new Float64Array(keys);
  let m = -Infinity;
  for (let j = 0; j < keys; j++) {
    let dot = 0;
    for (let c = 0; c < D; c++) dot += qAt(c) * kAt(j, c);
    s[j] = dot / Math.sqrt(D);
    m = Math.max(m, s[j]);
  }
  const out = new Float64Array(D);
  let sum = 0;
  for (let j = 0; j < keys; j++) {
    const e = Math.exp(s[j] - m);
    sum += e;
    for (let c = 0; c < D; c++) out[c] += e * vAt(j, c);
  }
  return out.map((x) => x / sum);
}

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let e = 0;
  for (let i = 0; i < a.length; i++) e = Math.max(e, Math.abs(a[i] - b[i]));
  return e;
}

/**
 * A packed f16 tensor's sequences (lengths `lens` at offsets `cu`, `heads` heads) copied to the start of
 * batches of `longest` rows, zeros after: `[seqs, longest, heads, D]` ("b s n d").
 */
function padSequences(src: GpuTensor, heads: number, lens: number[], cu: Int32Array, longest: number) {
  const row = heads * D * 2;
  const buffer = device.createBuffer({ size: lens.length * longest * row, usage: USAGE });
  const enc = device.createCommandEncoder();
  lens.forEach((len, i) =>
    enc.copyBufferToBuffer(src.buffer, cu[i] * row, buffer, i * longest * row, len * row)
  );
  device.queue.submit([enc.finish()]);
  return { buffer, shape: [lens.length, longest, heads, D], dtype: "f16" as const };
}

async function best(inputs: { q: GpuTensor; k: GpuTensor; v: GpuTensor }, options: object): Promise<number> {
  const warm = await attentionForward(inputs.q, inputs.k, inputs.v, options);
  await readBuffer(device, warm.buffer, 16);
  warm.buffer.destroy();
  const trials: number[] = [];
  for (let t = 0; t < 3; t++) trials.push((await timeOnGpu(inputs, options, REPS)).ms);
  return Math.min(...trials);
}

async function packedPart(): Promise<void> {
  const lens = Array.from({ length: 16 }, (_, i) => scale(256 * (i + 1)));
  const longest = Math.max(...lens);
  const cu = Int32Array.from([0, ...lens.map((_, i) => lens.slice(0, i + 1).reduce((a, x) => a + x, 0))]);
  const total = cu[16];
  const q = tensor([total, N, D], 1), k = tensor([total, NKV, D], 2), v = tensor([total, NKV, D], 3);
  // The padded batch: each sequence's rows copied to the start of its batch, zeros after ("b s n d").
  const pad = (src: GpuTensor, heads: number) => padSequences(src, heads, lens, cu, longest);
  const padded = { q: pad(q.t, N), k: pad(k.t, NKV), v: pad(v.t, NKV) };
  const keep = new Uint8Array(16 * longest);
  lens.forEach((len, i) => keep.fill(1, i * longest, i * longest + len));
  const paddedOptions = {
    isCausal: true,
    qPattern: "b s n d",
    kPattern: "b s n d",
    vPattern: "b s n d",
    outPattern: "b s n d",
    keyPaddingMask: { data: keep, shape: [16, longest] },
  };
  const flops = lens.reduce((a, l) => a + 2 * N * l * l * D, 0); // causal: half of 4·n·l²·d
  const paddedFlops = 16 * 2 * N * longest * longest * D;
  const shape = `16 seqs ${lens[0]}..${longest} (${total} tokens), n${N}/${NKV} d${D} f16 causal`;
  const runs: [string, object, { q: GpuTensor; k: GpuTensor; v: GpuTensor }][] = [
    ["packed, host offsets", { isCausal: true, cuSeqlensQ: cu, cuSeqlensK: cu }, { q: q.t, k: k.t, v: v.t }],
    [
      "packed, GPU offsets",
      { isCausal: true, cuSeqlensQ: indices(cu, [17]), cuSeqlensK: indices(cu, [17]) },
      { q: q.t, k: k.t, v: v.t },
    ],
    ["padded + keyPaddingMask", paddedOptions, padded],
  ];
  // `--packed-backends a,b`: the packed (host offsets) and padded calls again on each backend named.
  const named = Deno.args.includes("--packed-backends")
    ? Deno.args[Deno.args.indexOf("--packed-backends") + 1].split(",")
    : [];
  for (const backend of named) {
    runs.push(
      [`packed, host offsets, ${backend}`, { ...runs[0][1], backend }, runs[0][2]],
      [`padded + keyPaddingMask, ${backend}`, { ...paddedOptions, backend }, padded],
    );
  }
  const times: Record<string, number> = {};
  for (const [name, options, inputs] of runs) {
    const e = await explain(inputs.q, inputs.k, inputs.v, options);
    const ms = await best(inputs, options);
    times[name] = ms;
    line({
      part: "packed",
      shape,
      run: name,
      backend: e.backend,
      ms: +ms.toFixed(3),
      usefulTflops: +(flops / ms / 1e9).toFixed(1),
      ...(name.startsWith("padded") ? { paddedTflops: +(paddedFlops / ms / 1e9).toFixed(1) } : {}),
    });
  }
  line({
    part: "packed",
    shape,
    speedupHost: +(times["padded + keyPaddingMask"] / times["packed, host offsets"]).toFixed(2),
    speedupGpu: +(times["padded + keyPaddingMask"] / times["packed, GPU offsets"]).toFixed(2),
    goal: 1.5,
  });
  for (const backend of named) {
    line({
      part: "packed",
      shape,
      backend,
      speedupHost: +(times[`padded + keyPaddingMask, ${backend}`] / times[`packed, host offsets, ${backend}`])
        .toFixed(2),
      goal: 1.5,
    });
  }
  // Sampled rows of both against float64: first, middle and last rows of a few sequences and heads.
  const outP = await attentionForward(q.t, k.t, v.t, { isCausal: true, cuSeqlensQ: cu, cuSeqlensK: cu });
  const outD = await attentionForward(padded.q, padded.k, padded.v, paddedOptions);
  const samples: [number, number, number][] = [];
  for (const s of [0, 7, 15]) {
    for (const i of [0, lens[s] >> 1, lens[s] - 1]) samples.push([s, i, (s * 5 + i) % N]);
  }
  const at = (b: Float16Array, heads: number) => (t: number, h: number, c: number) =>
    b[((t * heads + h) * D + c) % b.length];
  const [qa, ka, va] = [at(q.block, N), at(k.block, NKV), at(v.block, NKV)];
  const rowsP = await readRows(outP.buffer, samples.map(([s, i, h]) => ((cu[s] + i) * N + h) * D * 2), D * 2);
  const rowsD = await readRows(
    outD.buffer,
    samples.map(([s, i, h]) => ((s * longest + i) * N + h) * D * 2),
    D * 2,
  );
  let errP = 0, errD = 0;
  samples.forEach(([s, i, h], r) => {
    const t = cu[s] + i, hk = Math.floor(h / (N / NKV));
    const want = refRow(
      (c) => qa(t, h, c),
      i + 1,
      (j, c) => ka(cu[s] + j, hk, c),
      (j, c) => va(cu[s] + j, hk, c),
    );
    errP = Math.max(errP, maxDiff(rowsP.subarray(r * D, (r + 1) * D), want));
    errD = Math.max(errD, maxDiff(rowsD.subarray(r * D, (r + 1) * D), want));
  });
  line({
    part: "packed",
    check: "sampled rows vs float64",
    rows: samples.length,
    maxAbsPacked: errP,
    maxAbsPadded: errD,
  });
  for (const x of [q.t, k.t, v.t, padded.q, padded.k, padded.v, outP, outD]) x.buffer.destroy();
}

async function pagedPart(): Promise<void> {
  const [b, sKv, page] = [16, scale(8192), 64];
  const maxPages = sKv / page, numPages = b * maxPages;
  // A shuffled pool: batch i's page j is anywhere.
  const perm = Int32Array.from({ length: numPages }, (_, i) => i);
  let x = 12345;
  for (let i = numPages - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) >>> 0;
    const j = x % (i + 1);
    [perm[i], perm[j]] = [perm[j], perm[i]];
  }
  const table = indices(perm, [b, maxPages]);
  const lengths = indices(new Int32Array(b).fill(sKv), [b]);
  const q = tensor([b, N, 1, D], 4);
  const k = tensor([numPages, page, NKV, D], 5), v = tensor([numPages, page, NKV, D], 6);
  const options = { blockTable: table, cacheSeqlens: lengths };
  const bytes = 2 * b * NKV * sKv * D * 2;
  const shape = `b${b} n${N}/${NKV} s_kv${sKv} d${D} f16, pages of ${page}`;
  const e = await explain(q.t, k.t, v.t, options);
  const ms = await best({ q: q.t, k: k.t, v: v.t }, options);
  line({
    part: "paged decode",
    shape,
    backend: e.backend,
    us: +(ms * 1000).toFixed(2),
    GBps: Math.round(bytes / ms / 1e6),
    ofPeak: +(bytes * 1e3 / ms / PEAK).toFixed(3),
    goal: 0.7,
  });
  // The dense cache of the same shape (the pool read as [b, n_kv, s_kv, d]: same bytes).
  const dense = {
    q: q.t,
    k: { ...k.t, shape: [b, sKv, NKV, D] },
    v: { ...v.t, shape: [b, sKv, NKV, D] },
  };
  const denseOptions = { kPattern: "b s n d", vPattern: "b s n d" };
  const msDense = await best(dense, denseOptions);
  line({
    part: "paged decode",
    shape: shape.replace(", pages of 64", ", dense cache"),
    backend: (await explain(dense.q, dense.k, dense.v, denseOptions)).backend,
    us: +(msDense * 1000).toFixed(2),
    GBps: Math.round(bytes / msDense / 1e6),
    ofPeak: +(bytes * 1e3 / msDense / PEAK).toFixed(3),
  });
  // `--paged-sweep`: split-kv's knobs on the paged and the dense cache, in two interleaved rounds.
  if (Deno.args.includes("--paged-sweep")) {
    const variants: { prefetch: 0 | 1 | 2; splits?: number; unroll?: number; threads?: number }[] = [];
    for (const prefetch of [0, 1] as const) {
      variants.push({ prefetch }, { prefetch, splits: 8 }, { prefetch, splits: 3 }, {
        prefetch,
        threads: 64,
        splits: 8,
      });
    }
    // The same pool read in order (batch i's page j is page i * max_pages + j): what the shuffle costs.
    const inOrder = indices(Int32Array.from({ length: numPages }, (_, i) => i), [b, maxPages]);
    // Issue 4's decode shape (b 1, s_kv 32768) over the pool's first bytes, head-major.
    const b1 = {
      q: { ...q.t, shape: [1, N, 1, D] },
      k: { ...k.t, shape: [1, NKV, sKv * 4, D] },
      v: { ...v.t, shape: [1, NKV, sKv * 4, D] },
    };
    for (let round = 0; round < 2; round++) {
      for (const x of variants) {
        splitKvTuning.prefetch = x.prefetch;
        splitKvTuning.splits = x.splits ?? null;
        const override = {
          ...(x.unroll ? { unroll: x.unroll } : {}),
          ...(x.threads ? { threads: x.threads } : {}),
        };
        splitKvTuning.override = Object.keys(override).length ? override : null;
        const msP = await best({ q: q.t, k: k.t, v: v.t }, options);
        const msD = await best(dense, denseOptions);
        const msO = await best({ q: q.t, k: k.t, v: v.t }, { blockTable: inOrder, cacheSeqlens: lengths });
        const msB1 = await best(b1, {});
        // The same bytes read head-major ([b, n_kv, s_kv, d]): each workgroup streams one region.
        const msH = await best({
          q: q.t,
          k: { ...dense.k, shape: [b, NKV, sKv, D] },
          v: { ...dense.v, shape: [b, NKV, sKv, D] },
        }, {});
        line({
          part: "paged sweep",
          round,
          variant: x,
          pagedUs: +(msP * 1000).toFixed(2),
          pagedOfPeak: +(bytes * 1e3 / msP / PEAK).toFixed(3),
          denseUs: +(msD * 1000).toFixed(2),
          denseOfPeak: +(bytes * 1e3 / msD / PEAK).toFixed(3),
          headMajorUs: +(msH * 1000).toFixed(2),
          headMajorOfPeak: +(bytes * 1e3 / msH / PEAK).toFixed(3),
          inOrderPagedUs: +(msO * 1000).toFixed(2),
          inOrderPagedOfPeak: +(bytes * 1e3 / msO / PEAK).toFixed(3),
          decodeB1s32768Us: +(msB1 * 1000).toFixed(2),
        });
      }
    }
    splitKvTuning.splits = null;
    splitKvTuning.override = null;
    splitKvTuning.prefetch = 1;
  }
  // Sampled rows against float64 through the table.
  const out = await attentionForward(q.t, k.t, v.t, options);
  const samples = [[0, 0], [5, 13], [15, 31]];
  const rows = await readRows(out.buffer, samples.map(([bi, h]) => (bi * N + h) * D * 2), D * 2);
  let err = 0;
  const keyRow = (bi: number, j: number) => perm[bi * maxPages + Math.floor(j / page)] * page + (j % page);
  samples.forEach(([bi, h], r) => {
    const hk = Math.floor(h / (N / NKV));
    const want = refRow(
      (c) => q.block[((bi * N + h) * D + c) % q.block.length],
      sKv,
      (j, c) => k.block[((keyRow(bi, j) * NKV + hk) * D + c) % k.block.length],
      (j, c) => v.block[((keyRow(bi, j) * NKV + hk) * D + c) % v.block.length],
    );
    err = Math.max(err, maxDiff(rows.subarray(r * D, (r + 1) * D), want));
  });
  line({ part: "paged decode", check: "sampled rows vs float64", rows: samples.length, maxAbs: err });
  // One append step (a decode step's new row per batch), lengths advanced on the GPU.
  const shortLens = indices(new Int32Array(b).fill(sKv - 9), [b]);
  const newRows = tensor([b, 1, NKV, D], 7);
  // One step first: its kernel is compiled then (seconds on a cold pipeline cache), not timed.
  await appendKvCache(newRows.t, newRows.t, k.t, v.t, {
    blockTable: table,
    cacheSeqlens: shortLens,
    advance: true,
  });
  await readBuffer(device, shortLens.buffer, 16);
  const t0 = performance.now();
  for (let i = 0; i < 8; i++) {
    await appendKvCache(newRows.t, newRows.t, k.t, v.t, {
      blockTable: table,
      cacheSeqlens: shortLens,
      advance: true,
    });
  }
  await readBuffer(device, shortLens.buffer, 16);
  line({
    part: "append",
    shape: `b${b} 1 row x n_kv${NKV} d${D}`,
    usPerStepWall: +((performance.now() - t0) * 1000 / 8).toFixed(1),
  });
  for (const t of [q.t, k.t, v.t, out, newRows.t]) t.buffer.destroy();
}

/**
 * `--packed-decode`: one decode step of 32 sequences packed (one query row each, 512 to 8192 keys,
 * n 32/8, d 128, f16), on the router's choice and on flash, against the same step padded to the
 * longest cache with keyPaddingMask; K and V bytes read per second against the 4.3 TB/s peak.
 */
async function packedDecodePart(): Promise<void> {
  const seqs = 32;
  const kLens = Array.from(
    { length: seqs },
    (_, i) => Math.round(scale(512 + (i * (8192 - 512)) / (seqs - 1))),
  );
  const longest = Math.max(...kLens);
  const sum = (xs: number[]) => xs.reduce((a, x) => a + x, 0);
  const cuq = Int32Array.from({ length: seqs + 1 }, (_, i) => i);
  const cuk = Int32Array.from([0, ...kLens.map((_, i) => sum(kLens.slice(0, i + 1)))]);
  const total = cuk[seqs];
  const q = tensor([seqs, N, D], 4), k = tensor([total, NKV, D], 5), v = tensor([total, NKV, D], 6);
  const bytes = 2 * total * NKV * D * 2;
  const shape = `${seqs} seqs x 1 query row, keys ${kLens[0]}..${longest} (${total}), n${N}/${NKV} d${D} f16`;
  const packed = { cuSeqlensQ: cuq, cuSeqlensK: cuk };
  // Padded: every cache copied to the start of its batch of `longest` rows ("b s n d").
  const pad = (src: GpuTensor) => padSequences(src, NKV, kLens, cuk, longest);
  const keep = new Uint8Array(seqs * longest);
  kLens.forEach((len, i) => keep.fill(1, i * longest, i * longest + len));
  const qDense = { buffer: q.t.buffer, shape: [seqs, 1, N, D], dtype: "f16" as const };
  const paddedInputs = { q: qDense, k: pad(k.t), v: pad(v.t) };
  const paddedOptions = {
    qPattern: "b s n d",
    kPattern: "b s n d",
    vPattern: "b s n d",
    outPattern: "b s n d",
    keyPaddingMask: { data: keep, shape: [seqs, longest] },
  };
  const runs: [string, object, { q: GpuTensor; k: GpuTensor; v: GpuTensor }][] = [
    ["packed, router", packed, { q: q.t, k: k.t, v: v.t }],
    ["packed, flash", { ...packed, backend: "flash" }, { q: q.t, k: k.t, v: v.t }],
    ["padded + keyPaddingMask, router", paddedOptions, paddedInputs],
  ];
  for (const [name, options, inputs] of runs) {
    const e = await explain(inputs.q, inputs.k, inputs.v, options);
    const ms = await best(inputs, options);
    line({
      part: "packed decode",
      shape,
      run: name,
      backend: e.backend,
      us: +(ms * 1000).toFixed(2),
      GBps: +(bytes / ms / 1e6).toFixed(0),
      ofPeak: +(bytes / ms / 1e-3 / PEAK).toFixed(3),
    });
  }
  // Sampled rows against float64: first, middle and last sequence, a few heads.
  const out = await attentionForward(q.t, k.t, v.t, packed);
  const samples: [number, number][] = [[0, 0], [15, 7], [31, 31]];
  const rows = await readRows(out.buffer, samples.map(([s, h]) => (s * N + h) * D * 2), D * 2);
  const at = (b: Float16Array, heads: number) => (t: number, h: number, c: number) =>
    b[((t * heads + h) * D + c) % b.length];
  const [qa, ka, va] = [at(q.block, N), at(k.block, NKV), at(v.block, NKV)];
  let err = 0;
  samples.forEach(([s, h], r) => {
    const hk = Math.floor(h / (N / NKV));
    const want = refRow(
      (c) => qa(s, h, c),
      kLens[s],
      (j, c) => ka(cuk[s] + j, hk, c),
      (j, c) => va(cuk[s] + j, hk, c),
    );
    err = Math.max(err, maxDiff(rows.subarray(r * D, (r + 1) * D), want));
  });
  line({ part: "packed decode", check: "sampled rows vs float64", rows: samples.length, maxAbs: err });
  for (const x of [q.t, k.t, v.t, paddedInputs.k, paddedInputs.v, out]) x.buffer.destroy();
}

console.log(
  `adapter: ${info?.adapter}; deno ${Deno.version.deno}; date ${new Date().toISOString()}${
    DRY ? " (dry)" : ""
  }`,
);
if (Deno.args.includes("--packed-decode")) await packedDecodePart();
else {
  if (!Deno.args.includes("--paged-only")) await packedPart();
  await pagedPart();
}
