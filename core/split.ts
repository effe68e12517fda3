/**
 * Calls past the binding limits: a call whose q, k, v, mask, output or lse does not fit one
 * storage binding (`maxStorageBufferBindingSize`) runs as pieces, for any backend and unknown to
 * it. The planner cuts the call into boxes over batches, then heads (a K/V head with its GQA
 * group), then query heads and rows; a K/V head too long for one binding is cut into key ranges
 * whose partial outputs are merged by their log-sum-exp (wgsl/merge.ts).
 *
 * Each piece is an ordinary {@link AttentionProblem} with the call's strides; its tensors are bound
 * as ranges of the call's buffers (`GpuCall.windows`), whose offsets must be multiples of
 * `minStorageBufferOffsetAlignment` (256 bytes). Where a range does not start on that alignment it
 * is gathered into a dense temporary instead; an output range that does not is written to a
 * temporary and moved into place by the merge kernel, which takes any element offset.
 */
import type { GpuBackend, GpuIO } from "../backends/backend.ts";
import { WgattnError } from "./errors.ts";
import type { GpuCall } from "./gpu.ts";
import type { AxisRecord } from "./layout.ts";
import type { AttentionProblem, MaskView } from "./problem.ts";
import { DTYPE_BYTES } from "./tensor.ts";
import { gatherKernel, MERGE_THREADS, type MergeConfig, mergeKernel } from "../wgsl/merge.ts";

/** A box of the call: batches, query heads with their K/V heads, and query rows. */
export interface Box {
  b0: number;
  nb: number;
  h0: number;
  nh: number;
  hk0: number;
  nhk: number;
  i0: number;
  ni: number;
  /** Key ranges `[j0, j0 + nj)`; more than one are merged by their lse. */
  kv: [number, number][];
}

/** How a call is cut. */
export interface SplitPlan {
  boxes: Box[];
  /** Which axis the cut went down to, in words (for explain). */
  level: "batch" | "head" | "query" | "key";
}

const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));
const lcm = (a: number, b: number) => (a / gcd(a, b)) * b;

/** Bytes from the first to the last element of a box of a strided tensor. */
function spanBytes(strides: readonly number[], lens: readonly number[], bytes: number): number {
  let last = 0;
  for (let a = 0; a < strides.length; a++) last += (lens[a] - 1) * strides[a];
  return (last + 1) * bytes;
}

/** The largest x in [1, hi] with pred(x) (pred monotone: true then false), or 0. */
function maxFit(hi: number, pred: (x: number) => boolean): number {
  if (hi < 1 || !pred(1)) return 0;
  let lo = 1;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (pred(mid)) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** Rounds a count down to a multiple of the step that keeps offsets aligned, if that keeps half. */
function preferAligned(count: number, strideBytes: number[], align: number): number {
  let g = 1;
  for (const s of strideBytes) if (s !== 0) g = lcm(g, align / gcd(align, s));
  const aligned = Math.floor(count / g) * g;
  return aligned >= Math.max(1, count / 2) ? aligned : count;
}

function qStrides(p: AttentionProblem) {
  const s = p.q.strides;
  return [s.b, s.n, s.s, s.d];
}
function kStrides(p: AttentionProblem, t: "k" | "v") {
  const s = p[t].strides;
  return [s.b, s.n, s.s, s.d];
}
function oStrides(p: AttentionProblem) {
  const s = p.out.strides;
  return [s.b, s.n, s.s, s.d];
}
function mStrides(m: MaskView) {
  return [m.strides.b, m.strides.n, m.strides.i, m.strides.j];
}
function maskBytes(m: MaskView) {
  return m.operand.dtype === "bool" ? 1 : 4;
}

/** Byte spans of each tensor of a piece of (nb, nh, nhk, ni, nj). */
function pieceSpans(p: AttentionProblem, wantLse: boolean, x: number[]): number[] {
  const [nb, nh, nhk, ni, nj] = x;
  const e = DTYPE_BYTES[p.dtype];
  const spans = [
    spanBytes(qStrides(p), [nb, nh, ni, p.d], e),
    spanBytes(kStrides(p, "k"), [nb, nhk, nj, p.d], e),
    spanBytes(kStrides(p, "v"), [nb, nhk, nj, p.dV], e),
    spanBytes(oStrides(p), [nb, nh, ni, p.dV], e),
  ];
  if (p.mask) spans.push(spanBytes(mStrides(p.mask), [nb, nh, ni, nj], maskBytes(p.mask)));
  if (wantLse) spans.push(nb * nh * ni * 4);
  if (nj < p.sKv) spans.push(nb * nh * ni * p.dV * 4); // the f32 accumulator of merged key ranges
  return spans;
}

/**
 * Cuts a call into pieces that each fit one storage binding of `limit` bytes, or null when the
 * whole call fits. Throws OUT_OF_MEMORY when even one query row cannot fit.
 */
export function planSplit(
  p: AttentionProblem,
  limit: number,
  align: number,
  wantLse: boolean,
): SplitPlan | null {
  const full = [p.b, p.n, p.nKv, p.sQ, p.sKv];
  if (pieceSpans(p, wantLse, full).every((s) => s <= limit)) return null;
  // Room for a range gathered from an aligned-down offset.
  const lim = limit - align;
  const fits = (x: number[]) => pieceSpans(p, wantLse, x).every((s) => s <= lim);
  const e = DTYPE_BYTES[p.dtype];
  const g = p.n / p.nKv;
  const mb = p.mask ? maskBytes(p.mask) : 0;
  const ms = p.mask ? mStrides(p.mask) : [0, 0, 0, 0];
  const boxes: Box[] = [];
  const allKeys: [number, number][] = [[0, p.sKv]];

  // Batches, every head.
  let nb = maxFit(p.b, (x) => fits([x, p.n, p.nKv, p.sQ, p.sKv]));
  if (nb >= 1) {
    nb = preferAligned(nb, [
      p.q.strides.b * e,
      p.k.strides.b * e,
      p.v.strides.b * e,
      p.out.strides.b * e,
      ms[0] * mb,
      wantLse ? p.n * p.sQ * 4 : 0,
    ], align);
    for (let b0 = 0; b0 < p.b; b0 += nb) {
      const n = Math.min(nb, p.b - b0);
      boxes.push({ b0, nb: n, h0: 0, nh: p.n, hk0: 0, nhk: p.nKv, i0: 0, ni: p.sQ, kv: allKeys });
    }
    return { boxes, level: "batch" };
  }
  // One batch, K/V heads with their query heads.
  let nhk = maxFit(p.nKv, (x) => fits([1, x * g, x, p.sQ, p.sKv]));
  if (nhk >= 1) {
    nhk = preferAligned(nhk, [
      g * p.q.strides.n * e,
      p.k.strides.n * e,
      p.v.strides.n * e,
      g * p.out.strides.n * e,
      g * ms[1] * mb,
      wantLse ? g * p.sQ * 4 : 0,
    ], align);
    for (let b0 = 0; b0 < p.b; b0++) {
      for (let hk0 = 0; hk0 < p.nKv; hk0 += nhk) {
        const n = Math.min(nhk, p.nKv - hk0);
        boxes.push({ b0, nb: 1, h0: hk0 * g, nh: n * g, hk0, nhk: n, i0: 0, ni: p.sQ, kv: allKeys });
      }
    }
    return { boxes, level: "head" };
  }
  // One K/V head: its keys in ranges if need be, then query heads of the group, then rows.
  let nj = maxFit(p.sKv, (x) =>
    spanBytes(kStrides(p, "k"), [1, 1, x, p.d], e) <= lim &&
    spanBytes(kStrides(p, "v"), [1, 1, x, p.dV], e) <= lim);
  let nh = 0, ni = 0;
  while (nj >= 1) {
    const j = nj;
    nh = maxFit(g, (x) => fits([1, x, 1, p.sQ, j]));
    if (nh >= 1) ni = p.sQ;
    else {
      nh = 1;
      ni = maxFit(p.sQ, (x) => fits([1, 1, 1, x, j]));
    }
    if (ni >= 1) break;
    nj = nj === 1 ? 0 : Math.floor(nj / 2);
  }
  if (nj < 1 || ni < 1) {
    throw new WgattnError("OUT_OF_MEMORY", "one query row of this call does not fit one storage binding", {
      expected: `tensors whose rows fit ${limit} bytes (maxStorageBufferBindingSize)`,
      actual: `d = ${p.d}, d_v = ${p.dV}, ${p.dtype}`,
    });
  }
  if (nj < p.sKv) {
    nj = preferAligned(nj, [p.k.strides.s * e, p.v.strides.s * e, ms[3] * mb], align);
  }
  const keys: [number, number][] = [];
  for (let j0 = 0; j0 < p.sKv; j0 += nj) keys.push([j0, Math.min(nj, p.sKv - j0)]);
  for (let b0 = 0; b0 < p.b; b0++) {
    for (let hk0 = 0; hk0 < p.nKv; hk0++) {
      for (let h = 0; h < g; h += nh) {
        for (let i0 = 0; i0 < p.sQ; i0 += ni) {
          const box = {
            b0,
            nb: 1,
            h0: hk0 * g + h,
            nh: Math.min(nh, g - h),
            hk0,
            nhk: 1,
            i0,
            ni: Math.min(ni, p.sQ - i0),
          };
          boxes.push({ ...box, kv: visibleRanges(p, box.i0, box.ni, keys) });
        }
      }
    }
  }
  return { boxes, level: nj < p.sKv ? "key" : "query" };
}

/** The key ranges that rows [i0, i0 + ni) can see (at least one, so the rows get written). */
function visibleRanges(p: AttentionProblem, i0: number, ni: number, keys: [number, number][]) {
  const lo = i0 + p.offset - p.left;
  const hi = i0 + ni - 1 + p.offset + p.right;
  const seen = keys.filter(([j0, n]) => j0 <= hi && j0 + n - 1 >= lo);
  return seen.length > 0 ? seen : [keys[0]];
}

/**
 * The band of a piece whose rows start at i0 and keys at j0, with sides that are unbounded within
 * the piece made infinite and the offset kept small (backends clamp sides by the piece's sizes).
 */
function pieceBand(p: AttentionProblem, i0: number, sQ: number, j0: number, sKv: number) {
  let a = p.offset - p.left + i0 - j0; // first visible key of row 0 of the piece
  let c = p.offset + p.right + i0 - j0; // last visible key of row 0
  const lowerOpen = !(a > -sQ), upperOpen = !(c < sKv);
  if (!lowerOpen) a = Math.min(a, sKv);
  if (!upperOpen) c = Math.max(c, -sQ - 1);
  if (lowerOpen && upperOpen) return { offset: sKv - sQ, left: Infinity, right: Infinity };
  if (lowerOpen) return { offset: c, left: Infinity, right: 0 };
  if (upperOpen) return { offset: a, left: 0, right: Infinity };
  if (c < a) return { offset: -sQ - 1, left: 0, right: 0 }; // nothing visible
  return { offset: a, left: 0, right: c - a };
}

const dense = (_nb: number, nh: number, ni: number, dd: number): AxisRecord => ({
  b: nh * ni * dd,
  n: ni * dd,
  s: dd,
  d: 1,
});

/** A range of a buffer: byte offset of the first element and bytes to its last. */
interface Range {
  buffer: GPUBuffer;
  offset: number;
  span: number;
}

/** A binding of [start, offset + span) with start aligned down; `base` elements to the range. */
function bindingOf(r: Range, align: number, elementBytes: number) {
  const start = Math.floor(r.offset / align) * align;
  const end = Math.min(r.buffer.size, Math.ceil((r.offset + r.span) / 4) * 4);
  return {
    binding: { buffer: r.buffer, offset: start, size: Math.floor((end - start) / 4) * 4 },
    base: (r.offset - start) / elementBytes,
  };
}

/** How many backend calls a plan makes (key ranges of every box). */
export function pieceCount(plan: SplitPlan): number {
  return plan.boxes.reduce((n, b) => n + b.kv.length, 0);
}

/** The first piece of a plan as the router would see it (for explain). */
export function firstPiece(p: AttentionProblem, plan: SplitPlan): AttentionProblem {
  const { nb, nh, nhk, i0, ni, kv } = plan.boxes[0];
  const [j0, nj] = kv[0];
  const band = pieceBand(p, i0, ni, j0, nj);
  return {
    ...p,
    b: nb,
    n: nh,
    nKv: nhk,
    sQ: ni,
    sKv: nj,
    ...band,
    isCausal: p.isCausal && band.right === 0,
    out: { ...p.out, shape: [nb, nh, ni, p.dV] },
  };
}

/** Chooses the backend of a piece (strict about GPU: a piece cannot run on the host). */
export type PieceChooser = (piece: AttentionProblem, wantLse: boolean) => GpuBackend;

/** Records every piece of a split call, and the merges, into one call. Nothing waits. */
export async function encodeSplit(
  p: AttentionProblem,
  plan: SplitPlan,
  io: GpuIO,
  call: GpuCall,
  choose: PieceChooser,
): Promise<void> {
  const align = call.device.limits.minStorageBufferOffsetAlignment ?? 256;
  const e = DTYPE_BYTES[p.dtype];
  const f16 = p.dtype === "f16" && call.rt.caps.shaderF16;
  const wantLse = io.lse !== null;
  const pool = new Map<string, GPUBuffer>();
  const temp = (name: string, bytes: number) => {
    const have = pool.get(name);
    if (have && have.size >= bytes) return have;
    const made = call.scratch(bytes, `wgattn split ${name}`);
    pool.set(name, made);
    return made;
  };
  const gather = async (name: string, r: Range, bytes: 1 | 2 | 4, lens: number[], strides: number[]) => {
    const count = lens.reduce((x, y) => x * y, 1);
    const words = Math.ceil((count * bytes) / 4);
    const dst = temp(name, words * 4);
    const kernel = gatherKernel({ bytes });
    const pipe = await call.pipeline(kernel);
    const { binding, base } = bindingOf(r, align, bytes);
    call.dispatch(pipe, kernel, { src: binding, dst }, {
      count,
      base,
      n0: lens[0],
      n1: lens[1],
      n2: lens[2],
      n3: lens[3],
      s0: strides[0],
      s1: strides[1],
      s2: strides[2],
      s3: strides[3],
    }, Math.ceil(words / 64));
    return dst;
  };
  const merge = async (c: MergeConfig, buffers: Record<string, GPUBuffer | GPUBufferBinding>, u: {
    rows: number;
    n: number;
    sQ: number;
    part: AxisRecord;
    out?: AxisRecord;
    oBase?: number;
    lBase?: number;
  }) => {
    const kernel = mergeKernel(c);
    const pipe = await call.pipeline(kernel);
    const per = c.pairs ? 2 : 1;
    const o = u.out ?? { b: 0, n: 0, s: 0, d: 0 };
    call.dispatch(pipe, kernel, buffers, {
      rows: u.rows,
      n: u.n,
      s_q: u.sQ,
      d_v: p.dV,
      p_sb: u.part.b,
      p_sh: u.part.n,
      p_ss: u.part.s,
      p_sd: u.part.d,
      o_sb: o.b,
      o_sh: o.n,
      o_ss: o.s,
      o_sd: o.d,
      o_base: u.oBase ?? 0,
      l_base: u.lBase ?? 0,
    }, Math.ceil((u.rows * Math.ceil(p.dV / per)) / MERGE_THREADS));
  };
  const pairs = p.dtype !== "f32" && !f16;

  for (const box of plan.boxes) {
    const { b0, nb, h0, nh, hk0, nhk, i0, ni } = box;
    const rows = nb * nh * ni;
    const outRange: Range = {
      buffer: io.out,
      offset: (b0 * p.out.strides.b + h0 * p.out.strides.n + i0 * p.out.strides.s) * e,
      span: spanBytes(oStrides(p), [nb, nh, ni, p.dV], e),
    };
    const lseRange: Range | null = io.lse
      ? { buffer: io.lse, offset: ((b0 * p.n + h0) * p.sQ + i0) * 4, span: rows * 4 }
      : null;
    const merged = box.kv.length > 1;
    const direct = !merged && outRange.offset % align === 0 &&
      (!lseRange || lseRange.offset % align === 0);
    const accLse = merged ? [temp("acc-lse-0", rows * 4), temp("acc-lse-1", rows * 4)] : [];
    const acc = merged ? temp("acc", rows * p.dV * 4) : null;
    const partStrides = dense(nb, nh, ni, p.dV);
    for (let t = 0; t < box.kv.length; t++) {
      const [j0, nj] = box.kv[t];
      const windows = new Map<GPUBuffer, GPUBufferBinding>();
      const bind = (r: Range): boolean => {
        if (r.offset % align !== 0) return false;
        const { binding } = bindingOf(r, align, 1);
        const had = windows.get(r.buffer);
        if (had && (had.offset !== binding.offset || had.size !== binding.size)) return false;
        windows.set(r.buffer, binding);
        return true;
      };
      const operand = async (
        name: "q" | "k" | "v",
        buffer: GPUBuffer,
        lens: number[],
        starts: number[],
      ): Promise<[GPUBuffer, AxisRecord]> => {
        const s = p[name].strides;
        const st = [s.b, s.n, s.s, s.d];
        const r: Range = {
          buffer,
          offset: starts.reduce((x, v, a) => x + v * st[a], 0) * e,
          span: spanBytes(st, lens, e),
        };
        if (bind(r)) return [buffer, s];
        const dst = await gather(name, r, e as 2 | 4, lens, st);
        return [dst, dense(lens[0], lens[1], lens[2], lens[3])];
      };
      const [q, qs] = await operand("q", io.q, [nb, nh, ni, p.d], [b0, h0, i0, 0]);
      const [k, ks] = await operand("k", io.k, [nb, nhk, nj, p.d], [b0, hk0, j0, 0]);
      const [v, vs] = await operand("v", io.v, [nb, nhk, nj, p.dV], [b0, hk0, j0, 0]);
      let mask: GPUBuffer | null = null;
      let maskView: MaskView | null = null;
      if (p.mask && io.mask) {
        const st = mStrides(p.mask);
        const mb = maskBytes(p.mask);
        const lens = [nb, nh, ni, nj].map((x, a) => (st[a] === 0 ? 1 : x));
        const r: Range = {
          buffer: io.mask,
          offset: [b0, h0, i0, j0].reduce((x, v, a) => x + v * st[a], 0) * mb,
          span: spanBytes(st, lens, mb),
        };
        // Bool masks are read as u32 words: a window must start on a word.
        if (bind(r)) {
          mask = io.mask;
          maskView = p.mask;
        } else {
          mask = await gather("mask", r, mb as 1 | 4, lens, st);
          let stride = 1;
          const ds = [0, 0, 0, 0];
          for (let a = 3; a >= 0; a--) {
            ds[a] = lens[a] === 1 && st[a] === 0 ? 0 : stride;
            stride *= lens[a];
          }
          maskView = { ...p.mask, strides: { b: ds[0], n: ds[1], i: ds[2], j: ds[3] } };
        }
      }
      let out: GPUBuffer;
      let outStrides: AxisRecord;
      let lse: GPUBuffer | null = null;
      if (direct) {
        bind(outRange);
        out = io.out;
        outStrides = p.out.strides;
        if (lseRange) {
          bind(lseRange);
          lse = io.lse;
        }
      } else {
        out = temp("part", rows * p.dV * e);
        outStrides = partStrides;
        if (merged || wantLse) lse = temp("part-lse", rows * 4);
      }
      const band = pieceBand(p, i0, ni, j0, nj);
      const piece: AttentionProblem = {
        ...p,
        b: nb,
        n: nh,
        nKv: nhk,
        sQ: ni,
        sKv: nj,
        ...band,
        isCausal: p.isCausal && band.right === 0,
        q: { operand: p.q.operand, strides: qs },
        k: { operand: p.k.operand, strides: ks },
        v: { operand: p.v.operand, strides: vs },
        mask: maskView,
        out: { pattern: p.out.pattern, shape: [nb, nh, ni, p.dV], strides: outStrides },
        residency: "gpu",
      };
      const backend = choose(piece, lse !== null);
      call.windows = windows;
      try {
        await backend.encode(piece, { q, k, v, mask, out, lse }, call);
      } finally {
        call.windows = null;
      }
      if (direct) continue;
      const last = t === box.kv.length - 1;
      if (merged && !last) {
        await merge(
          {
            dtype: p.dtype,
            f16,
            parts: 1,
            accIn: t > 0,
            toAcc: true,
            weighted: true,
            lseOut: true,
            pairs: false,
          },
          {
            acc: acc!,
            ...(t > 0 ? { acc_lse_in: accLse[(t - 1) % 2] } : {}),
            p0: out,
            l0: lse!,
            acc_lse_out: accLse[t % 2],
          },
          { rows, n: nh, sQ: ni, part: partStrides },
        );
        continue;
      }
      // Into place: the last key range merged with the accumulator, or the one part copied.
      const o = bindingOf(outRange, align, e);
      if (pairs && o.base % 2 !== 0) {
        throw new WgattnError(
          "NO_BACKEND",
          "cannot place a piece of a split 16-bit output at an odd element",
          {
            expected: p.dtype === "bf16"
              ? "an output whose pieces start at even elements (bf16 is written in pairs: WGSL has no bf16 type)"
              : "shader-f16, or an output whose pieces start at even elements",
            actual: `element offset ${outRange.offset / e}`,
          },
        );
      }
      const l = lseRange ? bindingOf(lseRange, align, 4) : null;
      await merge(
        {
          dtype: p.dtype,
          f16,
          parts: 1,
          accIn: merged,
          toAcc: false,
          weighted: merged || wantLse,
          lseOut: wantLse,
          pairs,
        },
        {
          ...(merged ? { acc: acc!, acc_lse_in: accLse[(t - 1) % 2] } : {}),
          p0: out,
          ...(lse ? { l0: lse } : {}),
          o: o.binding,
          ...(l ? { lse: l.binding } : {}),
        },
        { rows, n: nh, sQ: ni, part: partStrides, out: p.out.strides, oBase: o.base, lBase: l?.base ?? 0 },
      );
    }
  }
}
