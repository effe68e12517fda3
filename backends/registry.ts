/** Every backend, in the router's priority order (fastest first; `cpu` last, always able). */
import type { Backend } from "./backend.ts";
import { cpuBackend } from "./cpu.ts";
import { flashBackend } from "./flash.ts";
import { flashSubgroupBackend } from "./flash_subgroup.ts";
import { naiveBackend } from "./naive.ts";
import { sageBackend } from "./sage.ts";
import { splitKvBackend } from "./splitkv.ts";

export const BACKENDS: readonly Backend[] = [
  splitKvBackend, // few query rows per K/V head only (unsuitedReasons); flash past that
  flashBackend,
  flashSubgroupBackend,
  sageBackend, // approximate: only by name (unsuitedReasons)
  naiveBackend,
  cpuBackend,
];
