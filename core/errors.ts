/** Stable codes for every rejection wgattn makes. */
export type WgattnErrorCode =
  | "INVALID_SHAPE"
  | "SHAPE_MISMATCH"
  | "INVALID_PATTERN"
  | "INVALID_DIMS"
  | "UNSUPPORTED_DTYPE"
  | "DTYPE_MISMATCH"
  | "HEAD_COUNT"
  | "INVALID_MASK"
  | "INVALID_OPTION"
  | "UNKNOWN_BACKEND"
  | "BACKEND_UNSUPPORTED"
  | "NO_BACKEND"
  | "INVALID_BUFFER"
  | "OUT_OF_MEMORY"
  | "DEVICE_LOST"
  | "ENGINE_UNAVAILABLE"
  | "ENGINE_IN_USE"
  | "GPU_ERROR";

/** Details carried by a {@link WgattnError}. */
export interface WgattnErrorDetails {
  /** The argument or option at fault, e.g. `"q"` or `"options.windowSize"`. */
  argument?: string;
  /** What was expected, in words or as a value. */
  expected?: string;
  /** What was given. */
  actual?: string;
}

/**
 * The one error class wgattn throws. `code` is stable; the message names the argument,
 * the expected and the actual value.
 *
 * @example
 * ```ts
 * import { attentionForward, WgattnError } from "jsr:@wgattn/attention";
 * try {
 *   await attentionForward({ data: new Float32Array(6), shape: [1, 1, 2, 3] }, { data: new Float32Array(8), shape: [1, 1, 2, 4] }, { data: new Float32Array(8), shape: [1, 1, 2, 4] });
 * } catch (e) {
 *   if (e instanceof WgattnError) console.log(e.code, e.argument); // SHAPE_MISMATCH k
 * }
 * ```
 */
export class WgattnError extends Error {
  /** A stable machine-readable code. */
  readonly code: WgattnErrorCode;
  /** The argument at fault, when there is one. */
  readonly argument?: string;
  /** What was expected. */
  readonly expected?: string;
  /** What was given. */
  readonly actual?: string;

  /** An error with a stable `code`; `details` name the argument, what was expected and what was given. */
  constructor(code: WgattnErrorCode, message: string, details: WgattnErrorDetails = {}) {
    const parts = [message];
    if (details.argument) parts.push(`argument: ${details.argument}`);
    if (details.expected !== undefined) parts.push(`expected: ${details.expected}`);
    if (details.actual !== undefined) parts.push(`actual: ${details.actual}`);
    super(`[${code}] ${parts.join("; ")}`);
    this.name = "WgattnError";
    this.code = code;
    this.argument = details.argument;
    this.expected = details.expected;
    this.actual = details.actual;
  }
}

/** Throws a {@link WgattnError} unless `condition` holds. */
export function check(
  condition: unknown,
  code: WgattnErrorCode,
  message: string,
  details: WgattnErrorDetails = {},
): asserts condition {
  if (!condition) throw new WgattnError(code, message, details);
}
