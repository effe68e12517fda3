/**
 * Subgroup-matrix (matrix unit) steps for the kernel generators, in one of two forms chosen by a
 * flag:
 *
 * - real: Dawn's `chromium_experimental_subgroup_matrix` builtins (`subgroupMatrixLoad`,
 *   `subgroupMatrixMultiplyAccumulate`, `subgroupMatrixScalarMultiply`, `subgroupMatrixStore`), which Tint lowers to Vulkan
 *   cooperative matrices (NVIDIA tensor cores);
 * - emulated: the same tiles as plain WGSL, so that a kernel runs on any adapter (CPU adapters
 *   have no matrix units) and CI tests everything but the intrinsic. A "subgroup" is then 32
 *   consecutive invocations (whatever the hardware subgroup size) and a result matrix is a
 *   per-invocation fragment `array<T, M*N/32>`: invocation `lane` holds elements
 *   `lane*E .. lane*E+E-1` of the row-major M x N tile. A left or right matrix is its offset into
 *   its array: the emulated multiply reads the operands from memory, so a generator must not write
 *   an operand's memory between its load and the multiply that uses it.
 *
 * Operand placement follows the real builtins: `offset` and `stride` count elements of the matrix
 * component type (bytes for i8/u8, which live packed four to an i32/u32 word), row-major element
 * [r, c] at `offset + r * stride + c`, column-major at `offset + c * stride + r`.
 *
 * Tint's uniformity analysis wants every subgroup-matrix argument provably subgroup-uniform; in
 * the Dawn that npm `webgpu` 0.6.2 ships it has no subgroup-scope analysis (so an offset taken
 * from `local_invocation_index / 32` is "non-uniform"), but the rule is the filterable diagnostic
 * `chromium.subgroup_matrix_uniformity` (src/tint/lang/wgsl/resolver/uniformity.cc): the real
 * form turns it off, and the generators keep every matrix step in workgroup-uniform control flow
 * with offsets uniform per 32-invocation subgroup, which holds where subgroups are exactly 32
 * consecutive invocations (the backends require subgroupMinSize = subgroupMaxSize = 32).
 */

/** Element type of left and right operands. f16 tiles (AMD, Intel, Apple) need `enable f16;`. */
export type MmaComponent = "i8" | "u8" | "f16";
/** Accumulator (result) element type. */
export type MmaResult = "i32" | "u32" | "f32";

/** One tile shape: left M x K, right K x N, result M x N. */
export interface MmaShape {
  component: MmaComponent;
  result: MmaResult;
  M: number;
  N: number;
  K: number;
}

/** Where an operand or a result lives: an array declared by the generator, and its layout. */
export interface MmaPlace {
  /** The WGSL array variable (storage or workgroup); its element type is {@link mmaArrayElement}. */
  array: string;
  colMajor: boolean;
  /** Elements between rows (row-major) or columns (column-major); a compile-time constant. */
  stride: number;
}

/** Invocations of one (real or emulated) subgroup. */
export const MMA_SUBGROUP = 32;

/** WGSL element type of the array a matrix of this component type is loaded from or stored to. */
export function mmaArrayElement(t: MmaComponent | MmaResult): string {
  if (t === "i8" || t === "i32") return "i32";
  if (t === "u8" || t === "u32") return "u32";
  return t; // f16, f32
}

/** Whether a device configuration list has this shape (field names as `GPUSubgroupMatrixConfig`). */
export function hasMmaConfig(
  configs: readonly { componentType: string; resultComponentType: string; M: number; N: number; K: number }[],
  s: MmaShape,
): boolean {
  return configs.some((c) =>
    c.componentType === s.component && c.resultComponentType === s.result && c.M === s.M && c.N === s.N &&
    c.K === s.K
  );
}

/**
 * Emits the matrix steps of one kernel for one tile shape. Statements come back as WGSL text;
 * {@link header} goes first in the module and {@link helpers} anywhere at module scope (the
 * emulated form's functions). `lane` is the WGSL expression of the invocation's index within its
 * subgroup (0..31), used by the emulated form only.
 */
export class MmaEmitter {
  readonly #helpers = new Map<string, string>();
  /** Elements of a result fragment per invocation (emulated form). */
  readonly fragment: number;

  constructor(readonly shape: MmaShape, readonly emulate: boolean, readonly lane: string) {
    this.fragment = (shape.M * shape.N) / MMA_SUBGROUP;
    if (!Number.isInteger(this.fragment)) {
      throw new Error(`an ${shape.M}x${shape.N} tile does not split over 32`);
    }
  }

  /** Directives the real form needs (none for the emulated one, beyond f16's). */
  header(): string {
    const f16 = this.shape.component === "f16" ? "enable f16;\n" : "";
    if (this.emulate) return f16;
    return f16 + "enable subgroups;\nenable chromium_experimental_subgroup_matrix;\n" +
      "diagnostic(off, chromium.subgroup_matrix_uniformity);\n";
  }

  /** The emulated form's functions (empty for the real form). */
  helpers(): string {
    return [...this.#helpers.values()].join("");
  }

  /** A result matrix with every element `value` (a WGSL scalar of the result type). */
  splat(value: string): string {
    if (this.emulate) return `${this.#resultType}(${Array(this.fragment).fill(value).join(", ")})`;
    return `subgroupMatrixScalarAdd(${this.#resultType}(), ${value})`;
  }

  /** `var name: array<result, count>` of copies of the result matrix `init` (emulated form). */
  copyArray(name: string, count: number, init: string): string {
    return `var ${name} = array<${this.#resultType}, ${count}>(${Array(count).fill(init).join(", ")});`;
  }

  get #resultType(): string {
    const { result, M, N } = this.shape;
    return this.emulate
      ? `array<${result}, ${this.fragment}>`
      : `subgroup_matrix_result<${result}, ${N}, ${M}>`;
  }

  /** `var name = 0;` for a result matrix. */
  zero(name: string): string {
    return `var ${name} = ${this.#resultType}();`;
  }

  /** `var name: array<result, count>` of zero results (emulated form: an array of fragments). */
  zeroArray(name: string, count: number): string {
    return `var ${name} = array<${this.#resultType}, ${count}>();`;
  }

  /** `let name = <left M x K matrix at offset>`. */
  loadLeft(name: string, at: MmaPlace, offset: string): string {
    const { component, M, K } = this.shape;
    if (this.emulate) return `let ${name} = ${offset};`;
    return `let ${name} = subgroupMatrixLoad<subgroup_matrix_left<${component}, ${K}, ${M}>>(&${at.array}, ${offset}, ${at.colMajor}, ${at.stride}u);`;
  }

  /** `let name = <right K x N matrix at offset>`. */
  loadRight(name: string, at: MmaPlace, offset: string): string {
    const { component, N, K } = this.shape;
    if (this.emulate) return `let ${name} = ${offset};`;
    return `let ${name} = subgroupMatrixLoad<subgroup_matrix_right<${component}, ${N}, ${K}>>(&${at.array}, ${offset}, ${at.colMajor}, ${at.stride}u);`;
  }

  /**
   * `acc = left * right + acc`, for a left loaded from `leftAt` and a right from `rightAt` (the
   * emulated form reads them from there).
   */
  mma(acc: string, left: string, leftAt: MmaPlace, right: string, rightAt: MmaPlace): string {
    if (!this.emulate) return `${acc} = subgroupMatrixMultiplyAccumulate(${left}, ${right}, ${acc});`;
    const fn = this.#emulatedMma(leftAt, rightAt);
    return `${acc} = ${fn}(${left}, ${right}, ${acc}, ${this.lane});`;
  }

  /** `acc = acc * factor` for a result matrix `acc`, elementwise (an integer factor). */
  scale(acc: string, factor: number): string {
    const { result } = this.shape;
    const lit = result === "f32" ? `${factor}.0` : `${factor}${result === "u32" ? "u" : "i"}`;
    if (!this.emulate) return `${acc} = subgroupMatrixScalarMultiply(${acc}, ${lit});`;
    return `for (var fe = 0u; fe < ${this.fragment}u; fe++) { ${acc}[fe] *= ${lit}; }`;
  }

  /** Stores a result matrix at `offset` of `at`. */
  store(at: MmaPlace, offset: string, value: string): string {
    if (!this.emulate) {
      return `subgroupMatrixStore(&${at.array}, ${offset}, ${value}, ${at.colMajor}, ${at.stride}u);`;
    }
    const { N } = this.shape, E = this.fragment;
    const name = `mma_store_${at.array}_${at.colMajor ? "c" : "r"}${at.stride}`;
    this.#helpers.set(
      name,
      `fn ${name}(offset: u32, c: ${this.#resultType}, lane: u32) {
  for (var e = 0u; e < ${E}u; e++) {
    let row = (lane * ${E}u + e) / ${N}u;
    let col = (lane * ${E}u + e) % ${N}u;
    ${at.array}[offset + ${address(at, "row", "col")}] = c[e];
  }
}
`,
    );
    return `${name}(${offset}, ${value}, ${this.lane});`;
  }

  #reader(at: MmaPlace): string {
    const name = `mma_ld_${at.array}`;
    const t = this.shape.component;
    const body = t === "i8"
      ? `return extractBits(${at.array}[i >> 2u], (i & 3u) * 8u, 8u);` // sign-extends
      : t === "u8"
      ? `return extractBits(${at.array}[i >> 2u], (i & 3u) * 8u, 8u);`
      : `return ${at.array}[i];`;
    this.#helpers.set(
      name,
      `fn ${name}(i: u32) -> ${t === "u8" ? "u32" : t === "i8" ? "i32" : "f16"} { ${body} }\n`,
    );
    return name;
  }

  #emulatedMma(leftAt: MmaPlace, rightAt: MmaPlace): string {
    const { N, K, result } = this.shape, E = this.fragment;
    const key = (p: MmaPlace) => `${p.array}_${p.colMajor ? "c" : "r"}${p.stride}`;
    const name = `mma_${key(leftAt)}_${key(rightAt)}`;
    const ra = this.#reader(leftAt), rb = this.#reader(rightAt);
    const prod = this.shape.component === "f16"
      ? `f32(${ra}(a + ${address(leftAt, "row", "k")})) * f32(${rb}(b + ${address(rightAt, "k", "col")}))`
      : `${ra}(a + ${address(leftAt, "row", "k")}) * ${rb}(b + ${address(rightAt, "k", "col")})`;
    this.#helpers.set(
      name,
      `fn ${name}(a: u32, b: u32, c: ${this.#resultType}, lane: u32) -> ${this.#resultType} {
  var r = c;
  for (var e = 0u; e < ${E}u; e++) {
    let row = (lane * ${E}u + e) / ${N}u;
    let col = (lane * ${E}u + e) % ${N}u;
    var acc: ${result} = r[e];
    for (var k = 0u; k < ${K}u; k++) { acc += ${prod}; }
    r[e] = acc;
  }
  return r;
}
`,
    );
    return name;
  }
}

/** WGSL address of element [row, col] relative to a matrix's offset. */
function address(at: MmaPlace, row: string, col: string): string {
  return at.colMajor ? `${col} * ${at.stride}u + ${row}` : `${row} * ${at.stride}u + ${col}`;
}

/**
 * How a generator walks matrix steps: `forEach` writes the steps out one by one in the real form
 * (each tile a register variable, `name${i}`), and as a WGSL loop over an array of fragments in the
 * emulated form (`name[i]`), whose multiplies are loops themselves: written out, lavapipe's compiler
 * unrolls every call site and a d 256 kernel takes minutes to build. `tile` names tile `i` either way.
 */
export function mmaLoops(emulate: boolean, emit: (line: string) => void): {
  forEach: (v: string, n: number, body: (i: string) => void) => void;
  tile: (name: string, i: string) => string;
} {
  const forEach = (v: string, n: number, body: (i: string) => void) => {
    if (!emulate) {
      for (let i = 0; i < n; i++) body(`${i}u`);
      return;
    }
    emit(`    for (var ${v} = 0u; ${v} < ${n}u; ${v}++) {`);
    body(v);
    emit(`    }`);
  };
  const tile = (name: string, i: string) => emulate ? `${name}[${i}]` : `${name}${parseInt(i)}`;
  return { forEach, tile };
}
