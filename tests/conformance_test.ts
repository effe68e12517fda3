/**
 * Every registered backend (flash, naive, cpu, and any added later) against the float64 reference,
 * over the shared cases of `conformance.ts`. What a backend cannot serve on this adapter is listed
 * as ignored, with the backend's reason in the test name.
 */
import { BACKENDS } from "../backends/registry.ts";
import { defaultRuntime } from "../core/device.ts";
import { CASES, registerConformance } from "./conformance.ts";

const runtime = await defaultRuntime();
registerConformance(BACKENDS, CASES, runtime?.caps ?? null, runtime?.device ?? null);
