/**
 * What one more dependent dispatch costs inside a compute pass: N dispatches of a trivial kernel,
 * each reading what the previous one wrote (so the engine puts a barrier between them), timed by
 * the pass's timestamps; the cost per dispatch is the slope over N. Two widths: one workgroup, and
 * `--groups` workgroups (default 1056, eight per SM of an H200) of 256 invocations, the shape of the
 * pre-pass kernels. This is what fusing small kernels into fewer dispatches can save. Then what a
 * pre-pass-shaped stream reaches: `--mb` MB of 8-byte words (four f16) read and 4-byte words written
 * (int8 x4), one word per invocation, 8 B and 16 B per load.
 *
 *     deno run -A bench/dispatch_cost.ts [--groups 1056] [--reps 20] [--mb 28.3]
 */
import { getDevice } from "../mod.ts";

const arg = (name: string, fallback: string) => {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : fallback;
};
const wide = Number(arg("groups", "1056"));
const reps = Number(arg("reps", "20"));
const device = await getDevice();
if (!device) throw new Error("no WebGPU adapter");

const module = device.createShaderModule({
  code: `@group(0) @binding(0) var<storage, read_write> chain: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let i = wid.x * 256u + lid;
  chain[i] = chain[i] + 1u;
}
`,
});
const pipeline = await device.createComputePipelineAsync({
  layout: "auto",
  compute: { module, entryPoint: "main" },
});
const buffer = device.createBuffer({ size: wide * 256 * 4, usage: GPUBufferUsage.STORAGE });
const bind = device.createBindGroup({
  layout: pipeline.getBindGroupLayout(0),
  entries: [{ binding: 0, resource: { buffer } }],
});
const querySet = device.createQuerySet({ type: "timestamp", count: 2 * reps });
const resolve = device.createBuffer({
  size: 16 * reps,
  usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
});
const staging = device.createBuffer({
  size: 16 * reps,
  usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
});

/** Median ms of `reps` compute passes, each recorded by `record`, from their timestamps. */
async function medianPassMs(record: (pass: GPUComputePassEncoder) => void): Promise<number> {
  const enc = device!.createCommandEncoder();
  for (let r = 0; r < reps; r++) {
    const pass = enc.beginComputePass({
      timestampWrites: { querySet, beginningOfPassWriteIndex: 2 * r, endOfPassWriteIndex: 2 * r + 1 },
    });
    record(pass);
    pass.end();
  }
  enc.resolveQuerySet(querySet, 0, 2 * reps, resolve, 0);
  enc.copyBufferToBuffer(resolve, 0, staging, 0, 16 * reps);
  device!.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const t = new BigUint64Array(staging.getMappedRange().slice(0));
  staging.unmap();
  const ms = Array.from({ length: reps }, (_, r) => Number(t[2 * r + 1] - t[2 * r]) / 1e6).sort((a, b) =>
    a - b
  );
  return ms[Math.floor(reps / 2)];
}

function passMs(dispatches: number, groups: number): Promise<number> {
  return medianPassMs((pass) => {
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bind);
    for (let i = 0; i < dispatches; i++) pass.dispatchWorkgroups(groups);
  });
}

for (const groups of [1, wide]) {
  await passMs(8, groups); // warm up
  const counts = [1, 2, 8, 32];
  const times: number[] = [];
  for (const n of counts) times.push(await passMs(n, groups));
  const slope = (times[3] - times[0]) / (counts[3] - counts[0]);
  console.log(
    `${groups} workgroup${groups > 1 ? "s" : ""}: ${
      counts.map((n, i) => `${n} dispatches ${(times[i] * 1000).toFixed(1)} µs`).join(", ")
    }; ${(slope * 1000).toFixed(2)} µs per dependent dispatch`,
  );
}
// ---- a stream of the pre-pass's shape: 8 B or 16 B read, a quarter... half of it written ----
const mb = Number(arg("mb", "28.3"));
for (const width of [2, 4]) {
  const words = Math.floor((mb * 1e6) / 4 / width) * width;
  const streamModule = device.createShaderModule({
    code: `@group(0) @binding(0) var<storage, read> src: array<vec${width}<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<${width === 2 ? "u32" : "vec2<u32>"}>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wid.x + wid.y * nwg.x) * 256u + lid;
  if (i >= arrayLength(&src)) { return; }
  let w = src[i];
  dst[i] = ${width === 2 ? "w.x ^ w.y" : "w.xy ^ w.zw"};
}
`,
  });
  const p = await device.createComputePipelineAsync({
    layout: "auto",
    compute: { module: streamModule, entryPoint: "main" },
  });
  const src = device.createBuffer({ size: words * 4, usage: GPUBufferUsage.STORAGE });
  const dst = device.createBuffer({ size: words * 2, usage: GPUBufferUsage.STORAGE });
  const bg = device.createBindGroup({
    layout: p.getBindGroupLayout(0),
    entries: [{ binding: 0, resource: { buffer: src } }, { binding: 1, resource: { buffer: dst } }],
  });
  const groups = Math.ceil(words / width / 256);
  const x = Math.min(groups, 65535), y = Math.ceil(groups / x);
  const time = () =>
    medianPassMs((pass) => {
      pass.setPipeline(p);
      pass.setBindGroup(0, bg);
      pass.dispatchWorkgroups(x, y);
    });
  await time();
  const ms = await time();
  const bytes = words * 4 * 1.5;
  console.log(
    `stream, ${width * 4}-byte loads: ${(words * 4 / 1e6).toFixed(1)} MB read, ${
      (words * 2 / 1e6).toFixed(1)
    } MB written in ${(ms * 1000).toFixed(1)} µs (${
      (bytes / ms / 1e9).toFixed(2)
    } TB/s, one empty pass's ~7 µs included)`,
  );
  src.destroy();
  dst.destroy();
}
Deno.exit(0);
