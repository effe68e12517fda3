/**
 * Router decisions: `decide` with faked capabilities over a fake registry and the real one, and the
 * WGATTN_IMPLEMENTATION variable in subprocesses (good, bad and unpermitted values).
 */
import assert from "node:assert/strict";
import type { Backend } from "../backends/backend.ts";
import { BACKENDS } from "../backends/registry.ts";
import { type Capabilities, defaultRuntime } from "../core/device.ts";
import { WgattnError } from "../core/errors.ts";
import { type AttentionProblem, resolveProblem } from "../core/problem.ts";
import { backendNames, decide, lookupBackend } from "../core/router.ts";
import type { AttentionOptions, DType } from "../core/types.ts";

// ---- fakes ------------------------------------------------------------------------------------

/** Capabilities of an imaginary adapter; override what a test needs. */
function fakeCaps(
  over: Partial<Capabilities> = {},
  limits: Partial<Capabilities["limits"]> = {},
): Capabilities {
  return {
    adapter: "Fake GPU 9000",
    isFallbackAdapter: false,
    features: new Set(["shader-f16", "timestamp-query", "subgroups"]),
    shaderF16: true,
    subgroups: true,
    subgroupDirective: "",
    subgroupMinSize: 32,
    packedInt8Dot: true,
    timestamps: true,
    engine: "deno",
    subgroupMatrixConfigs: [],
    limits: {
      maxStorageBufferBindingSize: 2147483644,
      maxBufferSize: 4292870144,
      maxComputeWorkgroupStorageSize: 49152,
      maxComputeInvocationsPerWorkgroup: 1024,
      maxComputeWorkgroupSizeX: 1024,
      maxComputeWorkgroupsPerDimension: 65535,
      maxStorageBuffersPerShaderStage: 10,
      ...limits,
    },
    ...over,
  };
}

/** A backend that never runs; it only answers the router's questions. */
function fakeBackend(
  name: string,
  rules: {
    aliases?: string[];
    reject?: (p: AttentionProblem, caps: Capabilities | null) => string[];
    unsuited?: (p: AttentionProblem) => string[];
  } = {},
): Backend {
  return {
    kind: "cpu",
    name,
    aliases: rules.aliases ?? [],
    summary: `fake ${name}`,
    producesLse: false,
    unsupportedReasons: (p, caps) => rules.reject?.(p, caps) ?? [],
    ...(rules.unsuited ? { unsuitedReasons: (p: AttentionProblem) => rules.unsuited!(p) } : {}),
    compute: () => {
      throw new Error("fake backends do not compute");
    },
  };
}

/** A problem of q, k, v `[b, n, s, d]` with host data. */
function problem(
  shape: { b?: number; n?: number; s?: number; d?: number; dtype?: DType } = {},
  options: AttentionOptions = {},
): AttentionProblem {
  const { b = 1, n = 2, s = 8, d = 64, dtype = "f32" } = shape;
  const count = b * n * s * d;
  const data = dtype === "f32"
    ? new Float32Array(count).fill(0.5)
    : dtype === "f16"
    ? new Float16Array(count).fill(0.5)
    : new Uint16Array(count).fill(0x3f00);
  const t = { data, shape: [b, n, s, d], dtype };
  return resolveProblem(t, t, t, options);
}

const fast = fakeBackend("fast", {
  aliases: ["quick"],
  reject: (p, caps) => [
    ...(caps ? [] : ["no adapter"]),
    ...(p.d > 64 ? [`head dim ${p.d} is over 64`] : []),
  ],
});
const slow = fakeBackend("slow", { aliases: ["careful"] });
const FAKE = [fast, slow];

function throwsWgattn(fn: () => unknown, code: string, argument?: string): WgattnError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof WgattnError, `expected a WgattnError, got ${e}`);
    assert.equal(e.code, code, e.message);
    if (argument !== undefined) assert.equal(e.argument, argument, e.message);
    return e;
  }
  assert.fail(`expected a WgattnError ${code}, nothing was thrown`);
}

// ---- decide() over a fake registry ------------------------------------------------------------

Deno.test("router: priority order picks the first backend that can serve the call", () => {
  const d = decide(problem({ d: 32 }), fakeCaps(), FAKE);
  assert.equal(d.backend, fast);
  assert.equal(d.source, "priority");
  assert.deepEqual(d.chain, [{ backend: "fast", chosen: true, reasons: [] }]);
});

Deno.test("router: priority order falls past a backend that cannot serve, with its reason in the chain", () => {
  const d = decide(problem({ d: 128 }), fakeCaps(), FAKE);
  assert.equal(d.backend, slow);
  assert.equal(d.source, "priority");
  assert.deepEqual(d.chain, [
    { backend: "fast", chosen: false, reasons: ["head dim 128 is over 64"] },
    { backend: "slow", chosen: true, reasons: [] },
  ]);
});

Deno.test("router: options.backend is strict: BACKEND_UNSUPPORTED when it cannot serve the call", () => {
  const e = throwsWgattn(
    () => decide(problem({ d: 128 }), fakeCaps(), FAKE, { requested: "fast" }),
    "BACKEND_UNSUPPORTED",
    "options.backend",
  );
  assert.match(e.message, /head dim 128 is over 64/);
});

Deno.test("router: options.backend wins over priority and over the variable", () => {
  const d = decide(problem({ d: 32 }), fakeCaps(), FAKE, { requested: "slow", variable: "fast" });
  assert.equal(d.backend, slow);
  assert.equal(d.source, "option");
  assert.equal(d.requested, "slow");
  assert.deepEqual(d.chain, [{ backend: "slow", chosen: true, reasons: [] }]);
});

Deno.test("router: the variable is honoured when its backend can serve the call", () => {
  const d = decide(problem({ d: 32 }), fakeCaps(), FAKE, { variable: "slow" });
  assert.equal(d.backend, slow);
  assert.equal(d.source, "variable");
  assert.equal(d.requested, "slow");
});

Deno.test("router: the variable falls back softly, and the chain says why", () => {
  const d = decide(problem({ d: 128 }), fakeCaps(), FAKE, { variable: "fast" });
  assert.equal(d.backend, slow);
  assert.equal(d.source, "priority");
  assert.equal(d.requested, "fast");
  assert.equal(d.chain.length, 2);
  assert.equal(d.chain[0].backend, "fast");
  assert.equal(d.chain[0].chosen, false);
  assert.match(d.chain[0].reasons.join("; "), /WGATTN_IMPLEMENTATION/);
  assert.match(d.chain[0].reasons.join("; "), /head dim 128 is over 64/);
  assert.deepEqual(d.chain[1], { backend: "slow", chosen: true, reasons: [] });
});

Deno.test("router: aliases and case resolve to the canonical backend", () => {
  for (const name of ["quick", "QUICK", " Fast "]) {
    assert.equal(decide(problem({ d: 32 }), fakeCaps(), FAKE, { requested: name }).backend, fast, name);
    assert.equal(decide(problem({ d: 32 }), fakeCaps(), FAKE, { variable: name }).backend, fast, name);
  }
  assert.equal(decide(problem({ d: 32 }), fakeCaps(), FAKE, { requested: "careful" }).backend, slow);
});

Deno.test("router: an unknown name is UNKNOWN_BACKEND listing the valid names", () => {
  const e = throwsWgattn(
    () => decide(problem(), fakeCaps(), FAKE, { requested: "turbo" }),
    "UNKNOWN_BACKEND",
    "options.backend",
  );
  for (const name of ["fast", "quick", "slow", "careful"]) {
    assert.match(e.expected!, new RegExp(`\\b${name}\\b`));
  }
  assert.match(e.message, /turbo/);
  const v = throwsWgattn(
    () => decide(problem(), fakeCaps(), FAKE, { variable: "turbo" }),
    "UNKNOWN_BACKEND",
    "WGATTN_IMPLEMENTATION",
  );
  assert.match(v.expected!, /\bslow\b/);
});

Deno.test("router: a backend whose kernel failed on this device is passed over, with the failure", () => {
  const d = decide(problem({ d: 32 }), fakeCaps(), FAKE, { broken: new Map([["fast", "boom"]]) });
  assert.equal(d.backend, slow);
  assert.match(d.chain[0].reasons.join(), /failed on this device: boom/);
  throwsWgattn(
    () =>
      decide(problem({ d: 32 }), fakeCaps(), FAKE, {
        requested: "fast",
        broken: new Map([["fast", "boom"]]),
      }),
    "BACKEND_UNSUPPORTED",
    "options.backend",
  );
});

Deno.test("router: unsuited backends are skipped by priority, but can still be asked for", () => {
  const picky = fakeBackend("picky", { unsuited: () => ["slower than slow here"] });
  const registry = [picky, slow];
  const d = decide(problem(), fakeCaps(), registry);
  assert.equal(d.backend, slow);
  assert.deepEqual(d.chain[0], { backend: "picky", chosen: false, reasons: ["slower than slow here"] });
  assert.equal(decide(problem(), fakeCaps(), registry, { requested: "picky" }).backend, picky);
  assert.equal(decide(problem(), fakeCaps(), registry, { variable: "picky" }).backend, picky);
});

Deno.test("router: NO_BACKEND when nothing can serve the call, listing every reason", () => {
  const e = throwsWgattn(() => decide(problem({ d: 128 }), fakeCaps(), [fast]), "NO_BACKEND");
  assert.match(e.message, /fast: head dim 128 is over 64/);
});

// ---- decide() over the real registry ----------------------------------------------------------

const byName = (name: string) => BACKENDS.find((b) => b.name === name);

Deno.test("router (registry): naive and cpu are registered, cpu last", () => {
  assert.ok(byName("naive"));
  assert.equal(BACKENDS[BACKENDS.length - 1].name, "cpu");
  const names = BACKENDS.map((b) => b.name);
  assert.equal(new Set(names).size, names.length, "backend names are unique");
});

Deno.test("router (registry): every alias resolves to its own backend; DiffSynth names where registered", () => {
  const names = backendNames(BACKENDS);
  for (const b of BACKENDS) {
    assert.equal(lookupBackend(BACKENDS, b.name, "x"), b);
    for (const a of b.aliases) assert.equal(names.get(a), b, `alias ${a} of ${b.name}`);
  }
  assert.equal(lookupBackend(BACKENDS, "torch", "x").name, "naive");
  if (byName("flash")) {
    assert.equal(lookupBackend(BACKENDS, "flash_attention_2", "x").name, "flash");
    assert.equal(lookupBackend(BACKENDS, "flash_attention_3", "x").name, "flash");
  }
  // Every DiffSynth family name that is accepted must resolve to a registered backend.
  for (const name of ["torch", "flash_attention_2", "flash_attention_3", "sage_attention", "xformers"]) {
    const b = names.get(name);
    if (b) assert.ok(BACKENDS.includes(b));
  }
});

Deno.test("router (registry): the priority choice is the first registered backend with no reasons", () => {
  const caps = fakeCaps();
  for (
    const p of [
      problem(),
      problem({ d: 40, dtype: "f16" }),
      problem({ d: 39 }),
      problem({}, { isCausal: true }),
    ]
  ) {
    const d = decide(p, caps, BACKENDS);
    const first = BACKENDS.find((b) =>
      b.unsupportedReasons(p, caps).length === 0 && !b.unsuitedReasons?.(p, caps).length
    );
    assert.equal(d.backend, first);
    assert.equal(d.chain[d.chain.length - 1].backend, first!.name);
  }
});

Deno.test("router (registry): sage serves packed batches, picked by their longest sequences", () => {
  const caps = fakeCaps({}, { maxStorageBuffersPerShaderStage: 16 });
  const sage = byName("sage");
  if (!sage) return;
  /** A packed f16 batch of these lengths, n 2, d 64. */
  const packed = (lens: number[]) => {
    const total = lens.reduce((a, x) => a + x, 0);
    const t = {
      data: new Float16Array(total * 2 * 64).fill(0.5),
      shape: [total, 2, 64],
      dtype: "f16" as const,
    };
    const cu = Int32Array.from([0, ...lens.map((_, i) => lens.slice(0, i + 1).reduce((a, x) => a + x, 0))]);
    return resolveProblem(t, t, t, { cuSeqlensQ: cu, cuSeqlensK: cu, isCausal: true });
  };
  const long = packed([2048, 300, 2304]);
  assert.deepEqual(sage.unsupportedReasons(long, caps), []);
  assert.deepEqual(sage.unsuitedReasons!(long, caps), []);
  const d = decide(long, caps, BACKENDS);
  assert.equal(d.backend.name, "sage");
  assert.deepEqual(d.chain.find((c) => c.backend === "sage"), { backend: "sage", chosen: true, reasons: [] });
  // As many short calls: the pre-pass does not pay off, though the total is past SAGE_MIN_SEQ.
  const short = packed(Array(16).fill(256));
  assert.match(sage.unsuitedReasons!(short, caps).join(), /longest packed sequence q 256 \/ k 256/);
  assert.notEqual(decide(short, caps, BACKENDS).backend.name, "sage");
  // Its packed-batch kernel binds 12 storage buffers.
  assert.match(sage.unsupportedReasons(long, fakeCaps()).join(), /binds 12 storage buffers/);
  assert.notEqual(decide(long, fakeCaps(), BACKENDS).backend.name, "sage");
});

Deno.test("router (registry): split-kv takes packed decode batches, by their longest sequence, not packed prefill", () => {
  const caps = fakeCaps();
  const splitKv = byName("split-kv");
  if (!splitKv) return;
  /** A packed f16 batch, n 8 / n_kv 2, d 64: query lengths lensQ over key lengths lensK. */
  const packed = (lensQ: number[], lensK: number[]) => {
    const cu = (lens: number[]) =>
      Int32Array.from([0, ...lens.map((_, i) => lens.slice(0, i + 1).reduce((a, x) => a + x, 0))]);
    const t = (total: number, heads: number) => ({
      data: new Float16Array(total * heads * 64).fill(0.5),
      shape: [total, heads, 64],
      dtype: "f16" as const,
    });
    const tq = lensQ.reduce((a, x) => a + x, 0), tk = lensK.reduce((a, x) => a + x, 0);
    return resolveProblem(t(tq, 8), t(tk, 2), t(tk, 2), {
      cuSeqlensQ: cu(lensQ),
      cuSeqlensK: cu(lensK),
      isCausal: true,
    });
  };
  // Decode: one query row per sequence; 64 sequences (total_q 64 > SPLITKV_MAX_SQ, but each 1 row).
  const lensK = Array.from({ length: 64 }, (_, i) => 100 + 37 * i);
  const decode = packed(lensK.map(() => 1), lensK);
  assert.deepEqual(splitKv.unsupportedReasons(decode, caps), []);
  assert.deepEqual(splitKv.unsuitedReasons!(decode, caps), []);
  const d = decide(decode, caps, BACKENDS);
  assert.equal(d.backend.name, "split-kv");
  // A few speculative rows per sequence still: 4 rows x group 4 = 16 per K/V head.
  assert.equal(
    decide(packed(lensK.map((_, i) => 1 + (i % 4)), lensK), caps, BACKENDS).backend.name,
    "split-kv",
  );
  // Prefill: the longest sequence's 300 query rows are flash's.
  const prefill = packed([300, 1, 40], [300, 500, 40]);
  assert.deepEqual(splitKv.unsupportedReasons(prefill, caps), []);
  assert.match(splitKv.unsuitedReasons!(prefill, caps).join(), /longest sequence's s_q x group = 1200/);
  const p = decide(prefill, caps, BACKENDS);
  assert.notEqual(p.backend.name, "split-kv");
  assert.match(p.chain.find((c) => c.backend === "split-kv")!.reasons.join(), /longest sequence's s_q/);
  // A layout past what one dispatch can hold (64 sequences x 2 K/V heads > 8 x 8 workgroups) is refused.
  const tiny = fakeCaps({}, { maxComputeWorkgroupsPerDimension: 8 });
  assert.match(splitKv.unsupportedReasons(decode, tiny).join(), /packed batch's row bound .* > 64/);
  assert.notEqual(decide(decode, tiny, BACKENDS).backend.name, "split-kv");
});

Deno.test("router (registry): no adapter (caps null) gives cpu, each GPU backend saying why", () => {
  const d = decide(problem(), null, BACKENDS);
  assert.equal(d.backend.name, "cpu");
  assert.equal(d.source, "priority");
  for (const entry of d.chain.slice(0, -1)) {
    assert.equal(entry.chosen, false);
    assert.ok(entry.reasons.length > 0, `${entry.backend} gives a reason`);
  }
  assert.match(d.chain.find((c) => c.backend === "naive")!.reasons.join(), /no WebGPU adapter/);
  throwsWgattn(() => decide(problem(), null, BACKENDS, { requested: "naive" }), "BACKEND_UNSUPPORTED");
  assert.equal(decide(problem(), null, BACKENDS, { variable: "naive" }).backend.name, "cpu");
});

Deno.test("router (registry): compatibilityMode forces naive, over the variable", () => {
  const p = problem({}, { compatibilityMode: true });
  for (const variable of [undefined, "cpu", ...(byName("flash") ? ["flash"] : [])]) {
    const d = decide(p, fakeCaps(), BACKENDS, { variable });
    assert.equal(d.backend.name, "naive", `variable ${variable}`);
    assert.equal(d.source, "compatibility");
  }
  // Without an adapter the plain path is the host's.
  assert.equal(decide(p, null, BACKENDS).backend.name, "cpu");
});

Deno.test("router (registry): f16 without shader-f16 keeps naive off odd head dims", () => {
  const p = problem({ d: 39, dtype: "f16" });
  const without = decide(p, fakeCaps({ shaderF16: false, features: new Set() }), BACKENDS);
  assert.notEqual(without.backend.name, "naive");
  assert.match(without.chain.find((c) => c.backend === "naive")!.reasons.join(), /shader-f16/);
  const withF16 = decide(p, fakeCaps(), BACKENDS);
  assert.equal(withF16.chain.find((c) => c.backend === "naive")?.reasons.length ?? 0, 0);
});

Deno.test("router (registry): bf16 on odd head dims: naive's reason is WGSL's lack of bf16, not shader-f16", () => {
  // bf16 is written as pairs in u32 words whatever the adapter has: shader-f16 does not help.
  const p = problem({ d: 39, dtype: "bf16" });
  for (const caps of [fakeCaps(), fakeCaps({ shaderF16: false, features: new Set() })]) {
    const reasons = BACKENDS.find((b) => b.name === "naive")!.unsupportedReasons(p, caps).join("; ");
    assert.doesNotMatch(reasons, /shader-f16/, `shaderF16 ${caps.shaderF16}`);
    assert.match(reasons, /bf16 output is written in pairs of 16-bit values \(WGSL has no bf16 type\)/);
    assert.match(reasons, /contiguous even head dim \(d_v = 39\)/);
  }
});

Deno.test("router (registry): tensors over maxStorageBufferBindingSize leave only the cpu", () => {
  const caps = fakeCaps({}, { maxStorageBufferBindingSize: 1024 });
  const d = decide(problem({ s: 64, d: 64 }), caps, BACKENDS);
  assert.equal(d.backend.name, "cpu");
  assert.match(d.chain.find((c) => c.backend === "naive")!.reasons.join(), /maxStorageBufferBindingSize/);
});

// ---- the variable, in subprocesses ------------------------------------------------------------

const PROBE = new URL("./fixtures/implementation_probe.ts", import.meta.url).pathname;

interface ProbeResult {
  variable?: string | null;
  backend?: string;
  source?: string;
  requested?: string | null;
  chain?: { backend: string; chosen: boolean; reasons: string[] }[];
  unreadVariables?: string[];
  text?: string;
  ok?: boolean;
  error?: string;
  argument?: string;
  message?: string;
}

async function probe(value: string, permissions: string[], d = 16): Promise<ProbeResult> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--no-prompt", ...permissions, PROBE, String(d)],
    env: { WGATTN_IMPLEMENTATION: value, XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? "/tmp" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const out = new TextDecoder().decode(stdout).trim();
  assert.equal(code, 0, `probe exited with ${code}: ${out}\n${new TextDecoder().decode(stderr)}`);
  return JSON.parse(out.split("\n").pop()!);
}

const ALLOW = ["--allow-env=WGATTN_IMPLEMENTATION"];

Deno.test("variable: a good value picks the backend (source variable)", async () => {
  const r = await probe("naive", ALLOW);
  assert.equal(r.error, undefined, r.message);
  assert.equal(r.variable, "naive");
  assert.equal(r.backend, "naive");
  assert.equal(r.source, "variable");
  assert.equal(r.ok, true);
  const cpu = await probe("cpu", ALLOW);
  assert.equal(cpu.backend, "cpu");
  assert.equal(cpu.ok, true);
});

Deno.test("variable: an alias is accepted (torch)", async () => {
  const r = await probe("torch", ALLOW);
  assert.equal(r.backend, "naive");
  assert.equal(r.requested, "torch");
  assert.equal(r.source, "variable");
});

Deno.test("variable: a bad value is UNKNOWN_BACKEND naming the variable and listing the valid names", async () => {
  const r = await probe("warp-drive", ALLOW);
  assert.equal(r.error, "UNKNOWN_BACKEND");
  assert.equal(r.argument, "WGATTN_IMPLEMENTATION");
  assert.match(r.message!, /warp-drive/);
  for (const b of BACKENDS) assert.match(r.message!, new RegExp(`\\b${b.name}\\b`));
});

Deno.test("variable: without env permission it is ignored, and the module imports and runs", async () => {
  for (const permissions of [[], ["--allow-env=HOME"]]) {
    const r = await probe("warp-drive", permissions);
    assert.equal(r.error, undefined, r.message);
    assert.equal(r.variable, null);
    assert.equal(r.source, "priority");
    assert.equal(r.requested, null);
    assert.equal(r.ok, true);
    // explain() says so: without the permission wgattn cannot even tell whether it is set.
    assert.deepEqual(r.unreadVariables, ["WGATTN_IMPLEMENTATION", "WGATTN_WEBGPU"]);
    assert.match(r.text!, /^WGATTN_IMPLEMENTATION: not read: no env permission/m);
    assert.match(r.text!, /^WGATTN_WEBGPU: not read: no env permission/m);
  }
  const one = await probe("naive", ALLOW);
  assert.deepEqual(one.unreadVariables, ["WGATTN_WEBGPU"]);
  assert.doesNotMatch(one.text!, /WGATTN_IMPLEMENTATION: not read/);
  const both = await probe("naive", ["--allow-env=WGATTN_IMPLEMENTATION,WGATTN_WEBGPU"]);
  assert.deepEqual(both.unreadVariables, []);
  assert.doesNotMatch(both.text!, /not read/);
});

// A backend the variable names but that cannot serve the call: found on this machine, if any.
const runtime = await defaultRuntime();
const fallbackCase = (() => {
  const caps = runtime?.caps ?? null;
  for (const d of [39, 6, 300]) {
    const p = problem({ n: 2, s: 4, d });
    for (const b of BACKENDS) {
      if (b.name !== "cpu" && b.unsupportedReasons(p, caps).length > 0) return { backend: b.name, d };
    }
  }
  return null;
})();

Deno.test({
  name: `variable: a backend that cannot serve the call falls back softly${
    fallbackCase
      ? ` (${fallbackCase.backend}, d=${fallbackCase.d})`
      : " [skipped: every backend serves the probes here]"
  }`,
  ignore: fallbackCase === null,
  fn: async () => {
    const r = await probe(fallbackCase!.backend, ALLOW, fallbackCase!.d);
    assert.equal(r.error, undefined, r.message);
    assert.equal(r.source, "priority");
    assert.equal(r.requested, fallbackCase!.backend);
    assert.notEqual(r.backend, fallbackCase!.backend);
    assert.equal(r.chain![0].backend, fallbackCase!.backend);
    assert.equal(r.chain![0].chosen, false);
    assert.match(r.chain![0].reasons.join(), /WGATTN_IMPLEMENTATION/);
    assert.equal(r.ok, true);
  },
});
