/**
 * Ready-made flex functions: each as WGSL text for the GPU backends with its TypeScript twin (the
 * `cpu` backend runs that; the tests compare both against float64). Each returns options to spread
 * into a call: `attentionForward(q, k, v, { ...alibi(slopes), isCausal: true })`.
 */
import { f32Literal } from "./common.ts";
import type { MaskModFunction, ModBufferInput, ScoreModFunction } from "../core/flex.ts";

/** A score function with the buffers it reads. */
export interface ScoreModBundle {
  /** The function, as WGSL and TypeScript. */
  scoreMod: ScoreModFunction;
  /** The buffers it reads, by name. */
  modBuffers?: Record<string, ModBufferInput>;
}

/** A mask function with the buffers it reads. */
export interface MaskModBundle {
  /** The function, as WGSL and TypeScript. */
  maskMod: MaskModFunction;
  /** The buffers it reads, by name. */
  modBuffers?: Record<string, ModBufferInput>;
}

/** ALiBi's slopes for `n` heads (Press et al.): a geometric series from 2^(-8/n), extended for n not a power of 2. */
export function alibiSlopes(n: number): Float32Array {
  const pow2 = 2 ** Math.floor(Math.log2(n));
  const series = (m: number) => Array.from({ length: m }, (_, i) => 2 ** (-8 * (i + 1) / m));
  const slopes = series(pow2);
  if (pow2 < n) slopes.push(...series(2 * pow2).filter((_, i) => i % 2 === 0).slice(0, n - pow2));
  return Float32Array.from(slopes);
}

/**
 * ALiBi: adds `slope[h] · (kv - q)` to each score (negative for keys before the query); `slopes` per
 * query head (default {@link alibiSlopes}), read from the mod buffer `alibi_slopes`.
 *
 * @example
 * ```ts
 * import { alibi, attentionForward } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(4 * 32 * 16).fill(0.1), shape: [1, 4, 32, 16] };
 * const out = await attentionForward(t, t, t, { ...alibi(4), isCausal: true });
 * ```
 */
export function alibi(slopes: number | Float32Array): ScoreModBundle {
  const s = typeof slopes === "number" ? alibiSlopes(slopes) : slopes;
  return {
    scoreMod: {
      wgsl: `fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32 {
  return score + alibi_slopes[h] * (f32(kv) - f32(q));
}`,
      ts: (score, _b, h, q, kv, buffers) => score + buffers.alibi_slopes[h] * (kv - q),
    },
    modBuffers: { alibi_slopes: s },
  };
}

/**
 * Tanh soft-capping (Gemma 2): `cap · tanh(score / cap)`.
 *
 * @example
 * ```ts
 * import { attentionForward, softCap } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(2 * 16 * 16).fill(0.3), shape: [1, 2, 16, 16] };
 * const out = await attentionForward(t, t, t, { ...softCap(50) });
 * ```
 */
export function softCap(cap: number): ScoreModBundle {
  if (!(cap > 0) || !Number.isFinite(cap)) {
    throw new RangeError(`softCap: cap must be a positive number, not ${cap}`);
  }
  // WGSL's tanh(x) may be computed as (e^2x - 1)/(e^2x + 1), which overflows past |x| ~ 44: clamp.
  return {
    scoreMod: {
      wgsl: `fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32 {
  return ${f32Literal(cap)} * tanh(clamp(score / ${f32Literal(cap)}, -15.0, 15.0));
}`,
      ts: (score) => cap * Math.tanh(Math.max(-15, Math.min(15, score / cap))),
    },
  };
}

/**
 * A learned relative-position bias: adds `table[h · (2M + 1) + clamp(kv - q, -M, M) + M]`, with the
 * table `[n, 2M + 1]` (M = `maxDistance`) in the mod buffer `rel_bias`.
 *
 * @example
 * ```ts
 * import { attentionForward, relativePositionBias } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(2 * 16 * 16).fill(0.3), shape: [1, 2, 16, 16] };
 * const table = new Float32Array(2 * 9).map((_, i) => -0.1 * (i % 9));
 * const out = await attentionForward(t, t, t, { ...relativePositionBias(table, 4) });
 * ```
 */
export function relativePositionBias(table: Float32Array, maxDistance: number): ScoreModBundle {
  const width = 2 * maxDistance + 1;
  if (!Number.isInteger(maxDistance) || maxDistance < 0 || table.length % width !== 0) {
    throw new RangeError(
      `relativePositionBias: the table must be [n, ${width}] for maxDistance ${maxDistance}`,
    );
  }
  return {
    scoreMod: {
      wgsl: `fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32 {
  let rel = clamp(i32(kv) - i32(q), -${maxDistance}i, ${maxDistance}i);
  return score + rel_bias[h * ${width}u + u32(rel + ${maxDistance}i)];
}`,
      ts: (score, _b, h, q, kv, buffers) =>
        score +
        buffers.rel_bias[h * width + Math.max(-maxDistance, Math.min(maxDistance, kv - q)) + maxDistance],
    },
    modBuffers: { rel_bias: table },
  };
}

/**
 * A document (packed sequence) mask: query q attends key kv only within its document, from
 * per-position ids (`doc_q`, `doc_kv`; one array serves both for self-attention). `batchStride`
 * set to the sequence length gives each batch its own ids ([b, s] arrays); 0 shares them.
 * Combine with `isCausal` for causal packing.
 *
 * @example
 * ```ts
 * import { attentionForward, documentMask } from "jsr:@wgattn/attention";
 * const ids = Int32Array.from({ length: 32 }, (_, i) => Math.floor(i / 8)); // 4 documents of 8
 * const t = { data: new Float32Array(2 * 32 * 16).fill(0.3), shape: [1, 2, 32, 16] };
 * const out = await attentionForward(t, t, t, { ...documentMask(ids), isCausal: true });
 * ```
 */
export function documentMask(
  ids: Int32Array,
  kvIds: Int32Array = ids,
  options: { batchStrideQ?: number; batchStrideKv?: number } = {},
): MaskModBundle {
  const sq = options.batchStrideQ ?? 0, skv = options.batchStrideKv ?? sq;
  return {
    maskMod: {
      wgsl: `fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool {
  return doc_q[b * ${sq}u + q] == doc_kv[b * ${skv}u + kv];
}`,
      ts: (b, _h, q, kv, buffers) => buffers.doc_q[b * sq + q] === buffers.doc_kv[b * skv + kv],
    },
    modBuffers: { doc_q: ids, doc_kv: kvIds },
  };
}

/**
 * Prefix-LM: every query sees the first `prefix` keys (bidirectional prefix) and causally after
 * them (`kv <= q`). `prefix` is one length or one per batch (`Int32Array`, mod buffer `prefix_len`).
 *
 * @example
 * ```ts
 * import { attentionForward, prefixLm } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(2 * 32 * 16).fill(0.3), shape: [1, 2, 32, 16] };
 * const out = await attentionForward(t, t, t, { ...prefixLm(8) });
 * ```
 */
export function prefixLm(prefix: number | Int32Array): MaskModBundle {
  if (typeof prefix === "number") {
    if (!Number.isInteger(prefix) || prefix < 0) {
      throw new RangeError(`prefixLm: prefix must be an integer >= 0`);
    }
    return {
      maskMod: {
        wgsl: `fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool {
  return kv <= q || kv < ${prefix}u;
}`,
        ts: (_b, _h, q, kv) => kv <= q || kv < prefix,
      },
    };
  }
  return {
    maskMod: {
      wgsl: `fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool {
  return kv <= q || i32(kv) < prefix_len[b];
}`,
      ts: (b, _h, q, kv, buffers) => kv <= q || kv < buffers.prefix_len[b],
    },
    modBuffers: { prefix_len: prefix },
  };
}

/**
 * A sliding window by position: causal (`q - window <= kv <= q`, FlexAttention's
 * `sliding_window_causal`) or, with `causal: false`, `|q - kv| <= window`. Positions are each
 * sequence's own (top-left aligned), unlike `options.windowSize`.
 *
 * @example
 * ```ts
 * import { attentionForward, slidingWindow } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(2 * 32 * 16).fill(0.3), shape: [1, 2, 32, 16] };
 * const out = await attentionForward(t, t, t, { ...slidingWindow(4) });
 * ```
 */
export function slidingWindow(window: number, options: { causal?: boolean } = {}): MaskModBundle {
  if (!Number.isInteger(window) || window < 0) {
    throw new RangeError(`slidingWindow: window must be an integer >= 0`);
  }
  const causal = options.causal ?? true;
  return {
    maskMod: causal
      ? {
        wgsl: `fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool {
  return kv <= q && q - kv <= ${window}u;
}`,
        ts: (_b, _h, q, kv) => kv <= q && q - kv <= window,
      }
      : {
        wgsl: `fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool {
  return max(q, kv) - min(q, kv) <= ${window}u;
}`,
        ts: (_b, _h, q, kv) => Math.abs(q - kv) <= window,
      },
  };
}

/**
 * Wan2.2-Animate's log-scale, as DiffSynth-Studio computes it: the keys of latent frame 1, positions
 * `hw <= kv < 2·hw` (`hw` tokens per latent frame), get `logScale` added to their scores (natural-log
 * units: their softmax weight is multiplied by `e^logScale` before normalisation); other scores are
 * unchanged. From DiffSynth-Studio's `diffsynth/models/wan_animate_2_dit.py` (added in "Support Wan2.2
 * Animate", #1569): `_score_mod_impl` returns `torch.where((kv_idx >= hw) & (kv_idx < 2 * hw), score +
 * log_scale, score)`, made by `_get_score_mod(hw, log_scale)` for the in-context self-attention
 * (`forward_gen`) with `hw = origin_latent_hw` (the frame's height · width / 256) and `log_scale` the
 * pipeline's `animate2_log_scale` (default 0: no change). Its pipeline puts the reference image's latent
 * at frame 0, so frame 1 is the clip's first latent frame. `score` there is FlexAttention's scaled
 * score, the one `score_mod` gets here.
 *
 * @example
 * ```ts
 * import { attentionForward, wanAnimateLogScale } from "jsr:@wgattn/attention";
 * const t = { data: new Float32Array(2 * 32 * 16).fill(0.3), shape: [1, 2, 32, 16] };
 * const out = await attentionForward(t, t, t, { ...wanAnimateLogScale(8, -1) });
 * ```
 */
export function wanAnimateLogScale(hw: number, logScale: number): ScoreModBundle {
  if (!Number.isInteger(hw) || hw < 0 || hw >= 2 ** 31 || !Number.isFinite(logScale)) {
    throw new RangeError(
      `wanAnimateLogScale: hw must be an integer in [0, 2^31) and logScale finite, not ${hw} and ${logScale}`,
    );
  }
  return {
    scoreMod: {
      wgsl: `fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32 {
  return select(score, score + ${f32Literal(logScale)}, kv >= ${hw}u && kv < ${2 * hw}u);
}`,
      ts: (score, _b, _h, _q, kv) => kv >= hw && kv < 2 * hw ? score + Math.fround(logScale) : score,
    },
  };
}
