/**
 * `cpu`: attention on the host in float64. The fallback when there is no GPU, and the reference
 * for every option: sinks, packed batches and paged caches included.
 */
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

/** Where batch (or packed sequence) `b` lives: its lengths, first rows and key addressing. */
interface Segment {
  sQ: number;
  sKv: number;
  /** First q / output row (packed batches; 0 otherwise) and the lse row of query 0 of head h. */
  row0: number;
  lse0: (h: number) => number;
  /** Element offset of key j (head hk) in k or v, given the tensor's strides. */
  key: (j: number, hk: number, st: { b: number; n: number; s: number }) => number;
}

function segment(p: AttentionProblem, io: HostIO, b: number): Segment {
  // GPU offsets, tables and lengths are clamped as the kernels clamp them (host ones were checked).
  const clamp = (x: number, lo: number, hi: number) => Math.min(Math.max(x, lo), hi);
  if (p.varlen) {
    const q0 = clamp(io.cuQ![b], 0, p.sQ), k0 = clamp(io.cuK![b], 0, p.sKv);
    return {
      sQ: clamp(io.cuQ![b + 1], q0, p.sQ) - q0,
      sKv: clamp(io.cuK![b + 1], k0, p.sKv) - k0,
      row0: q0,
      lse0: (h) => h * p.sQ + q0,
      key: (j, hk, st) => (k0 + j) * st.s + hk * st.n,
    };
  }
  if (p.paged) {
    const { pageSize, maxPages, numPages } = p.paged, table = io.table!;
    return {
      sQ: p.sQ,
      sKv: clamp(io.seqlens![b], 0, maxPages * pageSize),
      row0: 0,
      lse0: (h) => (b * p.n + h) * p.sQ,
      key: (j, hk, st) =>
        (clamp(table[b * maxPages + Math.floor(j / pageSize)], 0, numPages - 1) * pageSize + (j % pageSize)) *
          st.s + hk * st.n,
    };
  }
  return {
    sQ: p.sQ,
    sKv: p.sKv,
    row0: 0,
    lse0: (h) => (b * p.n + h) * p.sQ,
    key: (j, hk, st) => b * st.b + hk * st.n + j * st.s,
  };
}

function compute(p: AttentionProblem, io: HostIO): void {
  const { q, k, v, out, mask, lse } = io;
  const scoreMod = p.flex?.scoreMod?.ts, maskMod = p.flex?.maskMod?.ts;
  const buffers = io.flex ?? {};
  const qs = p.q.strides, ks = p.k.strides, vs = p.v.strides, os = p.out.strides;
  const ms = p.mask?.strides;
  const additive = p.mask?.kind === "additive";
  const group = p.n / p.nKv;
  const sinks = io.sinks;
  const acc = new Float64Array(p.dV);
  const seqs = p.varlen ? p.varlen.seqs : p.b;
  for (let b = 0; b < seqs; b++) {
    const seg = segment(p, io, b);
    // Bottom-right alignment within each sequence (the call's own offset for dense calls).
    const offset = p.varlen || p.paged ? seg.sKv - seg.sQ : diagonalOffset(p);
    const bq = p.varlen ? 0 : b; // packed tensors are one batch of all tokens
    const scores = new Float64Array(seg.sKv);
    for (let h = 0; h < p.n; h++) {
      const hk = Math.floor(h / group);
      for (let i = 0; i < seg.sQ; i++) {
        const qBase = bq * qs.b + h * qs.n + (seg.row0 + i) * qs.s;
        const lo = Math.max(0, i + offset - p.left);
        const hi = Math.min(seg.sKv - 1, i + offset + p.right);
        let max = -Infinity;
        for (let j = 0; j < seg.sKv; j++) {
          let s = -Infinity;
          if (j >= lo && j <= hi) {
            const kBase = seg.key(j, hk, ks);
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
          for (let j = 0; j < seg.sKv; j++) {
            if (scores[j] === -Infinity) continue;
            const e = Math.exp(scores[j] - max);
            sum += e;
            const vBase = seg.key(j, hk, vs);
            for (let c = 0; c < p.dV; c++) acc[c] += e * v[vBase + c * vs.d];
          }
        }
        // A sink is one more term of the denominator, exp(sink), with no value.
        const sink = sinks ? sinks[h] : -Infinity;
        if (sink !== -Infinity && !Number.isNaN(sum)) {
          const m2 = Math.max(max, sink);
          const keep = max === -Infinity ? 0 : Math.exp(max - m2);
          sum = sum * keep + Math.exp(sink - m2);
          for (let c = 0; c < p.dV; c++) acc[c] *= keep;
          max = m2;
        }
        const oBase = bq * os.b + h * os.n + (seg.row0 + i) * os.s;
        for (let c = 0; c < p.dV; c++) {
          out[oBase + c * os.d] = sum > 0 ? acc[c] / sum : (Number.isNaN(sum) ? NaN : 0);
        }
        if (lse) {
          lse[seg.lse0(h) + i] = sum > 0 ? max + Math.log(sum) : (Number.isNaN(sum) ? NaN : -Infinity);
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
