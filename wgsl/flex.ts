/**
 * The flex hook of the kernel generators: the user's `score_mod` / `mask_mod` WGSL and the mod
 * buffers' storage bindings emitted into a kernel, the per-score code (score_mod on the scaled
 * score in natural-log units, mask_mod as -inf), the block-map lookup the fused kernels skip tiles
 * by, and the kernel that builds a block map.
 */
import { WgattnError } from "../core/errors.ts";
import { modBufferDecls } from "../core/flex.ts";
import {
  type Kernel,
  LINEAR_WORKGROUP,
  uniformBlock,
  type UniformType,
  WORKGROUP_BUILTINS,
} from "./common.ts";

/** What of a call's flex options changes a kernel's text. */
export interface FlexKernelConfig {
  scoreMod: string | null;
  maskMod: string | null;
  /** Mod buffers, sorted by name. */
  buffers: readonly { name: string; dtype: string }[];
  /** A block map (binding `flex_blocks`) is read per key tile (fused kernels). */
  blockMap: boolean;
}

/** The flex part of a pipeline cache key: the functions' full text and the buffers' declarations. */
export function flexKey(f: FlexKernelConfig | null | undefined): string {
  if (!f) return "";
  return `:flex${
    JSON.stringify([f.scoreMod, f.maskMod, f.buffers.map((x) => `${x.name}:${x.dtype}`), f.blockMap])
  }`;
}

/**
 * Uniforms a fused kernel adds with a block map: block sizes, blocks per row and column, and the
 * map's batch and head strides in blocks (0 where it broadcasts).
 */
export const BLOCK_MAP_UNIFORMS: [string, UniformType][] = [
  ["fb_bq", "u32"],
  ["fb_bk", "u32"],
  ["fb_nq", "u32"],
  ["fb_nk", "u32"],
  ["fb_sb", "u32"],
  ["fb_sh", "u32"],
];

/** Module-scope names a WGSL text declares (at the start of a line). */
function declaredNames(code: string): Set<string> {
  const names = new Set<string>();
  const re =
    /^(?:@[^\n]*?\s)?(?:var(?:<[^>]*>)?|const|fn|struct|alias|override)\s+([A-Za-z_][A-Za-z0-9_]*)/gm;
  for (const m of code.matchAll(re)) names.add(m[1]);
  for (const m of code.matchAll(/\bfn\s+([A-Za-z_][A-Za-z0-9_]*)/g)) names.add(m[1]);
  return names;
}

/**
 * The flex declarations of a kernel (user functions, mod buffers from binding `first`, the block
 * map and its lookup), with the binding names they add. Refuses a user name that a kernel's own
 * module-scope name already takes (INVALID_OPTION naming the option).
 */
export function flexDeclarations(
  f: FlexKernelConfig,
  kernelCode: string,
  first: number,
  tileKeys?: number,
): { code: string; bindings: string[] } {
  const taken = declaredNames(kernelCode);
  const clash = (names: Iterable<string>, argument: string) => {
    for (const name of names) {
      if (taken.has(name) || name.startsWith("flex_")) {
        throw new WgattnError("INVALID_OPTION", `${argument} declares ${name}, a name the kernel uses`, {
          argument,
          expected: "names other than the kernels' own (q, k, v, o, mask, lse, P, ...) and not flex_*",
          actual: JSON.stringify(name),
        });
      }
    }
  };
  if (f.scoreMod) clash([...declaredNames(f.scoreMod)].filter((x) => x !== "score_mod"), "options.scoreMod");
  if (f.maskMod) clash([...declaredNames(f.maskMod)].filter((x) => x !== "mask_mod"), "options.maskMod");
  clash(f.buffers.map((x) => x.name), "options.modBuffers");
  let code = "";
  if (f.scoreMod) code += f.scoreMod + "\n";
  if (f.maskMod) code += f.maskMod + "\n";
  // Only the buffers the texts name: a layout "auto" leaves unused bindings out, and the bind group
  // must match it.
  const used = f.buffers.filter((x) => new RegExp(`\\b${x.name}\\b`).test(code));
  code += modBufferDecls(used, first);
  const bindings = used.map((x) => x.name);
  if (f.blockMap) {
    code += `@group(0) @binding(${first + bindings.length}) var<storage, read> flex_blocks: array<u32>;\n`;
    bindings.push("flex_blocks");
    // A tile's state from the blocks it overlaps (0 empty, 1 partial, 2 full). Every argument is
    // uniform over the workgroup and the map is read-only storage, so the result is too: the tile
    // loop may branch on it around its barriers.
    code += `fn flex_tile(bb: u32, hh: u32, r0: u32, r1: u32, t: u32) -> u32 {
  let k0 = t * ${tileKeys}u;
  let k1 = min(k0 + ${tileKeys}u, P.s_kv);
  let base = bb * P.fb_sb + hh * P.fb_sh;
  var live = false;
  var full = true;
  for (var x = r0 / P.fb_bq; x <= (r1 - 1u) / P.fb_bq; x++) {
    for (var y = k0 / P.fb_bk; y <= (k1 - 1u) / P.fb_bk; y++) {
      let st = flex_blocks[base + x * P.fb_nk + y];
      live = live || st != 0u;
      full = full && st == 2u;
    }
  }
  return select(select(0u, 1u, live), 2u, full);
}
fn flex_next(bb: u32, hh: u32, r0: u32, r1: u32, t: u32, t_hi: u32) -> u32 {
  var x = t;
  loop {
    if (x >= t_hi) { break; }
    if (flex_tile(bb, hh, r0, r1, x) != 0u) { break; }
    x++;
  }
  return x;
}
`;
  }
  return { code, bindings };
}

/**
 * WGSL statements applying the flex functions to one score variable `s` holding the scaled score in
 * natural-log units: `s = score_mod(s, ...)`, then -inf (`neg`) where `mask_mod` refuses; `skipMask`
 * is a WGSL bool that, when true, skips the mask test (a full tile).
 */
export function flexScoreStatements(
  f: FlexKernelConfig,
  s: string,
  args: { b: string; h: string; q: string; kv: string },
  neg: string,
  skipMask?: string,
): string {
  const out: string[] = [];
  if (f.scoreMod) out.push(`${s} = score_mod(${s}, ${args.b}, ${args.h}, ${args.q}, ${args.kv});`);
  if (f.maskMod) {
    const test = `mask_mod(${args.b}, ${args.h}, ${args.q}, ${args.kv})`;
    out.push(`${s} = select(${neg}, ${s}, ${skipMask ? `${skipMask} || ${test}` : test});`);
  }
  return out.join(" ");
}

/** Uniforms of the block-map kernel. */
const BLOCK_MASK_UNIFORMS: [string, UniformType][] = [
  ["groups", "u32"],
  ["n", "u32"],
  ["s_q", "u32"],
  ["s_kv", "u32"],
  ["bq", "u32"],
  ["bk", "u32"],
  ["nq", "u32"],
  ["nk", "u32"],
];

/**
 * The kernel that evaluates `mask_mod` over every element of each block (one workgroup of 256 per
 * block of the map [b, n, nq, nk]) and writes its state: 0 empty, 1 partial, 2 full.
 */
export function blockMaskKernel(
  maskMod: string,
  buffers: readonly { name: string; dtype: string }[],
): Kernel {
  const f: FlexKernelConfig = { scoreMod: null, maskMod, buffers, blockMap: false };
  const head = uniformBlock(BLOCK_MASK_UNIFORMS) +
    `@group(0) @binding(1) var<storage, read_write> flex_map: array<u32>;\nvar<workgroup> flex_seen: atomic<u32>;\n`;
  const { code: decls, bindings } = flexDeclarations(f, head, 2);
  const code = head + decls + `
@compute @workgroup_size(256)
fn main(${WORKGROUP_BUILTINS}) {
  ${LINEAR_WORKGROUP}
  let y = wg % P.nk;
  let x = (wg / P.nk) % P.nq;
  let bh = wg / (P.nk * P.nq);
  let h = bh % P.n;
  let b = bh / P.n;
  let q0 = x * P.bq;
  let k0 = y * P.bk;
  let rows = min(P.bq, P.s_q - q0);
  let cols = min(P.bk, P.s_kv - k0);
  if (lid == 0u) { atomicStore(&flex_seen, 0u); }
  workgroupBarrier();
  // Bit 0: some element attends; bit 1: some element does not.
  var seen = 0u;
  for (var e = lid; e < rows * cols; e += 256u) {
    seen |= select(2u, 1u, mask_mod(b, h, q0 + e / cols, k0 + e % cols));
    if (seen == 3u) { break; }
  }
  atomicOr(&flex_seen, seen);
  workgroupBarrier();
  if (lid == 0u) {
    let all = atomicLoad(&flex_seen);
    flex_map[wg] = select(select(0u, 1u, all == 3u), 2u, all == 1u);
  }
}
`;
  return {
    key: `flex-blockmask${flexKey(f)}`,
    label: "flex block mask",
    code,
    bindings: ["flex_map", ...bindings],
    uniforms: BLOCK_MASK_UNIFORMS,
  };
}
