/** `cpu`: attention on the host in float64. The fallback when there is no GPU. */
import type { CpuBackend, HostIO } from "./backend.ts";
import { type AttentionProblem, diagonalOffset } from "../core/problem.ts";

/** Why cpu cannot serve a flex call: a function given as WGSL only. */
function unsupportedReasons(p: AttentionProblem): string[] {
  const f = p.flex;
  if (!f) return [];
  const reasons: string[] = [];
  if (f.scoreMod && !f.scoreMod.ts) {
    reasons.push("options.scoreMod has no TypeScript form ({ wgsl, ts }) for the host");
  }
  if (f.maskMod && !f.maskMod.ts) {
    reasons.push("options.maskMod has no TypeScript form ({ wgsl, ts }) for the host");
  }
  return reasons;
}

function compute(p: AttentionProblem, io: HostIO): void {
  const { q, k, v, out, mask, lse } = io;
  const scoreMod = p.flex?.scoreMod?.ts, maskMod = p.flex?.maskMod?.ts;
  const buffers = io.flex ?? {};
  const qs = p.q.strides, ks = p.k.strides, vs = p.v.strides, os = p.out.strides;
  const ms = p.mask?.strides;
  const additive = p.mask?.kind === "additive";
  const group = p.n / p.nKv;
  const offset = diagonalOffset(p);
  const scores = new Float64Array(p.sKv);
  const acc = new Float64Array(p.dV);
  for (let b = 0; b < p.b; b++) {
    for (let h = 0; h < p.n; h++) {
      const hk = Math.floor(h / group);
      for (let i = 0; i < p.sQ; i++) {
        const qBase = b * qs.b + h * qs.n + i * qs.s;
        const lo = Math.max(0, i + offset - p.left);
        const hi = Math.min(p.sKv - 1, i + offset + p.right);
        let max = -Infinity;
        for (let j = 0; j < p.sKv; j++) {
          let s = -Infinity;
          if (j >= lo && j <= hi) {
            const kBase = b * ks.b + hk * ks.n + j * ks.s;
            let dot = 0;
            for (let c = 0; c < p.d; c++) dot += q[qBase + c * qs.d] * k[kBase + c * ks.d];
            s = dot * p.scale;
            // score_mod sees the scaled score (natural-log units), as on the GPU; mask_mod comes last.
            if (scoreMod) s = scoreMod(s, b, h, i, j, buffers);
            if (mask && ms) {
              const m = mask[b * ms.b + h * ms.n + i * ms.i + j * ms.j];
              if (additive) s += m;
              else if (m === 0) s = -Infinity;
            }
            if (maskMod && !maskMod(b, h, i, j, buffers)) s = -Infinity;
          }
          scores[j] = s;
          if (s > max || Number.isNaN(s)) max = Number.isNaN(max) ? max : (Number.isNaN(s) ? NaN : s);
        }
        acc.fill(0);
        let sum = 0;
        if (max !== -Infinity) {
          for (let j = 0; j < p.sKv; j++) {
            if (scores[j] === -Infinity) continue;
            const e = Math.exp(scores[j] - max);
            sum += e;
            const vBase = b * vs.b + hk * vs.n + j * vs.s;
            for (let c = 0; c < p.dV; c++) acc[c] += e * v[vBase + c * vs.d];
          }
        }
        const oBase = b * os.b + h * os.n + i * os.s;
        for (let c = 0; c < p.dV; c++) {
          out[oBase + c * os.d] = sum > 0 ? acc[c] / sum : (Number.isNaN(sum) ? NaN : 0);
        }
        if (lse) {
          lse[(b * p.n + h) * p.sQ + i] = sum > 0
            ? max + Math.log(sum)
            : (Number.isNaN(sum) ? NaN : -Infinity);
        }
      }
    }
  }
}

/** The float64 host backend. */
export const cpuBackend: CpuBackend = {
  kind: "cpu",
  name: "cpu",
  aliases: ["reference", "host"],
  summary: "float64 on the host; exact reference and the fallback without a GPU",
  producesLse: true,
  unsupportedReasons,
  compute,
};
