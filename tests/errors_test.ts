/**
 * Bad input: every rejection is a WgattnError with a stable code, naming the argument at fault
 * with what was expected and what was given, from attentionForward and explain alike.
 */
import { engineAdapter } from "../engines/select.ts";
import assert from "node:assert/strict";
import { defaultRuntime } from "../core/device.ts";
import type { AttentionOptions, TensorInput } from "../core/types.ts";
import {
  attentionForward,
  availableBackends,
  deviceInfo,
  explain,
  mergeAttention,
  stats,
  WgattnError,
  type WgattnErrorCode,
} from "../mod.ts";

/** Counts what is queued on `device` (submissions and buffer writes) until `restore()`. */
function spyQueue(device: GPUDevice): { queued: () => number; restore: () => void } {
  const queue = device.queue;
  const own = queue as unknown as Record<string, unknown>;
  const submit = queue.submit, writeBuffer = queue.writeBuffer;
  let queued = 0;
  queue.submit = function (this: GPUQueue, ...args: Parameters<GPUQueue["submit"]>) {
    queued++;
    return submit.apply(this, args);
  };
  queue.writeBuffer = function (this: GPUQueue, ...args: Parameters<GPUQueue["writeBuffer"]>) {
    if ((args[2] as ArrayBufferView).byteLength > 0 && args[4] !== 0) queued++; // an empty write queues nothing
    return writeBuffer.apply(this, args);
  };
  return {
    queued: () => queued,
    restore: () => {
      delete own.submit;
      delete own.writeBuffer;
    },
  };
}

const t = (shape: number[], fill = 0.5): { data: Float32Array; shape: number[] } => ({
  data: new Float32Array(shape.reduce((p, x) => p * x, 1)).fill(fill),
  shape,
});
const Q = t([1, 2, 8, 16]);

/** Asserts that the call rejects with `code`, naming `argument` (exactly, or matching a RegExp). */
async function rejects(
  args: [unknown, unknown, unknown, unknown?],
  code: WgattnErrorCode,
  argument: string | RegExp,
  message?: RegExp,
): Promise<WgattnError> {
  const [q, k, v, options] = args as [TensorInput, TensorInput, TensorInput, AttentionOptions?];
  let first: WgattnError | undefined;
  for (const call of [attentionForward, explain]) {
    let error: unknown;
    // A rejected call queues nothing on the GPU and leaves nothing allocated.
    const device = (await defaultRuntime())?.device;
    const spy = device ? spyQueue(device) : null;
    const before = stats();
    try {
      await call(q, k, v, options);
    } catch (e) {
      error = e;
    } finally {
      spy?.restore();
    }
    assert.equal(spy?.queued() ?? 0, 0, `${call.name} queued GPU work for a rejected call`);
    assert.equal(stats().liveBuffers, before.liveBuffers, `${call.name} left buffers allocated`);
    assert.ok(error !== undefined, `${call.name} should reject`);
    assert.ok(error instanceof WgattnError, `${call.name}: expected a WgattnError, got ${error}`);
    assert.equal(error.name, "WgattnError");
    assert.equal(error.code, code, error.message);
    if (typeof argument === "string") assert.equal(error.argument, argument, error.message);
    else assert.match(error.argument ?? "", argument, error.message);
    assert.ok(error.expected, `expected is given: ${error.message}`);
    assert.ok(error.actual !== undefined, `actual is given: ${error.message}`);
    assert.ok(error.message.includes(`[${code}]`), error.message);
    assert.ok(error.message.includes(error.argument!), "the message names the argument");
    if (message) assert.match(error.message, message);
    first ??= error;
  }
  return first!;
}

Deno.test("errors: mismatched shapes", async () => {
  await rejects([Q, t([1, 2, 8, 32]), t([1, 2, 8, 32])], "SHAPE_MISMATCH", "k", /d = 16/);
  await rejects([Q, t([2, 2, 8, 16]), t([2, 2, 8, 16])], "SHAPE_MISMATCH", "k");
  await rejects([Q, Q, t([1, 2, 9, 16])], "SHAPE_MISMATCH", "v");
  await rejects([Q, Q, t([1, 1, 8, 16])], "SHAPE_MISMATCH", "v");
  await rejects([t([2, 8, 16]), Q, Q], "INVALID_SHAPE", "q", /3 axes/);
  await rejects([{ data: new Float32Array(0), shape: [1, -1, 8, 16] }, Q, Q], "INVALID_SHAPE", "q", /-1/);
  await rejects([{ data: new Float32Array(4), shape: [1, 1, 2, 2.5] }, Q, Q], "INVALID_SHAPE", "q");
  await rejects([null, Q, Q], "INVALID_SHAPE", "q");
});

Deno.test("errors: a pattern that does not parse", async () => {
  for (
    const pattern of ["b n s", "b n s x", "b n (s d", "b n s d d", "(b n) (s d)", "b n () s d", "b,n,s,d"]
  ) {
    await rejects([Q, Q, Q, { qPattern: pattern }], "INVALID_PATTERN", "options.qPattern", /cannot parse/);
  }
  await rejects([Q, Q, Q, { kPattern: "b n s q" }], "INVALID_PATTERN", "options.kPattern");
  await rejects([Q, Q, Q, { vPattern: "" }], "INVALID_PATTERN", "options.vPattern");
  await rejects([Q, Q, Q, { outPattern: "b s (n d" }], "INVALID_PATTERN", "options.outPattern");
});

Deno.test("errors: a pattern or shape that does not match the data", async () => {
  // Data length against shape.
  await rejects([{ data: new Float32Array(100), shape: [1, 2, 8, 16] }, Q, Q], "INVALID_SHAPE", "q", /256/);
  await rejects([Q, Q, { data: new Float32Array(255), shape: [1, 2, 8, 16] }], "INVALID_SHAPE", "v");
  // Axis count against pattern.
  await rejects([Q, Q, Q, { qPattern: "b s (n d)", dims: { n: 2 } }], "INVALID_SHAPE", "q", /pattern/);
  await rejects([Q, t([1, 8, 32]), Q, { kPattern: "b s n d" }], "INVALID_SHAPE", "k");
});

Deno.test("errors: dims that do not divide or do not fit", async () => {
  const packed = t([1, 8, 30]);
  const e = await rejects(
    [packed, packed, packed, {
      qPattern: "b s (n d)",
      kPattern: "b s (n d)",
      vPattern: "b s (n d)",
      dims: { n: 4 },
    }],
    "INVALID_DIMS",
    /^(q|options\.dims(\.n)?)$/,
  );
  assert.match(e.message, /dims/);
  assert.match(e.message, /30/);
  await rejects([packed, packed, packed, { qPattern: "b s (n d)" }], "INVALID_DIMS", "options.dims");
  // k "b d (n s)": dims.n sets q's heads, not k's, and no option sets k's s: say that, not "neither given".
  const k = await rejects(
    [t([1, 8, 32]), t([1, 16, 16]), Q, { qPattern: "b s (n d)", kPattern: "b d (n s)", dims: { n: 2 } }],
    "INVALID_DIMS",
    "options.dims.nKv",
  );
  assert.doesNotMatch(k.message, /neither/);
  assert.match(k.message, /k's grouped axis \(n s\) in options\.kPattern/);
  assert.match(k.expected!, /options\.dims\.nKv \(k and v's head count; options\.dims\.n sets q's only\)/);
  assert.match(k.expected!, /s: k's sequence length, which no option sets/);
  assert.match(k.actual!, /options\.dims = \{"n":2\}/);
  // An empty group with another axis of 0 does not give the third.
  await rejects(
    [t([0, 2, 8, 16]), t([0, 8, 16]), t([0, 2, 8, 16]), { kPattern: "(b n) s d" }],
    "INVALID_DIMS",
    "options.dims.nKv",
    /empty/,
  );
  await rejects([Q, Q, Q, { dims: { n: 3 } }], "INVALID_DIMS", "options.dims.n");
  await rejects([Q, Q, Q, { dims: { n: 2.5 } }], "INVALID_DIMS", "options.dims.n");
  await rejects([Q, Q, Q, { dims: { n: 0 } }], "INVALID_DIMS", "options.dims.n");
  await rejects([Q, Q, Q, { dims: { heads: 2 } as never }], "INVALID_DIMS", "options.dims.heads");
  await rejects([Q, Q, Q, { dims: { nKv: 4 } }], "INVALID_DIMS", "options.dims.nKv");
});

Deno.test("errors: unsupported and mismatched dtypes", async () => {
  const shape = [1, 2, 8, 16];
  for (const data of [new Int32Array(256), new Float64Array(256), new Uint8Array(256), [1, 2, 3]]) {
    await rejects([{ data, shape }, Q, Q], "UNSUPPORTED_DTYPE", "q");
  }
  await rejects([{ data: new Uint16Array(256), shape }, Q, Q], "UNSUPPORTED_DTYPE", "q", /Uint16Array/);
  await rejects([{ data: new Float32Array(256), shape, dtype: "f16" }, Q, Q], "UNSUPPORTED_DTYPE", "q");
  await rejects([{ data: new Float32Array(256), shape, dtype: "f64" }, Q, Q], "UNSUPPORTED_DTYPE", "q");
  await rejects([{ data: new Int8Array(256), dims: shape, type: "int8" }, Q, Q], "UNSUPPORTED_DTYPE", "q");
  await rejects([Q, { data: new Float16Array(256), shape }, Q], "DTYPE_MISMATCH", "k");
  await rejects([Q, Q, { data: new Uint16Array(256), shape, dtype: "bf16" }], "DTYPE_MISMATCH", "v");
});

Deno.test("errors: head counts that do not divide", async () => {
  const e = await rejects([t([1, 3, 8, 16]), t([1, 2, 8, 16]), t([1, 2, 8, 16])], "HEAD_COUNT", "k");
  assert.match(e.message, /n = 3/);
  assert.match(e.message, /n_kv = 2/);
  await rejects([t([1, 2, 8, 16]), t([1, 4, 8, 16]), t([1, 4, 8, 16])], "HEAD_COUNT", "k");
});

Deno.test("errors: masks that do not broadcast or are malformed", async () => {
  const bool = (shape: number[]) => ({
    data: new Uint8Array(shape.reduce((p, x) => p * x, 1)).fill(1),
    shape,
  });
  for (const shape of [[7, 8], [1, 3, 8, 8], [2, 1, 8, 8], [8, 9], [1, 1, 1, 8, 8], [5]]) {
    await rejects([Q, Q, Q, { attnMask: bool(shape) }], "INVALID_MASK", "options.attnMask", /broadcast/);
  }
  await rejects(
    [Q, Q, Q, { attnMask: { data: new Uint8Array(10), shape: [8, 8] } }],
    "INVALID_MASK",
    "options.attnMask",
  );
  await rejects(
    [Q, Q, Q, { attnMask: { data: new Int32Array(64), shape: [8, 8] } as never }],
    "UNSUPPORTED_DTYPE",
    "options.attnMask",
  );
  await rejects([Q, Q, Q, { keyPaddingMask: bool([1, 2, 8]) }], "INVALID_MASK", "options.keyPaddingMask");
  await rejects([Q, Q, Q, { keyPaddingMask: bool([1, 7]) }], "INVALID_MASK", "options.keyPaddingMask");
  await rejects(
    [Q, Q, Q, { keyPaddingMask: { data: new Float32Array(8), shape: [1, 8] } }],
    "INVALID_MASK",
    "options.keyPaddingMask",
  );
  await rejects(
    [Q, Q, Q, { attnMask: bool([8, 8]), keyPaddingMask: bool([1, 8]) }],
    "INVALID_MASK",
    "options.keyPaddingMask",
  );
});

Deno.test("errors: a scale that is not a finite number", async () => {
  for (const scale of [NaN, Infinity, -Infinity, "0.5" as unknown as number]) {
    await rejects([Q, Q, Q, { scale }], "INVALID_OPTION", "options.scale");
  }
});

Deno.test("errors: options of the wrong type are refused, naming the key", async () => {
  const wrong: [keyof AttentionOptions, unknown[]][] = [
    ["isCausal", [1, "yes", null, 0]],
    ["compatibilityMode", [1, "true", null]],
    ["qPattern", [3, null]],
    ["dims", [4, "n=2"]],
    ["backend", [3, true]],
    ["device", [{}, "gpu"]],
    ["attnMask", ["mask", 1]],
  ];
  for (const [key, values] of wrong) {
    for (const value of values) {
      await rejects([Q, Q, Q, { [key]: value }], "INVALID_OPTION", `options.${key}`);
    }
  }
  // A string prints quoted, so "0.5" is not read as the number 0.5.
  const e = await rejects([Q, Q, Q, { scale: "0.5" as never }], "INVALID_OPTION", "options.scale");
  assert.match(e.message, /actual: "0\.5"/);
});

Deno.test("errors: an unknown option is refused, naming the key it resembles", async () => {
  const near: [string, string][] = [
    ["isCasual", "isCausal"],
    ["is_causal", "isCausal"],
    ["attn_mask", "attnMask"],
    ["compatibility_mode", "compatibilityMode"],
    ["windowsize", "windowSize"],
    ["keyPadingMask", "keyPaddingMask"],
    ["backends", "backend"],
  ];
  for (const [key, meant] of near) {
    const e = await rejects([Q, Q, Q, { [key]: true }], "INVALID_OPTION", `options.${key}`);
    assert.match(e.message, new RegExp(`did you mean ${meant}\\?`), e.message);
  }
  const e = await rejects([Q, Q, Q, { turbo: true }], "INVALID_OPTION", "options.turbo");
  assert.doesNotMatch(e.message, /did you mean/);
  assert.match(e.expected!, /isCausal/);
  // dims keys likewise.
  const d = await rejects([Q, Q, Q, { dims: { nkv: 2 } as never }], "INVALID_DIMS", "options.dims.nkv");
  assert.match(d.message, /did you mean nKv\?/);
  // The other functions that take options check them the same way.
  for (
    const call of [
      () => availableBackends({ devise: null } as never),
      () => deviceInfo({ device: "gpu" } as never),
      () => mergeAttention([{ out: Q, lse: t([1, 2, 8]) }], { outpattern: "b s n d" } as never),
    ]
  ) {
    await assert.rejects(call, (err: unknown) => err instanceof WgattnError && err.code === "INVALID_OPTION");
  }
});

Deno.test("errors: windowSize negative or not an integer", async () => {
  for (
    const windowSize of [-2, 1.5, NaN, [1] as unknown as number, [1, -3], [0.5, 2], "3" as unknown as number]
  ) {
    await rejects(
      [Q, Q, Q, { windowSize: windowSize as AttentionOptions["windowSize"] }],
      "INVALID_OPTION",
      "options.windowSize",
    );
  }
});

Deno.test("errors: an unknown backend lists the valid names", async () => {
  const e = await rejects(
    [Q, Q, Q, { backend: "warp-drive" }],
    "UNKNOWN_BACKEND",
    "options.backend",
    /warp-drive/,
  );
  assert.match(e.expected!, /\bnaive\b/);
  assert.match(e.expected!, /\bcpu\b/);
  await rejects([Q, Q, Q, { backend: 3 as unknown as string }], "INVALID_OPTION", "options.backend");
  await rejects([Q, Q, Q, "fast" as unknown as AttentionOptions], "INVALID_OPTION", "options");
});

const runtime = await defaultRuntime();

Deno.test({
  name: `errors: GPU buffers that lack STORAGE usage or are too small${
    runtime ? "" : " [skipped: no WebGPU adapter]"
  }`,
  ignore: runtime === null,
  fn: async () => {
    const device = runtime!.device;
    const make = (size: number, usage: number) => device.createBuffer({ size, usage });
    const ok = make(1024, GPUBufferUsage.STORAGE);
    const small = make(512, GPUBufferUsage.STORAGE);
    const noStorage = make(1024, GPUBufferUsage.COPY_SRC);
    const gpu = (buffer: GPUBuffer) => ({ buffer, shape: [1, 2, 8, 16], dtype: "f32" as const });
    try {
      await rejects([gpu(small), gpu(ok), gpu(ok)], "INVALID_BUFFER", "q", /1024/);
      await rejects([gpu(ok), gpu(noStorage), gpu(ok)], "INVALID_BUFFER", "k", /STORAGE/);
      await rejects(
        [gpu(ok), gpu(ok), gpu(ok), { attnMask: { buffer: small, shape: [2, 8, 64], dtype: "bool" } }],
        "INVALID_BUFFER",
        "options.attnMask",
      );
      await rejects(
        [{ buffer: ok, shape: [1, 2, 8, 16], dtype: "i32" }, gpu(ok), gpu(ok)],
        "UNSUPPORTED_DTYPE",
        "q",
      );
    } finally {
      for (const b of [ok, small, noStorage]) b.destroy();
    }
  },
});

Deno.test("errors: options.out of the wrong kind or size, sharing an input's bytes, or on a GPU call", async () => {
  const count = 2 * 8 * 16;
  await rejects([Q, Q, Q, { out: new Float64Array(count) }], "INVALID_OPTION", "options.out", /Float32Array/);
  await rejects([Q, Q, Q, { out: new Float16Array(count) }], "INVALID_OPTION", "options.out", /Float32Array/);
  await rejects([Q, Q, Q, { out: new Float32Array(count - 1) }], "INVALID_OPTION", "options.out", /256/);
  await rejects([Q, Q, Q, { out: [0] }], "INVALID_OPTION", "options.out");
  const q16 = { data: new Uint16Array(count), shape: [1, 2, 8, 16], dtype: "f16" as const };
  await rejects(
    [q16, q16, q16, { out: new Float16Array(count) }],
    "INVALID_OPTION",
    "options.out",
    /Uint16Array/,
  );
  // Writing the output into an input it shares bytes with.
  const own = { data: new Float32Array(count).fill(0.25), shape: [1, 2, 8, 16] };
  await rejects([Q, own, Q, { out: own.data }], "INVALID_OPTION", "options.out", /shares memory/);
  await rejects([Q, Q, Q, { out: Q.data.subarray(0) }], "INVALID_OPTION", "options.out", /shares memory/);
  if (runtime) {
    const buffer = runtime.device.createBuffer({ size: count * 4, usage: GPUBufferUsage.STORAGE });
    const gpu = { buffer, shape: [1, 2, 8, 16], dtype: "f32" as const };
    try {
      await rejects(
        [gpu, gpu, gpu, { out: new Float32Array(count) }],
        "INVALID_OPTION",
        "options.out",
        /host calls/,
      );
    } finally {
      buffer.destroy();
    }
  }
});

Deno.test({
  name: `errors: GPU buffers that are destroyed, mapped or of another device${
    runtime ? "" : " [skipped: no WebGPU adapter]"
  }`,
  ignore: runtime === null,
  fn: async () => {
    const device = runtime!.device;
    const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST;
    const ok = device.createBuffer({ size: 1024, usage });
    const destroyed = device.createBuffer({ size: 1024, usage, label: "gone" });
    destroyed.destroy();
    const mapped = device.createBuffer({ size: 1024, usage, mappedAtCreation: true });
    const other = await (await engineAdapter())!.requestDevice();
    const foreign = other.createBuffer({ size: 1024, usage });
    const mask = (buffer: GPUBuffer) => ({ buffer, shape: [2, 8, 8], dtype: "bool" as const });
    const gpu = (buffer: GPUBuffer) => ({ buffer, shape: [1, 2, 8, 16], dtype: "f32" as const });
    try {
      await rejects([gpu(destroyed), gpu(ok), gpu(ok)], "INVALID_BUFFER", "q", /destroyed/);
      await rejects([gpu(ok), gpu(ok), gpu(destroyed)], "INVALID_BUFFER", "v", /destroyed/);
      await rejects([gpu(ok), gpu(foreign), gpu(ok)], "INVALID_BUFFER", "k", /another GPUDevice/);
      await rejects([gpu(ok), gpu(ok), gpu(mapped)], "INVALID_BUFFER", "v", /mapped/);
      await rejects(
        [gpu(ok), gpu(ok), gpu(ok), { attnMask: mask(destroyed) }],
        "INVALID_BUFFER",
        "options.attnMask",
        /destroyed/,
      );
      await rejects(
        [gpu(ok), gpu(ok), gpu(ok), { keyPaddingMask: { buffer: foreign, shape: [1, 8], dtype: "bool" } }],
        "INVALID_BUFFER",
        "options.keyPaddingMask",
        /another GPUDevice/,
      );
      // A buffer of the device passed as options.device is foreign to the default one, and back.
      await rejects([gpu(foreign), gpu(foreign), gpu(foreign)], "INVALID_BUFFER", "q", /another GPUDevice/);
      const good = await attentionForward(gpu(foreign), gpu(foreign), gpu(foreign), { device: other });
      good.buffer.destroy();
      await rejects(
        [gpu(ok), gpu(ok), gpu(ok), { device: other }],
        "INVALID_BUFFER",
        "q",
        /another GPUDevice/,
      );
      // The same buffers, once fine again, work: the checks left no state behind.
      mapped.unmap();
      const out = await attentionForward(gpu(ok), gpu(ok), gpu(mapped));
      out.buffer.destroy();
    } finally {
      for (const b of [ok, mapped, foreign]) b.destroy();
      other.destroy();
    }
  },
});

Deno.test("errors: a backend forced by the caller that cannot serve the call is an error, not a fallback", async () => {
  const additive = { data: new Float32Array(64), shape: [8, 8] };
  const e = await rejects(
    [Q, Q, Q, { backend: "flash", attnMask: additive }],
    "BACKEND_UNSUPPORTED",
    "options.backend",
    /flash/,
  );
  assert.match(e.actual!, /mask/);
  // A host call large enough to start its uploads before its encoding (core/execute.ts,
  // EarlyUploads) is routed first: refused, it queues nothing either (d 63 is no multiple of 4).
  const big = t([1, 2, 2100, 63]);
  assert.ok(3 * big.data.byteLength >= 1 << 20);
  await rejects(
    [big, big, big, { backend: "flash" }],
    "BACKEND_UNSUPPORTED",
    "options.backend",
    /head dim 63/,
  );
  // Without the option the router serves the same call (the variable's choice falls back the same
  // way: see router_test.ts).
  const device = (await defaultRuntime())?.device;
  const spy = device ? spyQueue(device) : null;
  try {
    const out = await attentionForward(Q, Q, Q, { attnMask: additive });
    assert.deepEqual(out.shape, [1, 2, 8, 16]);
  } finally {
    spy?.restore();
  }
  if (spy) assert.ok(spy.queued() > 0, "the queue spy sees a call that runs");
  await rejects([Q, Q, Q, { backend: "" }], "UNKNOWN_BACKEND", "options.backend");
});
