/**
 * Zero-size axes: b, n, s_q or s_kv of 0 are accepted, as PyTorch accepts them. The output has the
 * call's shape (empty, or zeros for rows that see no key, log-sum-exp -Infinity, wgattn's rule for
 * a fully masked row); nothing is dispatched; GPU tensors in give GPU buffers of the output's size
 * (0 bytes for an empty one). Every entry point, each dtype, several layouts, host and GPU.
 */
import assert from "node:assert/strict";
import { defaultRuntime } from "../core/device.ts";
import { readBuffer } from "../core/gpu.ts";
import {
  attentionForward,
  type AttentionOptions,
  attentionWithLse,
  type DType,
  explain,
  type GpuTensor,
  type HostTensor,
  mergeAttention,
  stats,
  WgattnError,
} from "../mod.ts";

const runtime = await defaultRuntime();

/** Counts submissions and non-empty buffer writes on the device, and pipelines built, until `stop()`. */
function spy(device: GPUDevice | undefined) {
  if (!device) return { stop: () => ({ submits: 0, writes: 0, pipelines: 0 }) };
  const queue = device.queue;
  const own = queue as unknown as Record<string, unknown>;
  const submit = queue.submit, writeBuffer = queue.writeBuffer;
  const pipelinesBefore = stats().cachedPipelines;
  let submits = 0, writes = 0;
  queue.submit = function (this: GPUQueue, ...args: Parameters<GPUQueue["submit"]>) {
    submits++;
    return submit.apply(this, args);
  };
  queue.writeBuffer = function (this: GPUQueue, ...args: Parameters<GPUQueue["writeBuffer"]>) {
    if ((args[2] as ArrayBufferView).byteLength > 0) writes++;
    return writeBuffer.apply(this, args);
  };
  return {
    stop: () => {
      delete own.submit;
      delete own.writeBuffer;
      return { submits, writes, pipelines: stats().cachedPipelines - pipelinesBefore };
    },
  };
}

interface Case {
  name: string;
  b: number;
  n: number;
  nKv: number;
  sQ: number;
  sKv: number;
  d: number;
  /** Pattern of q, k, v and out; a grouped one needs dims. */
  pattern: string;
  dims?: AttentionOptions["dims"];
}

const CASES: Case[] = [
  { name: "s_q = 0", b: 2, n: 2, nKv: 2, sQ: 0, sKv: 5, d: 8, pattern: "b n s d" },
  { name: "s_kv = 0", b: 2, n: 4, nKv: 2, sQ: 3, sKv: 0, d: 8, pattern: "b n s d" },
  { name: "b = 0", b: 0, n: 2, nKv: 1, sQ: 3, sKv: 5, d: 8, pattern: "b n s d" },
  { name: "n = 0 (n_kv 0)", b: 1, n: 0, nKv: 0, sQ: 3, sKv: 5, d: 8, pattern: "b n s d" },
  { name: "s_kv = 0, b s n d", b: 1, n: 2, nKv: 2, sQ: 3, sKv: 0, d: 8, pattern: "b s n d" },
  { name: "s_q = 0, b s n d", b: 1, n: 2, nKv: 1, sQ: 0, sKv: 4, d: 8, pattern: "b s n d" },
  {
    name: "s_kv = 0, b s (n d)",
    b: 1,
    n: 2,
    nKv: 2,
    sQ: 3,
    sKv: 0,
    d: 8,
    pattern: "b s (n d)",
    dims: { n: 2 },
  },
  {
    name: "s_q = 0, b s (n d)",
    b: 2,
    n: 2,
    nKv: 2,
    sQ: 0,
    sKv: 4,
    d: 8,
    pattern: "b s (n d)",
    dims: { n: 2 },
  },
];

function shapeOf(pattern: string, sizes: { b: number; n: number; s: number; d: number }): number[] {
  if (pattern === "b n s d") return [sizes.b, sizes.n, sizes.s, sizes.d];
  if (pattern === "b s n d") return [sizes.b, sizes.s, sizes.n, sizes.d];
  return [sizes.b, sizes.s, sizes.n * sizes.d];
}

function hostArray(dtype: DType, count: number) {
  const values = Float32Array.from({ length: count }, (_, i) => Math.sin(i + 1));
  if (dtype === "f32") return values;
  if (dtype === "f16") return Float16Array.from(values);
  return Uint16Array.from(new Uint32Array(values.buffer), (u) => u >>> 16);
}

function inputs(c: Case, dtype: DType) {
  const make = (n: number, s: number): HostTensor => {
    const shape = shapeOf(c.pattern, { b: c.b, n, s, d: c.d });
    return { data: hostArray(dtype, shape.reduce((p, x) => p * x, 1)), shape, dtype };
  };
  const options: AttentionOptions = {
    qPattern: c.pattern,
    kPattern: c.pattern,
    vPattern: c.pattern,
    outPattern: c.pattern,
    ...(c.dims ? { dims: c.dims } : {}),
  };
  return { q: make(c.n, c.sQ), k: make(c.nKv, c.sKv), v: make(c.nKv, c.sKv), options };
}

const DTYPES: DType[] = ["f32", "f16", "bf16"];

Deno.test("empty: host calls give the call's shape, zeros for rows without keys, lse -Infinity; nothing on the GPU", async () => {
  for (const c of CASES) {
    for (const dtype of DTYPES) {
      const name = `${c.name} ${dtype}`;
      const { q, k, v, options } = inputs(c, dtype);
      const outShape = shapeOf(c.pattern, { b: c.b, n: c.n, s: c.sQ, d: c.d });
      const watch = spy(runtime?.device);
      const out = await attentionForward(q, k, v, options);
      const { out: out2, lse } = await attentionWithLse(q, k, v, { ...options, isCausal: true });
      const why = await explain(q, k, v, options);
      assert.deepEqual(watch.stop(), { submits: 0, writes: 0, pipelines: 0 }, `${name}: GPU work`);
      for (const o of [out, out2]) {
        assert.deepEqual([...o.shape], outShape, name);
        assert.equal(o.dtype, dtype, name);
        assert.equal(o.data.length, outShape.reduce((p, x) => p * x, 1), name);
        assert.ok(o.data.every((x) => x === 0), `${name}: rows that see no key are zeros`);
      }
      assert.deepEqual([...lse.shape], [c.b, c.n, c.sQ], name);
      assert.equal(lse.data.length, c.b * c.n * c.sQ, name);
      assert.ok(lse.data.every((x) => x === -Infinity), `${name}: lse -Infinity`);
      assert.equal(why.backend, "none", name);
      assert.equal(why.source, "empty", name);
      assert.deepEqual(why.chain, []);
      assert.match(why.text, /^backend: none \(empty call, .*= 0: .*no kernel runs\)$/m, name);
      if (c.sKv === 0 && c.b * c.n * c.sQ > 0) assert.match(why.text, /zeros/, name);
    }
  }
});

Deno.test("empty: a mask with an empty axis, and options that name a backend", async () => {
  const c = CASES[1]; // s_kv = 0
  const { q, k, v, options } = inputs(c, "f32");
  const padding = { data: new Uint8Array(0), shape: [c.b, 0] };
  const a = await attentionForward(q, k, v, { ...options, keyPaddingMask: padding });
  assert.ok(a.data.every((x) => x === 0));
  const bias = { data: new Float32Array(0), shape: [c.sQ, 0] };
  const b = await attentionForward(q, k, v, { ...options, attnMask: bias, windowSize: 2 });
  assert.ok(b.data.every((x) => x === 0));
  // A forced backend runs nothing here, so none is refused; a name of no backend is still an error.
  for (const backend of ["flash", "split-kv", "naive", "cpu", "torch"]) {
    const out = await attentionForward(q, k, v, { ...options, backend });
    assert.ok(out.data.every((x) => x === 0), backend);
  }
  await assert.rejects(
    () => attentionForward(q, k, v, { ...options, backend: "warp-drive" }),
    (e) => e instanceof WgattnError && e.code === "UNKNOWN_BACKEND",
  );
  await assert.rejects(
    () => explain(q, k, v, { ...options, backend: "warp-drive" }),
    (e) => e instanceof WgattnError && e.code === "UNKNOWN_BACKEND",
  );
});

Deno.test("empty: a head dim of 0 is refused (INVALID_SHAPE), and so are k/v heads of 0 under q heads", async () => {
  const t = (shape: number[]) => ({ data: new Float32Array(shape.reduce((p, x) => p * x, 1)), shape });
  for (
    const [q, k, v, argument] of [
      [t([1, 2, 3, 0]), t([1, 2, 4, 0]), t([1, 2, 4, 8]), "q"],
      [t([1, 2, 3, 8]), t([1, 2, 4, 8]), t([1, 2, 4, 0]), "v"],
    ] as const
  ) {
    for (const call of [attentionForward, explain]) {
      await assert.rejects(
        () => call(q, k, v),
        (e) =>
          e instanceof WgattnError && e.code === "INVALID_SHAPE" && e.argument === argument &&
          /head dim/.test(e.message),
      );
    }
  }
  await assert.rejects(
    () => attentionForward(t([1, 2, 3, 8]), t([1, 0, 4, 8]), t([1, 0, 4, 8])),
    (e) => e instanceof WgattnError && e.code === "HEAD_COUNT",
  );
});

Deno.test("empty: mergeAttention of empty parts, on the host", async () => {
  for (const dtype of DTYPES) {
    const part = (): { out: HostTensor; lse: HostTensor } => ({
      out: { data: hostArray(dtype, 0), shape: [1, 2, 0, 8], dtype },
      lse: { data: new Float32Array(0), shape: [1, 2, 0] },
    });
    const { out, lse } = await mergeAttention([part(), part()]);
    assert.deepEqual([...out.shape], [1, 2, 0, 8]);
    assert.equal(out.dtype, dtype);
    assert.equal(out.data.length, 0);
    assert.deepEqual([...lse.shape], [1, 2, 0]);
  }
  // Parts of s_kv = 0 calls: each row saw no key in any part: zeros, -Infinity.
  const { q, k, v, options } = inputs(CASES[1], "f32");
  const p = await attentionWithLse(q, k, v, options);
  const merged = await mergeAttention([p, p]);
  assert.ok(merged.out.data.every((x) => x === 0));
  assert.ok(merged.lse.data.every((x) => x === -Infinity));
});

// ---- GPU tensors --------------------------------------------------------------------------------

function upload(device: GPUDevice, t: HostTensor): GpuTensor {
  const bytes = t.data.byteLength;
  const buffer = device.createBuffer({
    size: Math.ceil(bytes / 4) * 4, // 0 for an empty tensor: WebGPU allows it
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  if (bytes > 0) {
    const padded = new Uint8Array(Math.ceil(bytes / 4) * 4);
    padded.set(new Uint8Array(t.data.buffer, t.data.byteOffset, bytes));
    device.queue.writeBuffer(buffer, 0, padded);
  }
  return { buffer, shape: t.shape, dtype: t.dtype! };
}

const BYTES: Record<DType, number> = { f32: 4, f16: 2, bf16: 2 };

Deno.test({
  name: `empty: GPU tensors in, GPU buffers of the output's size out, no dispatch${
    runtime ? "" : " [skipped: no WebGPU adapter]"
  }`,
  ignore: runtime === null,
  fn: async () => {
    const device = runtime!.device;
    for (const c of CASES) {
      for (const dtype of DTYPES) {
        const name = `${c.name} ${dtype}`;
        const host = inputs(c, dtype);
        const [q, k, v] = [host.q, host.k, host.v].map((t) => upload(device, t));
        const rows = c.b * c.n * c.sQ;
        const outCount = rows * c.d;
        const watch = spy(device);
        const out = await attentionForward(q, k, v, host.options);
        const { out: out2, lse } = await attentionWithLse(q, k, v, host.options);
        const why = await explain(q, k, v, host.options);
        const again = await attentionForward(out, k, v, host.options); // chains
        const seen = watch.stop();
        // Only the lse's -Infinity is written; nothing is submitted, no pipeline built.
        assert.deepEqual(seen, { submits: 0, writes: rows > 0 ? 1 : 0, pipelines: 0 }, name);
        assert.equal(why.backend, "none", name);
        for (const o of [out, out2, again]) {
          assert.equal(o.dtype, dtype, name);
          assert.deepEqual([...o.shape], [...host.q.shape], name); // d_v = d, one pattern
          if (outCount === 0) assert.equal(o.buffer.size, 0, `${name}: an empty output gets an empty buffer`);
          else assert.ok(o.buffer.size >= outCount * BYTES[dtype], name);
        }
        assert.deepEqual([...lse.shape], [c.b, c.n, c.sQ], name);
        if (outCount > 0) {
          const bytes = new Uint8Array(await readBuffer(device, out2.buffer, outCount * BYTES[dtype]));
          assert.ok(bytes.every((x) => x === 0), `${name}: zeros`);
          const l = new Float32Array(await readBuffer(device, lse.buffer, rows * 4));
          assert.ok(l.every((x) => x === -Infinity), `${name}: lse -Infinity`);
        } else {
          assert.equal(lse.buffer.size, 0, name);
        }
        // Empty parts merge on the GPU without a dispatch.
        if (rows === 0) {
          const watchMerge = spy(device);
          const merged = await mergeAttention([{ out: out2, lse }, { out: out2, lse }], {
            outPattern: c.pattern,
          });
          assert.deepEqual(watchMerge.stop(), { submits: 0, writes: 0, pipelines: 0 }, name);
          assert.equal(merged.out.buffer.size, 0);
          assert.deepEqual([...merged.out.shape], [...out2.shape]);
          merged.out.buffer.destroy();
          merged.lse.buffer.destroy();
        }
        for (const t of [q, k, v, out, out2, lse, again]) t.buffer.destroy();
      }
    }
    assert.equal(stats().liveBuffers, 0, "wgattn holds nothing");
  },
});
