/**
 * PyTorch's figures for the bench table and chart: the JSON lines `bench/torch_sdpa.py` prints
 * (`{"peer": "torch", "backend": "flash_attention", "dtype": "fp16", "b": 1, "n": 24, "s": 4608,
 * "d": 128, "ms": 0.83, "tflops": 314.6}`, with `s_kv`, `n_kv`, `causal` when they differ).
 */
import { WgattnError } from "../core/errors.ts";
import type { BenchShape } from "../bench/common.ts";

/** One PyTorch measurement. */
export interface TorchLine {
  backend: string;
  dtype: string;
  b: number;
  n: number;
  s: number;
  d: number;
  sKv: number;
  nKv: number;
  causal: boolean;
  ms: number | null;
  tflops: number | null;
}

/** A PyTorch measurement matched to a bench shape. */
export interface TorchRow {
  shape: string;
  dtype: "f32" | "f16";
  backend: string;
  ms: number | null;
  tflops: number | null;
}

function bad(path: string, line: number, why: string, text: string): WgattnError {
  return new WgattnError("INVALID_OPTION", `--torch ${path}:${line}: ${why}`, {
    argument: "--torch",
    expected:
      'JSON lines of bench/torch_sdpa.py ({"peer": "torch", "backend", "dtype", "b", "n", "s", "d", "ms", ...})',
    actual: text.slice(0, 120),
  });
}

/** Parses the lines; blank lines and lines that are not JSON objects of a torch peer are errors, `#` lines comments. */
export function parseTorch(text: string, path: string): TorchLine[] {
  const out: TorchLine[] = [];
  text.split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    let r: Record<string, unknown>;
    try {
      r = JSON.parse(line);
    } catch {
      throw bad(path, i + 1, "not JSON", line);
    }
    if (r === null || typeof r !== "object" || Array.isArray(r)) {
      throw bad(path, i + 1, "not a JSON object", line);
    }
    if (r.peer !== undefined && r.peer !== "torch") return; // other peers' lines may share the file
    const int = (k: string) => typeof r[k] === "number" && Number.isSafeInteger(r[k]) && (r[k] as number) > 0;
    for (const k of ["b", "n", "s", "d"]) {
      if (!int(k)) throw bad(path, i + 1, `"${k}" must be a whole number > 0`, line);
    }
    for (const k of ["s_kv", "n_kv"]) {
      if (r[k] !== undefined && !int(k)) throw bad(path, i + 1, `"${k}" must be a whole number > 0`, line);
    }
    if (typeof r.backend !== "string" || typeof r.dtype !== "string") {
      throw bad(path, i + 1, '"backend" and "dtype" must be strings', line);
    }
    const num = (k: string) => {
      if (r[k] === null || r[k] === undefined) return null;
      if (typeof r[k] !== "number" || !Number.isFinite(r[k])) {
        throw bad(path, i + 1, `"${k}" must be a number or null`, line);
      }
      return r[k] as number;
    };
    out.push({
      backend: r.backend,
      dtype: ({ fp32: "f32", fp16: "f16", bf16: "bf16" } as Record<string, string>)[r.dtype] ?? r.dtype,
      b: r.b as number,
      n: r.n as number,
      s: r.s as number,
      d: r.d as number,
      sKv: (r.s_kv as number | undefined) ?? (r.s as number),
      nKv: (r.n_kv as number | undefined) ?? (r.n as number),
      causal: r.causal === true,
      ms: num("ms"),
      tflops: num("tflops"),
    });
  });
  return out;
}

/** Reads and parses the file. */
export async function readTorch(path: string): Promise<TorchLine[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new WgattnError("INVALID_OPTION", "the PyTorch figures cannot be read", {
      argument: "--torch",
      expected: "a readable JSON-lines file (and --allow-read)",
      actual: `${path}: ${(e as Error).message}`,
    });
  }
  return parseTorch(text, path);
}

/** The lines that measured one of `shapes` in one of `dtypes`, named by the shape. */
export function torchRowsFor(
  lines: readonly TorchLine[],
  shapes: readonly BenchShape[],
  dtypes: readonly ("f32" | "f16")[],
): TorchRow[] {
  const rows: TorchRow[] = [];
  for (const t of lines) {
    const s = shapes.find((s) =>
      s.b === t.b && s.n === t.n && s.s === t.s && s.d === t.d && (s.sKv ?? s.s) === t.sKv &&
      (s.nKv ?? s.n) === t.nKv && !!s.causal === t.causal
    );
    const dtype = dtypes.find((d) => d === t.dtype);
    if (s && dtype) rows.push({ shape: s.name, dtype, backend: t.backend, ms: t.ms, tflops: t.tflops });
  }
  return rows;
}
