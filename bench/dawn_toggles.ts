/**
 * What Dawn's toggles cost or save on the H200, to explain where Dawn and Deno's engine differ
 * (bench/RESULTS.md): Tint removes workgroup-array index clamps by its integer range analysis, which
 * Naga keeps. Each run loads Dawn with extra toggles and times the suite kernels with timestamps:
 *
 *   source .gpu/setup.sh && deno run -A bench/dawn_toggles.ts --module $PWD/.gpu/webgpu/index.js \
 *     [--enable disable_robustness] [--disable enable_integer_range_analysis_in_robustness]
 *     [--only flux:f16:sage-mma]
 */
import { useEngine } from "../mod.ts";
import { dawnTuning } from "../engines/dawn.ts";
import { shapeFlops, shapeInputs, SHAPES, timeOnGpu } from "./common.ts";
import { getDevice } from "../mod.ts";

const arg = (name: string) => {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : undefined;
};
dawnTuning.enable = arg("enable")?.split(",") ?? [];
dawnTuning.disable = arg("disable")?.split(",") ?? [];
await useEngine("dawn", { module: arg("module") });
const device = (await getDevice())!;
const runs = [
  { shape: "flux", dtype: "f32", backend: "flash-subgroup" },
  { shape: "flux", dtype: "f16", backend: "sage" },
  { shape: "sd3", dtype: "f16", backend: "sage" },
  { shape: "seed", dtype: "f32", backend: "flash-subgroup" },
  { shape: "flux", dtype: "f16", backend: "sage-mma" },
] as const;
// `--only flux:f16:sage-mma,...`: those runs alone.
const only = arg("only")?.split(",");
for (const r of runs.filter((r) => !only || only.includes(`${r.shape}:${r.dtype}:${r.backend}`))) {
  const s = SHAPES.find((x) => x.name === r.shape)!;
  const inputs = shapeInputs(device, s, r.dtype);
  const options = { backend: r.backend, isCausal: s.causal };
  await timeOnGpu(inputs, options, 2);
  const trials = [];
  for (let t = 0; t < 3; t++) trials.push((await timeOnGpu(inputs, options, 10)).ms);
  const ms = Math.min(...trials);
  console.log(JSON.stringify({
    bench: "dawn-toggles",
    enable: dawnTuning.enable,
    disable: dawnTuning.disable,
    ...r,
    ms: +ms.toFixed(3),
    tflops: +(shapeFlops(s) / ms / 1e9).toFixed(1),
  }));
  for (const t of [inputs.q, inputs.k, inputs.v]) t.buffer.destroy();
}
Deno.exit(0);
