/**
 * The command line: strict flags and one-line errors with their code and exit status (in
 * subprocesses, as a user runs it), PyTorch's lines and the chart, and info, check and bench end to
 * end on this machine's adapter (small calls).
 */
import assert from "node:assert/strict";
import { parseFlags } from "../cli/args.ts";
import { parseTorch, torchRowsFor } from "../cli/torch.ts";
import { chartSvg } from "../cli/svg.ts";
import { main } from "../cli.ts";
import { WgattnError } from "../mod.ts";
import { BACKENDS } from "../backends/registry.ts";
import { getDevice } from "../mod.ts";
import { SHAPES } from "../bench/common.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;

/** Runs the CLI in a subprocess: no --allow-ffi, so Dawn is reported unavailable, not loaded. */
async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-env", "--allow-read", "--allow-write", CLI, ...args],
    env: { NO_COLOR: "1" },
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

/** Runs `main` in this process and returns what it printed on stdout. */
async function inProcess(...args: string[]): Promise<{ code: number; stdout: string }> {
  const lines: string[] = [];
  const log = console.log;
  console.log = (...a: unknown[]) => lines.push(a.map(String).join(" "));
  try {
    return { code: await main(args), stdout: lines.join("\n") };
  } finally {
    console.log = log;
  }
}

const codeOf = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof WgattnError);
    return `${e.code} ${e.argument}`;
  }
  return "no error";
};

Deno.test("flags are strict: unknown, repeated, valueless and malformed flags name themselves", () => {
  const specs = {
    shape: { kind: "string", help: "" },
    reps: { kind: "int", help: "" },
    json: { kind: "bool", help: "" },
  } as const;
  assert.equal(codeOf(() => parseFlags(["--bogus"], specs)), "INVALID_OPTION --bogus");
  assert.equal(codeOf(() => parseFlags(["-x"], specs)), "INVALID_OPTION -x");
  assert.equal(codeOf(() => parseFlags(["--json", "--json"], specs)), "INVALID_OPTION --json");
  assert.equal(codeOf(() => parseFlags(["--json=1"], specs)), "INVALID_OPTION --json");
  assert.equal(codeOf(() => parseFlags(["--shape"], specs)), "INVALID_OPTION --shape");
  assert.equal(codeOf(() => parseFlags(["--shape", "--json"], specs)), "INVALID_OPTION --shape");
  assert.equal(codeOf(() => parseFlags(["--reps", "1.5"], specs)), "INVALID_OPTION --reps");
  assert.equal(codeOf(() => parseFlags(["--reps=-1"], specs)), "INVALID_OPTION --reps");
  const p = parseFlags(["--shape=1,2,3,4", "--reps", "3", "--json", "-h"], specs);
  assert.deepEqual([...p.flags], [["shape", "1,2,3,4"], ["reps", 3], ["json", true], ["help", true]]);
});

Deno.test("an error is one line on stderr, `error [CODE]: message`, with exit code 2", async () => {
  const cases: [string[], string][] = [
    [["frob"], "INVALID_OPTION"],
    [["--engine", "webgl", "info"], "INVALID_OPTION"],
    [["info", "--shape", "1,2,3"], "INVALID_OPTION"],
    [["info", "--causal"], "INVALID_OPTION"],
    [["info", "--shape", "1,2,8,64", "--dtype", "f64"], "INVALID_OPTION"],
    [["check", "--backends", "nope"], "UNKNOWN_BACKEND"],
    [["bench", "--shapes", "huge"], "INVALID_OPTION"],
    [["bench", "--torch", "/nonexistent.jsonl"], "INVALID_OPTION"],
  ];
  for (const [args, code] of cases) {
    const r = await cli(...args);
    assert.equal(r.code, 2, args.join(" "));
    const lines = r.stderr.trim().split("\n").filter((l) => l.startsWith("error"));
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0], new RegExp(`^error \\[${code}\\]: `), args.join(" "));
    assert.equal(r.stdout, "");
  }
});

Deno.test("--help for each command: usage and its flags, exit code 0", async () => {
  for (const args of [["--help"], ["info", "--help"], ["bench", "-h"], ["check", "--help"]]) {
    const r = await inProcess(...args);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /^usage: wgattn/);
    assert.match(r.stdout, /--help/);
  }
  assert.match((await inProcess("bench", "--help")).stdout, /--svg FILE/);
  assert.match((await inProcess("--version")).stdout, /^wgattn \d+\.\d+\.\d+/);
});

Deno.test("PyTorch's JSON lines: parsed, matched to the bench shapes, bad lines named by number", () => {
  const text = [
    '{"peer": "torch", "backend": "flash_attention", "dtype": "fp16", "b":1,"n":24,"s":4608,"d":128,"ms":0.8294,"tflops":314.6}',
    '{"peer": "torch", "backend": "math", "dtype": "fp32", "b":4,"n":32,"s":2048,"s_kv":2048,"n_kv":32,"d":128,"causal":true,"ms":2.1,"tflops":26.1}',
    '{"peer": "torch", "backend": "flash_attention", "dtype": "fp32", "b":1,"n":32,"s":1,"s_kv":32768,"n_kv":8,"d":128,"ms":null,"tflops":null,"unsupported":"RuntimeError"}',
    '{"peer": "other", "anything": 1}',
    "# a comment",
    "",
  ].join("\n");
  const lines = parseTorch(text, "t.jsonl");
  assert.equal(lines.length, 3);
  assert.equal(lines[0].dtype, "f16");
  assert.equal(lines[0].sKv, 4608);
  const rows = torchRowsFor(lines, SHAPES, ["f32", "f16"]);
  assert.deepEqual(rows.map((r) => `${r.shape} ${r.dtype} ${r.backend} ${r.tflops}`), [
    "flux f16 flash_attention 314.6",
    "causal f32 math 26.1",
    "decode f32 flash_attention null",
  ]);
  assert.equal(torchRowsFor(lines, SHAPES, ["f32"]).length, 2);
  const bad = (t: string) => {
    try {
      parseTorch(t, "t.jsonl");
    } catch (e) {
      return (e as WgattnError).message;
    }
    return "no error";
  };
  assert.match(bad('{"backend": "math"\n'), /t\.jsonl:1: not JSON/);
  assert.match(
    bad('\n{"peer": "torch", "backend": "math", "dtype": "fp32", "b": 0, "n": 1, "s": 1, "d": 1}'),
    /:2: "b"/,
  );
  assert.match(bad("[1, 2]"), /not a JSON object/);
});

Deno.test("the chart: one bar per value, the legend, escaped text, a log axis past a 20x spread", () => {
  const groups = [
    {
      label: "flux f16",
      sublabel: "b1 n24 s4608 d128",
      bars: [{ series: "sage", value: 41.7, marked: true }, { series: "torch <flash>", value: 314.6 }],
    },
    {
      label: "seed f32",
      sublabel: "b32 n8 s128 d64",
      bars: [{ series: "sage", value: 3.1 }, { series: "flash", value: 8.2, marked: true }],
    },
  ];
  const svg = chartSvg({ title: "t & u", subtitle: "s", groups });
  assert.match(svg, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
  assert.match(svg, /<\/svg>\n$/);
  assert.equal((svg.match(/<rect [^>]*><title>/g) ?? []).length, 4);
  assert.ok(svg.includes("torch &lt;flash&gt;") && svg.includes("t &amp; u") && !svg.includes("<flash>"));
  assert.match(svg, /TFLOP\/s \(log scale\)/);
  assert.equal((svg.match(/<path d="M/g) ?? []).length, 2); // the router's choices flagged
  const linear = chartSvg({ title: "t", subtitle: "s", groups: [groups[1]] });
  assert.doesNotMatch(linear, /log scale/);
  // Every element closed: as many opening tags as closing ones (or self-closed).
  const opened =
    (linear.match(/<(text|svg|rect|title)\b[^>]*>/g) ?? []).filter((t) => !t.endsWith("/>")).length;
  const closed = (linear.match(/<\/(text|svg|rect|title)>/g) ?? []).length;
  assert.equal(opened, closed);
});

const device = await getDevice();

Deno.test("info --json: both engines, the device, every backend, the router's chain for --shape", async () => {
  const r = await cli("info", "--json", "--shape", "1,2,16,64", "--causal");
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  assert.deepEqual(report.engines.map((e: { name: string }) => e.name), ["deno", "dawn"]);
  const dawn = report.engines[1];
  assert.match(dawn.unavailable ?? "", /allow-ffi/); // the subprocess has no --allow-ffi
  assert.deepEqual(report.backends.map((b: { name: string }) => b.name), BACKENDS.map((b) => b.name));
  const chain = report.call.explanation.chain as { backend: string; chosen: boolean }[];
  assert.equal(chain.filter((c) => c.chosen).length, 1);
  assert.equal(chain.at(-1)!.backend, report.call.explanation.backend);
  const names = [
    ...chain.map((c) => c.backend),
    ...report.call.beyond.map((b: { backend: string }) => b.backend),
  ];
  assert.deepEqual(names, BACKENDS.map((b) => b.name)); // every backend accounted for
  if (device) assert.ok(report.device.features.length > 0 && report.device.limits.maxBufferSize > 0);
  const text = await cli("info", "--shape", "1,2,16,64");
  assert.match(text.stdout, /^engines\n/);
  assert.match(text.stdout, /backends, in the router's priority order/);
  assert.match(text.stdout, /call: q \[1, 2, 16, 64\] f32\n {2}backend: /);
});

Deno.test("check: a pass/fail table over cases x backends, the summary, exit code 0", async () => {
  const r = await inProcess(
    "check",
    "--filter",
    "(shorter than a tile)",
    "--backends",
    "naive,cpu,reference",
  );
  assert.equal(r.code, 0, r.stdout);
  assert.match(r.stdout, /^case +naive +cpu\n/);
  assert.match(r.stdout, /f32 host b1 n2 s5 d64 \(shorter than a tile\) +(ok|-) +ok/);
  assert.match(r.stdout, /check: \d passed, 0 failed, \d skipped \(1 cases x 2 backends\)/);
  const json = JSON.parse(
    (await inProcess("check", "--filter", "s5 d64", "--backends", "cpu", "--json")).stdout,
  );
  assert.deepEqual(json.results.map((x: { status: string }) => x.status), ["pass"]);
});

Deno.test({
  name: "bench: a measured row per backend, the router's choice marked, --json and --svg",
  ignore: !device,
  fn: async () => {
    const svg = await Deno.makeTempFile({ suffix: ".svg" });
    try {
      const r = await inProcess(
        "bench",
        "--shape",
        "1,2,64,32",
        "--dtypes",
        "f32",
        "--backends",
        "router,naive",
        "--budget-ms",
        "5",
        "--json",
        "--svg",
        svg,
      );
      assert.equal(r.code, 0);
      const report = JSON.parse(r.stdout);
      assert.equal(report.rows.length, 2);
      assert.ok(report.rows.every((x: { ms: number }) => x.ms > 0), r.stdout);
      assert.equal(report.rows.filter((x: { router: boolean }) => x.router).length, 1);
      assert.match(await Deno.readTextFile(svg), /<svg[\s\S]*naive[\s\S]*<\/svg>/);
    } finally {
      await Deno.remove(svg);
    }
  },
});
