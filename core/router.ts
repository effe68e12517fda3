import { WgattnError } from "./errors.ts";
import type { Capabilities } from "./device.ts";
import type { AttentionProblem } from "./problem.ts";
import type { Backend } from "../backends/backend.ts";

/** How the backend was picked. */
export type DecisionSource = "option" | "variable" | "compatibility" | "priority";

/** One backend's verdict in the chain the router walked. */
export interface ChainEntry {
  /** The backend's canonical name. */
  backend: string;
  /** True for the backend that runs. */
  chosen: boolean;
  /** Why it was passed over (empty for the chosen one, and for those never reached). */
  reasons: string[];
}

/** The router's decision for one call. */
export interface Decision {
  backend: Backend;
  source: DecisionSource;
  /** The name asked for by the option or the variable, if any. */
  requested?: string;
  chain: ChainEntry[];
}

/** Every name (canonical and alias) a registry accepts, mapped to its backend. */
export function backendNames(registry: readonly Backend[]): Map<string, Backend> {
  const names = new Map<string, Backend>();
  for (const b of registry) {
    names.set(b.name, b);
    for (const a of b.aliases) if (!names.has(a)) names.set(a, b);
  }
  return names;
}

/** Resolves a backend name or alias; unknown names throw, listing the valid ones. */
export function lookupBackend(registry: readonly Backend[], name: string, argument: string): Backend {
  const names = backendNames(registry);
  const found = names.get(name.trim().toLowerCase()) ?? names.get(name.trim());
  if (!found) {
    throw new WgattnError("UNKNOWN_BACKEND", `unknown backend name`, {
      argument,
      expected: `one of ${[...names.keys()].join(", ")}`,
      actual: JSON.stringify(name),
    });
  }
  return found;
}

/**
 * Reasons a backend cannot serve the call here, including a kernel that failed to build and, when
 * the caller wants the log-sum-exp, a backend that does not write it.
 */
export function reasonsFor(
  b: Backend,
  p: AttentionProblem,
  caps: Capabilities | null,
  broken: ReadonlyMap<string, string>,
  wantLse = false,
): string[] {
  const reasons = b.unsupportedReasons(p, caps);
  if (wantLse && !b.producesLse) reasons.push("it does not produce the log-sum-exp");
  const failure = broken.get(b.name);
  if (failure) reasons.push(`its kernel failed on this device: ${failure}`);
  return reasons;
}

/**
 * Picks the backend for one call: `requested` (strict), else compatibility mode (naive), else the
 * variable's choice (falls back when it cannot serve), else the registry's priority order.
 */
export function decide(
  p: AttentionProblem,
  caps: Capabilities | null,
  registry: readonly Backend[],
  choice: {
    requested?: string;
    variable?: string;
    broken?: ReadonlyMap<string, string>;
    /** The call wants each row's log-sum-exp: backends without it are passed over. */
    wantLse?: boolean;
  } = {},
): Decision {
  const broken = choice.broken ?? new Map<string, string>();
  const wantLse = choice.wantLse === true;
  if (choice.requested !== undefined) {
    const b = lookupBackend(registry, choice.requested, "options.backend");
    const reasons = reasonsFor(b, p, caps, broken, wantLse);
    if (reasons.length > 0) {
      throw new WgattnError("BACKEND_UNSUPPORTED", `backend ${b.name} cannot serve this call`, {
        argument: "options.backend",
        expected: "a backend that supports the call (leave options.backend out to let the router choose)",
        actual: `${b.name}: ${reasons.join("; ")}`,
      });
    }
    return {
      backend: b,
      source: "option",
      requested: choice.requested,
      chain: [{ backend: b.name, chosen: true, reasons: [] }],
    };
  }
  const chain: ChainEntry[] = [];
  let source: DecisionSource = "priority";
  let requested: string | undefined;
  let order = registry;
  if (p.compatibilityMode) {
    source = "compatibility";
    order = registry.filter((b) => b.name === "naive" || b.name === "cpu");
  } else if (choice.variable) {
    requested = choice.variable;
    const b = lookupBackend(registry, choice.variable, "WGATTN_IMPLEMENTATION");
    const reasons = reasonsFor(b, p, caps, broken, wantLse);
    if (reasons.length === 0) {
      return {
        backend: b,
        source: "variable",
        requested,
        chain: [{ backend: b.name, chosen: true, reasons: [] }],
      };
    }
    chain.push({
      backend: b.name,
      chosen: false,
      reasons: ["chosen by WGATTN_IMPLEMENTATION but " + reasons.join("; ")],
    });
    order = registry.filter((x) => x !== b);
  }
  for (const b of order) {
    const reasons = reasonsFor(b, p, caps, broken, wantLse);
    if (reasons.length === 0 && caps && b.unsuitedReasons) reasons.push(...b.unsuitedReasons(p, caps));
    if (reasons.length === 0) {
      chain.push({ backend: b.name, chosen: true, reasons: [] });
      return { backend: b, source, requested, chain };
    }
    chain.push({ backend: b.name, chosen: false, reasons });
  }
  throw new WgattnError("NO_BACKEND", "no backend can serve this call", {
    expected: "at least one backend that supports it",
    actual: chain.map((c) => `${c.backend}: ${c.reasons.join("; ")}`).join(" | "),
  });
}
