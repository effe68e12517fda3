/**
 * `sage-mma` on a GPU: its form (real subgroup matrices or emulated) and why, accuracy against
 * float64 on sampled rows (random, K-outlier and causal inputs), and kernel time from timestamp
 * queries beside other backends, in TFLOP/s (4·b·n·s_q·s_kv·d, halved for causal).
 *
 *     deno run -A bench/sage_mma_bench.ts --shapes flux,seed --dtypes f16 --backends sage-mma,sage
 *       [--accuracy 256] [--accuracy-cases random,outliers,causal] [--accuracy-override '{"warps":4}'] [--crossover 1024,2048,4096] [--sweep '[{"warps":2},{"onePass":true},{"prepassOnly":true,"prepassSkip":["vstat"]}]'] [--reps 10]
 *
 * Each step reports its own failure (e.g. a kernel that does not compile) and the run goes on.
 */
import {
  chooseSageMmaConfig,
  emulatingMma,
  isTwoPass,
  realMmaReasons,
  sageMmaTuning,
} from "../backends/sage_mma.ts";
import { resolveProblem } from "../core/problem.ts";
import { sageMmaKey } from "../wgsl/sage_mma.ts";
import { defaultRuntime } from "../core/device.ts";
import { deviceInfo } from "../mod.ts";
import { type TwoPassConfig, twoPassKey } from "../wgsl/sage_mma_two_pass.ts";
import { type BenchShape, shapeFlops, shapeInputs, SHAPES, timeOnGpu } from "./common.ts";
import { sageAccuracy } from "./sage_accuracy.ts";

const arg = (name: string, fallback: string) => {
  const i = Deno.args.indexOf(`--${name}`);
  return i >= 0 ? Deno.args[i + 1] : fallback;
};
const shapeNames = arg("shapes", "flux").split(",");
const dtypes = arg("dtypes", "f16").split(",") as ("f32" | "f16")[];
const backends = arg("backends", "sage-mma,sage").split(",");
const accuracyRows = Number(arg("accuracy", "256"));
const reps = Number(arg("reps", "10"));
const crossover = arg("crossover", "").split(",").filter((x) => x).map(Number);
const sweep = JSON.parse(arg("sweep", "[]")) as (Partial<TwoPassConfig> & {
  onePass?: boolean;
  prepassOnly?: boolean;
  prepassSkip?: typeof sageMmaTuning.prepassSkip;
})[];
// `--accuracy-override JSON`: the config override the accuracy step runs under (default none).
const accuracyOverride = JSON.parse(arg("accuracy-override", "null")) as Partial<TwoPassConfig> | null;
// Accuracy inputs: random, K outliers, causal.
const accuracyCases = arg("accuracy-cases", "random,outliers,causal").split(",");

const rt = await defaultRuntime();
if (!rt) throw new Error("no WebGPU adapter");
const info = await deviceInfo();
console.log(
  `device: ${info?.adapter} (${info?.engine}); subgroups ${rt.caps.subgroupMinSize}-${rt.caps.subgroupMaxSize}`,
);
console.log(`subgroup matrices: ${JSON.stringify(rt.caps.subgroupMatrixConfigs)}`);
const reasons = realMmaReasons(rt.caps);
console.log(
  `sage-mma form: ${emulatingMma() ? "emulated (WGATTN_EMULATE_MMA=1)" : "real"}${
    reasons.length && !emulatingMma() ? `; cannot run: ${reasons.join("; ")}` : ""
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

const shapes = shapeNames.map((name) => {
  const s = SHAPES.find((x) => x.name === name);
  if (!s) throw new Error(`unknown shape ${name}`);
  return s;
});

// ---- accuracy against float64 on sampled rows ----
if (accuracyRows > 0) {
  for (const s of shapes) {
    for (const dtype of dtypes) {
      const all: [string, boolean, boolean][] = [["random", false, false], ["outliers", true, false], [
        "causal",
        false,
        true,
      ]];
      for (const [, outliers, causal] of all.filter(([name]) => accuracyCases.includes(name))) {
        await step(`accuracy ${s.name} ${dtype}`, async () => {
          sageMmaTuning.override = accuracyOverride;
          const r = await sageAccuracy({
            b: s.b,
            n: s.n,
            s: s.s,
            d: s.d,
            dtype,
            causal,
            outliers,
            rows: accuracyRows,
            backend: "sage-mma",
          }).finally(() => sageMmaTuning.override = null);
          console.log(JSON.stringify({ kind: "accuracy", name: s.name, override: accuracyOverride, ...r }));
          console.log(
            `  accuracy sage-mma ${s.name} ${dtype}${causal ? " causal" : ""}${
              outliers ? " K outliers" : " random"
            }: cosine ${r.cosine.toFixed(6)}, relative L1 ${r.relL1.toFixed(5)} (${r.rowsChecked} rows)`,
          );
        });
      }
    }
  }
}

// ---- speed ----
async function time(s: BenchShape, dtype: "f32" | "f16", backend: string, label = backend) {
  await step(`time ${s.name} ${dtype} ${label}`, async () => {
    const inputs = shapeInputs(rt!.device, s, dtype);
    try {
      if (backend === "sage-mma") {
        // The kernel the call runs: an override that does not fit falls back to another layout.
        const c = chooseSageMmaConfig(
          resolveProblem(inputs.q, inputs.k, inputs.v, { isCausal: s.causal === true }),
          rt!.caps,
          false,
        );
        console.log(`  kernel: ${typeof c === "string" ? c : isTwoPass(c) ? twoPassKey(c) : sageMmaKey(c)}`);
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
    for (const backend of backends) await time(s, dtype, backend);
    for (const o of sweep) {
      // `onePass: true` selects the one-pass kernel (wgsl/sage_mma.ts), `prepassOnly: true` times the
      // quantization pre-pass alone; the rest overrides the config.
      const { onePass, prepassOnly, prepassSkip, ...rest } = o;
      sageMmaTuning.override = rest;
      sageMmaTuning.twoPass = onePass !== true;
      sageMmaTuning.prepassOnly = prepassOnly === true;
      sageMmaTuning.prepassSkip = prepassSkip ?? [];
      try {
        await time(s, dtype, "sage-mma", `sage-mma ${JSON.stringify(o)}`);
      } finally {
        sageMmaTuning.override = null;
        sageMmaTuning.twoPass = true;
        sageMmaTuning.prepassOnly = false;
        sageMmaTuning.prepassSkip = [];
      }
    }
  }
}

// ---- crossover against the other backends: b1 n24 d128 at each s ----
for (const sq of crossover) {
  const s: BenchShape = { name: `s${sq}`, b: 1, n: 24, s: sq, d: 128 };
  for (const dtype of dtypes) for (const backend of backends) await time(s, dtype, backend);
}
