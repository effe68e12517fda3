/**
 * The wgattn command line: `info` (engines, adapters, features and limits, every backend with why
 * not, and the router's chain for a call), `bench` (shapes × dtypes × backends timed on the GPU: a
 * table, JSON, or an SVG chart beside PyTorch's figures) and `check` (the conformance cases against
 * float64 on this machine: a pass/fail table and the exit code). `--help` after any command.
 *
 * ```sh
 * deno run -A jsr:@wgattn/attention/cli info --shape 1,24,4608,128 --dtype f16
 * deno task cli bench --quick
 * deno task cli check
 * ```
 *
 * @module
 */
import { WgattnError } from "./core/errors.ts";
import { useEngine } from "./engines/select.ts";
import { helpText, oneOf, parseFlags } from "./cli/args.ts";
import { info } from "./cli/info.ts";
import { bench } from "./cli/bench.ts";
import { check } from "./cli/check.ts";
import meta from "./deno.json" with { type: "json" };

const GLOBAL_FLAGS = {
  engine: {
    kind: "string",
    value: "deno|dawn",
    help: "the WebGPU engine (before the command)",
    default: "WGATTN_WEBGPU, else deno",
  },
  version: { kind: "bool", help: "print the version" },
  help: { kind: "bool", help: "this help" },
} as const;

const COMMANDS: Record<string, (argv: readonly string[]) => Promise<number>> = { info, bench, check };

const HELP = helpText(
  "wgattn [--engine deno|dawn] <info|bench|check> [options]   (wgattn <command> --help for its options)",
  [
    "Scaled-dot-product attention on WebGPU, from the terminal.",
    "",
    "commands:",
    "  info   engines and adapters, features and limits, every backend with why not; --shape: the router's chain",
    "  bench  shapes x dtypes x backends timed on the GPU: a table, --json, --svg chart (with --torch figures)",
    "  check  the conformance cases against float64 on this machine: a pass/fail table, exit code 1 on a failure",
  ].join("\n"),
  GLOBAL_FLAGS,
);

/** The error as the CLI prints it: one line, `error [CODE]: message`. */
export function errorLine(e: unknown): string {
  if (e instanceof WgattnError) return `error [${e.code}]: ${e.message.replace(/^\[[A-Z_]+\] /, "")}`;
  const err = e as Error;
  return `error [${err?.name ?? "Error"}]: ${String(err?.message ?? e).split("\n")[0]}`;
}

/**
 * Runs the command line `argv` (without the program name) and resolves to its exit code: 0, 1 when
 * `check` finds a failing case, 2 for an error (printed as one line on stderr).
 *
 * @example
 * ```ts
 * import { main } from "jsr:@wgattn/attention/cli";
 * const code = await main(["info", "--shape", "1,8,128,64"]);
 * console.log(code); // 0
 * ```
 */
export async function main(argv: readonly string[]): Promise<number> {
  try {
    // Global flags come before the command; everything after it is the command's.
    let at = -1;
    for (let i = 0; i < argv.length && at < 0; i++) {
      if (argv[i] === "--engine") i++;
      else if (!argv[i].startsWith("-")) at = i;
    }
    const globals = parseFlags(at < 0 ? argv : argv.slice(0, at), GLOBAL_FLAGS);
    if (globals.flags.get("version")) {
      console.log(`wgattn ${meta.version}`);
      return 0;
    }
    if (globals.flags.get("help")) {
      console.log(HELP);
      return 0;
    }
    if (at < 0) {
      console.error(HELP); // no command: a usage error
      return 2;
    }
    const name = argv[at];
    const command = COMMANDS[name];
    if (!command) {
      throw new WgattnError("INVALID_OPTION", `unknown command ${JSON.stringify(name)}`, {
        argument: "command",
        expected: Object.keys(COMMANDS).join(", "),
        actual: name,
      });
    }
    const engine = globals.flags.get("engine") as string | undefined;
    if (engine !== undefined) await useEngine(oneOf("--engine", engine, ["deno", "dawn"]));
    return await command(argv.slice(at + 1));
  } catch (e) {
    console.error(errorLine(e));
    return 2;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
