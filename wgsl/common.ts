/**
 * Pieces shared by the kernel generators: uniform structs, dtype-aware loads and stores, and the
 * kernel descriptor the backends hand to the GPU runner.
 */
import type { DType } from "../core/types.ts";

/** A uniform field's WGSL type. */
export type UniformType = "u32" | "i32" | "f32";

/** A generated compute kernel, ready to compile and bind. */
export interface Kernel {
  /** Pipeline cache key: every parameter that changes the WGSL text. */
  key: string;
  /** Human-readable name for errors and profiles. */
  label: string;
  /** WGSL source (entry point `main`). */
  code: string;
  /** Storage bindings in binding order (binding i+1; binding 0 is the uniform block). */
  bindings: readonly string[];
  /** Uniform fields in declaration order. */
  uniforms: readonly (readonly [string, UniformType])[];
}

/** Generated kernels by generator and config, so that a call does not write its WGSL again. */
const generated = new Map<string, Kernel>();
/** Most kernels remembered (a map of recent ones, cleared when full: a serving loop uses few). */
const GENERATED_MAX = 512;

/**
 * `make(config)`, generated once per distinct config: writing a kernel's text takes about 0.6 ms
 * (flash at the seed shape, on the H200's host), which a call on small tensors would pay every time.
 * The config must be plain data (it is compared by its JSON).
 */
export function kernelOf<C>(make: (config: C) => Kernel, config: C): Kernel {
  const key = `${make.name}:${JSON.stringify(config)}`;
  let kernel = generated.get(key);
  if (!kernel) {
    if (generated.size >= GENERATED_MAX) generated.clear();
    generated.set(key, kernel = make(config));
  }
  return kernel;
}

/**
 * WGSL expressions for +Infinity and -Infinity. Tint rejects a constant expression whose value is
 * an infinity (`bitcast<f32>(0x7f800000u)` does not compile on Dawn), so they are read from private
 * variables that {@link uniformBlock} declares in every kernel.
 */
export const POS_INF = "bitcast<f32>(POS_INF_BITS)";
/** See {@link POS_INF}. */
export const NEG_INF = "bitcast<f32>(NEG_INF_BITS)";
const INFINITY_BITS =
  "var<private> POS_INF_BITS: u32 = 0x7f800000u;\nvar<private> NEG_INF_BITS: u32 = 0xff800000u;\n";

/**
 * WGSL text of the uniform struct `Params` bound at group 0, binding 0 (and the bits behind
 * {@link POS_INF} and {@link NEG_INF}).
 */
export function uniformBlock(fields: readonly (readonly [string, UniformType])[]): string {
  const body = fields.map(([name, type]) => `  ${name}: ${type},`).join("\n");
  return `struct Params {\n${body}\n}\n@group(0) @binding(0) var<uniform> P: Params;\n${INFINITY_BITS}`;
}

/** Packs uniform values (16-byte aligned block of 4-byte fields). */
export function packUniforms(
  fields: readonly (readonly [string, UniformType])[],
  values: Record<string, number>,
): ArrayBuffer {
  const bytes = new ArrayBuffer(Math.max(16, Math.ceil((fields.length * 4) / 16) * 16));
  const view = new DataView(bytes);
  fields.forEach(([name, type], i) => {
    const value = values[name];
    if (value === undefined) throw new Error(`uniform ${name} has no value`);
    if (type === "f32") view.setFloat32(i * 4, value, true);
    else if (type === "i32") view.setInt32(i * 4, Math.max(-2147483648, Math.min(2147483647, value)), true);
    else view.setUint32(i * 4, value >>> 0, true);
  });
  return bytes;
}

/** How a tensor of `dtype` is declared in WGSL storage. */
export function storageElement(dtype: DType, f16: boolean): string {
  if (dtype === "f32") return "f32";
  if (dtype === "f16" && f16) return "f16";
  return "u32"; // 16-bit values packed two to a word
}

/** Declares a storage binding. */
export function storageDecl(
  name: string,
  binding: number,
  element: string,
  access: "read" | "read_write",
): string {
  return `@group(0) @binding(${binding}) var<storage, ${access}> ${name}: array<${element}>;\n`;
}

/**
 * A WGSL function `ld_<name>(i: u32) -> f32` reading element i of a tensor of `dtype`.
 * 16-bit values without shader-f16 are read from packed u32 words.
 */
export function scalarLoader(name: string, dtype: DType, f16: boolean): string {
  if (dtype === "f32") return `fn ld_${name}(i: u32) -> f32 { return ${name}[i]; }\n`;
  if (dtype === "f16" && f16) return `fn ld_${name}(i: u32) -> f32 { return f32(${name}[i]); }\n`;
  const half = `(${name}[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu`;
  if (dtype === "f16") return `fn ld_${name}(i: u32) -> f32 { return unpack2x16float(${half}).x; }\n`;
  return `fn ld_${name}(i: u32) -> f32 { return bitcast<f32>((${half}) << 16u); }\n`;
}

/** WGSL helpers converting f32 to bf16 bits (round to nearest even) and packing two halves. */
export const BF16_PACK = `fn bf16_bits(x: f32) -> u32 {
  let u = bitcast<u32>(x);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) { return (u >> 16u) | 0x40u; }
  return ((u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u) & 0xffffu;
}
fn pack_bf16(a: f32, b: f32) -> u32 { return bf16_bits(a) | (bf16_bits(b) << 16u); }
`;

/** Packs two f32 into one u32 of two 16-bit values of `dtype`. */
export function packPair(dtype: DType, a: string, b: string): string {
  return dtype === "bf16" ? `pack_bf16(${a}, ${b})` : `pack2x16float(vec2<f32>(${a}, ${b}))`;
}

/**
 * A WGSL expression: whether the f32 `x` is NaN, by its bits. Comparisons with NaN are not reliable
 * across compilers (Mesa rewrites `!(x <= y)` as `x > y`), so a NaN must never be told apart from
 * an empty row (log-sum-exp `-inf`, weight 0) by a float comparison.
 */
export function isNanExpr(x: string): string {
  return `((bitcast<u32>(${x}) & 0x7fffffffu) > 0x7f800000u)`;
}

/** A WGSL expression: whether the f32 `x` is exactly `-inf` (an empty row's log-sum-exp), by its bits. */
export function isMinusInfExpr(x: string): string {
  return `(bitcast<u32>(${x}) == 0xff800000u)`;
}

/** The linear workgroup index of a dispatch split over x and y (see GpuCall.dispatch). */
export const LINEAR_WORKGROUP = `let wg = wid.x + wid.y * nwg.x;\n  if (wg >= P.groups) { return; }\n`;

/** Builtins that {@link LINEAR_WORKGROUP} needs. */
export const WORKGROUP_BUILTINS =
  `@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32`;

/** Formats a number as a WGSL f32 literal. */
export function f32Literal(x: number): string {
  if (x === Infinity) return "0x1p+128f"; // not representable: callers use flags instead
  const s = Number.isInteger(x) ? `${x}.0` : x.toPrecision(9);
  return `f32(${s})`;
}
