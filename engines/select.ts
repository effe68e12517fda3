/**
 * Which WebGPU engine wgattn acquires its device with: chosen once per process, before the first
 * device, by `useEngine()` in code or the variable `WGATTN_WEBGPU` (read only when env access is
 * already granted). The variable is soft (Dawn failing to load leaves Deno's engine, and explain()
 * says why); `useEngine` is strict.
 */
import { WgattnError } from "../core/errors.ts";
import { readEnvIfGranted } from "../core/env.ts";
import { adoptedDawnEngine, DAWN_PACKAGE, DawnUnavailable, loadDawn } from "./dawn.ts";
import { denoEngine } from "./deno.ts";
import { type Engine, type EngineName, engineOfDevice } from "./engine.ts";

/**
 * The environment variable that picks the WebGPU engine: `deno` (default) or `dawn`. Read only
 * when env access to it is already granted; if Dawn cannot load, calls run on Deno's engine and
 * `explain()` says why.
 *
 * @example
 * ```ts
 * import { ENGINE_VARIABLE } from "jsr:@wgattn/attention";
 * console.log(ENGINE_VARIABLE); // "WGATTN_WEBGPU": run with WGATTN_WEBGPU=dawn deno run --allow-env --allow-ffi --allow-read ...
 * ```
 */
export const ENGINE_VARIABLE = "WGATTN_WEBGPU";
/** The variable that points Dawn at an unpacked copy of the npm package `webgpu` (its index.js). */
export const DAWN_MODULE_VARIABLE = "WGATTN_DAWN_MODULE";

/** The engine in use and how it came to be. */
export interface EngineChoice {
  engine: Engine;
  /** What was asked for. */
  requested: EngineName;
  /** Who asked: the default, the variable or `useEngine()`. */
  source: "default" | "variable" | "code";
  /** Why the requested engine is not the one in use (the variable's soft fallback). */
  fallback?: string;
}

let choice: Promise<EngineChoice> | null = null;
/** Set once a device was acquired with the chosen engine: the choice is final from then on. */
let locked = false;
let loadedDawn: Engine | null = null;
let adoptedDawn: Engine | null = null;

async function fromVariable(): Promise<EngineChoice> {
  const raw = readEnvIfGranted(ENGINE_VARIABLE)?.toLowerCase();
  if (raw === undefined || raw === "deno") {
    return { engine: denoEngine, requested: "deno", source: raw ? "variable" : "default" };
  }
  if (raw !== "dawn") {
    throw new WgattnError("INVALID_OPTION", `${ENGINE_VARIABLE} names no WebGPU engine`, {
      argument: ENGINE_VARIABLE,
      expected: '"deno" or "dawn"',
      actual: JSON.stringify(raw),
    });
  }
  try {
    loadedDawn = await loadDawn(readEnvIfGranted(DAWN_MODULE_VARIABLE) ?? DAWN_PACKAGE);
    return { engine: loadedDawn, requested: "dawn", source: "variable" };
  } catch (e) {
    const why = e instanceof DawnUnavailable ? e.message : String(e);
    return { engine: denoEngine, requested: "dawn", source: "variable", fallback: why };
  }
}

/** The engine wgattn acquires devices with (deciding it on first use). */
export function chosenEngine(): Promise<EngineChoice> {
  choice ??= fromVariable();
  return choice;
}

/** Marks the choice final: wgattn acquired a device with it. */
export function lockEngine(): void {
  locked = true;
}

/** The engine object for a device (detected: a Dawn device from any copy of dawn.node, else Deno's). */
export function engineFor(device: GPUDevice): Engine {
  if (engineOfDevice(device) === "deno") return denoEngine;
  return loadedDawn ?? (adoptedDawn ??= adoptedDawnEngine());
}

/** Options of {@link useEngine}. */
export interface UseEngineOptions {
  /**
   * For Dawn: where the npm package `webgpu` is, as a path or URL of its index.js (an unpacked copy
   * on an offline machine), or an npm specifier. Default `npm:webgpu@0.6.2`.
   */
  module?: string;
}

/**
 * Chooses the WebGPU engine in code, before wgattn acquires its first device: `"deno"` (Deno's own
 * WebGPU, the default) or `"dawn"` (Chrome's engine, from the npm package `webgpu`, which reaches
 * the tensor cores through subgroup matrices and waits for the GPU in microseconds). Strict: if
 * Dawn cannot load, it throws `ENGINE_UNAVAILABLE` with the reason (package missing, `--allow-ffi`
 * not granted, no adapter); after the first device, choosing another engine is `ENGINE_IN_USE`.
 *
 * @example
 * ```ts
 * import { attentionForward, deviceInfo, useEngine } from "jsr:@wgattn/attention";
 * await useEngine("dawn"); // needs --allow-ffi --allow-read (and npm access, or options.module)
 * console.log((await deviceInfo())?.engine); // "dawn"
 * ```
 */
export async function useEngine(name: EngineName, options: UseEngineOptions = {}): Promise<void> {
  if (name !== "deno" && name !== "dawn") {
    throw new WgattnError("INVALID_OPTION", "useEngine takes a WebGPU engine name", {
      argument: "name",
      expected: '"deno" or "dawn"',
      actual: JSON.stringify(name),
    });
  }
  for (const key of Object.keys(options)) {
    if (key !== "module") {
      throw new WgattnError("INVALID_OPTION", `useEngine has no option ${JSON.stringify(key)}`, {
        argument: `options.${key}`,
        expected: "module",
        actual: key,
      });
    }
  }
  if (options.module !== undefined && typeof options.module !== "string") {
    throw new WgattnError("INVALID_OPTION", "options.module must be a string", {
      argument: "options.module",
      expected: "a path, URL or npm specifier of the package's index.js",
      actual: typeof options.module,
    });
  }
  if (locked) {
    const current = (await choice!).engine.name;
    if (current === name) return;
    throw new WgattnError("ENGINE_IN_USE", `wgattn already acquired its device with the ${current} engine`, {
      argument: "name",
      expected:
        `the engine in use (${current}): the engine is chosen once per process, before the first call`,
      actual: name,
    });
  }
  if (name === "deno") {
    choice = Promise.resolve({ engine: denoEngine, requested: "deno", source: "code" });
    return;
  }
  try {
    loadedDawn = await loadDawn(options.module ?? readEnvIfGranted(DAWN_MODULE_VARIABLE) ?? DAWN_PACKAGE);
  } catch (e) {
    throw new WgattnError("ENGINE_UNAVAILABLE", "the Dawn engine cannot be used here", {
      argument: "name",
      expected: "dawn.node loaded (npm package webgpu, --allow-ffi) with an adapter",
      actual: e instanceof DawnUnavailable ? e.message : String(e),
    });
  }
  choice = Promise.resolve({ engine: loadedDawn, requested: "dawn", source: "code" });
}

/**
 * A fresh adapter of the chosen engine, for a second device on the same engine (tests, benches):
 * `navigator.gpu` would give one of Deno's engine whatever was chosen.
 */
export async function engineAdapter(): Promise<GPUAdapter | null> {
  return await (await chosenEngine()).engine.requestAdapter();
}
