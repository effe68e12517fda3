/**
 * NaN and Inf in the inputs, on every registered backend, against the float64 reference (which
 * follows IEEE arithmetic over the keys each row attends): a NaN reaches exactly the rows that
 * attend it, `-Infinity` in an additive mask masks a key, a row with nothing to attend is zeros.
 * The contract is written down in README.md ("NaN and Inf").
 */
import assert from "node:assert/strict";
import { BACKENDS } from "../backends/registry.ts";
import { runtimeFor } from "../core/device.ts";
import { resolveProblem } from "../core/problem.ts";
import { type AttentionOptions, attentionWithLse, getDevice, type HostTensor } from "../mod.ts";
import { toleranceFor } from "./conformance.ts";
import { type Logical, referenceAttention, type RefOptions, rng } from "./reference.ts";

const device = await getDevice();
const caps = device ? (await runtimeFor(device)).caps : null;

const B = 1, N = 2, S = 40, D = 16;
const at = (h: number, s: number, c: number) => ((0 * N + h) * S + s) * D + c;

interface NanCase {
  name: string;
  /** Poisons q, k or v in place. */
  poison?: (t: { q: Float64Array; k: Float64Array; v: Float64Array }) => void;
  options?: AttentionOptions;
  ref?: RefOptions;
  /**
   * Backends that only meet a weaker form: `extraNaN` where a NaN in v may also reach rows that
   * mask its key (0 · NaN inside a tile of keys), `ignore` for a known gap, with the reason.
   */
  weaker?: Record<string, { extraNaN?: true; ignore?: string }>;
  /** Whether the reference has NaN somewhere (a sanity check of the case). */
  expectNaN?: boolean;
}

const padding = (masked: number[]) => {
  const data = new Uint8Array(S).fill(1);
  for (const j of masked) data[j] = 0;
  return data;
};
const additive = (f: (i: number, j: number) => number) =>
  Float32Array.from({ length: S * S }, (_, e) => f(Math.floor(e / S), e % S));

const FLASH_V_LEAK = { extraNaN: true } as const;

/**
 * `sage` quantizes q and k in blocks of its tile with one scale each, so a NaN or Inf in q or k
 * reaches its whole block by design (README, "NaN and Inf"); tests/sage_test.ts checks that
 * contract block by block. Here it runs the cases where only v or a mask carries the NaN.
 */
const SAGE_BLOCKS = {
  ignore: "sage quantizes q and k per block, so a NaN in q or k reaches its block (tests/sage_test.ts)",
} as const;

/**
 * `sage-mma` also quantizes v per channel over the sequence (one scale per channel), so a NaN in v
 * makes its channel NaN in every row of the head that attends any key, and a NaN at a padded key
 * still reaches its channel (the quantization pre-pass does not see the mask).
 */
const SAGE_MMA_V_CHANNEL = { extraNaN: true } as const;
const SAGE_MMA_PADDED = {
  ignore:
    "sage-mma quantizes v per channel over the sequence, padded keys included: a NaN in v reaches its channel",
} as const;
const SAGE_MMA_BLOCKS = {
  ignore: "sage-mma quantizes q and k per block, so a NaN in q or k reaches its block (as sage)",
} as const;

/**
 * `flash-mma` splits q and k per row (one scale each), so a NaN in q or k reaches exactly the scores
 * it takes part in; v per channel over the sequence (padded keys included), so a NaN in v makes its
 * channel NaN in every row of the head.
 */
const FLASH_MMA_V_CHANNEL = { extraNaN: true } as const;
const FLASH_MMA_INF = {
  ignore:
    "flash-mma splits k per row: an Inf makes the key's scale infinite and all its scores NaN (0 · Inf)",
} as const;

const CASES: NanCase[] = [
  {
    name: "NaN in q reaches its own row only",
    poison: ({ q }) => void (q[at(1, 3, 2)] = NaN),
    expectNaN: true,
    weaker: { sage: SAGE_BLOCKS, "sage-mma": SAGE_MMA_BLOCKS },
  },
  {
    name: "NaN in k reaches every row that attends the key",
    poison: ({ k }) => void (k[at(0, 5, 1)] = NaN),
    expectNaN: true,
    weaker: { sage: SAGE_BLOCKS, "sage-mma": SAGE_MMA_BLOCKS },
  },
  {
    name: "NaN in k, causal: only the rows that see the key",
    poison: ({ k }) => void (k[at(0, 5, 1)] = NaN),
    options: { isCausal: true },
    ref: { isCausal: true },
    expectNaN: true,
    weaker: { sage: SAGE_BLOCKS, "sage-mma": SAGE_MMA_BLOCKS },
  },
  {
    name: "NaN in v reaches that column of the rows attending its key",
    poison: ({ v }) => void (v[at(1, 7, 3)] = NaN),
    expectNaN: true,
    weaker: { "sage-mma": SAGE_MMA_V_CHANNEL, "flash-mma": FLASH_MMA_V_CHANNEL },
  },
  {
    name: "NaN in v, causal: only the rows that see the key",
    poison: ({ v }) => void (v[at(1, 7, 3)] = NaN),
    options: { isCausal: true },
    ref: { isCausal: true },
    expectNaN: true,
    weaker: {
      flash: FLASH_V_LEAK,
      "flash-subgroup": FLASH_V_LEAK,
      sage: FLASH_V_LEAK,
      "sage-mma": SAGE_MMA_V_CHANNEL,
      "flash-mma": FLASH_MMA_V_CHANNEL,
    },
  },
  {
    name: "NaN in k and v at a padded key: no NaN anywhere",
    poison: ({ k, v }) => {
      k[at(0, 9, 0)] = NaN;
      v[at(0, 9, 0)] = NaN;
    },
    options: { keyPaddingMask: { data: padding([9]), shape: [1, S] } },
    ref: { keyPaddingMask: { data: padding([9]), shape: [1, S] } },
    expectNaN: false,
    weaker: {
      flash: FLASH_V_LEAK,
      "flash-subgroup": FLASH_V_LEAK,
      sage: SAGE_BLOCKS,
      "sage-mma": SAGE_MMA_PADDED,
      "flash-mma": FLASH_MMA_V_CHANNEL,
    },
  },
  {
    name: "+Inf in k: rows with a positive score to it are NaN (inf - inf), others see -inf (masked)",
    poison: ({ k }) => void (k[at(1, 11, 4)] = Infinity),
    expectNaN: true,
    weaker: { sage: SAGE_BLOCKS, "sage-mma": SAGE_MMA_BLOCKS, "flash-mma": FLASH_MMA_INF },
  },
  {
    name: "-Infinity in an additive mask masks the key; a row of -Infinity is zeros",
    options: {
      attnMask: {
        data: additive((i, j) => (i === 6 || (j + i) % 5 === 0 ? -Infinity : 0.25 * Math.sin(i * j))),
        shape: [S, S],
      },
    },
    ref: {
      attnMask: {
        kind: "additive",
        data: additive((i, j) => (i === 6 || (j + i) % 5 === 0 ? -Infinity : 0.25 * Math.sin(i * j))),
        shape: [S, S],
      },
    },
  },
  {
    name: "NaN in an additive mask reaches its row only",
    options: { attnMask: { data: additive((i, j) => (i === 4 && j === 2 ? NaN : 0)), shape: [S, S] } },
    ref: {
      attnMask: { kind: "additive", data: additive((i, j) => (i === 4 && j === 2 ? NaN : 0)), shape: [S, S] },
    },
    expectNaN: true,
  },
  {
    name: "every key padded: zeros, log-sum-exp -Infinity",
    options: { keyPaddingMask: { data: padding([...Array(S).keys()]), shape: [1, S] } },
    ref: { keyPaddingMask: { data: padding([...Array(S).keys()]), shape: [1, S] } },
  },
];

function inputs(c: NanCase) {
  const random = rng(7);
  const make = () => Float64Array.from({ length: B * N * S * D }, () => random() * 2 - 1);
  const t = { q: make(), k: make(), v: make() };
  c.poison?.(t);
  const logical = (data: Float64Array): Logical => ({ data, sizes: { b: B, n: N, s: S, d: D } });
  const host = (data: Float64Array): HostTensor => ({ data: Float32Array.from(data), shape: [B, N, S, D] });
  // The reference sees the values as f32 holds them.
  const f32 = (x: Float64Array) => Float64Array.from(Float32Array.from(x));
  const ref = referenceAttention(logical(f32(t.q)), logical(f32(t.k)), logical(f32(t.v)), c.ref ?? {});
  return { q: host(t.q), k: host(t.k), v: host(t.v), ref };
}

for (const backend of BACKENDS) {
  const name = backend.name;
  for (const c of CASES) {
    const { q, k, v, ref } = inputs(c);
    const weaker = c.weaker?.[name];
    const reasons = backend.unsupportedReasons(resolveProblem(q, k, v, c.options), caps);
    const skip = reasons.length > 0 ? reasons.join("; ") : weaker?.ignore;
    Deno.test({
      name: `nan: ${name}: ${c.name}${skip ? ` [skipped: ${skip}]` : ""}`,
      ignore: skip !== undefined,
      fn: async () => {
        const { out, lse } = await attentionWithLse(q, k, v, { ...c.options, backend: name });
        const got = out.data as Float32Array, gotLse = lse.data as Float32Array;
        // f32 bounds of tests/conformance.ts (an approximate backend has its own).
        const tol = toleranceFor(name, "f32");
        let expectedNaN = 0;
        for (let row = 0; row < B * N * S; row++) {
          const l = ref.lse[row];
          if (Number.isNaN(l)) {
            assert.ok(Number.isNaN(gotLse[row]), `lse of row ${row} should be NaN, is ${gotLse[row]}`);
          } else if (l === -Infinity) assert.equal(gotLse[row], -Infinity, `lse of row ${row}`);
          else assert.ok(Math.abs(gotLse[row] - l) <= tol.lse, `lse of row ${row}: ${gotLse[row]} vs ${l}`);
          for (let c2 = 0; c2 < D; c2++) {
            const e = ref.out[row * D + c2], g = got[row * D + c2];
            const where = `row ${row} (head ${Math.floor(row / S)}, query ${row % S}), column ${c2}`;
            if (Number.isNaN(e)) {
              expectedNaN++;
              assert.ok(Number.isNaN(g), `${where} should be NaN, is ${g}`);
            } else if (weaker?.extraNaN && Number.isNaN(g)) {
              // Allowed for this backend: NaN, never a wrong finite number.
            } else if (l === -Infinity) {
              assert.ok(g === 0, `${where}: a fully masked row is zeros, got ${g}`);
            } else {
              assert.ok(Math.abs(g - e) <= tol.maxAbs, `${where}: ${g} vs ${e}`);
            }
          }
        }
        if (c.expectNaN !== undefined) {
          assert.equal(expectedNaN > 0, c.expectNaN, "the reference has NaN where the case says");
        }
      },
    });
  }
}
