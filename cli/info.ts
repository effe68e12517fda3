/**
 * `wgattn info`: the engines and their adapters, what the device in use offers, every backend with
 * whether it can run here and why not, and, given a call's shape, the router's whole chain for it.
 */
import {
  availableBackends,
  type BackendInfo,
  type DeviceInfo,
  deviceInfo,
  explain,
  getDevice,
} from "../mod.ts";
import type { Explanation } from "../core/api.ts";
import { readEnvIfGranted } from "../core/env.ts";
import { WgattnError } from "../core/errors.ts";
import { chosenEngine, DAWN_MODULE_VARIABLE } from "../engines/select.ts";
import { DAWN_PACKAGE, DawnUnavailable, loadDawn } from "../engines/dawn.ts";
import { denoEngine } from "../engines/deno.ts";
import type { Engine, EngineName } from "../engines/engine.ts";
import { helpText, parseFlags } from "./args.ts";
import { CALL_FLAGS, callFromFlags, callTensors, describeCall } from "./call.ts";
import { textTable } from "./table.ts";

const FLAGS = {
  ...CALL_FLAGS,
  json: { kind: "bool", help: "print everything as one JSON object" },
  help: { kind: "bool", help: "this help" },
} as const;

/** The help of `wgattn info`. */
export const INFO_HELP: string = helpText(
  "wgattn info [--shape b,n,s,d [--dtype f16] [--causal] ...] [--json]",
  "The WebGPU engines and their adapters, the features and limits of the device in use, every backend\n" +
    "with whether it can run here (and why not); with --shape, the router's whole chain for that call.",
  FLAGS,
);

/** One engine as info lists it. */
interface EngineRow {
  name: EngineName;
  version: string;
  inUse: boolean;
  adapter: string | null;
  software?: boolean;
  /** Why it has no adapter here. */
  unavailable?: string;
}

async function adapterOf(engine: Engine): Promise<{ adapter: string; software: boolean } | string> {
  const adapter = await engine.requestAdapter();
  if (!adapter) return "no adapter";
  const i = adapter.info;
  const name = i?.description || i?.device || i?.vendor || "unknown adapter";
  return { adapter: name, software: (i as { isFallbackAdapter?: boolean })?.isFallbackAdapter ?? false };
}

/** Both engines: the one in use from its device, the other probed for an adapter of its own. */
async function engineRows(info: DeviceInfo | null): Promise<EngineRow[]> {
  const choice = await chosenEngine();
  const rows: EngineRow[] = [];
  for (const name of ["deno", "dawn"] as const) {
    if (info && info.engine === name) {
      rows.push({
        name,
        version: info.engineVersion,
        inUse: true,
        adapter: info.adapter,
        software: info.isFallbackAdapter,
      });
      continue;
    }
    let engine: Engine;
    try {
      engine = name === "deno"
        ? denoEngine
        : choice.engine.name === "dawn"
        ? choice.engine
        : await loadDawn(readEnvIfGranted(DAWN_MODULE_VARIABLE) ?? DAWN_PACKAGE);
    } catch (e) {
      const why = e instanceof DawnUnavailable ? e.message : String((e as Error)?.message ?? e);
      rows.push({
        name,
        version: DAWN_PACKAGE.replace(/^npm:/, ""),
        inUse: false,
        adapter: null,
        unavailable: why,
      });
      continue;
    }
    const a = await adapterOf(engine).catch((e) => String(e?.message ?? e));
    rows.push(
      typeof a === "string"
        ? { name, version: engine.version, inUse: false, adapter: null, unavailable: a }
        : { name, version: engine.version, inUse: false, ...a },
    );
  }
  return rows;
}

/** What `info` found, as `--json` prints it. */
export interface InfoReport {
  engines: EngineRow[];
  device: (DeviceInfo & { features: string[] }) | null;
  backends: BackendInfo[];
  call?: {
    description: string;
    explanation: Explanation;
    /** The backends after the chosen one, which the router did not reach: could each serve it? */
    beyond: { backend: string; reasons: string[] }[];
  };
}

/** Runs `wgattn info`; returns the exit code. */
export async function info(argv: readonly string[]): Promise<number> {
  const parsed = parseFlags(argv, FLAGS);
  if (parsed.flags.get("help")) {
    console.log(INFO_HELP);
    return 0;
  }
  if (parsed.positional.length) {
    throw new WgattnError("INVALID_OPTION", "info takes no positional arguments", {
      argument: parsed.positional[0],
      expected: "flags only (see wgattn info --help)",
      actual: parsed.positional.join(" "),
    });
  }
  const call = callFromFlags(parsed);
  const device = await getDevice();
  const dev = await deviceInfo();
  const report: InfoReport = {
    engines: await engineRows(dev),
    device: dev && device ? { ...dev, features: [...device.features].sort() } : null,
    backends: await availableBackends(),
  };
  if (call) {
    const { q, k, v } = callTensors(call);
    const explanation = await explain(q, k, v, call.options);
    const names = report.backends.map((b) => b.name);
    const beyond = [];
    for (const name of names.slice(names.indexOf(explanation.backend) + 1)) {
      try {
        await explain(q, k, v, { ...call.options, backend: name });
        beyond.push({ backend: name, reasons: [] });
      } catch (e) {
        if (!(e instanceof WgattnError) || e.code !== "BACKEND_UNSUPPORTED") throw e;
        // `actual` is "<name>: <its reasons>".
        beyond.push({ backend: name, reasons: [(e.actual ?? e.message).replace(`${name}: `, "")] });
      }
    }
    report.call = { description: describeCall(call), explanation, beyond };
  }
  if (parsed.flags.get("json")) {
    console.log(JSON.stringify(report, null, 2));
    return 0;
  }
  console.log(formatInfo(report));
  return 0;
}

const yes = (x: boolean) => x ? "yes" : "no";

/** The report as text for the terminal. */
export function formatInfo(r: InfoReport): string {
  const out: string[] = [];
  out.push("engines");
  out.push(indent(textTable(
    ["engine", "version", "adapter"],
    r.engines.map((e) => [
      e.name + (e.inUse ? " *" : ""),
      e.version,
      e.adapter ? `${e.adapter}${e.software ? " (software)" : ""}` : `unavailable: ${e.unavailable}`,
    ]),
  )));
  out.push("  * in use (choose with --engine deno|dawn, or WGATTN_WEBGPU)");
  out.push("");
  const d = r.device;
  if (!d) out.push("device: none (no WebGPU adapter): every call runs on the cpu backend");
  else {
    out.push(`device: ${d.adapter} on ${d.engine} (${d.engineVersion})`);
    const mma = d.subgroupMatrixConfigs.map((m) =>
      `${m.componentType}->${m.resultComponentType} ${m.M}x${m.N}x${m.K}`
    );
    out.push(
      `  shader-f16 ${yes(d.shaderF16)}, subgroups ${yes(d.subgroups)}, packed int8 dot ${
        yes(d.packedInt8Dot)
      }, timestamps ${yes(d.timestamps)}, subgroup matrices ${mma.length ? mma.join(", ") : "none"}`,
    );
    out.push(`  features: ${d.features.join(", ") || "none"}`);
    out.push("  limits:");
    const names = Object.keys(d.limits).sort();
    const width = Math.max(...names.map((n) => n.length));
    for (const n of names) out.push(`    ${n.padEnd(width)}  ${d.limits[n]}`);
  }
  out.push("");
  out.push("backends, in the router's priority order");
  out.push(indent(textTable(
    ["backend", "available", "what / why not"],
    r.backends.map((b) => [b.name, yes(b.available), b.available ? b.summary : b.reasons.join("; ")]),
  )));
  if (r.call) {
    out.push("");
    out.push(`call: ${r.call.description}`);
    out.push(indent(r.call.explanation.text));
    if (r.call.beyond.length) {
      out.push("  not reached (what each would do with options.backend):");
      for (const b of r.call.beyond) {
        out.push(`       ${b.backend}: ${b.reasons.length ? b.reasons.join("; ") : "could serve it"}`);
      }
    }
  }
  return out.join("\n");
}

function indent(text: string): string {
  return text.split("\n").map((l) => `  ${l}`).join("\n");
}
