/**
 * Brings the GPU to its working clocks before a timed region. An idle H200 sits at 345 MHz and
 * needs sustained load to boost to 1980 MHz; a chain of short calls (a decode step is tens of
 * microseconds, and the host encodes slower than that) may never get it there, so its timestamps
 * would measure a cold chip. `heat` queues one dispatch of pure arithmetic lasting about `ms`
 * milliseconds of GPU time, without waiting: the timed calls queued right after it start on a
 * warm chip.
 */
import { engineFor } from "../engines/select.ts";
import { Profiler } from "../core/gpu.ts";

const THREADS = 256;
// Four independent FMA chains per thread; the result is written only if impossible, so the
// compiler cannot drop the loop.
const CODE = `@group(0) @binding(0) var<uniform> iters: vec4<u32>;
@group(0) @binding(1) var<storage, read_write> sink: array<f32>;
@compute @workgroup_size(${THREADS})
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  var a = f32(g.x) * 1e-9;
  var b = a + 0.25;
  var c = a + 0.5;
  var d = a + 0.75;
  for (var i = 0u; i < iters.x; i++) {
    a = fma(a, 0.9999, 0.0001);
    b = fma(b, 0.9999, 0.0001);
    c = fma(c, 0.9999, 0.0001);
    d = fma(d, 0.9999, 0.0001);
  }
  if (a + b + c + d == 1234.5) { sink[0] = a; }
}
`;

interface Heater {
  pipeline: GPUComputePipeline;
  sink: GPUBuffer;
  msPerIter: number;
}
const heaters = new WeakMap<GPUDevice, Heater>();
/** Workgroups per dispatch: enough to cover every SM of a big GPU several times. */
const GROUPS = 2048;

function dispatch(device: GPUDevice, h: Omit<Heater, "msPerIter">, iters: number, profiler?: Profiler) {
  const uniform = device.createBuffer({
    size: 16,
    usage: GPUBufferUsage.UNIFORM,
    mappedAtCreation: true,
  });
  new Uint32Array(uniform.getMappedRange()).set([iters, 0, 0, 0]);
  uniform.unmap();
  const bind = device.createBindGroup({
    layout: h.pipeline.getBindGroupLayout(0),
    entries: [{ binding: 0, resource: { buffer: uniform } }, { binding: 1, resource: { buffer: h.sink } }],
  });
  const enc = device.createCommandEncoder();
  const pass = enc.beginComputePass({ timestampWrites: profiler?.next("heater") });
  pass.setPipeline(h.pipeline);
  pass.setBindGroup(0, bind);
  pass.dispatchWorkgroups(GROUPS);
  pass.end();
  device.queue.submit([enc.finish()]);
  uniform.destroy();
}

/** Queues about `ms` milliseconds of GPU arithmetic (the first call calibrates, with one wait). */
export async function heat(device: GPUDevice, ms: number): Promise<void> {
  if (ms <= 0) return;
  let h = heaters.get(device);
  if (!h) {
    const module = device.createShaderModule({ code: CODE, label: "heater" });
    const pipeline = await engineFor(device).createComputePipeline(device, {
      layout: "auto",
      compute: { module, entryPoint: "main" },
    });
    const sink = device.createBuffer({ size: 16, usage: GPUBufferUsage.STORAGE });
    const profiler = new Profiler(device, 4);
    const iters = 1 << 16;
    dispatch(device, { pipeline, sink }, iters); // warm up, then time a second run
    dispatch(device, { pipeline, sink }, iters, profiler);
    const [t] = await profiler.read();
    profiler.destroy();
    h = { pipeline, sink, msPerIter: Math.max(t.ms, 1e-3) / iters };
    heaters.set(device, h);
  }
  dispatch(device, h, Math.max(1, Math.round(ms / h.msPerIter)));
}
