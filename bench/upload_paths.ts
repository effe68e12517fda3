/**
 * How host bytes reach the GPU and come back on the engine in use, for one 8 MiB tensor (a seed-call
 * operand): buffer creation, `queue.writeBuffer`, a pooled mapped staging buffer + copy (what the
 * Dawn engine uses), and the read-back. Medians of 20, each step waited for. On the H200:
 *
 *   source .gpu/setup.sh && deno run -A bench/upload_paths.ts
 *   source .gpu/setup.sh && WGATTN_WEBGPU=dawn WGATTN_DAWN_MODULE=$PWD/.gpu/webgpu/index.js deno run -A bench/upload_paths.ts
 */
import { getDevice } from "../mod.ts";
import { engineFor } from "../engines/select.ts";
import { queueWrite } from "../engines/engine.ts";
import { stagedWrite } from "../engines/dawn.ts";
import { readBuffer } from "../core/gpu.ts";

const device = await getDevice();
if (!device) throw new Error("no GPU");
const engine = engineFor(device);
const BYTES = 8 << 20;
const src = new Uint8Array(BYTES).map((_, i) => (i * 7) & 255);
const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
const wait = () => engine.hold(device.queue.onSubmittedWorkDone());
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function time(name: string, step: () => void | Promise<void>): Promise<void> {
  const ts: number[] = [];
  for (let i = 0; i < 23; i++) {
    const t0 = performance.now();
    await step();
    await wait();
    if (i >= 3) ts.push(performance.now() - t0);
  }
  const ms = median(ts);
  console.log(JSON.stringify({
    bench: "upload",
    engine: engine.name,
    step: name,
    ms: +ms.toFixed(3),
    gbPerS: +(BYTES / ms / 1e6).toFixed(2),
  }));
}

const target = device.createBuffer({ size: BYTES, usage });
await time("create + destroy (no write)", () => device.createBuffer({ size: BYTES, usage }).destroy());
await time("create + first use (zero-init) + destroy", () => {
  const b = device.createBuffer({ size: BYTES, usage });
  const e = device.createCommandEncoder();
  e.copyBufferToBuffer(b, 0, target, 0, 16);
  device.queue.submit([e.finish()]);
  b.destroy();
});
await time("queue.writeBuffer into an existing buffer", () => queueWrite(device, target, src));
await time("create + queue.writeBuffer + destroy", () => {
  const b = device.createBuffer({ size: BYTES, usage });
  queueWrite(device, b, src);
  b.destroy();
});
await time("pooled mapped staging + copy into an existing buffer", () => stagedWrite(device, target, src));
await time("create + pooled staging + copy + destroy", () => {
  const b = device.createBuffer({ size: BYTES, usage });
  stagedWrite(device, b, src);
  b.destroy();
});
await time("engine.writeBuffer into an existing buffer", () => engine.writeBuffer(device, target, src));
await time("read back (copy + mapAsync + copy out)", async () => {
  await readBuffer(device, target, BYTES);
});
const back = new Uint8Array(await readBuffer(device, target, BYTES));
console.log(
  JSON.stringify({
    bench: "upload",
    engine: engine.name,
    roundTripEqual: back.every((x, i) => x === src[i]),
  }),
);
Deno.exit(0);
