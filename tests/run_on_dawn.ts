/**
 * `deno task test:dawn`: the whole suite again with WGATTN_WEBGPU=dawn, if Dawn can run here. Where
 * it cannot (no `webgpu` package, no Vulkan adapter Dawn accepts: Debian 12's Mesa 22 lavapipe is
 * refused), it says why and exits 0, unless WGATTN_REQUIRE_DAWN=1 (CI), where that is a failure.
 * Arguments are passed on to `deno test` (e.g. a file or --filter).
 *
 * `WGATTN_DAWN_VK_ICD`, when set, is the Vulkan driver manifest Dawn's run uses (VK_ICD_FILENAMES
 * for it alone): CI gives Deno's engine Mesa 22's lavapipe, which compiles the kernels 6 to 9 times
 * faster than Mesa 25's (measured here), and Dawn the Mesa 25 it needs.
 */
import { loadDawn } from "../engines/dawn.ts";

const module = Deno.env.get("WGATTN_DAWN_MODULE");
const icd = Deno.env.get("WGATTN_DAWN_VK_ICD");
if (icd) Deno.env.set("VK_ICD_FILENAMES", icd);
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
  env: {
    WGATTN_WEBGPU: "dawn",
    XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp",
    ...(icd ? { VK_ICD_FILENAMES: icd } : {}),
  },
  stdout: "inherit",
  stderr: "inherit",
}).spawn().status;
Deno.exit(code);
