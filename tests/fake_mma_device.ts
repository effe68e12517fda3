/**
 * Capabilities of a device with int8 subgroup matrices (i8 -> i32 M16 N16 K32, subgroups of exactly
 * 32: Dawn on an NVIDIA H200), for router checks of the matrix backends; nothing runs on it.
 */
import type { Capabilities } from "../core/device.ts";

export const FAKE_MMA_DEVICE: Capabilities = {
  engine: "dawn",
  adapter: "fake",
  isFallbackAdapter: false,
  features: new Set(["subgroups", "chromium-experimental-subgroup-matrix"]),
  shaderF16: false,
  subgroups: true,
  subgroupDirective: "enable subgroups;\n",
  subgroupMinSize: 32,
  subgroupMaxSize: 32,
  packedInt8Dot: true,
  timestamps: true,
  subgroupMatrixConfigs: [{ componentType: "i8", resultComponentType: "i32", M: 16, N: 16, K: 32 }],
  limits: {
    maxStorageBufferBindingSize: 2 ** 31 - 4,
    maxBufferSize: 2 ** 32 - 4,
    maxComputeWorkgroupStorageSize: 49152,
    maxComputeInvocationsPerWorkgroup: 1024,
    maxComputeWorkgroupSizeX: 1024,
    maxComputeWorkgroupsPerDimension: 65535,
    maxStorageBuffersPerShaderStage: 16,
  },
} as unknown as Capabilities;
