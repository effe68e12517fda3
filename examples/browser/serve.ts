/**
 * The browser build and a small static server for the example page and the browser test. Browsers
 * load JavaScript, not TypeScript: `deno bundle` strips the types into ES modules under `dist/`
 * (the module's code unchanged; shared code split into chunks), and the server serves the repository
 * over http (WebGPU needs a secure context, which localhost is).
 *
 *   deno run --allow-read --allow-write --allow-run --allow-net --allow-env examples/browser/serve.ts
 *   # then open http://localhost:8000/examples/browser/ in Chrome or Edge
 */

/** The repository's root directory. */
export const ROOT: string = new URL("../../", import.meta.url).pathname;

/** The entry points the pages import, as `dist/<same path>.js`. */
const ENTRIES = ["mod.ts", "tests/browser/check_page.ts"];

/** Bundles the browser entry points into `dist/` with `deno bundle` (it fetches esbuild from npm once). */
export async function buildBrowser(): Promise<void> {
  const args = ["bundle", "--quiet", "--platform", "browser", "--format", "esm", "--code-splitting"];
  const { code, stderr } = await new Deno.Command(Deno.execPath(), {
    args: [...args, "--outdir", "dist", ...ENTRIES],
    cwd: ROOT,
    stdout: "inherit",
    stderr: "piped",
  }).output();
  if (code !== 0) throw new Error(`deno bundle failed: ${new TextDecoder().decode(stderr)}`);
}

const TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  json: "application/json",
  svg: "image/svg+xml",
  css: "text/css",
  map: "application/json",
};

/** Options of {@link serveRepo}. */
export interface ServeOptions {
  /** 0 picks a free port. */
  port: number;
  /** Gets each POST to `/report/<name>` (the browser test's pages report through it). */
  onReport?: (name: string, body: string) => void;
}

/** Serves the repository's files (GET) on 127.0.0.1, and reports (POST /report/...). */
export function serveRepo(options: ServeOptions): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port: options.port, onListen() {} }, async (req) => {
    const url = new URL(req.url);
    if (req.method === "POST" && url.pathname.startsWith("/report/") && options.onReport) {
      options.onReport(url.pathname.slice("/report/".length), await req.text());
      return new Response("ok");
    }
    if (req.method !== "GET") return new Response("method not allowed", { status: 405 });
    let path = decodeURIComponent(url.pathname);
    if (path.endsWith("/")) path += "index.html";
    // Only files under the root: no "..", no hidden files.
    if (path.split("/").some((p) => p === ".." || p.startsWith("."))) {
      return new Response("not found", { status: 404 });
    }
    try {
      const body = await Deno.readFile(ROOT + path.slice(1));
      const type = TYPES[path.split(".").pop() ?? ""] ?? "application/octet-stream";
      return new Response(body, { headers: { "content-type": type, "cache-control": "no-store" } });
    } catch {
      return new Response("not found", { status: 404 });
    }
  });
}

if (import.meta.main) {
  await buildBrowser();
  const port = Number(Deno.args[0] ?? 8000);
  serveRepo({ port });
  console.log(`serving ${ROOT} on http://localhost:${port}/examples/browser/ (Chrome or Edge: WebGPU)`);
}
