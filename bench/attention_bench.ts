/**
 * `deno bench` over the suite shapes, f32 and f16, every backend that can serve each call.
 * Each iteration queues 4 calls on GPU tensors and waits once, so the ~11 ms host wait is shared.
 * On a software adapter only shapes under 2 GFLOP run. The H200 table with TFLOP/s and PyTorch
 * ratios comes from bench/report.ts.
 */
import { attentionForward, deviceInfo, explain, getDevice, type GpuTensor } from "../mod.ts";
import { readBuffer } from "../core/gpu.ts";
import { shapeFlops, shapeInputs, SHAPES } from "./common.ts";

const device = await getDevice();
const info = await deviceInfo();
const CALLS = 4;
const BACKENDS = ["flash", "flash-subgroup", "naive"];

for (const shape of SHAPES) {
  for (const dtype of ["f32", "f16"] as const) {
    const tooBig = !device || (info!.isFallbackAdapter && shapeFlops(shape) > 2e9);
    const inputs = tooBig ? null : shapeInputs(device!, shape, dtype);
    for (const backend of BACKENDS) {
      let skip = tooBig ? "too large for this adapter" : "";
      if (!skip && backend === "naive" && shapeFlops(shape) > 3e12) skip = "naive takes seconds here";
      if (!skip) {
        try {
          await explain(inputs!.q, inputs!.k, inputs!.v, { backend, isCausal: shape.causal });
        } catch (e) {
          skip = (e as Error).message;
        }
      }
      Deno.bench({
        name: `${shape.name} ${dtype} ${backend}${skip ? ` [skipped: ${skip.slice(0, 80)}]` : ""}`,
        group: `${shape.name} ${dtype}`,
        baseline: backend === "flash",
        ignore: skip !== "",
        n: 5,
        warmup: 1,
        async fn(b) {
          const outs: GpuTensor[] = [];
          b.start();
          for (let i = 0; i < CALLS; i++) {
            outs.push(
              await attentionForward(inputs!.q, inputs!.k, inputs!.v, { backend, isCausal: shape.causal }),
            );
          }
          await readBuffer(device!, outs[outs.length - 1].buffer, 16);
          b.end();
          for (const o of outs) o.buffer.destroy();
        },
      });
    }
  }
}
