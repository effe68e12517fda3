/**
 * The generated WGSL of every GPU backend stays small for small calls, so that their first call
 * compiles in seconds on a CPU adapter: lavapipe (cold cache) spent about a minute on a 88 KB
 * split-kv kernel for a `[1, 2, 8, 4]` query, and its compile time grows with the code. The kernels
 * are generated as a call would, but not compiled: `GpuCall.pipeline` is replaced for the test.
 * A size bound, not a timed test (speed goals live in benchmarks).
 */
import assert from "node:assert/strict";
import type { Backend } from "../backends/backend.ts";
import { BACKENDS } from "../backends/registry.ts";
import { runtimeFor } from "../core/device.ts";
import { GpuCall } from "../core/gpu.ts";
import { resolveProblem } from "../core/problem.ts";
import type { AttentionOptions, DType, HostTensor } from "../core/types.ts";
import { attentionForward, getDevice } from "../mod.ts";
import type { Kernel } from "../wgsl/common.ts";

/**
 * Most bytes of WGSL one kernel of a small call may have. The kernels of such calls measured up to
 * 23 KB, each compiling in 1 to 4 s of CPU on lavapipe, against 36 to 88 KB and 17 to 60 s before.
 */
export const SMALL_CALL_MAX_BYTES = 24 * 1024;

const device = await getDevice();
const caps = device ? (await runtimeFor(device)).caps : null;

const f16 = (n: number) => new Float16Array(n).fill(0.5);
function tensor(dtype: DType, n: number, s: number, d: number): HostTensor {
  const count = n * s * d;
  if (dtype === "f32") return { data: new Float32Array(count).fill(0.5), shape: [1, n, s, d] };
  if (dtype === "f16") return { data: f16(count), shape: [1, n, s, d] };
  return { data: new Uint16Array(count).fill(0x3f00), shape: [1, n, s, d], dtype: "bf16" };
}

interface SmallCall {
  sQ: number;
  sKv: number;
  d: number;
  n?: number;
  nKv?: number;
  dtype?: DType;
  options?: AttentionOptions;
}

/** Small calls: few query rows, few keys, every head dim a kernel is specialized for up to 64. */
const CALLS: SmallCall[] = [];
for (const d of [4, 8, 16, 32, 64]) {
  for (const [sQ, sKv] of [[1, 5], [4, 6], [8, 5], [16, 64]]) CALLS.push({ sQ, sKv, d });
}
CALLS.push({ sQ: 8, sKv: 40, d: 16, options: { isCausal: true } });
CALLS.push({ sQ: 4, sKv: 33, d: 64, n: 8, nKv: 2 });
CALLS.push({ sQ: 8, sKv: 16, d: 32, dtype: "f16" });
CALLS.push({ sQ: 8, sKv: 16, d: 32, dtype: "bf16" });
CALLS.push({
  sQ: 8,
  sKv: 16,
  d: 16,
  options: { keyPaddingMask: { data: new Uint8Array(16).fill(1), shape: [1, 16] } },
});

function callTensors(c: SmallCall) {
  const n = c.n ?? 2, dtype = c.dtype ?? "f32";
  return { q: tensor(dtype, n, c.sQ, c.d), kv: tensor(dtype, c.nKv ?? n, c.sKv, c.d) };
}

/** Why `backend` cannot serve the call on this device (empty when it can). */
function reasonsFor(backend: Backend, c: SmallCall): string[] {
  const { q, kv } = callTensors(c);
  return backend.unsupportedReasons(resolveProblem(q, kv, kv, c.options), caps);
}

/** The kernels a call would build on `backend`, without compiling or running them. */
async function kernelsOf(backend: string, c: SmallCall): Promise<Kernel[]> {
  const { q, kv } = callTensors(c);
  const seen: Kernel[] = [];
  const pipeline = GpuCall.prototype.pipeline;
  GpuCall.prototype.pipeline = (kernel: Kernel) => {
    seen.push(kernel);
    return Promise.reject(new Error("not compiled: tests/codesize_test.ts"));
  };
  try {
    await attentionForward(q, kv, kv, { ...c.options, backend }).catch(() => {});
  } finally {
    GpuCall.prototype.pipeline = pipeline;
  }
  return seen;
}

const describe = (c: SmallCall) =>
  `s_q ${c.sQ} s_kv ${c.sKv} d ${c.d}${c.n ? ` n ${c.n}/${c.nKv}` : ""}${c.dtype ? ` ${c.dtype}` : ""}${
    c.options ? ` ${Object.keys(c.options).join(",")}` : ""
  }`;

for (const backend of BACKENDS) {
  const servable = caps && backend.kind === "gpu"
    ? CALLS.filter((c) => reasonsFor(backend, c).length === 0)
    : [];
  const skip = backend.kind !== "gpu"
    ? "generates no WGSL"
    : caps === null
    ? "no WebGPU adapter"
    : servable.length === 0
    ? reasonsFor(backend, CALLS[0]).join("; ")
    : undefined;
  Deno.test({
    name: `codesize: ${backend.name}: each kernel of a small call is at most ${
      SMALL_CALL_MAX_BYTES / 1024
    } KB${skip ? ` [skipped: ${skip}]` : ""}`,
    ignore: skip !== undefined,
    fn: async () => {
      const sizes: string[] = [];
      for (const c of servable) {
        const kernels = await kernelsOf(backend.name, c);
        assert.ok(kernels.length > 0, `${backend.name}, ${describe(c)}: no kernel was built`);
        for (const k of kernels) {
          const lines = k.code.split("\n").length;
          sizes.push(`${describe(c)}: ${k.key} ${k.code.length} B ${lines} lines`);
          assert.ok(
            k.code.length <= SMALL_CALL_MAX_BYTES,
            `${backend.name}, ${describe(c)}: kernel ${k.key} is ${k.code.length} bytes (${lines} lines)`,
          );
        }
      }
      if (Deno.env.get("WGATTN_PRINT_SIZES")) console.log(sizes.join("\n"));
    },
  });
}
