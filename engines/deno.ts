/**
 * Deno's own WebGPU (wgpu, with the Naga WGSL compiler): `navigator.gpu`, no flags needed. Also
 * the engine of a browser page, where `navigator.gpu` is the browser's.
 */
import { type Engine, plainCopy, queueWrite } from "./engine.ts";

function navigatorGpu(): GPU | undefined {
  return (globalThis.navigator as { gpu?: GPU } | undefined)?.gpu;
}

function denoVersion(): string | undefined {
  return (globalThis as { Deno?: { version?: { deno?: string } } }).Deno?.version?.deno;
}

/** Deno's built-in WebGPU engine. */
export const denoEngine: Engine = {
  name: "deno",
  compiler: denoVersion() ? "naga" : "browser",
  version: denoVersion() ? `deno ${denoVersion()}` : "browser",
  async requestAdapter() {
    const gpu = navigatorGpu();
    if (!gpu) return null;
    try {
      return await gpu.requestAdapter({ powerPreference: "high-performance" });
    } catch {
      return null;
    }
  },
  get wgslLanguageFeatures(): ReadonlySet<string> {
    return (navigatorGpu() as { wgslLanguageFeatures?: ReadonlySet<string> } | undefined)
      ?.wgslLanguageFeatures ?? new Set();
  },
  createComputePipeline(device, descriptor) {
    return device.createComputePipelineAsync(descriptor);
  },
  hold(work) {
    return work;
  },
  writeBuffer: queueWrite,
  copyOut: plainCopy,
};
