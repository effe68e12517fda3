/**
 * `mergeAttention`: attention over the union of disjoint key sets, from each set's output and
 * log-sum-exp. On the host in float64 for host tensors; on the GPU (wgsl/merge.ts, nothing waits)
 * for GPU tensors.
 */
import { WgattnError } from "./errors.ts";
import { checkOptions, GPU_DEVICE_RULE } from "./options.ts";
import { defaultRuntime, type GpuRuntime, runtimeFor } from "./device.ts";
import { GpuCall, releaseBuffer, untrackBuffer } from "./gpu.ts";
import { type AxisRecord, resolveLayout } from "./layout.ts";
import {
  DTYPE_BYTES,
  elementCount,
  float64ToHost,
  hostToFloat64,
  inFormOf,
  type Operand,
  toOperand,
} from "./tensor.ts";
import type { AttentionOutput, DType, GpuTensor, HostTensor, LseOutput, TensorInput } from "./types.ts";
import { MERGE_THREADS, type MergeConfig, mergeKernel } from "../wgsl/merge.ts";

/** One part of {@link mergeAttention}: attention over one key set, with its log-sum-exp. */
export interface AttentionPart<T extends TensorInput = TensorInput, L extends TensorInput = TensorInput> {
  /** Output over this part's keys, in the layout of `options.outPattern`. */
  out: T;
  /** f32 `[b, n, s_q]` log-sum-exp of each row over this part's keys (`-Infinity`: none seen). */
  lse: L;
}

/** Options of {@link mergeAttention}. */
export interface MergeOptions {
  /** Axis order of every part's `out` and of the result. Default `"b n s d"`. */
  outPattern?: string;
  /** The `GPUDevice` the parts live on (GPU parts); by default the one wgattn uses. */
  device?: GPUDevice;
}

/** Output and log-sum-exp over the union of the parts' keys. */
export interface MergedAttention<T, L = T> {
  /** In the parts' layout, dtype and form. */
  out: T;
  /** f32 `[b, n, s_q]`. */
  lse: L;
}

interface Validated {
  outs: Operand[];
  lses: Operand[];
  b: number;
  n: number;
  sQ: number;
  dV: number;
  dtype: DType;
  strides: AxisRecord;
  shape: readonly number[];
  residency: "host" | "gpu";
}

function validate(parts: readonly AttentionPart[], options: MergeOptions): Validated {
  if (!Array.isArray(parts) || parts.length === 0) {
    throw new WgattnError("INVALID_OPTION", "mergeAttention needs at least one part", {
      argument: "parts",
      expected: "a non-empty array of { out, lse }",
      actual: Array.isArray(parts) ? "[]" : typeof parts,
    });
  }
  const outs: Operand[] = [], lses: Operand[] = [];
  parts.forEach((part, i) => {
    if (part === null || typeof part !== "object") {
      throw new WgattnError("INVALID_OPTION", `parts[${i}] must be { out, lse }`, {
        argument: `parts[${i}]`,
        expected: "{ out, lse }",
        actual: String(part),
      });
    }
    outs.push(toOperand(part.out, `parts[${i}].out`));
    lses.push(toOperand(part.lse, `parts[${i}].lse`));
  });
  const first = outs[0], lse0 = lses[0];
  outs.forEach((o, i) => {
    for (const t of [o, lses[i]]) {
      if (t.residency !== first.residency) {
        throw new WgattnError("INVALID_BUFFER", "parts must all be host tensors or all GPU tensors", {
          argument: t === o ? `parts[${i}].out` : `parts[${i}].lse`,
          expected: `a ${first.residency} tensor, as parts[0].out`,
          actual: `a ${t.residency} tensor`,
        });
      }
    }
    if (o.dtype !== first.dtype) {
      throw new WgattnError("DTYPE_MISMATCH", "every part's out must have one dtype", {
        argument: `parts[${i}].out`,
        expected: first.dtype,
        actual: o.dtype,
      });
    }
    if (o.shape.length !== first.shape.length || o.shape.some((x, a) => x !== first.shape[a])) {
      throw new WgattnError("SHAPE_MISMATCH", "every part's out must have one shape", {
        argument: `parts[${i}].out`,
        expected: `[${first.shape}]`,
        actual: `[${o.shape}]`,
      });
    }
    const l = lses[i];
    if (l.dtype !== "f32") {
      throw new WgattnError("UNSUPPORTED_DTYPE", "a part's lse must be f32", {
        argument: `parts[${i}].lse`,
        expected: "f32",
        actual: l.dtype,
      });
    }
    if (l.shape.length !== 3 || l.shape.some((x, a) => x !== lse0.shape[a])) {
      throw new WgattnError("SHAPE_MISMATCH", "every part's lse must be [b, n, s_q], one shape", {
        argument: `parts[${i}].lse`,
        expected: l.shape.length !== 3 ? "3 axes [b, n, s_q]" : `[${lse0.shape}]`,
        actual: `[${l.shape}]`,
      });
    }
  });
  const [b, n, sQ] = lse0.shape;
  const layout = resolveLayout(
    options.outPattern ?? "b n s d",
    first.shape,
    { b: { value: b, from: "lse" }, n: { value: n, from: "lse" }, s: { value: sQ, from: "lse" } },
    "parts[0].out",
    "options.outPattern",
  );
  if (layout.sizes.d === 0) {
    throw new WgattnError("INVALID_SHAPE", "a part's head dim must be at least 1", {
      argument: "parts[0].out",
      expected: "d >= 1 (b, n and s_q may be 0)",
      actual: `d = 0 in shape [${first.shape}]`,
    });
  }
  return {
    outs,
    lses,
    b,
    n,
    sQ,
    dV: layout.sizes.d,
    dtype: first.dtype,
    strides: layout.strides,
    shape: first.shape,
    residency: first.residency,
  };
}

function mergeOnHost(v: Validated): MergedAttention<HostTensor> {
  const data = (o: Operand) => (o.residency === "host" ? o.data : new Float32Array(0));
  const outs = v.outs.map((o) => hostToFloat64(data(o), o.dtype));
  const lses = v.lses.map((l) => data(l) as Float32Array);
  const out = new Float64Array(outs[0].length);
  const lse = new Float32Array(v.b * v.n * v.sQ);
  const s = v.strides;
  const w = new Float64Array(outs.length);
  for (let b = 0; b < v.b; b++) {
    for (let h = 0; h < v.n; h++) {
      for (let i = 0; i < v.sQ; i++) {
        const row = (b * v.n + h) * v.sQ + i;
        let m = -Infinity;
        for (const l of lses) if (l[row] > m) m = l[row];
        let total = 0;
        for (let p = 0; p < lses.length; p++) {
          w[p] = lses[p][row] === -Infinity ? 0 : Math.exp(lses[p][row] - m);
          total += w[p];
        }
        const live = m !== -Infinity && total > 0;
        lse[row] = live ? m + Math.log(total) : (Number.isNaN(total) ? NaN : -Infinity);
        const base = b * s.b + h * s.n + i * s.s;
        for (let c = 0; c < v.dV; c++) {
          const at = base + c * s.d;
          let acc = 0;
          if (live) { for (let p = 0; p < outs.length; p++) if (w[p] !== 0) acc += w[p] * outs[p][at]; }
          out[at] = live ? acc / total : 0;
        }
      }
    }
  }
  return {
    out: { data: float64ToHost(out, v.dtype), shape: [...v.shape], dtype: v.dtype },
    lse: { data: lse, shape: [v.b, v.n, v.sQ], dtype: "f32" },
  };
}

/**
 * No rows (b, n or s_q of 0): empty buffers (WebGPU allows size 0; they are never bound), no
 * dispatch, nothing queued.
 */
function emptyMerge(v: Validated, rt: GpuRuntime): MergedAttention<GpuTensor> {
  if (rt.lost) {
    throw new WgattnError("DEVICE_LOST", "the GPU device was lost before mergeAttention", {
      expected: "a live device",
      actual: "lost",
    });
  }
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  return {
    out: {
      buffer: rt.device.createBuffer({ size: 0, usage, label: "wgattn merged output (empty)" }),
      shape: [...v.shape],
      dtype: v.dtype,
    },
    lse: {
      buffer: rt.device.createBuffer({ size: 0, usage, label: "wgattn merged lse (empty)" }),
      shape: [v.b, v.n, v.sQ],
      dtype: "f32",
    },
  };
}

async function mergeOnGpu(v: Validated, rt: GpuRuntime): Promise<MergedAttention<GpuTensor>> {
  if (v.b * v.n * v.sQ === 0) return emptyMerge(v, rt);
  const caps = rt.caps;
  const f16 = v.dtype === "f16" && caps.shaderF16;
  const pairs = v.dtype !== "f32" && !f16;
  if (pairs && (v.strides.d !== 1 || v.dV % 2 !== 0)) {
    throw new WgattnError(
      "UNSUPPORTED_DTYPE",
      `merging ${v.dtype} parts on this device needs a contiguous even d`,
      {
        argument: "parts",
        expected: v.dtype === "bf16"
          ? "an out layout whose head dim is contiguous and even (bf16 is written in pairs: WGSL has no bf16 type)"
          : "shader-f16, or an out layout whose head dim is contiguous and even",
        actual: `d = ${v.dV}, stride ${v.strides.d}`,
      },
    );
  }
  const rows = v.b * v.n * v.sQ;
  const outBytes = elementCount(v.shape) * DTYPE_BYTES[v.dtype];
  const limit = caps.limits.maxStorageBufferBindingSize;
  for (const [name, bytes] of [["out", outBytes], ["acc", rows * v.dV * 4]] as const) {
    if (bytes > limit) {
      throw new WgattnError(
        "OUT_OF_MEMORY",
        `mergeAttention: each part's ${name} must fit one storage binding`,
        {
          argument: "parts",
          expected: `at most ${limit} bytes (maxStorageBufferBindingSize)`,
          actual: `${bytes} bytes`,
        },
      );
    }
  }
  const call = new GpuCall(rt, "wgattn merge");
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  let out: GPUBuffer | null = null, lse: GPUBuffer | null = null;
  try {
    out = call.createBuffer(outBytes, usage, "wgattn merged output");
    lse = call.createBuffer(rows * 4, usage, "wgattn merged lse");
    const budget = caps.limits.maxStorageBuffersPerShaderStage;
    const buffers = (o: Operand) => (o.residency === "gpu" ? o.buffer : out!);
    let next = 0;
    let acc: GPUBuffer | null = null;
    const accLse: GPUBuffer[] = [];
    let cur = 0; // which of accLse holds the accumulator's lse
    while (true) {
      const left = v.outs.length - next;
      const final = 2 * left + (acc ? 4 : 2) <= budget;
      const take = final ? left : Math.max(1, Math.floor((budget - (acc ? 3 : 2)) / 2));
      const c: MergeConfig = {
        dtype: v.dtype,
        f16,
        parts: take,
        accIn: acc !== null,
        toAcc: !final,
        weighted: true,
        lseOut: true,
        pairs: final && pairs,
      };
      const bind: Record<string, GPUBuffer> = {};
      if (!acc && !final) {
        acc = call.scratch(rows * v.dV * 4, "wgattn merge accumulator");
        accLse.push(
          call.scratch(rows * 4, "wgattn merge lse 0"),
          call.scratch(rows * 4, "wgattn merge lse 1"),
        );
        bind.acc = acc;
        bind.acc_lse_out = accLse[0];
      } else if (acc) {
        bind.acc = acc;
        bind.acc_lse_in = accLse[cur];
        if (!final) bind.acc_lse_out = accLse[1 - cur];
      }
      for (let i = 0; i < take; i++) {
        bind[`p${i}`] = buffers(v.outs[next + i]);
        bind[`l${i}`] = buffers(v.lses[next + i]);
      }
      if (final) {
        bind.o = out;
        bind.lse = lse;
      }
      const kernel = mergeKernel(c);
      const pipe = await call.pipeline(kernel);
      const per = c.pairs ? 2 : 1;
      const o = final ? v.strides : { b: 0, n: 0, s: 0, d: 0 };
      call.dispatch(pipe, kernel, bind, {
        rows,
        n: v.n,
        s_q: v.sQ,
        d_v: v.dV,
        p_sb: v.strides.b,
        p_sh: v.strides.n,
        p_ss: v.strides.s,
        p_sd: v.strides.d,
        o_sb: o.b,
        o_sh: o.n,
        o_ss: o.s,
        o_sd: o.d,
        o_base: 0,
        l_base: 0,
      }, Math.ceil((rows * Math.ceil(v.dV / per)) / MERGE_THREADS));
      next += take;
      if (final) break;
      cur = c.accIn ? 1 - cur : 0;
    }
  } catch (e) {
    call.abandon();
    if (out) releaseBuffer(out);
    if (lse) releaseBuffer(lse);
    if (e instanceof WgattnError) throw e;
    throw new WgattnError("GPU_ERROR", `mergeAttention failed: ${(e as Error).message}`);
  }
  // Each allocation's error scope was popped right away (GpuCall.errors): concurrent calls stay apart.
  const { outOfMemory: oom, validation } = await call.errors();
  if (oom || validation || rt.lost) {
    call.abandon();
    releaseBuffer(out);
    releaseBuffer(lse);
    if (rt.lost) {
      throw new WgattnError("DEVICE_LOST", "the GPU device was lost during mergeAttention", {
        expected: "a live device",
        actual: "lost",
      });
    }
    if (!oom) {
      throw new WgattnError("GPU_ERROR", `mergeAttention: the device refused: ${validation!.message}`);
    }
    throw new WgattnError("OUT_OF_MEMORY", `the GPU ran out of memory: ${oom.message}`, {
      expected: "buffers that fit in device memory",
      actual: `${rows} rows of ${v.dV}`,
    });
  }
  const refused = await call.submit();
  if (refused) {
    releaseBuffer(out);
    releaseBuffer(lse);
    throw new WgattnError("GPU_ERROR", `mergeAttention: the device refused the work: ${refused.message}`);
  }
  untrackBuffer(out);
  untrackBuffer(lse);
  return {
    out: { buffer: out, shape: [...v.shape], dtype: v.dtype },
    lse: { buffer: lse, shape: [v.b, v.n, v.sQ], dtype: "f32" },
  };
}

/**
 * Attention over the union of disjoint key sets, from each set's output and log-sum-exp (as
 * {@link attentionWithLse} returns them): exactly the attention one call over all the keys gives,
 * up to rounding. Host parts are merged on the host; GPU parts on the GPU, queued without waiting.
 *
 * Each row weighs part p by `exp(lse_p - lse)`, where `lse = log(sum_p exp(lse_p))`; a part that saw
 * no key for a row (`lse_p = -Infinity`) adds nothing, and a row no part saw gives zeros.
 *
 * @example
 * ```ts
 * import { attentionWithLse, mergeAttention } from "jsr:@wgattn/attention";
 * const t = (s: number) => ({ data: Float32Array.from({ length: s * 16 }, () => Math.random() - 0.5), shape: [1, 1, s, 16] });
 * const q = t(4), k1 = t(8), v1 = t(8), k2 = t(8), v2 = t(8);
 * const parts = [await attentionWithLse(q, k1, v1), await attentionWithLse(q, k2, v2)];
 * const { out, lse } = await mergeAttention(parts); // as attention over the 16 keys of k1 and k2
 * console.log(out.shape, lse.shape); // [1, 1, 4, 16] [1, 1, 4]
 * ```
 */
export async function mergeAttention<T extends TensorInput>(
  parts: readonly AttentionPart<T>[],
  options: MergeOptions = {},
): Promise<MergedAttention<AttentionOutput<T>, LseOutput<T>>> {
  checkOptions(options, { outPattern: "string", device: GPU_DEVICE_RULE });
  const v = validate(parts, options ?? {});
  type R = MergedAttention<AttentionOutput<T>, LseOutput<T>>;
  // The result in the form of parts[0].out (ONNX-style in, ONNX-style out; a Uint16Array of f16 stays one).
  const like = (m: MergedAttention<HostTensor | GpuTensor>) =>
    ({ out: inFormOf(parts[0].out, m.out), lse: inFormOf(parts[0].out, m.lse) }) as R;
  if (v.residency === "host") return like(mergeOnHost(v));
  const rt = options?.device ? await runtimeFor(options.device) : await defaultRuntime();
  if (!rt) {
    throw new WgattnError("INVALID_BUFFER", "GPU parts but no device is in use", {
      argument: "parts",
      expected: "GPU tensors on the device wgattn uses (or options.device)",
      actual: "no WebGPU device",
    });
  }
  return like(await mergeOnGpu(v, rt));
}
