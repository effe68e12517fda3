/**
 * Strict command-line options: every flag is declared with its kind; an unknown flag, a missing or
 * malformed value, or a repeated flag is an `INVALID_OPTION` error naming the flag.
 */
import { WgattnError } from "../core/errors.ts";

/** How a flag takes its value. */
export type FlagKind = "bool" | "string" | "int" | "number";

/** One declared flag. */
export interface FlagSpec {
  kind: FlagKind;
  /** Shown by --help, after the flag (e.g. `b,n,s,d`). */
  value?: string;
  help: string;
  /** Shown by --help. */
  default?: string;
}

/** Parsed flags by name (without the dashes); positional words in order. */
export interface Parsed {
  flags: Map<string, string | number | boolean>;
  positional: string[];
}

function invalid(flag: string, message: string, expected: string, actual: string): WgattnError {
  return new WgattnError("INVALID_OPTION", message, { argument: flag, expected, actual });
}

/** Parses `argv` against `specs`; `--name value` and `--name=value` both work. */
export function parseFlags(argv: readonly string[], specs: Record<string, FlagSpec>): Parsed {
  const flags = new Map<string, string | number | boolean>();
  const positional: string[] = [];
  const known = Object.keys(specs).map((k) => `--${k}`).join(", ");
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i];
    if (word === "-h") {
      flags.set("help", true);
      continue;
    }
    if (!word.startsWith("--")) {
      if (word.startsWith("-") && word.length > 1 && !/^-\d/.test(word)) {
        throw invalid(word, `unknown flag ${word}`, known || "no flags", word);
      }
      positional.push(word);
      continue;
    }
    const eq = word.indexOf("=");
    const name = word.slice(2, eq < 0 ? undefined : eq);
    const spec = specs[name];
    if (!spec) throw invalid(`--${name}`, `unknown flag --${name}`, known || "no flags", word);
    if (flags.has(name)) throw invalid(`--${name}`, `--${name} is given twice`, "once", "twice");
    if (spec.kind === "bool") {
      if (eq >= 0) throw invalid(`--${name}`, `--${name} takes no value`, "no value", word.slice(eq + 1));
      flags.set(name, true);
      continue;
    }
    let raw: string | undefined;
    if (eq >= 0) raw = word.slice(eq + 1);
    else if (i + 1 < argv.length && !argv[i + 1].startsWith("--")) raw = argv[++i];
    if (raw === undefined || raw === "") {
      throw invalid(`--${name}`, `--${name} needs a value`, spec.value ?? spec.kind, "nothing");
    }
    if (spec.kind === "string") flags.set(name, raw);
    else {
      const x = Number(raw);
      const ok = spec.kind === "int" ? Number.isSafeInteger(x) && x >= 0 : Number.isFinite(x);
      if (!ok) {
        throw invalid(
          `--${name}`,
          `--${name} must be ${spec.kind === "int" ? "a whole number >= 0" : "a finite number"}`,
          spec.value ?? spec.kind,
          JSON.stringify(raw),
        );
      }
      flags.set(name, x);
    }
  }
  return { flags, positional };
}

/** A comma-separated list of whole numbers, each >= `min`. */
export function intList(flag: string, raw: string, length: readonly number[], min = 0): number[] {
  const parts = raw.split(",").map((x) => x.trim());
  const values = parts.map(Number);
  if (!length.includes(parts.length) || values.some((x) => !Number.isSafeInteger(x) || x < min)) {
    throw invalid(
      flag,
      `${flag} takes ${length.join(" or ")} whole numbers >= ${min}, comma-separated`,
      length.length === 1 && length[0] === 4 ? "b,n,s,d" : `${length.join(" or ")} numbers`,
      JSON.stringify(raw),
    );
  }
  return values;
}

/** A comma-separated list of names, each one of `allowed` (case-sensitive), without repeats. */
export function nameList<T extends string>(flag: string, raw: string, allowed: readonly T[]): T[] {
  const names = raw.split(",").map((x) => x.trim()).filter((x) => x !== "");
  if (names.length === 0) {
    throw invalid(flag, `${flag} names nothing`, allowed.join(", "), JSON.stringify(raw));
  }
  for (const name of names) {
    if (!allowed.includes(name as T)) {
      throw invalid(flag, `${flag} names an unknown value`, allowed.join(", "), JSON.stringify(name));
    }
  }
  if (new Set(names).size !== names.length) {
    throw invalid(flag, `${flag} repeats a value`, "each at most once", JSON.stringify(raw));
  }
  return names as T[];
}

/** One of `allowed`. */
export function oneOf<T extends string>(flag: string, raw: string, allowed: readonly T[]): T {
  if (!allowed.includes(raw as T)) {
    throw invalid(
      flag,
      `${flag} takes one of ${allowed.join(", ")}`,
      allowed.join(", "),
      JSON.stringify(raw),
    );
  }
  return raw as T;
}

/** The help text of a command: usage line, description, then each flag. */
export function helpText(usage: string, description: string, specs: Record<string, FlagSpec>): string {
  const rows = Object.entries(specs).map(([name, s]) => [`--${name}${s.value ? ` ${s.value}` : ""}`, s]);
  const width = Math.max(...rows.map(([f]) => (f as string).length));
  const lines = rows.map(([f, s]) => {
    const spec = s as FlagSpec;
    return `  ${(f as string).padEnd(width)}  ${spec.help}${
      spec.default ? ` (default: ${spec.default})` : ""
    }`;
  });
  return `usage: ${usage}\n\n${description}\n\noptions:\n${lines.join("\n")}\n`;
}
