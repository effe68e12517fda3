/**
 * What each subgroup-matrix step costs on this device (Dawn, real subgroup matrices): a loop of
 * 256 iterations per subgroup, 4 subgroups per workgroup, 8 workgroups per SM-ish (1056), each
 * variant adding one step to the baseline multiply-accumulate loop. The per-iteration time of a
 * variant minus the baseline's is that step's cost; the sage-mma kernels do these steps per key tile.
 *
 *   source .gpu/setup.sh && WGATTN_WEBGPU=dawn WGATTN_DAWN_MODULE=$PWD/.gpu/webgpu/index.js deno run -A bench/mma_probe.ts
 */
import { getDevice } from "../mod.ts";
import { engineFor } from "../engines/select.ts";

const maybeDevice = await getDevice();
if (!maybeDevice) throw new Error("no GPU");
const device: GPUDevice = maybeDevice;
const engine = engineFor(device);
if (!device.features.has("chromium-experimental-subgroup-matrix" as GPUFeatureName)) {
  throw new Error("no subgroup matrices on this device");
}
const WGS = 1056, ITER = 256, THREADS = 128;
const header = `enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> src: array<i32>;
@group(0) @binding(1) var<storage, read_write> dst: array<i32>;
var<workgroup> wsrc: array<i32, 4096>;
var<workgroup> wdst: array<i32, ${4 * 16 * 20}>;
`;
const A = "subgroup_matrix_left<i8, 32, 16>", B = "subgroup_matrix_right<i8, 16, 32>";
const C = "subgroup_matrix_result<i32, 16, 16>";
/** A kernel whose loop body is `body` (accumulators c0..c3, operands a, b; `it` the iteration). */
function kernel(pre: string, body: string): string {
  return `${header}
@compute @workgroup_size(${THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let warp = lid / 32u;
  for (var i = lid; i < 4096u; i += ${THREADS}u) { wsrc[i] = src[i]; }
  workgroupBarrier();
  var c0 = ${C}(); var c1 = ${C}(); var c2 = ${C}(); var c3 = ${C}();
  let a = subgroupMatrixLoad<${A}>(&src, warp * 512u, false, 32u);
  let b = subgroupMatrixLoad<${B}>(&src, 2048u + warp * 512u, true, 32u);
  ${pre}
  for (var it = 0u; it < ${ITER}u; it++) {
${body}
  }
  subgroupMatrixStore(&dst, (wid.x * 4u + warp) * 1024u, c0, false, 16u);
  subgroupMatrixStore(&dst, (wid.x * 4u + warp) * 1024u + 256u, c1, false, 16u);
  subgroupMatrixStore(&dst, (wid.x * 4u + warp) * 1024u + 512u, c2, false, 16u);
  subgroupMatrixStore(&dst, (wid.x * 4u + warp) * 1024u + 768u, c3, false, 16u);
}
`;
}
const mma4 = (bb: string) =>
  [0, 1, 2, 3].map((i) => `    c${i} = subgroupMatrixMultiplyAccumulate(a, ${bb}, c${i});`).join("\n");
const variants: [string, string, string][] = [
  ["4 MMAs (registers only)", "", mma4("b")],
  [
    "4 MMAs, each B loaded from storage (same address: L1)",
    "",
    [0, 1, 2, 3].map((i) =>
      `    { let bb = subgroupMatrixLoad<${B}>(&src, ${
        i * 512
      }u, true, 32u); c${i} = subgroupMatrixMultiplyAccumulate(a, bb, c${i}); }`
    ).join("\n"),
  ],
  [
    "4 MMAs, each B loaded from storage (streaming 2 MB: L2)",
    "",
    [0, 1, 2, 3].map((i) =>
      `    { let bb = subgroupMatrixLoad<${B}>(&src, ((wid.x * 977u + it * 4u + ${i}u) % 4096u) * 512u, true, 32u); c${i} = subgroupMatrixMultiplyAccumulate(a, bb, c${i}); }`
    ).join("\n"),
  ],
  [
    "4 MMAs, each B loaded from workgroup memory",
    "",
    [0, 1, 2, 3].map((i) =>
      `    { let bb = subgroupMatrixLoad<${B}>(&wsrc, ${
        i * 512
      }u + (it & 3u) * 2048u, true, 32u); c${i} = subgroupMatrixMultiplyAccumulate(a, bb, c${i}); }`
    ).join("\n"),
  ],
  [
    "4 MMAs + 4 result stores to workgroup memory (no barrier)",
    "",
    mma4("b") + "\n" +
    [0, 1, 2, 3].map((i) => `    subgroupMatrixStore(&wdst, warp * 320u + ${i * 4}u, c${i}, false, 20u);`)
      .join(
        "\n",
      ),
  ],
  [
    "4 MMAs + 4 scalar multiplies of the results",
    "",
    mma4("b") + "\n" +
    [0, 1, 2, 3].map((i) => `    c${i} = subgroupMatrixScalarMultiply(c${i}, i32(it & 1u) * 2i - 1i);`).join(
      "\n",
    ),
  ],
  [
    "4 MMAs + workgroupBarrier",
    "",
    mma4("b") + "\n    workgroupBarrier();",
  ],
  [
    "4 MMAs + 4 stores + barrier + 8 reads per invocation",
    "var acc = 0i;",
    mma4("b") + "\n" +
    [0, 1, 2, 3].map((i) => `    subgroupMatrixStore(&wdst, warp * 320u + ${i * 4}u, c${i}, false, 20u);`)
      .join(
        "\n",
      ) +
    "\n    workgroupBarrier();\n" +
    Array.from({ length: 8 }, (_, e) => `    acc += wdst[warp * 320u + (lid % 16u) * 20u + ${e}u];`).join(
      "\n",
    ) +
    "\n    workgroupBarrier();\n    if (acc == 12345) { c0 = ${C}(); }".replace("${C}", C),
  ],
];
const src = device.createBuffer({ size: 4 << 20, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
const dstBuf = device.createBuffer({ size: WGS * 4 * 1024 * 4, usage: GPUBufferUsage.STORAGE });
const query = device.createQuerySet({ type: "timestamp", count: 2 });
const resolve = device.createBuffer({
  size: 16,
  usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
});
const read = device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
await checkScalarMultiply();
for (const [name, pre, body] of variants) {
  const module = device.createShaderModule({ code: kernel(pre, body) });
  const pipeline = await engine.createComputePipeline(device, {
    layout: "auto",
    compute: { module, entryPoint: "main" },
  });
  const bind = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [{ binding: 0, resource: { buffer: src } }, { binding: 1, resource: { buffer: dstBuf } }],
  });
  const times: number[] = [];
  for (let rep = 0; rep < 6; rep++) {
    const enc = device.createCommandEncoder();
    const pass = enc.beginComputePass({
      timestampWrites: { querySet: query, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 },
    });
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bind);
    pass.dispatchWorkgroups(WGS);
    pass.end();
    enc.resolveQuerySet(query, 0, 2, resolve, 0);
    enc.copyBufferToBuffer(resolve, 0, read, 0, 16);
    device.queue.submit([enc.finish()]);
    await engine.hold(read.mapAsync(GPUMapMode.READ));
    const t = new BigUint64Array(read.getMappedRange().slice(0));
    read.unmap();
    times.push(Number(t[1] - t[0]) / 1e6);
  }
  const ms = times.sort((x, y) => x - y)[3];
  // 4 MMAs of 16x16x32 per iteration per subgroup.
  const ops = WGS * 4 * ITER * 4 * 2 * 16 * 16 * 32;
  const perIterNs = (ms * 1e6) / ITER;
  console.log(
    JSON.stringify({
      bench: "mma-probe",
      variant: name,
      ms: +ms.toFixed(4),
      tops: +(ops / ms / 1e9).toFixed(1),
      perIterationNs: +perIterNs.toFixed(2),
    }),
  );
}

/**
 * Whether `subgroupMatrixScalarMultiply` on an i32 result is exact: c = A·B, then c·254 + A·B
 * (the Horner step flash-mma fuses two slice orders with) against the host's 255·(A·B).
 */
async function checkScalarMultiply(): Promise<void> {
  const code = `${header}
@compute @workgroup_size(32)
fn main() {
  let a = subgroupMatrixLoad<${A}>(&src, 0u, false, 32u);
  let b = subgroupMatrixLoad<${B}>(&src, 2048u, true, 32u);
  var c = subgroupMatrixMultiplyAccumulate(a, b, ${C}());
  c = subgroupMatrixScalarMultiply(c, 254i);
  c = subgroupMatrixMultiplyAccumulate(a, b, c);
  subgroupMatrixStore(&dst, 0u, c, false, 16u);
}
`;
  const bytes = new Int8Array(4096);
  for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 255) - 127;
  const s = device.createBuffer({ size: 4096, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST });
  device.queue.writeBuffer(s, 0, bytes);
  const d = device.createBuffer({ size: 1024, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
  const r = device.createBuffer({ size: 1024, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const pipeline = await engine.createComputePipeline(device, {
    layout: "auto",
    compute: { module: device.createShaderModule({ code }), entryPoint: "main" },
  });
  const enc = device.createCommandEncoder();
  const pass = enc.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(
    0,
    device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: [{ binding: 0, resource: { buffer: s } }, { binding: 1, resource: { buffer: d } }],
    }),
  );
  pass.dispatchWorkgroups(1);
  pass.end();
  enc.copyBufferToBuffer(d, 0, r, 0, 1024);
  device.queue.submit([enc.finish()]);
  await engine.hold(r.mapAsync(GPUMapMode.READ));
  const got = new Int32Array(r.getMappedRange().slice(0));
  r.unmap();
  let wrong = 0;
  for (let m = 0; m < 16; m++) {
    for (let n = 0; n < 16; n++) {
      let c = 0;
      for (let k = 0; k < 32; k++) c += bytes[m * 32 + k] * bytes[2048 + n * 32 + k];
      if (got[m * 16 + n] !== 255 * c) wrong++;
    }
  }
  console.log(JSON.stringify({ bench: "mma-probe", check: "scalar multiply, i32 Horner step", wrong }));
}
