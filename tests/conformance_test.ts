/**
 * Every registered backend (and any added later to backends/registry.ts) against the float64
 * reference, over the shared cases of `conformance.ts`. What a backend cannot serve on this adapter
 * is listed as ignored, with the backend's reason in the test name.
 */
import { BACKENDS } from "../backends/registry.ts";
import { runtimeFor } from "../core/device.ts";
import { getDevice } from "../mod.ts";
import { CASES, registerConformance } from "./conformance.ts";

const device = await getDevice(); // null without a WebGPU adapter: GPU backends and GPU tensors skip
const caps = device ? (await runtimeFor(device)).caps : null;
registerConformance(BACKENDS, CASES, caps, device);
