/**
 * `wgattn bench`: shapes × dtypes × backends, each timed on the GPU (timestamp queries where the
 * device has them, else the wall clock over a chain of calls), with a progress bar on stderr, then a
 * table, `--json`, or `--svg FILE` (TFLOP/s by shape and backend, PyTorch's figures beside them
 * with `--torch FILE.jsonl`).
 */
import {
  attentionForward,
  availableBackends,
  deviceInfo,
  explain,
  getDevice,
  type GpuTensor,
} from "../mod.ts";
import { WgattnError } from "../core/errors.ts";
import { engineFor } from "../engines/select.ts";
import { type BenchShape, kvBytes, shapeFlops, shapeInputs, SHAPES, timeOnGpu } from "../bench/common.ts";
import { helpText, intList, nameList, parseFlags } from "./args.ts";
import { Progress } from "./progress.ts";
import { textTable } from "./table.ts";
import { type BenchChart, chartSvg } from "./svg.ts";
import { readTorch, type TorchRow, torchRowsFor } from "./torch.ts";

/** The small suite of `--quick`: about a minute on a software adapter. */
export const QUICK_SHAPES: readonly BenchShape[] = [
  { name: "small", b: 1, n: 4, s: 256, d: 64 },
  { name: "small-causal", b: 1, n: 4, s: 256, d: 64, causal: true },
  { name: "small-decode", b: 1, n: 8, s: 1, d: 64, sKv: 2048, nKv: 2 },
];

const DTYPES = ["f32", "f16"] as const;
type BenchDType = typeof DTYPES[number];

const FLAGS = {
  quick: {
    kind: "bool",
    help: `a small suite (${
      QUICK_SHAPES.map((s) => s.name).join(", ")
    }), the router's choice, flash and naive`,
  },
  shapes: {
    kind: "string",
    value: "NAMES",
    help: `suite shapes: ${[...SHAPES, ...QUICK_SHAPES].map((s) => s.name).join(", ")}`,
    default: "the suite, or the quick one",
  },
  shape: {
    kind: "string",
    value: "b,n,s,d",
    help: "one more shape of your own (with --s-kv, --n-kv, --causal)",
  },
  "s-kv": { kind: "int", value: "N", help: "keys per sequence of --shape", default: "s" },
  "n-kv": { kind: "int", value: "N", help: "k/v heads of --shape", default: "n" },
  causal: { kind: "bool", help: "--shape is causal" },
  dtypes: { kind: "string", value: "f32,f16", help: "element types", default: "f32,f16" },
  backends: {
    kind: "string",
    value: "NAMES",
    help: "backends by name (router: whatever the router picks)",
    default: "every GPU backend available here",
  },
  "budget-ms": { kind: "int", value: "MS", help: "GPU time to spend per trial", default: "400" },
  json: { kind: "bool", help: "print the results as JSON instead of the table" },
  svg: { kind: "string", value: "FILE", help: "write a chart of TFLOP/s by shape and backend" },
  torch: {
    kind: "string",
    value: "FILE.jsonl",
    help: "PyTorch's figures (the lines of bench/torch_sdpa.py) for the table and chart",
  },
  help: { kind: "bool", help: "this help" },
} as const;

/** The help of `wgattn bench`. */
export const BENCH_HELP: string = helpText(
  "wgattn bench [--quick] [--shapes flux,sd3] [--dtypes f32,f16] [--backends flash,naive] [--json] [--svg FILE] [--torch FILE.jsonl]",
  "Times each shape x dtype x backend on the GPU (median of the best of three trials; timestamp\n" +
    "queries where the device has them, else the wall clock) and prints a table; the router's choice\n" +
    "for each call is marked *. A backend that cannot serve a shape is listed with its reason.",
  FLAGS,
);

/** One measured (or refused) configuration. */
export interface BenchRow {
  shape: string;
  dims: string;
  dtype: BenchDType;
  backend: string;
  /** The backend the router picks for this call. */
  router: boolean;
  ms: number | null;
  tflops: number | null;
  /** K and V bytes read per ms, the floor of a decode step. */
  kvGBs: number | null;
  /** Compile and first run, host to host. */
  firstCallMs: number | null;
  /** Why there is no time: unsupported, skipped, or the error. */
  note?: string;
}

function dimsOf(s: BenchShape): string {
  return `b${s.b} n${s.n}${s.nKv ? `/kv${s.nKv}` : ""} s${s.s}${s.sKv ? `x${s.sKv}` : ""} d${s.d}${
    s.causal ? " causal" : ""
  }`;
}

/** Median ms of one call by the wall clock: `reps` chained calls, one wait. */
async function timeByClock(
  device: GPUDevice,
  inputs: { q: GpuTensor; k: GpuTensor; v: GpuTensor },
  options: { backend: string; isCausal?: boolean },
  reps: number,
): Promise<number> {
  const hold = engineFor(device).hold;
  const t0 = performance.now();
  const outs: GpuTensor[] = [];
  for (let i = 0; i < reps; i++) outs.push(await attentionForward(inputs.q, inputs.k, inputs.v, options));
  await hold(device.queue.onSubmittedWorkDone());
  const ms = (performance.now() - t0) / reps;
  for (const o of outs) o.buffer.destroy();
  return ms;
}

async function measure(
  device: GPUDevice,
  timestamps: boolean,
  s: BenchShape,
  dtype: BenchDType,
  backend: string,
  chosen: string,
  budgetMs: number,
): Promise<BenchRow> {
  const name = backend === "router" ? chosen : backend;
  const base = { shape: s.name, dims: dimsOf(s), dtype, backend: name, router: name === chosen };
  const none = { ms: null, tflops: null, kvGBs: null, firstCallMs: null };
  if (name === "naive" && shapeFlops(s) > 3e12) {
    return { ...base, ...none, note: "skipped: naive takes seconds per call past 3 TFLOP" };
  }
  const inputs = shapeInputs(device, s, dtype);
  const options = { backend: name, isCausal: s.causal };
  try {
    const t0 = performance.now();
    const first = await attentionForward(inputs.q, inputs.k, inputs.v, options);
    await engineFor(device).hold(device.queue.onSubmittedWorkDone());
    first.buffer.destroy();
    const firstCallMs = performance.now() - t0;
    const time = (reps: number) =>
      timestamps
        ? timeOnGpu(inputs, options, reps).then((t) => t.ms)
        : timeByClock(device, inputs, options, reps);
    const probe = await time(1);
    const reps = Math.max(2, Math.min(20, Math.ceil(budgetMs / Math.max(probe, 0.05))));
    let ms = Infinity;
    for (let t = 0; t < 3; t++) ms = Math.min(ms, await time(reps));
    return {
      ...base,
      ms,
      tflops: shapeFlops(s) / ms / 1e9,
      kvGBs: kvBytes(s, dtype) / ms / 1e6,
      firstCallMs,
    };
  } catch (e) {
    const unsupported = e instanceof WgattnError && e.code === "BACKEND_UNSUPPORTED";
    const message = (e as Error)?.message ?? String(e);
    return {
      ...base,
      ...none,
      note: unsupported ? `unsupported: ${message.replace(/^\[[A-Z_]+\] /, "")}` : `error: ${message}`,
    };
  } finally {
    for (const t of Object.values(inputs) as GpuTensor[]) t.buffer.destroy();
  }
}

/** What `bench --json` prints. */
export interface BenchReport {
  adapter: string;
  engine: string;
  date: string;
  timing: "timestamp queries" | "wall clock";
  rows: BenchRow[];
  torch: TorchRow[];
}

/** Runs `wgattn bench`; returns the exit code. */
export async function bench(argv: readonly string[]): Promise<number> {
  const { flags, positional } = parseFlags(argv, FLAGS);
  if (flags.get("help")) {
    console.log(BENCH_HELP);
    return 0;
  }
  if (positional.length) {
    throw new WgattnError("INVALID_OPTION", "bench takes no positional arguments", {
      argument: positional[0],
      expected: "flags only (see wgattn bench --help)",
      actual: positional.join(" "),
    });
  }
  const quick = !!flags.get("quick");
  const known = [...SHAPES, ...QUICK_SHAPES];
  const shapes: BenchShape[] = flags.has("shapes")
    ? nameList("--shapes", flags.get("shapes") as string, known.map((s) => s.name)).map((n) =>
      known.find((s) => s.name === n)!
    )
    : flags.has("shape")
    ? []
    : [...(quick ? QUICK_SHAPES : SHAPES)];
  if (flags.has("shape")) {
    const [b, n, s, d] = intList("--shape", flags.get("shape") as string, [4], 1);
    const sKv = flags.get("s-kv") as number | undefined, nKv = flags.get("n-kv") as number | undefined;
    const custom = { name: "custom", b, n, s, d, sKv, nKv, causal: !!flags.get("causal") || undefined };
    shapes.push({ ...custom, name: `${b},${n},${s},${d}` });
  } else {
    for (const f of ["s-kv", "n-kv", "causal"]) {
      if (flags.has(f)) {
        throw new WgattnError("INVALID_OPTION", `--${f} describes --shape: give it too`, {
          argument: `--${f}`,
          expected: "--shape b,n,s,d",
          actual: "no --shape",
        });
      }
    }
  }
  const dtypes = flags.has("dtypes")
    ? nameList("--dtypes", flags.get("dtypes") as string, DTYPES)
    : [...DTYPES];
  const torch = flags.has("torch") ? await readTorch(flags.get("torch") as string) : [];
  const svgPath = flags.get("svg") as string | undefined;
  const budgetMs = (flags.get("budget-ms") as number | undefined) ?? 400;

  const device = await getDevice();
  const info = await deviceInfo();
  if (!device || !info) {
    throw new WgattnError("NO_BACKEND", "bench times GPU kernels, and this machine has no WebGPU adapter", {
      argument: "bench",
      expected: "a WebGPU adapter (a GPU driver, or a software one such as lavapipe)",
      actual: "none",
    });
  }
  if (info.isFallbackAdapter && !quick && !flags.has("shapes") && !flags.has("shape")) {
    console.error(
      `note: ${info.adapter} is a software adapter: the full suite takes hours here; --quick runs a small one`,
    );
  }
  const gpuBackends = (await availableBackends()).filter((b) => b.name !== "cpu");
  const names = ["router", ...gpuBackends.map((b) => b.name), ...gpuBackends.flatMap((b) => b.aliases)];
  const backends = flags.has("backends")
    ? nameList("--backends", flags.get("backends") as string, names)
    : quick
    ? ["router", "flash", "naive"]
    : gpuBackends.filter((b) => b.available).map((b) => b.name);

  const jobs = shapes.flatMap((s) =>
    dtypes.flatMap((dtype) => backends.map((backend) => ({ s, dtype, backend })))
  );
  const progress = new Progress(jobs.length);
  const rows: BenchRow[] = [];
  const chosen = new Map<string, string>();
  try {
    for (const { s, dtype, backend } of jobs) {
      const key = `${s.name}:${dtype}`;
      if (!chosen.has(key)) {
        const inputs = shapeInputs(device, s, dtype);
        try {
          chosen.set(key, (await explain(inputs.q, inputs.k, inputs.v, { isCausal: s.causal })).backend);
        } finally {
          for (const t of Object.values(inputs) as GpuTensor[]) t.buffer.destroy();
        }
      }
      progress.step(`${s.name} ${dtype} ${backend === "router" ? `router (${chosen.get(key)})` : backend}`);
      const row = await measure(device, info.timestamps, s, dtype, backend, chosen.get(key)!, budgetMs);
      // The router's choice named twice (router and by name) is measured once.
      if (!rows.some((r) => r.shape === row.shape && r.dtype === row.dtype && r.backend === row.backend)) {
        rows.push(row);
      }
      progress.advance();
    }
  } finally {
    progress.end();
  }
  const report: BenchReport = {
    adapter: info.adapter,
    engine: `${info.engine} (${info.engineVersion})`,
    date: new Date().toISOString(),
    timing: info.timestamps ? "timestamp queries" : "wall clock",
    rows,
    torch: torchRowsFor(torch, shapes, dtypes),
  };
  if (svgPath) await writeChart(svgPath, report, shapes);
  if (flags.get("json")) console.log(JSON.stringify(report, null, 1));
  else console.log(formatBench(report, shapes));
  return 0;
}

async function writeChart(path: string, r: BenchReport, shapes: readonly BenchShape[]): Promise<void> {
  const chart: BenchChart = {
    title: `wgattn: attention TFLOP/s on ${r.adapter}`,
    subtitle: `${r.engine}, ${r.timing}, ${r.date.slice(0, 10)}${
      r.torch.length ? "; PyTorch SDPA beside" : ""
    }`,
    groups: [],
  };
  for (const s of shapes) {
    for (const dtype of DTYPES) {
      const bars = [
        ...r.rows.filter((x) => x.shape === s.name && x.dtype === dtype && x.tflops !== null).map((x) => ({
          series: x.backend,
          value: x.tflops!,
          marked: x.router,
        })),
        ...r.torch.filter((t) => t.shape === s.name && t.dtype === dtype && t.tflops !== null).map((t) => ({
          series: `torch ${t.backend}`,
          value: t.tflops!,
        })),
      ];
      if (bars.length) chart.groups.push({ label: `${s.name} ${dtype}`, sublabel: dimsOf(s), bars });
    }
  }
  try {
    await Deno.writeTextFile(path, chartSvg(chart));
  } catch (e) {
    throw new WgattnError("INVALID_OPTION", "the chart cannot be written", {
      argument: "--svg",
      expected: "a writable file path (and --allow-write)",
      actual: `${path}: ${(e as Error).message}`,
    });
  }
}

const fixed = (x: number | null, digits: number) => x === null ? "-" : x.toFixed(digits);
/** Three significant digits, without exponents for small values (a software adapter's TFLOP/s). */
const sig = (x: number | null) =>
  x === null
    ? "-"
    : x >= 100
    ? x.toFixed(0)
    : x >= 10
    ? x.toFixed(1)
    : x >= 1
    ? x.toFixed(2)
    : x.toPrecision(3);

/** The results as a text table (PyTorch's rows under each shape's). */
export function formatBench(r: BenchReport, shapes: readonly BenchShape[]): string {
  const body: string[][] = [];
  for (const s of shapes) {
    for (const dtype of DTYPES) {
      for (const x of r.rows.filter((x) => x.shape === s.name && x.dtype === dtype)) {
        body.push([
          x.shape,
          x.dims,
          x.dtype,
          x.backend + (x.router ? " *" : ""),
          fixed(x.ms, 3),
          sig(x.tflops),
          sig(x.kvGBs),
          x.firstCallMs === null ? "-" : `${Math.round(x.firstCallMs)}`,
          x.note ?? "",
        ]);
      }
      for (const t of r.torch.filter((t) => t.shape === s.name && t.dtype === dtype)) {
        body.push([
          t.shape,
          dimsOf(s),
          dtype,
          `torch ${t.backend}`,
          fixed(t.ms, 3),
          sig(t.tflops),
          "",
          "",
          t.ms === null ? "unsupported by PyTorch here" : "",
        ]);
      }
    }
  }
  return [
    `adapter: ${r.adapter}; engine: ${r.engine}; timing: ${r.timing}; ${r.date}`,
    textTable(
      ["shape", "dims", "dtype", "backend", "ms", "TFLOP/s", "K+V GB/s", "first call ms", "note"],
      body,
    ),
    "* the router's choice for the call",
  ].join("\n");
}
