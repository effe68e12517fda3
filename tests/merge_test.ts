/**
 * `mergeAttention`: attention over keys split into 2, 3 and 7 parts, causal or not, merged by the
 * parts' log-sum-exp, equals one call over all the keys; on the host and on the GPU (with few
 * bindings per shader, so several merge passes run). Also the router's handling of lse requests.
 */
import { engineAdapter } from "../engines/select.ts";
import assert from "node:assert/strict";
import type { Backend } from "../backends/backend.ts";
import { defaultRuntime, restrictLimits } from "../core/device.ts";
import { readBuffer } from "../core/gpu.ts";
import { resolveProblem } from "../core/problem.ts";
import { decide } from "../core/router.ts";
import {
  type AttentionOptions,
  attentionWithLse,
  type GpuTensor,
  type HostTensor,
  mergeAttention,
  WgattnError,
} from "../mod.ts";
import { errorStats, fromHostArray, randomLogical, rng, roundTo, toHostArray } from "./reference.ts";

const runtime = await defaultRuntime();
const ignore = runtime === null;

type DType = "f32" | "f16" | "bf16";
const TOL: Record<DType, number> = { f32: 2e-5, f16: 4e-3, bf16: 2e-2 };

interface Inputs {
  q: HostTensor;
  /** Logical [b, n_kv, s_kv, d] keys and values, rounded to the dtype. */
  k: Float64Array;
  v: Float64Array;
  b: number;
  nKv: number;
  sKv: number;
  d: number;
  dtype: DType;
}

function inputs(dtype: DType, b: number, n: number, nKv: number, sQ: number, sKv: number, d: number): Inputs {
  const random = rng(sKv * 31 + sQ);
  const q = randomLogical({ b, n, s: sQ, d }, random);
  const k = roundTo(randomLogical({ b, n: nKv, s: sKv, d }, random).data, dtype);
  const v = roundTo(randomLogical({ b, n: nKv, s: sKv, d }, random).data, dtype);
  return {
    q: { data: toHostArray(q.data, dtype), shape: [b, n, sQ, d], dtype },
    k,
    v,
    b,
    nKv,
    sKv,
    d,
    dtype,
  };
}

/** Keys [j0, j1) of a logical [b, n_kv, s_kv, d] tensor, as a host tensor. */
function keys(x: Inputs, t: Float64Array, j0: number, j1: number): HostTensor {
  const out = new Float64Array(x.b * x.nKv * (j1 - j0) * x.d);
  let o = 0;
  for (let bh = 0; bh < x.b * x.nKv; bh++) {
    for (let j = j0; j < j1; j++) {
      for (let c = 0; c < x.d; c++) out[o++] = t[(bh * x.sKv + j) * x.d + c];
    }
  }
  return { data: toHostArray(out, x.dtype), shape: [x.b, x.nKv, j1 - j0, x.d], dtype: x.dtype };
}

/**
 * Options for a part holding keys [j0, j1) of a call over `sKv` keys: causal limits stay where the
 * whole call puts them when the part's window reaches `sKv - j1` keys past its own end.
 */
function partOptions(causal: boolean, sKv: number, j1: number): AttentionOptions {
  return causal ? { windowSize: [-1, sKv - j1] } : {};
}

function cuts(sKv: number, parts: number): number[] {
  return Array.from({ length: parts + 1 }, (_, i) => Math.round((i * sKv) / parts));
}

function compare(
  out: Float64Array,
  lse: Float64Array,
  ref: { out: Float64Array; lse: Float64Array },
  dtype: DType,
) {
  const e = errorStats(out, ref.out);
  assert.equal(e.bad, 0, `NaN outputs (first at ${e.worst})`);
  assert.ok(e.maxAbs <= TOL[dtype], `out max abs error ${e.maxAbs} at ${e.worst}`);
  const l = errorStats(lse, ref.lse);
  assert.equal(
    l.bad,
    0,
    `lse: NaN or wrong infinity (first at ${l.worst}: ${lse[l.worst]} vs ${ref.lse[l.worst]})`,
  );
  assert.ok(l.maxAbs <= 2e-5 * 64, `lse max abs error ${l.maxAbs}`);
}

for (const causal of [false, true]) {
  for (const parts of [2, 3, 7]) {
    Deno.test({
      name: `merge: keys in ${parts} parts${causal ? ", causal" : ""}, host tensors, equal one call`,
      ignore,
      fn: async () => {
        const x = inputs("f32", 2, 4, 2, 5, 100, 32);
        const whole = await attentionWithLse(x.q, keys(x, x.k, 0, x.sKv), keys(x, x.v, 0, x.sKv), {
          isCausal: causal,
          backend: "cpu",
        });
        const c = cuts(x.sKv, parts);
        const pieces = [];
        for (let p = 0; p < parts; p++) {
          pieces.push(
            await attentionWithLse(x.q, keys(x, x.k, c[p], c[p + 1]), keys(x, x.v, c[p], c[p + 1]), {
              ...partOptions(causal, x.sKv, c[p + 1]),
            }),
          );
        }
        const m = await mergeAttention(pieces);
        assert.deepEqual(m.out.shape, whole.out.shape);
        assert.deepEqual(m.lse.shape, whole.lse.shape);
        compare(
          Float64Array.from(m.out.data),
          Float64Array.from(m.lse.data),
          { out: Float64Array.from(whole.out.data), lse: Float64Array.from(whole.lse.data) },
          "f32",
        );
      },
    });
  }
}

function upload(device: GPUDevice, t: HostTensor): GpuTensor {
  const buffer = device.createBuffer({
    size: Math.max(16, Math.ceil(t.data.byteLength / 16) * 16),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  const bytes = new Uint8Array(Math.ceil(t.data.byteLength / 4) * 4);
  bytes.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  device.queue.writeBuffer(buffer, 0, bytes);
  return { buffer, shape: t.shape, dtype: t.dtype ?? "f32" };
}

async function download(device: GPUDevice, t: GpuTensor): Promise<Float64Array> {
  const count = t.shape.reduce((a, b) => a * b, 1);
  const raw = await readBuffer(device, t.buffer, count * (t.dtype === "f32" ? 4 : 2));
  const arr = t.dtype === "f32"
    ? new Float32Array(raw)
    : t.dtype === "f16"
    ? new Float16Array(raw)
    : new Uint16Array(raw);
  return fromHostArray(arr, t.dtype);
}

// A device of its own with 8 storage bindings per shader: 7 parts take three merge passes.
const device = runtime
  ? await (await engineAdapter())!.requestDevice({
    requiredFeatures: [...runtime.device.features].filter((f) => f === "shader-f16") as GPUFeatureName[],
  })
  : null;
if (device) await restrictLimits(device, { maxStorageBuffersPerShaderStage: 8 });

for (
  const [dtype, parts, causal] of [["f32", 7, true], ["f16", 3, false], ["bf16", 7, false], [
    "f32",
    2,
    false,
  ]] as const
) {
  Deno.test({
    name: `merge: GPU parts (${dtype}, ${parts} parts${
      causal ? ", causal" : ""
    }) merged on the GPU equal one call`,
    ignore,
    fn: async () => {
      const x = inputs(dtype, 1, 4, 2, 3, 90, 64);
      const opts = { device: device! };
      const whole = await attentionWithLse(x.q, keys(x, x.k, 0, x.sKv), keys(x, x.v, 0, x.sKv), {
        isCausal: causal,
        backend: "cpu",
      });
      const q = upload(device!, x.q);
      const c = cuts(x.sKv, parts);
      const pieces = [];
      for (let p = 0; p < parts; p++) {
        const k = upload(device!, keys(x, x.k, c[p], c[p + 1]));
        const v = upload(device!, keys(x, x.v, c[p], c[p + 1]));
        pieces.push(await attentionWithLse(q, k, v, { ...opts, ...partOptions(causal, x.sKv, c[p + 1]) }));
      }
      const m = await mergeAttention(pieces, opts);
      assert.equal(m.out.dtype, dtype);
      compare(
        await download(device!, m.out),
        await download(device!, m.lse),
        { out: fromHostArray(whole.out.data, dtype), lse: Float64Array.from(whole.lse.data) },
        dtype,
      );
    },
  });
}

Deno.test({
  name: "merge: another layout, rows that no part sees, one part alone",
  ignore,
  fn: async () => {
    // Parts in "b s n d"; row 0 of the second batch sees no key in any part.
    const b = 2, s = 3, n = 2, d = 8;
    const out = (seed: number) => Float32Array.from({ length: b * s * n * d }, (_, i) => Math.sin(i + seed));
    const lse = (seed: number) =>
      Float32Array.from(
        { length: b * n * s },
        (_, r) => (r === n * s || r === n * s + 1 ? -Infinity : (r % 5) + seed),
      );
    const parts = [0, 1].map((seed) => ({
      out: { data: out(seed), shape: [b, s, n, d] },
      lse: { data: lse(seed), shape: [b, n, s] },
    }));
    const host = await mergeAttention(parts, { outPattern: "b s n d" });
    const gpu = await mergeAttention(
      parts.map((p) => ({ out: upload(runtime!.device, p.out), lse: upload(runtime!.device, p.lse) })),
      { outPattern: "b s n d" },
    );
    const gOut = await download(runtime!.device, gpu.out), gLse = await download(runtime!.device, gpu.lse);
    for (let bb = 0; bb < b; bb++) {
      for (let i = 0; i < s; i++) {
        for (let h = 0; h < n; h++) {
          const row = (bb * n + h) * s + i;
          const [l0, l1] = [parts[0].lse.data[row], parts[1].lse.data[row]];
          const lse = l0 === -Infinity ? -Infinity : Math.log(Math.exp(l0) + Math.exp(l1));
          assert.ok(Math.abs(host.lse.data[row] - lse) < 1e-5 || host.lse.data[row] === lse, `row ${row}`);
          assert.ok(Math.abs(gLse[row] - lse) < 1e-5 || gLse[row] === lse, `gpu row ${row}`);
          for (let c = 0; c < d; c++) {
            const at = ((bb * s + i) * n + h) * d + c;
            const want = l0 === -Infinity
              ? 0
              : (Math.exp(l0 - lse) * parts[0].out.data[at] + Math.exp(l1 - lse) * parts[1].out.data[at]);
            assert.ok(
              Math.abs(host.out.data[at] - want) < 1e-5,
              `host ${at}: ${host.out.data[at]} vs ${want}`,
            );
            assert.ok(Math.abs(gOut[at] - want) < 1e-5, `gpu ${at}: ${gOut[at]} vs ${want}`);
          }
        }
      }
    }
    // One part alone comes back as it is, zeros where its lse is -inf.
    const one = await mergeAttention([parts[0]], { outPattern: "b s n d" });
    for (let at = 0; at < one.out.data.length; at++) {
      const [bb, i, h] = [Math.floor(at / (s * n * d)), Math.floor(at / (n * d)) % s, Math.floor(at / d) % n];
      const dead = parts[0].lse.data[(bb * n + h) * s + i] === -Infinity;
      assert.equal(one.out.data[at], dead ? 0 : parts[0].out.data[at]);
    }
    assert.deepEqual([...one.lse.data], [...parts[0].lse.data]);
  },
});

Deno.test({
  name: "merge: bad parts are WgattnErrors naming the part",
  ignore,
  fn: async () => {
    const t = (shape: number[]) => ({ data: new Float32Array(shape.reduce((a, b) => a * b, 1)), shape });
    const good = { out: t([1, 2, 3, 4]), lse: t([1, 2, 3]) };
    const cases: [unknown, string, string][] = [
      [[], "INVALID_OPTION", "parts"],
      [[good, { out: t([1, 2, 3, 8]), lse: t([1, 2, 3]) }], "SHAPE_MISMATCH", "parts[1].out"],
      [[good, { out: t([1, 2, 3, 4]), lse: t([1, 2, 4]) }], "SHAPE_MISMATCH", "parts[1].lse"],
      [
        [good, { out: { data: new Float16Array(24), shape: [1, 2, 3, 4] }, lse: t([1, 2, 3]) }],
        "DTYPE_MISMATCH",
        "parts[1].out",
      ],
      [
        [good, { out: upload(runtime!.device, good.out), lse: t([1, 2, 3]) }],
        "INVALID_BUFFER",
        "parts[1].out",
      ],
    ];
    for (const [parts, code, argument] of cases) {
      await assert.rejects(
        () => mergeAttention(parts as never),
        (e: unknown) => e instanceof WgattnError && e.code === code && e.argument === argument,
        `${code} ${argument}`,
      );
    }
  },
});

Deno.test("router: a call that wants the lse passes over backends that cannot write it", () => {
  const fake = (name: string, producesLse: boolean): Backend => ({
    kind: "cpu",
    name,
    aliases: [],
    summary: name,
    producesLse,
    unsupportedReasons: () => [],
    compute: () => {},
  });
  const registry = [fake("fast", false), fake("slow", true)];
  const t = { data: new Float32Array(16), shape: [1, 1, 1, 16] };
  const p = resolveProblem(t, t, t);
  assert.equal(decide(p, null, registry).backend.name, "fast");
  const d = decide(p, null, registry, { wantLse: true });
  assert.equal(d.backend.name, "slow");
  assert.match(d.chain[0].reasons.join(" "), /log-sum-exp/);
  assert.throws(
    () => decide(p, null, registry, { wantLse: true, requested: "fast" }),
    (e: unknown) => e instanceof WgattnError && e.code === "BACKEND_UNSUPPORTED",
  );
});
