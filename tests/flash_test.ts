/**
 * flash-specific cases beyond the shared conformance suite: tile parameters the software adapter
 * would not pick by itself (it takes the smallest tile, whose code compiles fastest: the 64-row
 * tiles GPUs get, the 8x4 warp layout, wide thread grids, small V chunks, the flat and the
 * row-pointer layouts of workgroup memory), against the float64 reference.
 */
import assert from "node:assert/strict";
import { attentionForward, attentionWithLse, deviceInfo } from "../mod.ts";
import { flashTuning } from "../backends/flash.ts";
import { debug } from "../core/gpu.ts";
import type { FlashConfig } from "../wgsl/flash.ts";
import { errorStats, randomLogical, referenceAttention, rng } from "./reference.ts";

const info = await deviceInfo();
const small = { storage: info?.limits.maxComputeWorkgroupStorageSize ?? 0 };

const VARIANTS: { name: string; tiles: Partial<FlashConfig> }[] = [
  // The 64-row tiles GPUs get, within the 32 KiB of workgroup memory software adapters have.
  {
    name: "64x64, 16x16 threads, flat",
    tiles: { br: 64, bc: 64, rt: 16, ct: 16, vc: 4, dk: 8, pointers: false },
  },
  { name: "32x64, 8x16 threads, flat", tiles: { br: 32, bc: 64, rt: 8, ct: 16, vc: 8, pointers: false } },
  // Flat workgroup-memory layout (pointers: false), the one the int8 mode uses.
  {
    name: "8x4 warp layout (ct 16)",
    tiles: { br: 16, bc: 32, rt: 4, ct: 16, vc: 8, swizzle: true, pointers: false },
  },
  {
    name: "row-major warps (ct 16)",
    tiles: { br: 16, bc: 32, rt: 4, ct: 16, vc: 8, swizzle: false, pointers: false },
  },
  { name: "bc 16, vc 4, dk 8", tiles: { br: 16, bc: 16, rt: 4, ct: 4, vc: 4, dk: 8, pointers: false } },
  { name: "row pointers (ct 16)", tiles: { br: 16, bc: 32, rt: 4, ct: 16, vc: 8, pointers: true } },
  { name: "row pointers, vc 4, dk 8", tiles: { br: 16, bc: 16, rt: 4, ct: 4, vc: 4, dk: 8, pointers: true } },
];
const CASES = [
  { b: 1, n: 2, sQ: 33, sKv: 33, d: 64, opts: {} },
  { b: 1, n: 2, sQ: 17, sKv: 70, d: 128, opts: { isCausal: true } },
  { b: 2, n: 2, sQ: 40, sKv: 40, d: 40, opts: { windowSize: [6, 2] as [number, number] } },
];

for (const variant of VARIANTS) {
  for (const c of CASES) {
    Deno.test({
      name: `flash tiles ${variant.name}: b${c.b} n${c.n} s_q${c.sQ} s_kv${c.sKv} d${c.d} ${
        JSON.stringify(c.opts)
      }${info ? "" : " [skipped: no WebGPU adapter]"}`,
      ignore: !info || small.storage < 8192,
      async fn() {
        const random = rng(c.sQ * 7 + c.d);
        const q = randomLogical({ b: c.b, n: c.n, s: c.sQ, d: c.d }, random);
        const k = randomLogical({ b: c.b, n: c.n, s: c.sKv, d: c.d }, random);
        const v = randomLogical({ b: c.b, n: c.n, s: c.sKv, d: c.d }, random);
        const t = (x: typeof q) => ({
          data: Float32Array.from(x.data),
          shape: [x.sizes.b, x.sizes.n, x.sizes.s, x.sizes.d],
        });
        const ref = referenceAttention(q, k, v, c.opts);
        debug.poisonOutputs = true;
        flashTuning.override = variant.tiles;
        try {
          const { out, lse } = await attentionWithLse(t(q), t(k), t(v), { ...c.opts, backend: "flash" });
          const e = errorStats(out.data as Float32Array, ref.out);
          assert.ok(e.maxAbs < 2e-5, `max abs error ${e.maxAbs}`);
          const l = errorStats(lse.data as Float32Array, ref.lse);
          assert.ok(l.maxAbs < 1e-4, `lse max abs error ${l.maxAbs}`);
          const plain = await attentionForward(t(q), t(k), t(v), { ...c.opts, backend: "flash" });
          assert.deepEqual(plain.data, out.data, "with and without lse: same bits");
        } finally {
          flashTuning.override = null;
          debug.poisonOutputs = false;
        }
      },
    });
  }
}
