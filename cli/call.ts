/** A call described on the command line (`--shape b,n,s,d` and friends), as tensors and options. */
import type { AttentionOptions, DType, HostTensor } from "../core/types.ts";
import { type FlagSpec, intList, oneOf, type Parsed } from "./args.ts";
import { WgattnError } from "../core/errors.ts";

/** The flags that describe a call. */
export const CALL_FLAGS: Record<string, FlagSpec> = {
  shape: { kind: "string", value: "b,n,s,d", help: "the call's q shape (batch, heads, sequence, head dim)" },
  "s-kv": { kind: "int", value: "N", help: "keys and values per sequence", default: "s" },
  "n-kv": { kind: "int", value: "N", help: "k/v heads (grouped-query attention)", default: "n" },
  dv: { kind: "int", value: "N", help: "v's head dim", default: "d" },
  dtype: { kind: "string", value: "f32|f16|bf16", help: "element type", default: "f32" },
  causal: { kind: "bool", help: "causal (aligned bottom-right)" },
  window: { kind: "string", value: "W|L,R", help: "sliding window (-1: unbounded side)" },
  scale: { kind: "number", value: "X", help: "score scale", default: "1/sqrt(d)" },
};

/** The sizes and options of a call. */
export interface CallSpec {
  b: number;
  n: number;
  s: number;
  d: number;
  sKv: number;
  nKv: number;
  dV: number;
  dtype: DType;
  options: AttentionOptions;
}

/** The call the flags describe, or null without `--shape` (the other call flags then are errors). */
export function callFromFlags({ flags }: Parsed): CallSpec | null {
  const shape = flags.get("shape") as string | undefined;
  if (shape === undefined) {
    const stray = Object.keys(CALL_FLAGS).find((k) => k !== "shape" && flags.has(k));
    if (stray) {
      throw new WgattnError("INVALID_OPTION", `--${stray} describes a call: give its shape too`, {
        argument: `--${stray}`,
        expected: "--shape b,n,s,d",
        actual: "no --shape",
      });
    }
    return null;
  }
  const [b, n, s, d] = intList("--shape", shape, [4], 1);
  const dtype = oneOf("--dtype", (flags.get("dtype") as string | undefined) ?? "f32", ["f32", "f16", "bf16"]);
  const options: AttentionOptions = {};
  if (flags.get("causal")) options.isCausal = true;
  const window = flags.get("window") as string | undefined;
  if (window !== undefined) {
    const parts = window.split(",").map(Number);
    if (![1, 2].includes(parts.length) || parts.some((x) => !Number.isSafeInteger(x) || x < -1)) {
      throw new WgattnError("INVALID_OPTION", "--window takes W or L,R (whole numbers, -1 for unbounded)", {
        argument: "--window",
        expected: "W or L,R",
        actual: JSON.stringify(window),
      });
    }
    options.windowSize = parts.length === 1 ? parts[0] : [parts[0], parts[1]];
  }
  if (flags.has("scale")) options.scale = flags.get("scale") as number;
  return {
    b,
    n,
    s,
    d,
    sKv: (flags.get("s-kv") as number | undefined) ?? s,
    nKv: (flags.get("n-kv") as number | undefined) ?? n,
    dV: (flags.get("dv") as number | undefined) ?? d,
    dtype,
    options,
  };
}

function zeros(count: number, dtype: DType, shape: number[]): HostTensor {
  // Zero-filled arrays are mapped lazily by the OS: explaining a large call touches no memory.
  const data = dtype === "f32"
    ? new Float32Array(count)
    : dtype === "f16"
    ? new Float16Array(count)
    : new Uint16Array(count);
  return { data, shape, dtype };
}

/** Host tensors of the call's shapes (zeros): what explain() needs to route it. */
export function callTensors(c: CallSpec): { q: HostTensor; k: HostTensor; v: HostTensor } {
  return {
    q: zeros(c.b * c.n * c.s * c.d, c.dtype, [c.b, c.n, c.s, c.d]),
    k: zeros(c.b * c.nKv * c.sKv * c.d, c.dtype, [c.b, c.nKv, c.sKv, c.d]),
    v: zeros(c.b * c.nKv * c.sKv * c.dV, c.dtype, [c.b, c.nKv, c.sKv, c.dV]),
  };
}

/** The call in one line, e.g. `[1, 24, 4608, 128] f16 causal`. */
export function describeCall(c: CallSpec): string {
  const kv = c.sKv !== c.s || c.nKv !== c.n || c.dV !== c.d
    ? ` k/v [${c.b}, ${c.nKv}, ${c.sKv}, ${c.d}${c.dV !== c.d ? `/${c.dV}` : ""}]`
    : "";
  const o = c.options;
  return `q [${c.b}, ${c.n}, ${c.s}, ${c.d}]${kv} ${c.dtype}${o.isCausal ? " causal" : ""}${
    o.windowSize !== undefined ? ` window ${JSON.stringify(o.windowSize)}` : ""
  }${o.scale !== undefined ? ` scale ${o.scale}` : ""}`;
}
