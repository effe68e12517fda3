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

/**
 * Names that stand for a family of backends rather than one (DiffSynth's `sage_attention`): the
 * call runs on the family's first member, in this order, that serves it here and that the router
 * would take on its own (not slower here, say); else on the first that serves it.
 */
export const BACKEND_FAMILIES: Readonly<Record<string, readonly string[]>> = {
  sage_attention: ["sage-mma", "sage"],
  sageattention: ["sage-mma", "sage"],
};

/** Resolves a backend name or alias; unknown names throw, listing the valid ones. */
export function lookupBackend(registry: readonly Backend[], name: string, argument: string): Backend {
  return lookupCandidates(registry, name, argument)[0];
}

/** The backends a name stands for: one, or a family's members in order. */
export function lookupCandidates(registry: readonly Backend[], name: string, argument: string): Backend[] {
  const key = name.trim().toLowerCase();
  const family = Object.hasOwn(BACKEND_FAMILIES, key) ? BACKEND_FAMILIES[key] : null;
  const members = family?.flatMap((n) => registry.filter((b) => b.name === n)) ?? [];
  if (members.length > 0) return members;
  const names = backendNames(registry);
  const found = names.get(key) ?? names.get(name.trim());
  if (!found) {
    throw new WgattnError("UNKNOWN_BACKEND", `unknown backend name`, {
      argument,
      expected: `one of ${[...names.keys(), ...Object.keys(BACKEND_FAMILIES)].join(", ")}`,
      actual: JSON.stringify(name),
    });
  }
  return [found];
}

/**
 * The member of `candidates` (a family, or one backend) that serves the call: the first the router
 * would take, else the first that can run it. Null when none can; `chain` gets every verdict.
 */
function pickNamed(
  candidates: readonly Backend[],
  p: AttentionProblem,
  caps: Capabilities | null,
  broken: ReadonlyMap<string, string>,
  wantLse: boolean,
  chain: ChainEntry[],
): Backend | null {
  if (candidates.length === 1) {
    const reasons = reasonsFor(candidates[0], p, caps, broken, wantLse);
    chain.push({ backend: candidates[0].name, chosen: reasons.length === 0, reasons });
    return reasons.length === 0 ? candidates[0] : null;
  }
  const verdicts = candidates.map((b) => {
    const reasons = reasonsFor(b, p, caps, broken, wantLse);
    const unsuited = reasons.length === 0 && caps && b.unsuitedReasons ? b.unsuitedReasons(p, caps) : [];
    return { b, reasons, unsuited };
  });
  const pick = verdicts.find((v) => v.reasons.length === 0 && v.unsuited.length === 0) ??
    verdicts.find((v) => v.reasons.length === 0);
  for (const v of verdicts) {
    chain.push({
      backend: v.b.name,
      chosen: v === pick,
      reasons: v === pick ? [] : [...v.reasons, ...v.unsuited],
    });
  }
  return pick?.b ?? null;
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
    const candidates = lookupCandidates(registry, choice.requested, "options.backend");
    const named: ChainEntry[] = [];
    const b = pickNamed(candidates, p, caps, broken, wantLse, named);
    if (!b) {
      const what = candidates.length === 1
        ? `backend ${candidates[0].name}`
        : `no backend of ${choice.requested}`;
      throw new WgattnError("BACKEND_UNSUPPORTED", `${what} cannot serve this call`, {
        argument: "options.backend",
        expected: "a backend that supports the call (leave options.backend out to let the router choose)",
        actual: named.map((c) => `${c.backend}: ${c.reasons.join("; ")}`).join(" | "),
      });
    }
    return { backend: b, source: "option", requested: choice.requested, chain: named };
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
    const candidates = lookupCandidates(registry, choice.variable, "WGATTN_IMPLEMENTATION");
    const named: ChainEntry[] = [];
    const b = pickNamed(candidates, p, caps, broken, wantLse, named);
    if (b) return { backend: b, source: "variable", requested, chain: named };
    for (const c of named) {
      chain.push({ ...c, reasons: ["chosen by WGATTN_IMPLEMENTATION but " + c.reasons.join("; ")] });
    }
    order = registry.filter((x) => !candidates.includes(x));
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
