import { WgattnError } from "./errors.ts";
import { isGpuBuffer } from "../engines/engine.ts";
import type {
  DType,
  GpuMask,
  GpuTensor,
  HostData,
  HostTensor,
  MaskInput,
  OrtTensorLike,
  TensorInput,
} from "./types.ts";

/** Bytes per element of each dtype. */
export const DTYPE_BYTES: Record<DType, number> = { f32: 4, f16: 2, bf16: 2 };

/** A validated operand: either host data or a GPU buffer, with its dense shape. */
export type Operand =
  | { residency: "host"; data: HostData; shape: readonly number[]; dtype: DType }
  | { residency: "gpu"; buffer: GPUBuffer; shape: readonly number[]; dtype: DType };

/** A validated mask. `bool` data is one byte per element. */
export type MaskOperand =
  | { residency: "host"; data: Uint8Array | Float32Array; shape: readonly number[]; dtype: "bool" | "f32" }
  | { residency: "gpu"; buffer: GPUBuffer; shape: readonly number[]; dtype: "bool" | "f32" };

const ORT_TYPES: Record<string, DType> = { float32: "f32", float16: "f16", bfloat16: "bf16" };

/** Number of elements of a shape. */
export function elementCount(shape: readonly number[]): number {
  return shape.reduce((p, x) => p * x, 1);
}

function checkShape(shape: unknown, argument: string): readonly number[] {
  // A size may be 0 (an empty axis, as PyTorch takes it); the call then computes no score.
  if (!Array.isArray(shape) || shape.some((x) => !Number.isInteger(x) || x < 0)) {
    throw new WgattnError("INVALID_SHAPE", `${argument}.shape must list integer sizes >= 0`, {
      argument,
      expected: "an array of integers >= 0",
      actual: JSON.stringify(shape),
    });
  }
  return shape;
}

function dtypeOfArray(data: unknown): DType | "u16" | undefined {
  if (data instanceof Float32Array) return "f32";
  if (typeof Float16Array !== "undefined" && data instanceof Float16Array) return "f16";
  if (data instanceof Uint16Array) return "u16";
  return undefined;
}

function describe(x: unknown): string {
  if (x === null || x === undefined) return String(x);
  if (typeof x !== "object") return typeof x;
  return (x as object).constructor?.name ?? "object";
}

/** Validates one of q, k, v. */
export function toOperand(input: TensorInput, argument: string): Operand {
  if (input === null || typeof input !== "object") {
    throw new WgattnError("INVALID_SHAPE", `${argument} must be a tensor object`, {
      argument,
      expected: "{ data, shape, dtype? }, { data, dims, type } or { buffer, shape, dtype }",
      actual: describe(input),
    });
  }
  if ("buffer" in input && isGpuBuffer(input.buffer)) {
    const shape = checkShape(input.shape, argument);
    const dtype = input.dtype;
    if (!(dtype in DTYPE_BYTES)) {
      throw new WgattnError("UNSUPPORTED_DTYPE", `${argument}.dtype is not supported`, {
        argument,
        expected: "f32, f16 or bf16",
        actual: String(dtype),
      });
    }
    checkGpuBuffer(input, elementCount(shape) * DTYPE_BYTES[dtype], argument);
    return { residency: "gpu", buffer: input.buffer, shape, dtype };
  }
  const ort = "dims" in input;
  const shape = checkShape(ort ? input.dims : (input as { shape: unknown }).shape, argument);
  const data = (input as { data: unknown }).data;
  const arrayType = dtypeOfArray(data);
  let dtype: DType | undefined;
  if (ort) {
    dtype = ORT_TYPES[(input as { type: string }).type];
    if (!dtype) {
      throw new WgattnError("UNSUPPORTED_DTYPE", `${argument}.type is not supported`, {
        argument,
        expected: "float32, float16 or bfloat16",
        actual: String((input as { type: unknown }).type),
      });
    }
  } else {
    dtype = (input as { dtype?: DType }).dtype ?? (arrayType === "u16" ? undefined : arrayType);
  }
  const fits = (dtype === "f32" && arrayType === "f32") || (dtype === "f16" && arrayType === "f16") ||
    (dtype === "bf16" && arrayType === "u16") || (dtype === "f16" && arrayType === "u16");
  if (!dtype || !fits) {
    throw new WgattnError("UNSUPPORTED_DTYPE", `${argument}.data does not hold a supported dtype`, {
      argument,
      expected: "Float32Array (f32), Float16Array (f16) or Uint16Array with dtype bf16 or f16",
      actual: `${describe(data)}${dtype ? ` with dtype ${dtype}` : ""}`,
    });
  }
  const n = elementCount(shape);
  if ((data as HostData).length !== n) {
    throw new WgattnError("INVALID_SHAPE", `${argument}.data length does not match its shape`, {
      argument,
      expected: `${n} elements for shape [${shape}]`,
      actual: `${(data as HostData).length} elements`,
    });
  }
  return { residency: "host", data: data as HostData, shape, dtype };
}

/** Checks a caller's GPU buffer: big enough and usable as storage. */
export function checkGpuBuffer(t: { buffer: GPUBuffer }, bytes: number, argument: string): void {
  if ((t.buffer.usage & GPUBufferUsage.STORAGE) === 0) {
    throw new WgattnError("INVALID_BUFFER", `${argument}.buffer lacks STORAGE usage`, {
      argument,
      expected: "a GPUBuffer created with GPUBufferUsage.STORAGE",
      actual: `usage flags 0x${t.buffer.usage.toString(16)}`,
    });
  }
  if (t.buffer.size < bytes) {
    throw new WgattnError("INVALID_BUFFER", `${argument}.buffer is smaller than its shape and dtype need`, {
      argument,
      expected: `at least ${bytes} bytes`,
      actual: `${t.buffer.size} bytes`,
    });
  }
}

/** Validates a mask; f16 host masks become f32, boolean masks bytes. */
export function toMaskOperand(input: MaskInput, argument: string): MaskOperand {
  if (input === null || typeof input !== "object") {
    throw new WgattnError("INVALID_MASK", `${argument} must be a mask object`, {
      argument,
      expected: "{ data, shape, dtype? } or { buffer, shape, dtype }",
      actual: describe(input),
    });
  }
  if ("buffer" in input && isGpuBuffer((input as GpuMask).buffer)) {
    const m = input as GpuMask;
    const shape = checkShape(m.shape, argument);
    if (m.dtype !== "bool" && m.dtype !== "f32") {
      throw new WgattnError("UNSUPPORTED_DTYPE", `${argument}.dtype is not supported for a GPU mask`, {
        argument,
        expected: "bool (one byte per element) or f32",
        actual: String(m.dtype),
      });
    }
    checkGpuBuffer(m, elementCount(shape) * (m.dtype === "bool" ? 1 : 4), argument);
    return { residency: "gpu", buffer: m.buffer, shape, dtype: m.dtype };
  }
  const ort = "dims" in input;
  const shape = checkShape(ort ? input.dims : (input as { shape: unknown }).shape, argument);
  const data = (input as { data: unknown }).data;
  const declared = ort
    ? ({ bool: "bool", float32: "f32", float16: "f16" } as Record<string, string>)[
      (input as { type: string }).type
    ]
    : (input as { dtype?: string }).dtype;
  const n = elementCount(shape);
  const lengthOk = (len: number) => {
    if (len !== n) {
      throw new WgattnError("INVALID_MASK", `${argument}.data length does not match its shape`, {
        argument,
        expected: `${n} elements for shape [${shape}]`,
        actual: `${len} elements`,
      });
    }
  };
  if (data instanceof Uint8Array && (declared === undefined || declared === "bool")) {
    lengthOk(data.length);
    return { residency: "host", data, shape, dtype: "bool" };
  }
  if (data instanceof Float32Array && (declared === undefined || declared === "f32")) {
    lengthOk(data.length);
    return { residency: "host", data, shape, dtype: "f32" };
  }
  if (typeof Float16Array !== "undefined" && data instanceof Float16Array && (declared ?? "f16") === "f16") {
    lengthOk(data.length);
    return { residency: "host", data: Float32Array.from(data), shape, dtype: "f32" };
  }
  throw new WgattnError("UNSUPPORTED_DTYPE", `${argument}.data does not hold a supported mask type`, {
    argument,
    expected: "Uint8Array (bool, nonzero = attend), Float32Array or Float16Array (additive)",
    actual: `${describe(data)}${declared ? ` with dtype ${declared}` : ""}`,
  });
}

// ---- host conversions -------------------------------------------------------------------------

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** bf16 bits to a number. */
export function bf16ToNumber(bits: number): number {
  u32Scratch[0] = bits << 16;
  return f32Scratch[0];
}

/** A number to bf16 bits, rounding to nearest even (NaN stays NaN). */
export function numberToBf16(x: number): number {
  f32Scratch[0] = x;
  const u = u32Scratch[0];
  if ((u & 0x7f800000) === 0x7f800000 && (u & 0x007fffff) !== 0) return (u >>> 16) | 0x40;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Reads host data as numbers (f64), whatever its dtype. */
export function hostToFloat64(data: HostData, dtype: DType): Float64Array {
  const out = new Float64Array(data.length);
  if (dtype === "bf16") { for (let i = 0; i < data.length; i++) out[i] = bf16ToNumber(data[i]); }
  else if (dtype === "f16" && data instanceof Uint16Array) {
    const view = new Float16Array(data.buffer, data.byteOffset, data.length);
    for (let i = 0; i < data.length; i++) out[i] = view[i];
  } else for (let i = 0; i < data.length; i++) out[i] = data[i];
  return out;
}

/** Writes numbers into a new host array of `dtype`. */
export function float64ToHost(values: ArrayLike<number>, dtype: DType): HostData {
  if (dtype === "f32") return Float32Array.from(values);
  if (dtype === "f16") return Float16Array.from(values);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = numberToBf16(values[i]);
  return out;
}

/** The host array type for `dtype` over raw bytes (as read back from the GPU). */
export function hostFromBytes(bytes: ArrayBuffer, dtype: DType, length: number): HostData {
  if (dtype === "f32") return new Float32Array(bytes, 0, length);
  if (dtype === "f16") return new Float16Array(bytes, 0, length);
  return new Uint16Array(bytes, 0, length);
}

const ORT_NAMES: Record<DType, OrtTensorLike["type"]> = { f32: "float32", f16: "float16", bf16: "bfloat16" };

/**
 * A result in the form of the input it answers: ONNX-style `{ data, dims, type }` for such an
 * input; f16 data as q's array (a `Uint16Array` of f16 bits stays one: a view, no copy). GPU
 * results are returned as they are.
 */
export function inFormOf(
  input: TensorInput,
  result: HostTensor | GpuTensor,
): HostTensor | GpuTensor | OrtTensorLike {
  if ("buffer" in result) return result;
  let data = result.data;
  const given = (input as { data?: unknown }).data;
  if (data instanceof Float16Array && given instanceof Uint16Array) {
    data = new Uint16Array(data.buffer, data.byteOffset, data.length);
  }
  const dtype = result.dtype ?? "f32";
  if ("dims" in input) return { data, dims: result.shape, type: ORT_NAMES[dtype] };
  return { data, shape: result.shape, dtype };
}
