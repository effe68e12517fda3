/**
 * The shared conformance cases (conformance/cases.ts) registered with `Deno.test`: each case on
 * each backend, forced with `options.backend`, against the float64 reference.
 */
import type { Backend } from "../backends/backend.ts";
import type { Capabilities } from "../core/device.ts";
import { debug } from "../core/gpu.ts";
import { caseName, caseReasons, type ConformanceCase, runCase } from "../conformance/cases.ts";

export * from "../conformance/cases.ts";

/**
 * Registers every case for every backend with `Deno.test`. Cases a backend cannot serve here are
 * registered as ignored, named with the reason.
 */
export function registerConformance(
  backends: readonly Backend[],
  cases: readonly ConformanceCase[],
  caps: Capabilities | null,
  device: GPUDevice | null,
): void {
  debug.poisonOutputs = true; // unwritten output elements read as NaN and fail
  const seen = new Set<string>();
  for (const c of cases) {
    const name = caseName(c);
    if (seen.has(name)) throw new Error(`duplicate conformance case: ${name}`);
    seen.add(name);
  }
  for (const backend of backends) {
    for (const c of cases) {
      const reasons = caseReasons(backend, c, caps, device);
      const skip = reasons.length > 0;
      Deno.test({
        name: `${backend.name}: ${caseName(c)}${skip ? ` [skipped: ${reasons.join("; ")}]` : ""}`,
        ignore: skip,
        fn: async () => {
          await runCase(backend, c, device);
        },
      });
    }
  }
}
