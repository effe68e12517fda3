/**
 * The browser test's page module: the quick conformance cases (no windows, s <= 77) on every
 * backend the page's WebGPU serves, each against the float64 reference, written to the page and
 * reported to the test server (`POST /report/case`, then `/report/done` with the summary line that
 * tests/browser/run.ts reads). `?filter=TEXT` keeps the cases whose name contains TEXT,
 * `?backends=a,b` those backends.
 */
import { deviceInfo, getDevice } from "../../mod.ts";
import { BACKENDS } from "../../backends/registry.ts";
import { runtimeFor } from "../../core/device.ts";
import { debug } from "../../core/gpu.ts";
import { caseName, caseReasons, QUICK_CASES, runCase } from "../../conformance/cases.ts";

// The page's DOM, typed here: the module is type-checked with Deno's libraries, which have no DOM.
interface PageDocument {
  title: string;
  getElementById(id: string): { textContent: string | null } | null;
}
const page = (globalThis as unknown as { document: PageDocument }).document;
const log = page.getElementById("log")!;
const report = (name: string, text: string) =>
  fetch(`/report/${name}`, { method: "POST", body: text }).catch(() => {});
const show = (text: string) => {
  log.textContent += text + "\n";
  console.log(text);
};

/** The flash kernels (flash, flash-subgroup, sage) with a causal or window band. */
const FLASH_FAMILY = new Set(["flash", "flash-subgroup", "sage"]);

/**
 * Why SwiftShader cannot run this pair, or null. Its compiler loses the device (or spins for
 * minutes) on flash's banded kernels, causal and window alike: measured in Chromium 156, where the
 * same kernels pass on lavapipe and on GPUs. A driver fault, so the pair is skipped only on a
 * software adapter, and named.
 */
function swiftShaderSkip(
  software: boolean,
  backend: string,
  c: { isCausal?: boolean; windowSize?: unknown },
) {
  if (!software || !FLASH_FAMILY.has(backend) || (!c.isCausal && c.windowSize === undefined)) return null;
  return "SwiftShader loses the device compiling flash's banded (causal/window) kernels";
}

async function run(): Promise<void> {
  const params = new URLSearchParams(location.search);
  const filter = params.get("filter");
  const only = params.get("backends")?.split(",");
  const cases = QUICK_CASES.filter((c) => !filter || caseName(c).includes(filter));
  const device = await getDevice();
  const info = await deviceInfo();
  const caps = device ? (await runtimeFor(device)).caps : null;
  const where = info
    ? `${info.adapter}${
      info.isFallbackAdapter ? " (software)" : ""
    }, subgroups ${info.subgroups}, shader-f16 ${info.shaderF16}`
    : "no WebGPU adapter";
  show(`adapter: ${where}`);
  await report("case", `adapter: ${where}`);
  debug.poisonOutputs = true; // an output element a kernel forgets to write reads as NaN and fails
  let passed = 0, failed = 0, skipped = 0, driverSkips = 0;
  const started = performance.now();
  for (const backend of BACKENDS.filter((b) => !only || only.includes(b.name))) {
    for (const c of cases) {
      const name = `${backend.name}: ${caseName(c)}`;
      const reasons = caseReasons(backend, c, caps, device);
      if (reasons.length) {
        skipped++;
        continue;
      }
      const driver = swiftShaderSkip(!!info?.isFallbackAdapter, backend.name, c);
      if (driver) {
        skipped++;
        driverSkips++;
        continue;
      }
      const t0 = performance.now();
      let line: string;
      try {
        await runCase(backend, c, device);
        passed++;
        line = `ok   ${name} (${Math.round(performance.now() - t0)} ms)`;
      } catch (e) {
        failed++;
        line = `FAIL ${name}: ${String((e as Error)?.message ?? e).split("\n")[0]}`;
      }
      show(line);
      await report("case", line);
    }
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const summary = `browser check: ${passed} passed, ${failed} failed, ${skipped} skipped (${driverSkips} ` +
    `of them flash's causal kernels, which SwiftShader cannot compile) in ${seconds} s`;
  show(summary);
  page.title = summary;
  await report("done", summary);
}

run().catch(async (e) => {
  const line = `browser check: error: ${String((e as Error)?.stack ?? e)}`;
  show(line);
  await report("done", line);
});
