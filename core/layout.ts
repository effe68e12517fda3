import { WgattnError } from "./errors.ts";

/** The four logical axes of an attention operand. */
export type Axis = "b" | "n" | "s" | "d";
const AXES: readonly Axis[] = ["b", "n", "s", "d"];

/** Sizes or element strides by logical axis. */
export type AxisRecord = Record<Axis, number>;

/** A parsed pattern: the memory-order list of groups, each one or more axes. */
export type ParsedPattern = Axis[][];

const patternCache = new Map<string, ParsedPattern>();
const PATTERN_CACHE_LIMIT = 256;

/** Parses an einops-style pattern over `b n s d`, e.g. `"b s (n d)"`. */
export function parsePattern(pattern: string, argument: string): ParsedPattern {
  const cached = patternCache.get(pattern);
  if (cached) return cached;
  const fail = (why: string): never => {
    throw new WgattnError("INVALID_PATTERN", `cannot parse ${argument}: ${why}`, {
      argument,
      expected: 'each of b, n, s, d once, space separated, at most one group such as "b s (n d)"',
      actual: JSON.stringify(pattern),
    });
  };
  if (typeof pattern !== "string") fail("not a string");
  const groups: Axis[][] = [];
  const tokens = pattern.trim().match(/\([^()]*\)|[^\s()]+|[()]/g) ?? [];
  for (const token of tokens) {
    if (token.startsWith("(")) {
      if (!token.endsWith(")")) fail("unbalanced parenthesis");
      const inner = token.slice(1, -1).trim().split(/\s+/).filter((t) => t.length > 0);
      if (inner.length === 0) fail("empty group");
      groups.push(inner.map((a) => asAxis(a, fail)));
    } else if (token === ")" || token === "(") {
      fail("unbalanced parenthesis");
    } else {
      groups.push([asAxis(token, fail)]);
    }
  }
  const seen = groups.flat();
  for (const axis of AXES) {
    const count = seen.filter((a) => a === axis).length;
    if (count !== 1) fail(count === 0 ? `axis ${axis} is missing` : `axis ${axis} appears ${count} times`);
  }
  if (groups.filter((g) => g.length > 1).length > 1) fail("more than one grouped axis");
  patternCache.set(pattern, groups);
  // Patterns come from callers: keep the cache bounded however many spellings a process sees.
  if (patternCache.size > PATTERN_CACHE_LIMIT) patternCache.delete(patternCache.keys().next().value!);
  return groups;
}

function asAxis(token: string, fail: (why: string) => never): Axis {
  if ((AXES as readonly string[]).includes(token)) return token as Axis;
  return fail(`unknown axis "${token}"`);
}

/** A size known before a tensor is read, and where it came from (for the error message). */
export interface KnownSize {
  value: number;
  /** `"dims"` for the caller's `dims` option, else the name of the tensor it came from. */
  from: string;
  /** The `dims` key it came from when that is not the axis name (`nKv` for k's heads). */
  dimsKey?: string;
}

/** A tensor's logical sizes and element strides, read from its pattern and shape. */
export interface Layout {
  sizes: AxisRecord;
  strides: AxisRecord;
}

/**
 * How a caller can give the size of an axis its tensor's pattern groups (for error messages):
 * per axis, the option that sets it (or why none does), and the `dims` the caller gave.
 */
export interface SizeHelp {
  /** Per axis: e.g. `options.dims.nKv (k and v's head count; options.dims.n sets q's only)`. */
  ways: Partial<Record<Axis, { option?: string; text: string }>>;
  /** What the caller gave, e.g. `options.dims = {"n":2}`. */
  given: string;
}

/**
 * Reads the logical sizes and strides of a dense tensor of `shape` laid out by `pattern`.
 * `known` sizes fill in a grouped axis and are checked against the rest. Sizes may be 0 (an empty
 * axis); the caller decides which axes may be.
 */
export function resolveLayout(
  pattern: string,
  shape: readonly number[],
  known: Partial<Record<Axis, KnownSize>>,
  argument: string,
  patternArgument: string,
  help?: SizeHelp,
): Layout {
  const groups = parsePattern(pattern, patternArgument);
  if (shape.length !== groups.length) {
    throw new WgattnError(
      "INVALID_SHAPE",
      `${argument} has ${shape.length} axes but its pattern has ${groups.length}`,
      { argument, expected: `${groups.length} axes for pattern "${pattern}"`, actual: `shape [${shape}]` },
    );
  }
  const sizes: Partial<AxisRecord> = {};
  const mismatch = (axis: Axis, k: KnownSize, actual: number | string): never => {
    throw new WgattnError(
      k.from === "dims" ? "INVALID_DIMS" : "SHAPE_MISMATCH",
      k.from === "dims"
        ? `options.dims.${k.dimsKey ?? axis} does not fit ${argument}`
        : `${argument} axis ${axis} does not match ${k.from}`,
      {
        argument: k.from === "dims" ? `options.dims.${k.dimsKey ?? axis}` : argument,
        expected: `${axis} = ${k.value} (from ${k.from})`,
        actual: `${axis} = ${actual} in ${argument} of shape [${shape}] with pattern "${pattern}"`,
      },
    );
  };
  /** Axes of a group whose sizes cannot be read from it: say which, and how to give them. */
  const undetermined = (group: Axis[], axes: Axis[], why: string): never => {
    const ways = axes.map((a) => ({ axis: a, way: help?.ways[a] }));
    const options = ways.map((w) => w.way?.option).filter((o): o is string => o !== undefined);
    throw new WgattnError(
      "INVALID_DIMS",
      `${argument}'s grouped axis (${group.join(" ")}) in ${patternArgument}: ${why}`,
      {
        argument: options.length === 1 ? options[0] : "options.dims",
        expected: ways.map((w) => `${w.axis}: ${w.way?.text ?? `options.dims.${w.axis}`}`).join("; or "),
        actual: `${help?.given ?? "no options.dims"}: the size of ${axes.join(" and ")} is not known`,
      },
    );
  };
  groups.forEach((group, i) => {
    const extent = shape[i];
    if (group.length === 1) {
      const axis = group[0];
      const k = known[axis];
      if (k && k.value !== extent) mismatch(axis, k, extent);
      sizes[axis] = extent;
      return;
    }
    const unknown = group.filter((a) => !known[a]);
    const knownProduct = group.filter((a) => known[a]).reduce((p, a) => p * known[a]!.value, 1);
    if (unknown.length > 1) {
      undetermined(
        group,
        unknown,
        `${unknown.length} of its axes (${unknown.join(", ")}) have no known size; all but one must be known`,
      );
    }
    if (unknown.length === 0) {
      if (knownProduct !== extent) {
        const k = known[group[0]]!;
        const others = knownProduct / k.value;
        mismatch(group[0], k, others > 0 ? extent / others : `? (a group of ${extent})`);
      }
    } else if (knownProduct === 0 && extent === 0) {
      // 0 = 0 * x for any x: an empty group does not say the size of its unknown axis.
      undetermined(
        group,
        unknown,
        `it is empty and another of its axes is 0, so it does not give ${unknown[0]}`,
      );
    } else if (knownProduct === 0 || extent % knownProduct !== 0) {
      const from = group.filter((a) => known[a]).map((a) => `${a} = ${known[a]!.value} (${known[a]!.from})`);
      throw new WgattnError(
        from.some((f) => f.endsWith("(dims)")) ? "INVALID_DIMS" : "SHAPE_MISMATCH",
        `${argument}'s grouped axis (${group.join(" ")}) of size ${extent} is not divisible by ${
          from.join(" * ")
        }`,
        { argument, expected: `a multiple of ${knownProduct}`, actual: `${extent}` },
      );
    }
    for (const a of group) sizes[a] = known[a]?.value ?? extent / knownProduct;
  });
  for (const axis of AXES) {
    const size = sizes[axis]!;
    if (!Number.isInteger(size) || size < 0) {
      throw new WgattnError("INVALID_SHAPE", `${argument} axis ${axis} must be an integer >= 0`, {
        argument,
        expected: "every size >= 0",
        actual: `${axis} = ${size} (shape [${shape}])`,
      });
    }
  }
  // Dense row-major strides over the expanded axis order.
  const strides: Partial<AxisRecord> = {};
  let stride = 1;
  for (const axis of groups.flat().reverse()) {
    strides[axis] = stride;
    stride *= sizes[axis]!;
  }
  return { sizes: sizes as AxisRecord, strides: strides as AxisRecord };
}

/** The dense shape of a tensor laid out by `pattern` with the given sizes. */
export function shapeFor(pattern: string, sizes: AxisRecord, patternArgument: string): number[] {
  return parsePattern(pattern, patternArgument).map((g) => g.reduce((p, a) => p * sizes[a], 1));
}
