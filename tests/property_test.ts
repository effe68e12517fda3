/**
 * Property test: random calls (shapes, layouts, dtypes, masks, causal and window, scale, lse, host,
 * ONNX-style and GPU tensors, and a random backend) against the float64 reference, through the
 * conformance runner. A backend that cannot serve a call must refuse it with BACKEND_UNSUPPORTED;
 * the router's own choice then runs it.
 *
 * Bounded in time: `WGATTN_PROPERTY_SECONDS` (default 15) of new cases, then it stops. The seed
 * is random unless `WGATTN_PROPERTY_SEED` gives it, and printed, with the failing case, on
 * failure; the same seed replays the same cases. `deno task test:property` runs for eight minutes
 * (for the H200; `WGATTN_PROPERTY_SECONDS` still wins).
 */
import assert from "node:assert/strict";
import { BACKENDS } from "../backends/registry.ts";
import { runtimeFor } from "../core/device.ts";
import { debug } from "../core/gpu.ts";
import { decide } from "../core/router.ts";
import { getDevice, WgattnError } from "../mod.ts";
import {
  caseName,
  caseReasons,
  type ConformanceCase,
  forgetCase,
  runCase,
  withCaseProblem,
} from "./conformance.ts";
import { rng } from "./reference.ts";

function env(name: string): string | undefined {
  try {
    return Deno.env.get(name) ?? undefined;
  } catch {
    return undefined; // no --allow-env: defaults
  }
}

/** `deno task test:property` passes `--long`: eight minutes, inside one command of the H200 runner. */
const SECONDS = Number(env("WGATTN_PROPERTY_SECONDS") ?? (Deno.args.includes("--long") ? 480 : 15));
const SEED = Number(env("WGATTN_PROPERTY_SEED") ?? Math.floor(Math.random() * 2 ** 31));
const MAX_CASES = Number(env("WGATTN_PROPERTY_CASES") ?? Infinity);

const device = await getDevice();
const runtime = device ? await runtimeFor(device) : null;
const caps = runtime?.caps ?? null;

const PATTERNS = ["b n s d", "b s n d", "b s (n d)", "(b n) s d", "b (n d) s", "s b n d", "n b s d"];

/** Case `index` of the run with `seed`: a function of both only, so a seed replays its cases. */
function generate(seed: number, index: number): { c: ConformanceCase; backend: string } {
  const random = rng((seed ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)];
  const chance = (p: number) => random() < p;
  // Sizes around the tile edges (16, 32, 64) and small ones; head dims from a few (each new one
  // compiles new kernels).
  const seq = () =>
    pick([1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 40, 63, 64, 65, 1 + Math.floor(random() * 70)]);
  const n = pick([1, 2, 3, 4]);
  const c: ConformanceCase = {
    b: pick([1, 1, 2]),
    n,
    nKv: pick([1, 2, 3, 4].filter((x) => n % x === 0)),
    sQ: seq(),
    sKv: seq(),
    d: pick([16, 16, 32, 64, 40, 8]),
    dtype: pick(["f32", "f32", "f32", "f16", "bf16"] as const),
  };
  if (chance(0.15)) c.dV = pick([8, 16, 24, 32]);
  if (chance(0.35)) {
    const one = pick(PATTERNS);
    c.layout = chance(0.6)
      ? { q: one, k: one, v: one, out: one }
      : { q: pick(PATTERNS), k: pick(PATTERNS), v: pick(PATTERNS), out: pick(PATTERNS) };
  }
  if (chance(0.35)) c.isCausal = true;
  if (chance(0.2)) {
    const side = () => (chance(0.2) ? -1 : Math.floor(random() * 12));
    c.windowSize = chance(0.5) ? Math.floor(random() * 12) : [side(), side()];
  }
  if (chance(0.15)) c.scale = Math.round((random() * 4 - 2) * 100) / 100 || 0.5;
  const sKv = c.sKv ?? c.sQ;
  const masks = chance(0.4);
  if (masks && chance(0.4)) {
    c.keyPadding = Array.from({ length: pick([1, c.b]) }, () => Math.floor(random() * (sKv + 1)));
  } else if (masks) {
    const full = [c.b, n, c.sQ, sKv];
    // A shape broadcastable to [b, n, s_q, s_kv]: some axes kept, some 1, leading ones dropped.
    let shape = full.map((x) => (chance(0.5) ? x : 1));
    shape = shape.slice(Math.floor(random() * 3));
    const kind = chance(0.5) ? "bool" : "additive";
    c.mask = {
      kind,
      shape,
      ...(kind === "additive" && chance(0.3) ? { array: "f16" as const } : {}),
      ...(chance(0.15) && shape.length >= 2 && shape[shape.length - 2] > 1
        ? { emptyRow: Math.floor(random() * shape[shape.length - 2]) }
        : {}),
    };
  }
  if (chance(0.3)) c.lse = true;
  if (device && chance(0.3)) c.gpu = true;
  else if (chance(0.15)) c.ort = true;
  c.note = `(property ${seed}#${index})`;
  return { c, backend: pick(BACKENDS.map((b) => b.name)) };
}

Deno.test({
  name: `property: random calls agree with the float64 reference (${SECONDS} s, seed ${SEED})`,
  fn: async () => {
    debug.poisonOutputs = true; // unwritten output elements read as NaN and fail
    const started = performance.now();
    const ran = new Map<string, number>();
    let index = 0, refused = 0;
    try {
      for (; index < MAX_CASES && performance.now() - started < SECONDS * 1000; index++) {
        const { c, backend: name } = generate(SEED, index);
        const context = () =>
          `seed ${SEED} case ${index} (replay: WGATTN_PROPERTY_SEED=${SEED} deno task test:property): ` +
          `${caseName(c)} ${JSON.stringify(c)} on ${name}`;
        try {
          let backend = BACKENDS.find((b) => b.name === name)!;
          const reasons = caseReasons(backend, c, caps, device);
          if (reasons.length > 0) {
            // Forced where it cannot serve: refused, with its reasons, before any work.
            await assert.rejects(
              () => runCase(backend, c, device),
              (e: unknown) =>
                e instanceof WgattnError && e.code === "BACKEND_UNSUPPORTED" &&
                e.argument === "options.backend",
            );
            refused++;
            // The router's own choice serves it instead.
            backend = withCaseProblem(
              c,
              device,
              (p) => decide(p, caps, BACKENDS, { broken: runtime?.broken, wantLse: c.lse === true }).backend,
            );
          }
          await runCase(backend, c, device);
          ran.set(backend.name, (ran.get(backend.name) ?? 0) + 1);
        } catch (e) {
          throw new Error(`${context()}\n${(e as Error).message}`, { cause: e });
        } finally {
          forgetCase(c);
        }
      }
    } finally {
      debug.poisonOutputs = false;
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    console.log(
      `  seed ${SEED}: ${index} cases in ${seconds} s (${refused} refused by the forced backend first); ` +
        [...ran].map(([b, k]) => `${b} ${k}`).join(", "),
    );
    assert.ok(index > 0, "at least one case ran");
  },
});
