/**
 * Strict checks of option objects: a key wgattn does not know, or a value of the wrong type, is
 * refused with INVALID_OPTION naming the key (and, for a misspelling, the key it resembles), so an
 * `isCasual: true` or an `isCausal: "yes"` never runs as something else silently.
 */
import { isGpuDevice } from "../engines/engine.ts";
import { WgattnError } from "./errors.ts";

/** What a value of an option must be: a JavaScript type, or a test with its description. */
export type OptionRule =
  | "boolean"
  | "string"
  | "number"
  | "object"
  | { test: (value: unknown) => boolean; expected: string };

/** The option keys of a function with the rule of each value. `undefined` is always allowed. */
export type OptionSchema = Record<string, OptionRule>;

/** Levenshtein distance, for suggesting the key a misspelling resembles. */
export function editDistance(a: string, b: string): number {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const next = [i];
    for (let j = 1; j <= b.length; j++) {
      next[j] = Math.min(row[j] + 1, next[j - 1] + 1, row[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    row = next;
  }
  return row[b.length];
}

/**
 * The valid key closest to `key`, if it is close enough to be a misspelling: compared without case
 * or underscores (DiffSynth's `is_causal` finds `isCausal`), within a third of its length (at least 2).
 */
export function closestKey(key: string, valid: readonly string[]): string | undefined {
  const norm = (s: string) => s.toLowerCase().replace(/[_\-\s]/g, "");
  let best: string | undefined, bestDistance = Infinity;
  for (const candidate of valid) {
    const distance = editDistance(norm(key), norm(candidate));
    if (distance < bestDistance) [best, bestDistance] = [candidate, distance];
  }
  return bestDistance <= Math.max(2, Math.floor(norm(key).length / 3)) ? best : undefined;
}

/** A value as an error message shows it: strings quoted, objects by their constructor. */
export function describeValue(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "bigint") return `${value}n`;
  if (value === null || typeof value !== "object") return String(value);
  if (Array.isArray(value)) return `an array of ${value.length}`;
  return `a ${(value as object).constructor?.name ?? "object"}`;
}

function ruleAccepts(rule: OptionRule, value: unknown): boolean {
  if (typeof rule === "object") return rule.test(value);
  switch (rule) {
    case "object":
      return typeof value === "object" && value !== null && !Array.isArray(value);
    case "boolean":
      return typeof value === "boolean";
    case "string":
      return typeof value === "string";
    case "number":
      return typeof value === "number";
  }
}

function ruleExpects(rule: OptionRule): string {
  if (typeof rule === "object") return rule.expected;
  return rule === "object" ? "an object" : `a ${rule}`;
}

/**
 * Refuses an options object with a key not in `schema` or a value its rule refuses (INVALID_OPTION,
 * argument `${prefix}.${key}`). `undefined` values pass: they mean "left out".
 */
export function checkOptions(options: unknown, schema: OptionSchema, prefix = "options"): void {
  if (options === undefined) return;
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    throw new WgattnError("INVALID_OPTION", `${prefix} must be an object`, {
      argument: prefix,
      expected: "an object or undefined",
      actual: describeValue(options),
    });
  }
  const valid = Object.keys(schema);
  for (const [key, value] of Object.entries(options)) {
    const argument = `${prefix}.${key}`;
    const rule = schema[key];
    if (rule === undefined || !Object.hasOwn(schema, key)) {
      const near = closestKey(key, valid);
      throw new WgattnError(
        "INVALID_OPTION",
        `${argument} is not an option${near ? ` (did you mean ${near}?)` : ""}`,
        {
          argument,
          expected: near ? `${near}, or one of ${valid.join(", ")}` : `one of ${valid.join(", ")}`,
          actual: JSON.stringify(key),
        },
      );
    }
    if (value !== undefined && !ruleAccepts(rule, value)) {
      throw new WgattnError("INVALID_OPTION", `${argument} must be ${ruleExpects(rule)}`, {
        argument,
        expected: ruleExpects(rule),
        actual: describeValue(value),
      });
    }
  }
}

/** A `GPUDevice` of either engine. */
export const GPU_DEVICE_RULE: OptionRule = {
  test: isGpuDevice,
  expected: "a GPUDevice",
};
