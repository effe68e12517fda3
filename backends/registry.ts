/** Every backend, in the router's priority order (fastest first; `cpu` last, always able). */
import type { Backend } from "./backend.ts";
import { cpuBackend } from "./cpu.ts";
import { flashBackend } from "./flash.ts";
import { flashMmaBackend } from "./flash_mma.ts";
import { flashSubgroupBackend } from "./flash_subgroup.ts";
import { naiveBackend } from "./naive.ts";
import { sageBackend } from "./sage.ts";
import { sageMmaBackend } from "./sage_mma.ts";
import { splitKvBackend } from "./splitkv.ts";

export const BACKENDS: readonly Backend[] = [
  splitKvBackend, // few query rows per K/V head only (unsuitedReasons); flash past that
  // int8 matrix tiles (Dawn's subgroup matrices): 16-bit inputs past its crossover only
  // (unsuitedReasons); its emulated form (WGATTN_EMULATE_MMA=1) only by name.
  sageMmaBackend,
  // 16-bit inputs with s_q, s_kv >= 2048 only (unsuitedReasons): 1.35-1.50x flash-subgroup (f16) on the
  // H200 there (bench/RESULTS.md, run 7); approximate, so never chosen for f32 unless named.
  sageBackend,
  // Exact f32 on int8 matrix tiles (Ozaki-style slices): f32 calls from FLASH_MMA_MIN_SEQ on, which
  // the H200 measurement sets (unsuitedReasons; until then by name only); its emulated form by name only.
  flashMmaBackend,
  // Subgroup reductions measured 3% to 11% faster than workgroup memory on the H200 in all 12 suite
  // rows (bench/RESULTS.md, run 7); flash serves devices without subgroups.
  flashSubgroupBackend,
  flashBackend,
  naiveBackend,
  cpuBackend,
];
