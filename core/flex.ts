/**
 * Flex attention (PyTorch FlexAttention's `score_mod` / `mask_mod` / `create_block_mask`): the option
 * types, their strict validation into the {@link FlexView} a problem carries, the compile check of
 * the user's WGSL (a `WgattnError` naming the option, with the compiler's line), and block masks.
 */
import { WgattnError } from "./errors.ts";
import { describeValue } from "./options.ts";
import type { GpuRuntime } from "./device.ts";
import { isGpuBuffer } from "../engines/engine.ts";

/** Element types a mod buffer may hold. */
export type ModBufferDType = "f32" | "i32" | "u32";

/** A mod buffer in a `GPUBuffer` (STORAGE usage) of the device in use. */
export interface GpuModBuffer {
  /** Needs `STORAGE` usage; `COPY_SRC` too for the `cpu` backend, which reads it back. */
  buffer: GPUBuffer;
  /** Element type the functions read it as. */
  dtype: ModBufferDType;
  /** Elements; default the whole buffer. */
  length?: number;
}

/** A mod buffer: host data (`Float32Array` f32, `Int32Array` i32, `Uint32Array` u32) or a GPU buffer. */
export type ModBufferInput = Float32Array | Int32Array | Uint32Array | GpuModBuffer;

/** Host views of the mod buffers, by name, as the TypeScript forms of the functions get them. */
export type ModBufferData = Readonly<Record<string, Float32Array | Int32Array | Uint32Array>>;

/**
 * A score function: `wgsl` defines `fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32`
 * (score = scale · q·k in natural-log units; h the query head; q and kv positions in their own
 * sequences), and may define helpers. `ts`, the same function in TypeScript, lets the `cpu`
 * backend serve the call.
 */
export interface ScoreModFunction {
  /** WGSL defining `score_mod` (and any helpers it calls). */
  wgsl: string;
  /** The same function in TypeScript, for the `cpu` backend. */
  ts?: (score: number, b: number, h: number, q: number, kv: number, buffers: ModBufferData) => number;
}

/** A mask function: `wgsl` defines `fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool` (true = attend). */
export interface MaskModFunction {
  /** WGSL defining `mask_mod` (and any helpers it calls). */
  wgsl: string;
  /** The same function in TypeScript, for the `cpu` backend. */
  ts?: (b: number, h: number, q: number, kv: number, buffers: ModBufferData) => boolean;
}

/** `options.scoreMod`: WGSL text, or the WGSL with its TypeScript twin. */
export type ScoreMod = string | ScoreModFunction;
/** `options.maskMod`: WGSL text, or the WGSL with its TypeScript twin. */
export type MaskMod = string | MaskModFunction;

/** The flex options of a call (a part of `AttentionOptions`). */
export interface FlexOptions {
  /** Modifies each score before the softmax (see {@link ScoreModFunction}). */
  scoreMod?: ScoreMod;
  /** Which (query, key) pairs attend (see {@link MaskModFunction}); composes with every other mask. */
  maskMod?: MaskMod;
  /** Named arrays the functions read as `var<storage, read> name: array<f32 | i32 | u32>`. */
  modBuffers?: Readonly<Record<string, ModBufferInput>>;
  /** A block map from {@link createBlockMask}: fused kernels skip its empty tiles. */
  blockMask?: BlockMask;
}

/** One validated mod buffer: its name, element type, length, and host data or GPU buffer. */
export type FlexBuffer =
  & { name: string; dtype: ModBufferDType; length: number }
  & ({ residency: "host"; data: Float32Array | Int32Array | Uint32Array } | {
    residency: "gpu";
    buffer: GPUBuffer;
  });

/** What a problem carries for flex calls. */
export interface FlexView {
  scoreMod: { wgsl: string; ts?: ScoreModFunction["ts"] } | null;
  maskMod: { wgsl: string; ts?: MaskModFunction["ts"] } | null;
  /** Sorted by name (kernel texts and bindings follow this order). */
  buffers: FlexBuffer[];
  blockMask: BlockMask | null;
}

const IDENT = /^[A-Za-z][A-Za-z0-9_]*$/;
const WGSL_RESERVED = new Set([
  "array",
  "bool",
  "f32",
  "f16",
  "i32",
  "u32",
  "fn",
  "let",
  "var",
  "const",
  "struct",
  "return",
  "if",
  "else",
  "for",
  "loop",
  "while",
  "break",
  "continue",
  "true",
  "false",
  "score_mod",
  "mask_mod",
  "main",
]);

function modFunction(
  value: unknown,
  argument: string,
  fnName: "score_mod" | "mask_mod",
): { wgsl: string; ts?: any } {
  const signature = fnName === "score_mod"
    ? "fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32"
    : "fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool";
  const fail = (message: string): never => {
    throw new WgattnError("INVALID_OPTION", `${argument} ${message}`, {
      argument,
      expected: `WGSL text defining ${signature}, or { wgsl, ts? }`,
      actual: describeValue(value),
    });
  };
  let wgsl: unknown, ts: unknown;
  if (typeof value === "string") wgsl = value;
  else if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const key of Object.keys(value)) {
      if (key !== "wgsl" && key !== "ts") fail(`has an unknown key ${JSON.stringify(key)}`);
    }
    ({ wgsl, ts } = value as { wgsl?: unknown; ts?: unknown });
    if (ts !== undefined && typeof ts !== "function") fail("ts must be a function");
  } else fail("must be WGSL text or { wgsl, ts? }");
  if (typeof wgsl !== "string") return fail("needs its WGSL text");
  if (!new RegExp(`\\bfn\\s+${fnName}\\s*\\(`).test(wgsl)) fail(`does not define fn ${fnName}`);
  return { wgsl, ts: ts as any };
}

function modBuffers(value: unknown): FlexBuffer[] {
  if (value === undefined || value === null) return [];
  if (typeof value !== "object" || Array.isArray(value)) {
    throw new WgattnError("INVALID_OPTION", "options.modBuffers must be an object of named arrays", {
      argument: "options.modBuffers",
      expected: "{ name: Float32Array | Int32Array | Uint32Array | { buffer, dtype } }",
      actual: describeValue(value),
    });
  }
  const out: FlexBuffer[] = [];
  for (const [name, x] of Object.entries(value).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    const argument = `options.modBuffers.${name}`;
    if (!IDENT.test(name) || WGSL_RESERVED.has(name)) {
      throw new WgattnError("INVALID_OPTION", `${argument}: the name is not a usable WGSL identifier`, {
        argument,
        expected: "a WGSL identifier (a letter, then letters, digits, _) that is not a keyword",
        actual: JSON.stringify(name),
      });
    }
    if (x instanceof Float32Array || x instanceof Int32Array || x instanceof Uint32Array) {
      if (x.length === 0) {
        throw new WgattnError("INVALID_OPTION", `${argument} is empty`, {
          argument,
          expected: "at least one element",
          actual: "0 elements",
        });
      }
      const dtype = x instanceof Float32Array ? "f32" : x instanceof Int32Array ? "i32" : "u32";
      out.push({ name, dtype, length: x.length, residency: "host", data: x });
      continue;
    }
    const g = x as Partial<GpuModBuffer> | null;
    if (
      g && typeof g === "object" && isGpuBuffer(g.buffer) &&
      (g.dtype === "f32" || g.dtype === "i32" || g.dtype === "u32")
    ) {
      const whole = Math.floor(g.buffer.size / 4);
      const length = g.length ?? whole;
      if (!Number.isInteger(length) || length < 1 || length > whole) {
        throw new WgattnError("INVALID_OPTION", `${argument}.length does not fit its buffer`, {
          argument: `${argument}.length`,
          expected: `an integer from 1 to ${whole}`,
          actual: describeValue(g.length),
        });
      }
      if ((g.buffer.usage & GPUBufferUsage.STORAGE) === 0) {
        throw new WgattnError("INVALID_BUFFER", `${argument}.buffer lacks STORAGE usage`, {
          argument,
          expected: "a GPUBuffer created with GPUBufferUsage.STORAGE",
          actual: `usage ${g.buffer.usage}`,
        });
      }
      out.push({ name, dtype: g.dtype, length, residency: "gpu", buffer: g.buffer });
      continue;
    }
    throw new WgattnError(
      "INVALID_OPTION",
      `${argument} must be a Float32Array, Int32Array, Uint32Array or a GPU buffer`,
      {
        argument,
        expected:
          "Float32Array | Int32Array | Uint32Array | { buffer: GPUBuffer, dtype: 'f32' | 'i32' | 'u32' }",
        actual: describeValue(x),
      },
    );
  }
  return out;
}

/**
 * Validates the flex options of a call against its sizes into a {@link FlexView}; null when the
 * call uses none.
 */
export function resolveFlex(
  options: FlexOptions,
  sizes: { b: number; n: number; sQ: number; sKv: number },
): FlexView | null {
  const { scoreMod, maskMod, blockMask } = options;
  if (scoreMod === undefined && maskMod === undefined && blockMask === undefined) {
    if (options.modBuffers !== undefined) {
      throw new WgattnError(
        "INVALID_OPTION",
        "options.modBuffers needs options.scoreMod or options.maskMod",
        {
          argument: "options.modBuffers",
          expected: "a scoreMod, maskMod or blockMask that reads the buffers",
          actual: "neither given",
        },
      );
    }
    return null;
  }
  const score = scoreMod === undefined ? null : modFunction(scoreMod, "options.scoreMod", "score_mod");
  let mask = maskMod === undefined ? null : modFunction(maskMod, "options.maskMod", "mask_mod");
  let buffers = modBuffers(options.modBuffers);
  let handle: BlockMask | null = null;
  if (blockMask !== undefined) {
    if (!(blockMask instanceof BlockMask)) {
      throw new WgattnError("INVALID_OPTION", "options.blockMask must come from createBlockMask()", {
        argument: "options.blockMask",
        expected: "a BlockMask from createBlockMask()",
        actual: describeValue(blockMask),
      });
    }
    handle = blockMask;
    if (handle.destroyed) {
      throw new WgattnError("INVALID_OPTION", "options.blockMask was destroyed", {
        argument: "options.blockMask",
        expected: "a live BlockMask",
        actual: "destroyed",
      });
    }
    if (mask && mask.wgsl !== handle.maskMod.wgsl) {
      throw new WgattnError(
        "INVALID_OPTION",
        "options.maskMod differs from the one options.blockMask was made from",
        {
          argument: "options.maskMod",
          expected: "the same WGSL text as the block mask's (or leave maskMod out: the block mask's is used)",
          actual: "another text",
        },
      );
    }
    // As FlexAttention's BlockMask: the handle carries its mask function (and the buffers it read).
    mask = { wgsl: handle.maskMod.wgsl, ts: mask?.ts ?? handle.maskMod.ts };
    const own = new Set(buffers.map((x) => x.name));
    buffers = [...buffers, ...handle.buffers.filter((x) => !own.has(x.name))]
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    if (
      (handle.b !== 1 && handle.b !== sizes.b) || (handle.n !== 1 && handle.n !== sizes.n) ||
      handle.sQ !== sizes.sQ || handle.sKv !== sizes.sKv
    ) {
      throw new WgattnError("INVALID_OPTION", "options.blockMask was made for another shape", {
        argument: "options.blockMask",
        expected:
          `a block mask of [b, n, s_q, s_kv] = [${sizes.b} (or 1), ${sizes.n} (or 1), ${sizes.sQ}, ${sizes.sKv}]`,
        actual: `[${handle.b}, ${handle.n}, ${handle.sQ}, ${handle.sKv}]`,
      });
    }
  }
  return { scoreMod: score, maskMod: mask, buffers, blockMask: handle };
}

/** The storage declarations of mod buffers, from binding `first` on. */
export function modBufferDecls(buffers: readonly { name: string; dtype: string }[], first: number): string {
  return buffers.map((x, i) =>
    `@group(0) @binding(${first + i}) var<storage, read> ${x.name}: array<${x.dtype}>;\n`
  ).join("");
}

/** The line:column and message of the first error in a WGSL compiler's report (Naga or Tint). */
export function compilerError(message: string): { line?: number; column?: number; text: string } {
  const lines = message.split("\n").map((l) => l.trim()).filter((l) => l.length > 0);
  // Tint: ":3:12 error: unresolved identifier 'foo'" (warnings may come first).
  const tint = lines.find((l) => /\d+:\d+ error:/.test(l));
  if (tint) {
    const m = /(\d+):(\d+) error:\s*(.*)$/.exec(tint)!;
    return { line: Number(m[1]), column: Number(m[2]), text: m[3] };
  }
  // Naga: "Shader '' parsing error: no definition ..." or "Shader validation error: Function [0]
  // 'mask_mod' is invalid", a "┌─ wgsl:2:18" location, the source lines with "^^" under the
  // culprit, and for validation errors a "= why" note.
  const span = lines.map((l) => /┌─\s*[^:\s]*:(\d+):(\d+)/.exec(l)).find((m) => m);
  let line = span ? Number(span[1]) : undefined, column = span ? Number(span[2]) : undefined;
  let numbered: number | null = null;
  for (const raw of message.split("\n")) {
    const n = /^\s*(\d+)\s*│/.exec(raw);
    if (n) numbered = Number(n[1]);
    else if (numbered !== null && /│[\s│]*\^/.test(raw) && !raw.includes("╰")) {
      // The source line above the first "^^" marker (its column is hard to read past nested gutters).
      if (numbered !== line) [line, column] = [numbered, undefined];
      break;
    }
  }
  const note = lines.find((l) => l.startsWith("= "))?.slice(2);
  const text = note ?? (lines.find((l) => /error/i.test(l)) ?? lines[0] ?? message)
    .replace(/^Shader '[^']*' (parsing|validation) error:\s*/i, "");
  return { line, column, text };
}

const compiled = new WeakMap<GpuRuntime, Map<string, Promise<void>>>();

/**
 * Compiles each of the call's functions alone (its text first, so the compiler's line numbers are
 * the text's own) with the mod buffers declared, calling it with the documented signature. Refuses
 * a function that does not compile with INVALID_OPTION naming the option, the line and the
 * compiler's message, before anything is queued. Cached per device and text.
 */
export async function checkFlexCompiles(rt: GpuRuntime, f: FlexView): Promise<void> {
  let cache = compiled.get(rt);
  if (!cache) compiled.set(rt, cache = new Map());
  const decls = modBufferDecls(f.buffers, 0);
  const checks: Promise<void>[] = [];
  const each: [string, string | undefined, string][] = [
    ["options.scoreMod", f.scoreMod?.wgsl, "let flex_s: f32 = score_mod(1.0, 0u, 0u, 0u, 0u); _ = flex_s;"],
    ["options.maskMod", f.maskMod?.wgsl, "let flex_m: bool = mask_mod(0u, 0u, 0u, 0u); _ = flex_m;"],
  ];
  for (const [argument, text, use] of each) {
    if (text === undefined) continue;
    const code = `${text}\n${decls}@compute @workgroup_size(1) fn main() { ${use} }\n`;
    let check = cache.get(code);
    if (!check) {
      check = compileProbe(rt, code).then((error) => {
        if (error === null) return;
        const userLines = text.split("\n").length;
        const e = compilerError(error);
        const where = e.line !== undefined && e.line <= userLines
          ? `line ${e.line}${e.column ? `:${e.column}` : ""}`
          : "its signature or a name it uses";
        const source = e.line !== undefined && e.line <= userLines ? text.split("\n")[e.line - 1].trim() : "";
        throw new WgattnError("INVALID_OPTION", `${argument} does not compile (${where}): ${e.text}`, {
          argument,
          expected: argument === "options.scoreMod"
            ? "WGSL defining fn score_mod(score: f32, b: u32, h: u32, q: u32, kv: u32) -> f32"
            : "WGSL defining fn mask_mod(b: u32, h: u32, q: u32, kv: u32) -> bool",
          actual: source ? `${where}: ${source}` : `${rt.engine.compiler}: ${e.text}`,
        });
      });
      cache.set(code, check);
      check.catch(() => cache!.delete(code));
    }
    checks.push(check);
  }
  await Promise.all(checks);
}

/** The compiler's message for `code`, or null when it compiles. */
async function compileProbe(rt: GpuRuntime, code: string): Promise<string | null> {
  const device = rt.device;
  device.pushErrorScope("validation");
  let module: GPUShaderModule;
  try {
    module = device.createShaderModule({ code, label: "wgattn flex check" });
  } catch (e) {
    device.popErrorScope().catch(() => null);
    return (e as Error).message;
  }
  const diagnostics = rt.engine.hold(device.popErrorScope().catch(() => null));
  try {
    await rt.engine.createComputePipeline(device, {
      layout: "auto",
      compute: { module, entryPoint: "main" },
    });
  } catch (e) {
    return (await diagnostics)?.message ?? (e as Error).message;
  }
  const d = await diagnostics;
  return d ? d.message : null;
}

/** Block states in a block map. */
export const BLOCK_EMPTY = 0, BLOCK_PARTIAL = 1, BLOCK_FULL = 2;

/**
 * A block map made by {@link createBlockMask}: for each (batch, head, query block, key block), whether
 * `mask_mod` is false everywhere (empty), true everywhere (full) or mixed (partial). Pass it as
 * `options.blockMask`; it is reusable across calls of its shape on its device. `b` or `n` of 1
 * broadcasts (the mask was evaluated at batch or head 0).
 */
export class BlockMask {
  /** Batch size, or 1 (broadcast). */
  readonly b: number;
  /** Query heads, or 1 (broadcast). */
  readonly n: number;
  /** Query sequence length. */
  readonly sQ: number;
  /** Key sequence length. */
  readonly sKv: number;
  /** Query rows per block. */
  readonly blockQ: number;
  /** Keys per block. */
  readonly blockKv: number;
  /** The mask function it was evaluated from. */
  readonly maskMod: { wgsl: string; ts?: MaskModFunction["ts"] };
  /** The mod buffers the mask read (calls with this block mask bind them too). */
  readonly buffers: readonly FlexBuffer[];
  /** The device it lives on. */
  readonly device: GPUDevice;
  /** u32 per block, [b, n, ceil(sQ / blockQ), ceil(sKv / blockKv)]: 0 empty, 1 partial, 2 full. */
  readonly buffer: GPUBuffer;
  /** Blocks of each state, once {@link counts} was awaited. */
  #counts: Promise<{ empty: number; partial: number; full: number }> | null = null;
  #destroyed = false;

  /** Made by {@link createBlockMask}. */
  constructor(init: {
    b: number;
    n: number;
    sQ: number;
    sKv: number;
    blockQ: number;
    blockKv: number;
    maskMod: { wgsl: string; ts?: MaskModFunction["ts"] };
    buffers: readonly FlexBuffer[];
    device: GPUDevice;
    buffer: GPUBuffer;
    read: () => Promise<Uint32Array>;
  }) {
    this.b = init.b;
    this.n = init.n;
    this.sQ = init.sQ;
    this.sKv = init.sKv;
    this.blockQ = init.blockQ;
    this.blockKv = init.blockKv;
    this.maskMod = init.maskMod;
    this.buffers = init.buffers;
    this.device = init.device;
    this.buffer = init.buffer;
    this.#read = init.read;
  }
  #read: () => Promise<Uint32Array>;

  /** Query blocks. */
  get queryBlocks(): number {
    return Math.ceil(this.sQ / this.blockQ);
  }

  /** Key blocks. */
  get keyBlocks(): number {
    return Math.ceil(this.sKv / this.blockKv);
  }

  /** Whether {@link destroy} was called. */
  get destroyed(): boolean {
    return this.#destroyed;
  }

  /** How many blocks are empty, partial and full (reads the map back: one host wait). */
  counts(): Promise<{ empty: number; partial: number; full: number }> {
    this.#counts ??= this.#read().then((states) => {
      const c = { empty: 0, partial: 0, full: 0 };
      for (const s of states) {
        if (s === BLOCK_EMPTY) c.empty++;
        else if (s === BLOCK_FULL) c.full++;
        else c.partial++;
      }
      return c;
    });
    return this.#counts;
  }

  /** Frees the block map's GPU buffer; calls can no longer use it. */
  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.buffer.destroy();
  }
}

/**
 * The GPU-side checks of a flex call, before anything is recorded: its block mask lives on this
 * device, and each function compiles ({@link checkFlexCompiles}).
 */
export async function checkFlexCall(rt: GpuRuntime, f: FlexView): Promise<void> {
  if (f.blockMask && f.blockMask.device !== rt.device) {
    throw new WgattnError("INVALID_OPTION", "options.blockMask belongs to another GPUDevice", {
      argument: "options.blockMask",
      expected: "a block mask made on the device of the call (createBlockMask's options.device)",
      actual: "another device",
    });
  }
  await checkFlexCompiles(rt, f);
}
