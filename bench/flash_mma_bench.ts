/**
 * `flash-mma` on a GPU: its form (real subgroup matrices or emulated) and why, accuracy against
 * float64 on sampled rows (max abs, relative L2, cosine) beside the other backends, and kernel time
 * from timestamp queries, in TFLOP/s (4·b·n·s_q·s_kv·d, halved for causal), f32 by default.
 *
 *     deno run -A bench/flash_mma_bench.ts --shapes seed,flux,sd3 --backends flash-mma,flash-subgroup
 *       [--dtypes f32] [--accuracy 256] [--reps 10] [--crossover 1024,2048,4096]
 *       [--sweep '[{"slices":4,"order":3,"maxOrder":3},{"maxOrder":1},{"maxOrder":0},{"skipMaxPass":true},
 *                  {"qRegisters":false},{"warps":2},{"bc":64},{"stage":"k","warps":3},{"stage":"v","warps":2},{"split":1,"warps":4},
 *                  {"shape":{"component":"i8","result":"i32","M":16,"N":8,"K":32}}]']
 *
 * `--sweep` entries override flash-mma's config (wgsl/flash_mma.ts, FlashMmaConfig): slice count
 * and products kept (`slices`, `order`), the maximum pass's products (`maxOrder`, below `order`
 * with its proven margin), a stage left out (`skipMaxPass`: wrong results, times pass 2 alone),
 * Q in registers or not, subgroups, subgroups a block of rows (`split`), key tile, K and/or V staged in
 * workgroup memory, N8 tiles, or `prepassOnly` (the slicing pre-pass alone). Each is timed at every shape and, with
 * `--accuracy`, checked. Each step reports its own failure (e.g. a kernel that does not compile)
 * and the run goes on. `--crossover` times b1 n24 d128 at each s (FLASH_MMA_MIN_SEQ's measurement).
 */
import {
  chooseFlashMmaConfig,
  emulatingFlashMma,
  flashMmaTuning,
  maxKernelConfig,
} from "../backends/flash_mma.ts";
import { mmaTileFor, realMmaReasons } from "../backends/sage_mma.ts";
import { resolveProblem } from "../core/problem.ts";
import { defaultRuntime } from "../core/device.ts";
import { deviceInfo } from "../mod.ts";
import { type FlashMmaConfig, flashMmaKey } from "../wgsl/flash_mma.ts";
import { type BenchShape, shapeFlops, shapeInputs, SHAPES, timeOnGpu } from "./common.ts";
import { sageAccuracy } from "./sage_accuracy.ts";

const arg = (name: string, fallback: string) => {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : fallback;
};
const shapeNames = arg("shapes", "seed,flux,sd3").split(",");
const dtypes = arg("dtypes", "f32").split(",") as ("f32" | "f16")[];
const backends = arg("backends", "flash-mma,flash-subgroup").split(",");
const accuracyRows = Number(arg("accuracy", "256"));
const reps = Number(arg("reps", "10"));
const crossover = arg("crossover", "").split(",").filter((x) => x).map(Number);
const sweep = JSON.parse(arg("sweep", "[]")) as (Partial<FlashMmaConfig> & { prepassOnly?: boolean })[];

const rt = await defaultRuntime();
if (!rt) throw new Error("no WebGPU adapter");
const info = await deviceInfo();
console.log(
  `device: ${info?.adapter} (${info?.engine}); subgroups ${rt.caps.subgroupMinSize}-${rt.caps.subgroupMaxSize}`,
);
console.log(`subgroup matrices: ${JSON.stringify(rt.caps.subgroupMatrixConfigs)}`);
const reasons = realMmaReasons(rt.caps);
console.log(
  `flash-mma form: ${emulatingFlashMma() ? "emulated (WGATTN_EMULATE_MMA=1)" : "real"}${
    reasons.length && !emulatingFlashMma() ? `; cannot run: ${reasons.join("; ")}` : ""
  }`,
);

async function step<T>(what: string, f: () => Promise<T>): Promise<T | null> {
  try {
    return await f();
  } catch (e) {
    console.log(`  ${what}: FAILED: ${(e as Error).message}`);
    return null;
  }
}

/** Runs `f` under a sweep entry: config overrides, and `prepassOnly` (the slicing pre-pass alone). */
async function withOverride<T>(
  o: (Partial<FlashMmaConfig> & { prepassOnly?: boolean }) | null,
  f: () => Promise<T>,
): Promise<T> {
  const { prepassOnly, ...rest } = o ?? {};
  flashMmaTuning.override = o ? rest : null;
  flashMmaTuning.prepassOnly = prepassOnly === true;
  try {
    return await f();
  } finally {
    flashMmaTuning.override = null;
    flashMmaTuning.prepassOnly = false;
  }
}

const shapes = shapeNames.map((name) => {
  const s = SHAPES.find((x) => x.name === name);
  if (!s) throw new Error(`unknown shape ${name}`);
  return s;
});

/** Every run: the backends as they are, then flash-mma under each sweep entry. */
const runs: { backend: string; label: string; override: (typeof sweep)[number] | null }[] = [
  ...backends.map((backend) => ({ backend, label: backend, override: null })),
  ...sweep.map((o) => ({ backend: "flash-mma", label: `flash-mma ${JSON.stringify(o)}`, override: o })),
];

// ---- accuracy against float64 on sampled rows ----
if (accuracyRows > 0) {
  for (const s of shapes) {
    for (const dtype of dtypes) {
      for (const r of runs) {
        await step(`accuracy ${s.name} ${dtype} ${r.label}`, () =>
          withOverride(r.override, async () => {
            const a = await sageAccuracy({
              b: s.b,
              n: s.n,
              s: s.s,
              d: s.d,
              dtype,
              causal: s.causal === true,
              rows: accuracyRows,
              backend: r.backend,
            });
            console.log(JSON.stringify({ kind: "accuracy", name: s.name, label: r.label, ...a }));
            console.log(
              `  accuracy ${s.name} ${dtype} ${r.label}: max abs ${a.maxAbs.toExponential(2)}, rel L2 ${
                a.relL2.toExponential(2)
              }, cosine ${a.cosine.toFixed(9)} (${a.rowsChecked} rows)`,
            );
          }));
      }
    }
  }
}

// ---- speed ----
async function time(s: BenchShape, dtype: "f32" | "f16", backend: string, label: string) {
  await step(`time ${s.name} ${dtype} ${label}`, async () => {
    const inputs = shapeInputs(rt!.device, s, dtype);
    try {
      if (backend === "flash-mma") {
        // The kernels the call runs: an override that does not fit falls back to another layout.
        const p = resolveProblem(inputs.q, inputs.k, inputs.v, { isCausal: s.causal === true });
        const c = chooseFlashMmaConfig(p, rt!.caps, false);
        const max = typeof c !== "string" && c.maxPass === "read"
          ? maxKernelConfig(c, mmaTileFor(rt!.caps, c.emulate).limits)
          : null;
        console.log(
          `  kernel: ${typeof c === "string" ? c : flashMmaKey(c)}${
            max ? `, maximum: ${flashMmaKey(max)}` : ""
          }`,
        );
      }
      const { ms } = await timeOnGpu(inputs, { backend, isCausal: s.causal === true }, reps);
      const tflops = shapeFlops(s) / ms / 1e9;
      console.log(JSON.stringify({ kind: "time", shape: s.name, dtype, backend: label, ms, tflops }));
      console.log(`  ${s.name} ${dtype} ${label}: ${ms.toFixed(3)} ms, ${tflops.toFixed(1)} TFLOP/s`);
    } finally {
      for (const t of Object.values(inputs)) t.buffer.destroy();
    }
  });
}

for (const s of shapes) {
  for (const dtype of dtypes) {
    for (const r of runs) await withOverride(r.override, () => time(s, dtype, r.backend, r.label));
  }
}

// ---- crossover against the other backends: b1 n24 d128 at each s ----
for (const sq of crossover) {
  const s: BenchShape = { name: `s${sq}`, b: 1, n: 24, s: sq, d: 128 };
  for (const dtype of dtypes) for (const backend of backends) await time(s, dtype, backend, backend);
}
