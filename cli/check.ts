/**
 * `wgattn check`: the shared conformance cases (the test suite's) on this machine, each forced onto
 * each backend and compared with the float64 reference; a pass/fail table, and exit code 1 when a
 * case fails.
 */
import { getDevice } from "../mod.ts";
import { BACKENDS } from "../backends/registry.ts";
import type { Backend } from "../backends/backend.ts";
import { runtimeFor } from "../core/device.ts";
import { debug } from "../core/gpu.ts";
import { WgattnError } from "../core/errors.ts";
import { backendNames } from "../core/router.ts";
import { caseName, caseReasons, CASES, QUICK_CASES, runCase } from "../conformance/cases.ts";
import { helpText, parseFlags } from "./args.ts";
import { Progress } from "./progress.ts";
import { textTable } from "./table.ts";

const FLAGS = {
  quick: {
    kind: "bool",
    help: `the ${QUICK_CASES.length} cases without windows and with s <= 77 (of ${CASES.length})`,
  },
  backends: {
    kind: "string",
    value: "NAMES",
    help: "backends to check",
    default: "every registered backend",
  },
  filter: {
    kind: "string",
    value: "TEXT",
    help: "only cases whose name contains TEXT (e.g. f16, causal, gpu)",
  },
  reasons: { kind: "bool", help: "list why each skipped case was skipped" },
  json: { kind: "bool", help: "print the results as JSON instead of the table" },
  help: { kind: "bool", help: "this help" },
} as const;

/** The help of `wgattn check`. */
export const CHECK_HELP: string = helpText(
  "wgattn check [--quick] [--backends flash,naive] [--filter f16] [--reasons] [--json]",
  "Runs the conformance cases of wgattn's test suite on this machine: each case forced onto each\n" +
    "backend, its output (and log-sum-exp) against a float64 reference within the dtype's tolerance.\n" +
    "ok: within tolerance; FAIL: off, or an error; -: the backend cannot serve the case here.\n" +
    "Exit code 0 when nothing fails, 1 when a case fails.",
  FLAGS,
);

/** One case on one backend. */
export interface CheckResult {
  backend: string;
  case: string;
  status: "pass" | "fail" | "skip";
  /** The failure, or why it was skipped. */
  detail?: string;
  /** Errors against the reference, for a pass. */
  maxAbs?: number;
  rel?: number;
  ms: number;
}

function pickBackends(raw: string | undefined): Backend[] {
  if (raw === undefined) return [...BACKENDS];
  const names = backendNames(BACKENDS);
  const picked: Backend[] = [];
  for (const name of raw.split(",").map((x) => x.trim().toLowerCase()).filter((x) => x)) {
    const b = names.get(name);
    if (!b) {
      throw new WgattnError("UNKNOWN_BACKEND", `--backends names no backend ${JSON.stringify(name)}`, {
        argument: "--backends",
        expected: BACKENDS.map((b) => b.name).join(", "),
        actual: name,
      });
    }
    if (!picked.includes(b)) picked.push(b);
  }
  if (!picked.length) {
    throw new WgattnError("INVALID_OPTION", "--backends names nothing", {
      argument: "--backends",
      expected: BACKENDS.map((b) => b.name).join(", "),
      actual: JSON.stringify(raw),
    });
  }
  return picked;
}

/** Runs `wgattn check`; returns the exit code. */
export async function check(argv: readonly string[]): Promise<number> {
  const { flags, positional } = parseFlags(argv, FLAGS);
  if (flags.get("help")) {
    console.log(CHECK_HELP);
    return 0;
  }
  if (positional.length) {
    throw new WgattnError("INVALID_OPTION", "check takes no positional arguments", {
      argument: positional[0],
      expected: "flags only (see wgattn check --help)",
      actual: positional.join(" "),
    });
  }
  const backends = pickBackends(flags.get("backends") as string | undefined);
  const filter = flags.get("filter") as string | undefined;
  const cases = (flags.get("quick") ? QUICK_CASES : CASES).filter((c) =>
    !filter || caseName(c).includes(filter)
  );
  if (!cases.length) {
    throw new WgattnError("INVALID_OPTION", "--filter leaves no case", {
      argument: "--filter",
      expected: "text in a case name, e.g. f16, causal, gpu, lse",
      actual: JSON.stringify(filter),
    });
  }
  const device = await getDevice();
  const caps = device ? (await runtimeFor(device)).caps : null;
  debug.poisonOutputs = true; // an output element a kernel forgets to write reads as NaN and fails
  const json = !!flags.get("json");
  const progress = new Progress(backends.length * cases.length);
  const results: CheckResult[] = [];
  const started = performance.now();
  try {
    for (const backend of backends) {
      for (const c of cases) {
        const name = caseName(c);
        progress.step(`${backend.name}: ${name}`);
        const t0 = performance.now();
        const reasons = caseReasons(backend, c, caps, device);
        if (reasons.length) {
          results.push({
            backend: backend.name,
            case: name,
            status: "skip",
            detail: reasons.join("; "),
            ms: 0,
          });
        } else {
          try {
            const { out } = await runCase(backend, c, device);
            results.push({
              backend: backend.name,
              case: name,
              status: "pass",
              maxAbs: out.maxAbs,
              rel: out.rel,
              ms: performance.now() - t0,
            });
          } catch (e) {
            const detail = String((e as Error)?.message ?? e).split("\n")[0];
            results.push({
              backend: backend.name,
              case: name,
              status: "fail",
              detail,
              ms: performance.now() - t0,
            });
          }
        }
        progress.advance();
      }
    }
  } finally {
    progress.end();
    debug.poisonOutputs = false;
  }
  const seconds = (performance.now() - started) / 1000;
  const count = (s: CheckResult["status"]) => results.filter((r) => r.status === s).length;
  const summary = `check: ${count("pass")} passed, ${count("fail")} failed, ${count("skip")} skipped ` +
    `(${cases.length} cases x ${backends.length} backends) in ${seconds.toFixed(1)} s`;
  if (json) {
    console.log(JSON.stringify({ adapter: caps?.adapter ?? null, summary, results }, null, 1));
  } else {
    console.log(
      formatCheck(results, backends.map((b) => b.name), cases.map(caseName), !!flags.get("reasons")),
    );
    console.log(`adapter: ${caps?.adapter ?? "none (GPU backends skip)"}`);
    console.log(summary);
  }
  return count("fail") ? 1 : 0;
}

/** The results as a case × backend table, then each failure (and skip, with `reasons`) in full. */
export function formatCheck(
  results: readonly CheckResult[],
  backends: readonly string[],
  cases: readonly string[],
  reasons: boolean,
): string {
  const cell = (r: CheckResult | undefined) =>
    !r ? "" : r.status === "pass" ? "ok" : r.status === "fail" ? "FAIL" : "-";
  const at = new Map(results.map((r) => [`${r.backend}\n${r.case}`, r]));
  const body = cases.map((c) => [c, ...backends.map((b) => cell(at.get(`${b}\n${c}`)))]);
  const lines = [textTable(["case", ...backends], body)];
  const failures = results.filter((r) => r.status === "fail");
  if (failures.length) {
    lines.push("", "failures:");
    for (const f of failures) lines.push(`  ${f.backend}: ${f.case}: ${f.detail}`);
  }
  if (reasons) {
    const skips = results.filter((r) => r.status === "skip");
    if (skips.length) {
      lines.push("", "skipped:");
      for (const s of skips) lines.push(`  ${s.backend}: ${s.case}: ${s.detail}`);
    }
  } else if (results.some((r) => r.status === "skip")) {
    lines.push("", "-: skipped on this machine (--reasons says why)");
  }
  return lines.join("\n");
}
