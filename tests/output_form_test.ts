/**
 * The output has q's form, in its TypeScript type and at run time: f32 in, `Float32Array` out (not
 * a union of three arrays); ONNX-style `{ data, dims, type }` in, the same form out (output, lse and
 * merged); a `Uint16Array` of f16 bits in, a `Uint16Array` out. The type checks are compile-time:
 * this file does not type-check if a type is wrong.
 */
import assert from "node:assert/strict";
import {
  attentionForward,
  attentionWithLse,
  type GpuTensor,
  type HostData,
  type HostTensor,
  mergeAttention,
} from "../mod.ts";

type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends (<T>() => T extends B ? 1 : 2) ? true : false;
/** Compiles only when `A` and `B` are the same type. */
function sameType<A, B>(_proof: Equal<A, B>): void {}

const shape = [1, 2, 4, 8];
const count = 64;
const values = () => Float32Array.from({ length: count }, (_, i) => Math.sin(i));
const bits16 = (x: Float16Array) => new Uint16Array(x.buffer, x.byteOffset, x.length);
/** The form is the API's, whatever the backend: naive's small kernels keep this file fast on every engine. */
const NAIVE = { backend: "naive" };

Deno.test("output form: the types follow q's array and dtype", async () => {
  const f32 = { data: values(), shape };
  const out = await attentionForward(f32, f32, f32, NAIVE);
  sameType<typeof out.data, Float32Array<ArrayBuffer>>(true);
  sameType<typeof out.dtype, "f32">(true);
  assert.ok(out.data instanceof Float32Array);

  const f16 = { data: Float16Array.from(values()), shape };
  const out16 = await attentionForward(f16, f16, f16, NAIVE);
  sameType<typeof out16.data, Float16Array<ArrayBuffer>>(true);
  sameType<typeof out16.dtype, "f16">(true);
  assert.ok(out16.data instanceof Float16Array);

  const bf16 = { data: new Uint16Array(count).fill(0x3f80), shape, dtype: "bf16" as const };
  const { out: outBf, lse } = await attentionWithLse(bf16, bf16, bf16, NAIVE);
  sameType<typeof outBf.data, Uint16Array<ArrayBuffer>>(true);
  sameType<typeof outBf.dtype, "bf16">(true);
  sameType<typeof lse.data, Float32Array<ArrayBuffer>>(true);
  sameType<typeof lse.dtype, "f32">(true);
  assert.ok(outBf.data instanceof Uint16Array && lse.data instanceof Float32Array);

  // A tensor typed only as HostTensor: the type cannot tell the array.
  const wide: HostTensor = f32;
  const outWide = await attentionForward(wide, wide, wide, NAIVE);
  sameType<typeof outWide.data, HostData>(true);

  const merged = await mergeAttention([{ out, lse: (await attentionWithLse(f32, f32, f32, NAIVE)).lse }]);
  sameType<typeof merged.out.data, Float32Array<ArrayBuffer>>(true);
  sameType<typeof merged.lse.data, Float32Array<ArrayBuffer>>(true);

  // GPU q: a GPU tensor of q's dtype (compile-time only: this closure never runs).
  const _gpu = async (q: GpuTensor & { dtype: "f16" }) => {
    const r = await attentionForward(q, q, q, NAIVE);
    sameType<typeof r.dtype, "f16">(true);
    sameType<typeof r.buffer, GPUBuffer>(true);
    const { lse } = await attentionWithLse(q, q, q, NAIVE);
    sameType<typeof lse.dtype, "f32">(true);
  };
});

Deno.test("output form: ONNX-style { data, dims, type } in, the same form out", async () => {
  const ort = { data: values(), dims: shape, type: "float32" as const };
  const out = await attentionForward(ort, ort, ort, NAIVE);
  sameType<typeof out.type, "float32">(true);
  sameType<typeof out.data, Float32Array<ArrayBuffer>>(true);
  assert.deepEqual(Object.keys(out).sort(), ["data", "dims", "type"]);
  assert.deepEqual([...out.dims], shape);
  assert.equal(out.type, "float32");

  const plain = { data: ort.data, shape };
  const host = await attentionForward(plain, plain, plain, NAIVE);
  assert.deepEqual(out.data, host.data, "the same numbers as host tensors give");

  const { out: o2, lse } = await attentionWithLse(ort, ort, ort, NAIVE);
  sameType<typeof lse.type, "float32">(true);
  assert.deepEqual(Object.keys(o2).sort(), ["data", "dims", "type"]);
  assert.deepEqual(Object.keys(lse).sort(), ["data", "dims", "type"]);
  assert.deepEqual([...lse.dims], [1, 2, 4]);
  assert.equal(lse.type, "float32");

  const merged = await mergeAttention([{ out: o2, lse }, { out: o2, lse }]);
  sameType<typeof merged.out.type, "float32">(true);
  assert.deepEqual(Object.keys(merged.out).sort(), ["data", "dims", "type"]);
  assert.deepEqual(Object.keys(merged.lse).sort(), ["data", "dims", "type"]);

  // ONNX float16 as ORT Web holds it: Uint16Array bits in, Uint16Array bits out.
  const half = { data: bits16(Float16Array.from(values())), dims: shape, type: "float16" as const };
  const out16 = await attentionForward(half, half, half, NAIVE);
  sameType<typeof out16.data, Uint16Array<ArrayBuffer>>(true);
  sameType<typeof out16.type, "float16">(true);
  assert.ok(out16.data instanceof Uint16Array);
  assert.equal(out16.type, "float16");
});

Deno.test("output form: a Uint16Array of f16 bits in gives a Uint16Array of the same bits out", async () => {
  const f16 = Float16Array.from(values());
  const asBits = { data: bits16(f16), shape, dtype: "f16" as const };
  const out = await attentionForward(asBits, asBits, asBits, NAIVE);
  sameType<typeof out.data, Uint16Array<ArrayBuffer>>(true);
  sameType<typeof out.dtype, "f16">(true);
  assert.ok(out.data instanceof Uint16Array);
  assert.equal(out.dtype, "f16");
  const plain = { data: f16, shape };
  const native = await attentionForward(plain, plain, plain, NAIVE);
  assert.deepEqual(out.data, bits16(native.data));
});

// options.out: the caller's array receives the output and is returned as the result's data, on the
// GPU path (read back straight into it) and the CPU path (copied in) alike, bit for bit the result
// a call without it gives; the array is poisoned first so that a partial write shows.
Deno.test("output form: options.out receives the output, on a GPU backend and on the CPU one", async () => {
  const f32 = { data: values(), shape };
  const mk = (seed: number) => ({
    data: Float32Array.from({ length: count }, (_, i) => Math.cos(i * seed)),
    shape,
  });
  const [q, k, v] = [f32, mk(2), mk(3)];
  for (const backend of ["naive", "cpu"]) {
    const fresh = await attentionForward(q, k, v, { backend, isCausal: true });
    const out = new Float32Array(count).fill(NaN);
    const got = await attentionForward(q, k, v, { backend, isCausal: true, out });
    sameType<typeof got.data, Float32Array<ArrayBuffer>>(true);
    assert.equal(got.data, out, `${backend}: the result is options.out itself`);
    assert.deepEqual(Array.from(out), Array.from(fresh.data), `${backend}: the same values`);
  }
  // A view into a larger buffer: only its own bytes are written.
  const backing = new Float32Array(count + 8).fill(-7);
  const view = backing.subarray(4, 4 + count);
  await attentionForward(q, k, v, { backend: "naive", out: view });
  assert.deepEqual(Array.from(backing.subarray(0, 4)), [-7, -7, -7, -7]);
  assert.deepEqual(Array.from(backing.subarray(4 + count)), Array(4).fill(-7));
  assert.ok(view.every(Number.isFinite));
  // 16-bit q in a Uint16Array: a Uint16Array out; ONNX-style q: the same form, its data the array;
  // with the lse; an empty call (s_kv 0) writes zeros.
  const u16 = { data: bits16(Float16Array.from(values())), shape, dtype: "f16" as const };
  const out16 = new Uint16Array(count).fill(0x7e00);
  const r16 = await attentionForward(u16, u16, u16, { backend: "naive", out: out16 });
  assert.equal(r16.data, out16);
  assert.deepEqual(
    Array.from(out16),
    Array.from((await attentionForward(u16, u16, u16, { backend: "naive" })).data),
  );
  const ort = { data: values(), dims: shape, type: "float32" as const };
  const outOrt = new Float32Array(count);
  const rOrt = await attentionForward(ort, ort, ort, { backend: "naive", out: outOrt });
  assert.equal(rOrt.data, outOrt);
  const outLse = new Float32Array(count).fill(NaN);
  const withLse = await attentionWithLse(q, k, v, { backend: "naive", out: outLse });
  assert.equal(withLse.out.data, outLse);
  assert.ok(outLse.every(Number.isFinite) && withLse.lse.data.length === 8);
  const none = { data: new Float32Array(0), shape: [1, 2, 0, 8] };
  const outEmpty = new Float32Array(count).fill(NaN);
  await attentionForward(q, none, none, { out: outEmpty });
  assert.ok(outEmpty.every((x) => x === 0), "an empty call's zeros");
  // An output of 1 MiB or more is read back by several threads on Dawn (engines/host_copy.ts): into a
  // view at an offset of a larger array too.
  const big = [1, 2, 512, 256], n = 2 * 512 * 256;
  const bq = { data: Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37)), shape: big };
  const freshBig = await attentionForward(bq, bq, bq, { backend: "naive" });
  const host = new Float32Array(n + 64).fill(NaN);
  const inView = host.subarray(16, 16 + n);
  const rBig = await attentionForward(bq, bq, bq, { backend: "naive", out: inView });
  assert.equal(rBig.data, inView);
  assert.ok(host.subarray(0, 16).every(Number.isNaN) && host.subarray(16 + n).every(Number.isNaN));
  assert.ok(inView.every((x, i) => x === freshBig.data[i]), "the same values through the threaded copy");
});
