/**
 * What the engine in use costs around the kernels (issue: two WebGPU engines): the host-wait floor
 * (an empty submit + onSubmittedWorkDone; a 16-byte copy + mapAsync), the seed call [32, 8, 128, 64]
 * f32 from host arrays to a host result end to end, and every backend's output on this engine
 * against float64 on small odd shapes (the check that Dawn runs wgattn correctly on a real GPU).
 * Run once per engine:
 *
 *   source .gpu/setup.sh && deno run -A bench/engines.ts
 *   source .gpu/setup.sh && WGATTN_WEBGPU=dawn WGATTN_DAWN_MODULE=.gpu/webgpu/index.js deno run -A bench/engines.ts
 */
import { attentionForward, deviceInfo, getDevice } from "../mod.ts";
import { BACKENDS } from "../backends/registry.ts";
import { engineFor } from "../engines/select.ts";
import { readBuffer } from "../core/gpu.ts";
import { errorStats, referenceAttention } from "../tests/reference.ts";

const device = await getDevice();
if (!device) throw new Error("no GPU");
const info = (await deviceInfo())!;
const engine = engineFor(device);
console.log(
  `engine: ${info.engine} (${info.engineVersion}); adapter: ${info.adapter}; date ${
    new Date().toISOString()
  }`,
);
console.log(
  `features: f16 ${info.shaderF16}, subgroups ${info.subgroups}, dot4 ${info.packedInt8Dot}, matrices ${
    JSON.stringify(info.subgroupMatrixConfigs)
  }`,
);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

// ---- host-wait floor
const waits: number[] = [];
for (let i = 0; i < 200; i++) {
  const t0 = performance.now();
  device.queue.submit([]);
  await engine.hold(device.queue.onSubmittedWorkDone());
  waits.push(performance.now() - t0);
}
const src = device.createBuffer({ size: 16, usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.STORAGE });
const maps: number[] = [];
for (let i = 0; i < 200; i++) {
  const staging = device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const t0 = performance.now();
  const enc = device.createCommandEncoder();
  enc.copyBufferToBuffer(src, 0, staging, 0, 16);
  device.queue.submit([enc.finish()]);
  await engine.hold(staging.mapAsync(GPUMapMode.READ));
  maps.push(performance.now() - t0);
  staging.destroy();
}
console.log(
  `host wait: empty submit + onSubmittedWorkDone median ${
    median(waits).toFixed(3)
  } ms; 16-byte copy + mapAsync median ${median(maps).toFixed(3)} ms`,
);

// ---- the seed call, host to host
const seedShape = [32, 8, 128, 64];
const count = seedShape.reduce((a, b) => a * b, 1);
const rand = (seed: number) => {
  let x = seed;
  return Float32Array.from({ length: count }, () => ((x = (x * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1);
};
const [q, k, v] = [1, 2, 3].map((s) => ({ data: rand(s), shape: seedShape }));
for (let i = 0; i < 3; i++) await attentionForward(q, k, v);
const ends: number[] = [];
for (let i = 0; i < 30; i++) {
  const t0 = performance.now();
  await attentionForward(q, k, v);
  ends.push(performance.now() - t0);
}
console.log(
  `seed call [32, 8, 128, 64] f32 host -> host: median ${median(ends).toFixed(2)} ms, min ${
    Math.min(...ends).toFixed(2)
  } ms (30 calls)`,
);

// Where the end-to-end time goes: the kernel alone on GPU tensors (one wait), an upload of q, k, v,
// a read-back of the output.
{
  const gpu = async (data: Float32Array<ArrayBuffer>) => {
    const buffer = device.createBuffer({
      size: data.byteLength,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
    });
    await engine.writeBuffer(device, buffer, new Uint8Array(data.buffer));
    return { buffer, shape: seedShape, dtype: "f32" as const };
  };
  const [gq, gk, gv] = await Promise.all([q, k, v].map((t) => gpu(t.data)));
  const kernel: number[] = [], upload: number[] = [], readback: number[] = [];
  for (let i = 0; i < 20; i++) {
    let t0 = performance.now();
    const out = await attentionForward(gq, gk, gv);
    await engine.hold(device.queue.onSubmittedWorkDone());
    kernel.push(performance.now() - t0);
    t0 = performance.now();
    const up = await Promise.all([q, k, v].map((t) => gpu(t.data)));
    await engine.hold(device.queue.onSubmittedWorkDone());
    upload.push(performance.now() - t0);
    up.forEach((t) => t.buffer.destroy());
    t0 = performance.now();
    await readBuffer(device, out.buffer, count * 4);
    readback.push(performance.now() - t0);
    out.buffer.destroy();
  }
  console.log(
    `seed call parts (medians of 20): GPU tensors in and out + one wait ${median(kernel).toFixed(2)} ms; ` +
      `uploading q, k, v (${(3 * count * 4 / 1e6).toFixed(1)} MB, engine.writeBuffer) ${
        median(upload).toFixed(2)
      } ms; reading the output back (${(count * 4 / 1e6).toFixed(1)} MB) ${median(readback).toFixed(2)} ms`,
  );
}

// ---- every backend against float64 on small odd shapes
const cases = [
  { b: 1, n: 3, nKv: 1, sQ: 37, sKv: 53, d: 64, causal: false },
  { b: 2, n: 2, nKv: 2, sQ: 5, sKv: 301, d: 128, causal: true },
  { b: 1, n: 4, nKv: 2, sQ: 130, sKv: 130, d: 40, causal: true },
];
for (const dtype of ["f32", "f16"] as const) {
  for (const c of cases) {
    const mk = (n: number, s: number, d: number, seed: number) => {
      let x = seed;
      const data = Float32Array.from(
        { length: c.b * n * s * d },
        () => ((x = (x * 1664525 + 1013904223) >>> 0) / 2 ** 32) * 2 - 1,
      );
      return dtype === "f16" ? Float16Array.from(data) : data;
    };
    const qd = mk(c.n, c.sQ, c.d, 7), kd = mk(c.nKv, c.sKv, c.d, 8), vd = mk(c.nKv, c.sKv, c.d, 9);
    const ref = referenceAttention(
      { data: Float64Array.from(qd), sizes: { b: c.b, n: c.n, s: c.sQ, d: c.d } },
      { data: Float64Array.from(kd), sizes: { b: c.b, n: c.nKv, s: c.sKv, d: c.d } },
      { data: Float64Array.from(vd), sizes: { b: c.b, n: c.nKv, s: c.sKv, d: c.d } },
      { isCausal: c.causal },
    );
    const line: string[] = [];
    for (const backend of BACKENDS.map((b) => b.name)) {
      try {
        const out = await attentionForward(
          { data: qd, shape: [c.b, c.n, c.sQ, c.d] },
          { data: kd, shape: [c.b, c.nKv, c.sKv, c.d] },
          { data: vd, shape: [c.b, c.nKv, c.sKv, c.d] },
          { backend, isCausal: c.causal },
        );
        line.push(`${backend} ${errorStats(Float64Array.from(out.data), ref.out).maxAbs.toExponential(1)}`);
      } catch (e) {
        line.push(`${backend} -- ${(e as Error).message.slice(0, 90)}`);
      }
    }
    console.log(
      `check ${dtype} b${c.b} n${c.n}/${c.nKv} s${c.sQ}x${c.sKv} d${c.d}${c.causal ? " causal" : ""}: ${
        line.join("; ")
      }`,
    );
  }
}
