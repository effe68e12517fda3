/**
 * Faults: the device lost between and during calls, out of memory, and a kernel that does not
 * compile. In each, a call either gives the right answer or rejects with a WgattnError (never a
 * wrong tensor), nothing is left allocated, and later calls work.
 */
import { engineAdapter, engineFor } from "../engines/select.ts";
import assert from "node:assert/strict";
import { defaultRuntime, runtimeFor } from "../core/device.ts";
import { debug } from "../core/gpu.ts";
import {
  attentionForward,
  attentionWithLse,
  availableBackends,
  explain,
  getDevice,
  type GpuTensor,
  type HostTensor,
  stats,
  WgattnError,
  type WgattnErrorCode,
} from "../mod.ts";
import { readBack } from "./conformance.ts";
import { rng } from "./reference.ts";

const runtime = await defaultRuntime();
const ignore = runtime === null;
const skip = ignore ? " [skipped: no WebGPU adapter]" : "";

const SHAPE = [1, 2, 24, 16];
const COUNT = 2 * 24 * 16;

function host(seed: number): HostTensor {
  const random = rng(seed);
  return { data: Float32Array.from({ length: COUNT }, () => random() * 2 - 1), shape: SHAPE };
}
const q = host(1), k = host(2), v = host(3);

function upload(device: GPUDevice, t: HostTensor): GpuTensor {
  const buffer = device.createBuffer({
    size: t.data.byteLength,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
  });
  device.queue.writeBuffer(buffer, 0, t.data as Float32Array<ArrayBuffer>);
  return { buffer, shape: t.shape, dtype: "f32" };
}

const bits = (t: HostTensor) => new Uint32Array((t.data as Float32Array).slice().buffer);

function isCode(code: WgattnErrorCode, message?: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof WgattnError, `expected a WgattnError, got ${e}`);
    assert.equal(e.code, code, e.message);
    if (message) assert.match(e.message, message);
    return true;
  };
}

Deno.test({
  name: `faults: device lost between calls: the next call acquires a new device, rebuilds and works${skip}`,
  ignore,
  fn: async () => {
    const before = (await getDevice())!;
    const expected = await attentionForward(q, k, v, { backend: "naive" });
    const gq = upload(before, q);
    before.destroy();
    await before.lost;
    const again = await attentionForward(q, k, v, { backend: "naive" });
    assert.deepEqual(bits(again), bits(expected), "same bits on the new device");
    const after = (await getDevice())!;
    assert.notEqual(after, before, "a new device was acquired");
    assert.equal((await runtimeFor(before)).broken.size, 0, "a lost device retires no backend");
    // Tensors of the lost device cannot be used on the new one: a clear error, not garbage.
    await assert.rejects(() => attentionForward(gq, gq, gq), isCode("INVALID_BUFFER", /another GPUDevice/));
    // The router's own choice rebuilds its pipelines on the new device too.
    const routed = await attentionForward(q, k, v);
    assert.ok(Math.max(...routed.data.map((x, i) => Math.abs(x - expected.data[i]))) < 1e-5);
  },
});

Deno.test({
  name: `faults: device destroyed during calls: each call gives the right answer or DEVICE_LOST${skip}`,
  ignore,
  fn: async () => {
    const expected = await attentionForward(q, k, v, { backend: "naive" });
    const expectedLse = (await attentionWithLse(q, k, v, { backend: "naive" })).lse;
    const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));
    const moments: [string, () => Promise<unknown>][] = [
      ["at once", () => Promise.resolve()],
      ["after a microtask", () => Promise.resolve().then(() => {})],
      ["after a macrotask", () => wait(0)],
      ["after 5 ms", () => wait(5)],
      ["after 30 ms", () => wait(30)],
    ];
    let lostCalls = 0, rightCalls = 0;
    for (const [when, moment] of moments) {
      const device = (await getDevice())!;
      const rt = await runtimeFor(device);
      const gq = upload(device, q), gk = upload(device, k), gv = upload(device, v);
      const calls: [string, Promise<unknown>][] = [
        ["host naive", attentionForward(q, k, v, { backend: "naive" })],
        ["host naive lse", attentionWithLse(q, k, v, { backend: "naive" })],
        ["host naive causal", attentionForward(q, k, v, { backend: "naive", isCausal: true })],
        ["gpu naive", attentionForward(gq, gk, gv, { backend: "naive" })],
        ["host cpu from gpu", attentionForward(gq, gk, gv, { backend: "cpu" })],
      ];
      await moment();
      device.destroy();
      const settled = await Promise.allSettled(calls.map(([, p]) => p));
      for (const [i, s] of settled.entries()) {
        const name = `${calls[i][0]} (destroyed ${when})`;
        if (s.status === "rejected") {
          isCode("DEVICE_LOST")(s.reason);
          assert.match(s.reason.message, /lost/, name);
          lostCalls++;
          continue;
        }
        rightCalls++;
        const value = s.value as HostTensor | GpuTensor | { out: HostTensor; lse: HostTensor };
        if ("lse" in value) {
          assert.deepEqual(bits(value.out), bits(expected), name);
          assert.deepEqual(bits(value.lse), bits(expectedLse), name);
        } else if ("data" in value) {
          // The causal call differs from the reference: only its shape and finiteness are known here.
          if (calls[i][0].includes("causal")) assert.ok(value.data.every(Number.isFinite), name);
          else assert.deepEqual(bits(value), bits(expected), name);
        } else {
          // Queued before the loss: a GPU tensor of the lost device, which the caller owns.
          assert.deepEqual([...value.shape], SHAPE, name);
          value.buffer.destroy();
        }
      }
      // Calls done before the destroy touched nothing lost: the runtime learns of the loss from the
      // device's own promise (its handler runs ahead of this one).
      await engineFor(device).hold(device.lost);
      assert.equal(rt.lost, true);
      assert.equal(rt.broken.size, 0, "a lost device retires no backend");
    }
    assert.ok(lostCalls > 0, "some calls were caught by the loss");
    // The library keeps working on a new device, with pipelines built again.
    const device = (await getDevice())!;
    const again = await attentionForward(q, k, v, { backend: "naive" });
    assert.deepEqual(bits(again), bits(expected));
    const gq = upload(device, q);
    const out = await attentionForward(gq, gq, gq, { backend: "naive" });
    assert.equal((await readBack(device, out.buffer, COUNT * 4)).byteLength, COUNT * 4);
    out.buffer.destroy();
    gq.buffer.destroy();
    assert.equal(stats().liveBuffers, 0, "nothing left allocated");
    console.log(`  ${lostCalls} calls rejected with DEVICE_LOST, ${rightCalls} gave the right result`);
  },
});

Deno.test({
  name: `faults: a device the caller gave is not replaced: DEVICE_LOST on each call after its loss${skip}`,
  ignore,
  fn: async () => {
    const mine = await (await engineAdapter())!.requestDevice();
    const ok = await attentionForward(q, k, v, { device: mine, backend: "naive" });
    mine.destroy();
    await mine.lost;
    for (let i = 0; i < 2; i++) {
      await assert.rejects(
        () => attentionForward(q, k, v, { device: mine, backend: "naive" }),
        isCode("DEVICE_LOST"),
      );
    }
    const gq = upload(mine, q);
    await assert.rejects(() => attentionForward(gq, gq, gq, { device: mine }), isCode("DEVICE_LOST"));
    // The default device is another one, untouched.
    const fine = await attentionForward(q, k, v, { backend: "naive" });
    assert.deepEqual(bits(fine), bits(ok));
  },
});

Deno.test({
  name: `faults: out of memory: a clear error, no partial output, nothing queued, later calls work${skip}`,
  ignore,
  fn: async () => {
    const expected = await attentionForward(q, k, v, { backend: "naive" });
    const device = (await getDevice())!;
    const gq = upload(device, q), gk = upload(device, k), gv = upload(device, v);
    const base = stats();
    const queue = device.queue as unknown as Record<string, unknown>;
    let queued = 0;
    const submit = device.queue.submit;
    queue.submit = function (this: GPUQueue, ...args: Parameters<GPUQueue["submit"]>) {
      queued++;
      return submit.apply(this, args);
    };
    try {
      // The device reports out-of-memory for one allocation: the output, the score scratch made
      // while recording, or a host tensor's upload (fault injection: a software adapter overcommits
      // memory, so it cannot be exhausted safely).
      for (const label of [/^wgattn output$/, /^naive scores$/, /^wgattn k$/, /^wgattn lse$/]) {
        debug.failAllocations = label;
        for (const [q0, k0, v0] of [[q, k, v], [gq, gk, gv]] as const) {
          if (label.source.includes(" k") && q0 === gq) continue; // GPU tensors are not uploaded
          await assert.rejects(
            () => attentionWithLse(q0, k0, v0, { backend: "naive" }),
            isCode("OUT_OF_MEMORY", /out of memory/),
          );
        }
      }
      assert.equal(queued, 0, "a call refused for memory queues nothing");
      assert.deepEqual(stats().liveBuffers, base.liveBuffers, "no buffer left behind");
      assert.deepEqual(stats().liveBytes, base.liveBytes);
    } finally {
      debug.failAllocations = null;
      delete queue.submit;
    }
    const after = await attentionForward(q, k, v, { backend: "naive" });
    assert.deepEqual(bits(after), bits(expected), "calls that fit still work");

    // A real device with the WebGPU default limits (256 MiB buffers): an output past them is
    // refused before anything is created.
    const small = await (await engineAdapter())!.requestDevice();
    try {
      const sQ = 8192, dV = (small.limits.maxBufferSize / 4 / sQ) * 2;
      const bq = { data: new Float32Array(sQ * 16).fill(0.1), shape: [1, 1, sQ, 16] };
      const bk = { data: new Float32Array(16).fill(0.1), shape: [1, 1, 1, 16] };
      const bv = { data: new Float32Array(dV).fill(0.1), shape: [1, 1, 1, dV] };
      await assert.rejects(
        () => attentionForward(bq, bk, bv, { device: small }),
        isCode("OUT_OF_MEMORY", /maxBufferSize/),
      );
      const fits = await attentionForward(q, k, v, { device: small, backend: "naive" });
      assert.deepEqual(bits(fits), bits(expected));
    } finally {
      small.destroy();
    }
    for (const t of [gq, gk, gv]) t.buffer.destroy();
  },
});

Deno.test({
  name: `faults: a kernel that fails to compile retires its backend, the router falls back${skip}`,
  ignore,
  fn: async () => {
    // A device of its own: what is retired on it stays on it.
    const device = await (await engineAdapter())!.requestDevice();
    const x = { data: new Float32Array(2 * 64 * 16).map((_, i) => Math.sin(i)), shape: [1, 2, 64, 16] };
    try {
      const first = await explain(x, x, x, { device });
      assert.equal(first.backend, "flash", first.text);
      const naive = await attentionForward(x, x, x, { device, backend: "naive" });
      debug.breakKernels = /^flash /;
      // The routed call falls back, and gives the fallback's answer.
      const out = await attentionForward(x, x, x, { device });
      assert.deepEqual(bits(out), bits(naive));
      const why = await explain(x, x, x, { device });
      assert.equal(why.backend, "naive", why.text);
      const flash = why.chain.find((c) => c.backend === "flash")!;
      assert.match(
        flash.reasons.join("; "),
        /kernel failed on this device: kernel flash .*failed to compile/,
      );
      assert.match(why.text, /failed to compile: .*(error|expected)/i, "the compiler's own words");
      const listed = (await availableBackends({ device })).find((b) => b.name === "flash")!;
      assert.equal(listed.available, false);
      assert.match(listed.reasons.join("; "), /failed to compile/);
      // Insisting on it is an error that says why.
      await assert.rejects(
        () => attentionForward(x, x, x, { device, backend: "flash" }),
        isCode("BACKEND_UNSUPPORTED", /failed to compile/),
      );
      // A forced backend whose kernel fails: the call fails (no silent fallback), the backend is
      // retired, and the router then goes down to what is left.
      debug.breakKernels = /^(flash|naive) /;
      await assert.rejects(
        () => attentionForward(x, x, x, { device, backend: "naive", isCausal: true }),
        isCode("GPU_ERROR", /failed to compile/),
      );
      const last = await explain(x, x, x, { device, isCausal: true });
      assert.equal(last.backend, "cpu", last.text);
      const cpu = await attentionForward(x, x, x, { device, isCausal: true });
      assert.deepEqual(cpu.shape, x.shape);
      // Other devices are untouched.
      assert.equal((await runtimeFor((await getDevice())!)).broken.size, 0);
    } finally {
      debug.breakKernels = null;
      device.destroy();
    }
  },
});

Deno.test({
  name: `faults: a host call whose uploads start before its encoding, served, retried and refused${skip}`,
  ignore,
  fn: async () => {
    // A device of its own: what is retired on it stays on it. Each tensor 512 KiB: together past the
    // 1 MiB from which a host call's uploads start beside its routing and encoding (EarlyUploads).
    const device = await (await engineAdapter())!.requestDevice();
    const random = rng(7);
    const shape = [1, 1, 1024, 128];
    const t = () => ({ data: Float32Array.from({ length: 1024 * 128 }, () => random() * 2 - 1), shape });
    const [x, y, z] = [t(), t(), t()];
    try {
      const base = stats().liveBuffers;
      const want = await attentionForward(x, y, z, { device, backend: "cpu" });
      const close = (got: HostTensor, what: string) => {
        let worst = 0;
        for (let i = 0; i < got.data.length; i++) {
          worst = Math.max(worst, Math.abs(got.data[i] - want.data[i]));
        }
        assert.ok(worst < 1e-5, `${what}: max abs ${worst}`);
      };
      const first = await explain(x, y, z, { device });
      close(await attentionForward(x, y, z, { device }), first.backend);
      assert.equal(stats().liveBuffers, base, "the served call left no buffer behind");
      // The chosen backend's kernel fails after the uploads started: the router falls back, and the
      // retry uploads again.
      debug.breakKernels = new RegExp(`^${first.backend} `);
      close(await attentionForward(x, y, z, { device }), `${first.backend} broken`);
      const next = await explain(x, y, z, { device });
      assert.notEqual(next.backend, first.backend, next.text);
      // Forced onto the broken backend: the call fails, and nothing it uploaded stays allocated.
      await assert.rejects(
        () => attentionForward(x, y, z, { device, backend: first.backend }),
        isCode("BACKEND_UNSUPPORTED", /failed to compile/),
      );
      assert.equal(stats().liveBuffers, base, "the refused call left no buffer behind");
    } finally {
      debug.breakKernels = null;
      device.destroy();
    }
  },
});
