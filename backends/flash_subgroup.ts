/**
 * `flash-subgroup`: the `flash` kernel with row max and row sum exchanged between the threads of
 * a row by subgroup shuffles instead of workgroup memory and a barrier. Needs subgroups whose size
 * covers a row's threads.
 */
import type { GpuBackend } from "./backend.ts";
import { encodeFlash, flashUnsupportedReasons } from "./flash.ts";

/** The subgroup variant of `flash`. */
export const flashSubgroupBackend: GpuBackend = {
  kind: "gpu",
  name: "flash-subgroup",
  aliases: ["flash_subgroup"],
  summary: "flash with subgroup shuffles for the row max and sum",
  producesLse: true,
  unsupportedReasons: (p, caps) => flashUnsupportedReasons(p, caps, true),
  encode: (p, io, call) => encodeFlash(p, io, call, true),
};
