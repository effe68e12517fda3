/**
 * The browser test: bundles the module for the browser, serves the repository, and opens two pages
 * in headless Chromium, whose WebGPU runs on SwiftShader (a CPU Vulkan adapter): the example page
 * (one call, the router's choice, the error against plain JS) and the quick conformance cases on
 * every backend the page's WebGPU serves. Prints each case's line and the summary; exits 1 when a
 * case fails, a page reports an error, or a page says nothing within the time limit.
 *
 *   deno task test:browser   # CHROMIUM=/path/to/chrome to use another binary
 *
 * Variables: CHROMIUM (default `chromium`), WGATTN_BROWSER_TIMEOUT_S (per page, default 600),
 * WGATTN_BROWSER_FILTER (only cases whose name contains it), WGATTN_BROWSER_BACKENDS (only these,
 * comma-separated).
 */
import { buildBrowser, serveRepo } from "../../examples/browser/serve.ts";

const CHROMIUM = Deno.env.get("CHROMIUM") ?? "chromium";
const TIMEOUT_S = Number(Deno.env.get("WGATTN_BROWSER_TIMEOUT_S") ?? 600);
const FILTER = Deno.env.get("WGATTN_BROWSER_FILTER");
const BACKENDS = Deno.env.get("WGATTN_BROWSER_BACKENDS");
// WebGPU compute on SwiftShader in headless Chromium (Debian's package); it offers subgroups, not shader-f16.
const FLAGS = [
  "--headless=new",
  "--no-sandbox",
  "--enable-unsafe-webgpu",
  "--enable-features=Vulkan,WebGPUService",
  "--use-vulkan=swiftshader",
  "--enable-unsafe-swiftshader",
  "--no-first-run",
  "--no-default-browser-check",
  "--disable-extensions",
  // A kernel's compile on SwiftShader can take longer than the GPU watchdog allows: without this the
  // GPU process is killed mid-compile and the device lost.
  "--disable-gpu-watchdog",
];

const t0 = performance.now();
await buildBrowser();
console.log(`bundled dist/ in ${Math.round(performance.now() - t0)} ms`);

let waiting: ((line: string) => void) | null = null;
const server = serveRepo({
  port: 0,
  onReport(name, body) {
    console.log(body);
    if (name === "done") waiting?.(body);
  },
});

/** Opens `path` in a fresh headless Chromium and resolves to the page's summary line (or a timeout's). */
async function visit(path: string): Promise<string> {
  const profile = await Deno.makeTempDir({ prefix: "wgattn-chromium-" });
  const done = new Promise<string>((resolve) => (waiting = resolve));
  const env = { ...Deno.env.toObject() };
  delete env.VK_ICD_FILENAMES; // Chromium brings SwiftShader; the tests' lavapipe choice is not its
  const child = new Deno.Command(CHROMIUM, {
    args: [...FLAGS, `--user-data-dir=${profile}`, `http://127.0.0.1:${server.addr.port}${path}`],
    stdout: "null",
    stderr: "piped",
    env,
    clearEnv: true,
  }).spawn();
  // Chromium's own log, kept for when the page says nothing.
  const stderr = new Response(child.stderr).text();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<string>((resolve) => {
    timer = setTimeout(
      () => resolve(`timeout: ${path} reported nothing in ${TIMEOUT_S} s`),
      TIMEOUT_S * 1000,
    );
  });
  const exited = child.status.then((s) => `chromium exited (code ${s.code}) before ${path} reported`);
  const line = await Promise.race([done, timeout, exited]);
  clearTimeout(timer);
  try {
    child.kill("SIGTERM");
  } catch { /* already gone */ }
  await child.status;
  if (/^(timeout|chromium exited)/.test(line)) console.log((await stderr).split("\n").slice(-20).join("\n"));
  await Deno.remove(profile, { recursive: true }).catch(() => {});
  return line;
}

const example = await visit("/examples/browser/?report");
const query = new URLSearchParams();
if (FILTER) query.set("filter", FILTER);
if (BACKENDS) query.set("backends", BACKENDS);
const check = await visit(`/tests/browser/?${query}`);
await server.shutdown();
const ok = /^example: ok/.test(example) && /^browser check: \d+ passed, 0 failed/.test(check);
console.log(`browser test ${ok ? "passed" : "FAILED"} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
Deno.exit(ok ? 0 : 1);
