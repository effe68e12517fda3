/**
 * `deno task test:dawn`: the whole suite again with WGATTN_WEBGPU=dawn, if Dawn can run here. Where
 * it cannot (no `webgpu` package, no Vulkan adapter Dawn accepts: Debian 12's Mesa 22 lavapipe is
 * refused), it says why and exits 0, unless WGATTN_REQUIRE_DAWN=1 (CI), where that is a failure.
 * Arguments are passed on to `deno test` (e.g. a file or --filter).
 */
import { loadDawn } from "../engines/dawn.ts";

const module = Deno.env.get("WGATTN_DAWN_MODULE");
try {
  await loadDawn(module);
} catch (e) {
  const why = (e as Error).message;
  if (Deno.env.get("WGATTN_REQUIRE_DAWN") === "1") {
    console.error(`test:dawn: Dawn cannot run here, and WGATTN_REQUIRE_DAWN=1: ${why}`);
    Deno.exit(1);
  }
  console.log(`test:dawn: skipped, Dawn cannot run here: ${why}`);
  Deno.exit(0);
}
const files = Deno.args.length > 0 ? Deno.args : ["tests/"];
const { code } = await new Deno.Command(Deno.execPath(), {
  args: ["test", "--allow-env", "--allow-read", "--allow-run", "--allow-ffi", ...files],
  env: { WGATTN_WEBGPU: "dawn", XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp" },
  stdout: "inherit",
  stderr: "inherit",
}).spawn().status;
Deno.exit(code);
