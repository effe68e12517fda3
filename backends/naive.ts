/** `naive`: the formula as written in three WGSL passes; serves every option. */
import { kernelOf } from "../wgsl/common.ts";
import { flexKernelConfig, type GpuBackend, gpuBaseReasons, type GpuIO } from "./backend.ts";
import type { Capabilities } from "../core/device.ts";
import type { GpuCall } from "../core/gpu.ts";
import { type AttentionProblem, diagonalOffset, hasBand, servingReasons } from "../core/problem.ts";
import { type NaiveConfig, naiveScoresKernel, naiveSoftmaxKernel, naiveValuesKernel } from "../wgsl/naive.ts";

/** Scores scratch per chunk, at most (and never more than one storage binding). */
const SCORE_BUDGET_BYTES = 64 << 20;

function config(p: AttentionProblem, caps: Capabilities, lse: boolean): NaiveConfig {
  const f16 = caps.shaderF16 && p.dtype === "f16";
  return {
    dtype: p.dtype,
    f16,
    mask: p.mask ? p.mask.kind === "bool" ? "bool" : "additive" : "none",
    band: hasBand(p),
    lse,
    packedOut: p.dtype !== "f32" && !f16,
    flex: flexKernelConfig(p, false),
    sinks: p.sinks !== null,
  };
}

function unsupportedReasons(p: AttentionProblem, caps: Capabilities | null): string[] {
  const reasons = gpuBaseReasons(p, caps);
  if (!caps) return reasons;
  // Its passes index dense [b, n, s_q, s_kv] scores; sinks join its softmax pass.
  reasons.push(...servingReasons(p, { sinks: true }));
  if (p.dtype !== "f32" && !(p.dtype === "f16" && caps.shaderF16)) {
    // 16-bit elements without a WGSL type of their own are written two to a u32 word. For bf16
    // that is always so (WGSL has no bf16), for f16 only without shader-f16.
    if (p.out.strides.d !== 1 || p.dV % 2 !== 0) {
      reasons.push(
        p.dtype === "bf16"
          ? `bf16 output is written in pairs of 16-bit values (WGSL has no bf16 type): it needs a contiguous even head dim (d_v = ${p.dV})`
          : `f16 output without shader-f16 is written in pairs of 16-bit values: it needs shader-f16, or a contiguous even head dim (d_v = ${p.dV})`,
      );
    }
  }
  if (p.sKv * 4 > Math.min(caps.limits.maxStorageBufferBindingSize, SCORE_BUDGET_BYTES)) {
    reasons.push(`one row of scores (s_kv = ${p.sKv}) does not fit the scratch budget`);
  }
  return reasons;
}

async function encode(p: AttentionProblem, io: GpuIO, call: GpuCall): Promise<void> {
  const caps = call.rt.caps;
  const c = config(p, caps, io.lse !== null);
  const kernels = [naiveScoresKernel, naiveSoftmaxKernel, naiveValuesKernel].map((make) => kernelOf(make, c));
  const [scoresPipe, softmaxPipe, valuesPipe] = await Promise.all(kernels.map((k) => call.pipeline(k)));
  const budget = Math.min(caps.limits.maxStorageBufferBindingSize, SCORE_BUDGET_BYTES);
  const totalRows = p.b * p.n * p.sQ;
  const chunkRows = Math.max(1, Math.min(totalRows, Math.floor(budget / (p.sKv * 4))));
  const scores = call.scratch(chunkRows * p.sKv * 4, "naive scores");
  const st = (t: "q" | "k" | "v", s: { b: number; n: number; s: number; d: number }) => ({
    [`${t}_sb`]: s.b,
    [`${t}_sh`]: s.n,
    [`${t}_ss`]: s.s,
    [`${t}_sd`]: s.d,
  });
  const o = p.out.strides;
  const ms = p.mask?.strides ?? { b: 0, n: 0, i: 0, j: 0 };
  for (let r0 = 0; r0 < totalRows; r0 += chunkRows) {
    const rows = Math.min(chunkRows, totalRows - r0);
    const common = { r0, rows, n: p.n, s_q: p.sQ, s_kv: p.sKv, group: p.n / p.nKv };
    call.dispatch(
      scoresPipe,
      kernels[0],
      { q: io.q, k: io.k, scores, ...(io.mask ? { mask: io.mask } : {}), ...(io.flex ?? {}) },
      {
        ...common,
        d: p.d,
        scale: p.scale,
        offset: diagonalOffset(p),
        left: p.left,
        right: p.right,
        ...st("q", p.q.strides),
        ...st("k", p.k.strides),
        m_sb: ms.b,
        m_sh: ms.n,
        m_si: ms.i,
        m_sj: ms.j,
      },
      Math.ceil((rows * p.sKv) / 256),
    );
    call.dispatch(
      softmaxPipe,
      kernels[1],
      { scores, ...(io.lse ? { lse: io.lse } : {}), ...(io.sinks ? { sinks: io.sinks } : {}) },
      common,
      rows,
    );
    const per = c.packedOut ? 2 : 1;
    call.dispatch(valuesPipe, kernels[2], { scores, v: io.v, o: io.out }, {
      ...common,
      d_v: p.dV,
      ...st("v", p.v.strides),
      o_sb: o.b,
      o_sh: o.n,
      o_ss: o.s,
      o_sd: o.d,
    }, Math.ceil((rows * Math.ceil(p.dV / per)) / 64));
  }
}

/** The plain three-pass WGSL backend. */
export const naiveBackend: GpuBackend = {
  kind: "gpu",
  name: "naive",
  aliases: ["torch", "sdpa", "plain"],
  summary: "three WGSL passes (scores, softmax, scores @ v); serves every option",
  producesLse: true,
  unsupportedReasons,
  encode,
};
