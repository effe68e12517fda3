/**
 * Checks a call's GPU tensors against the device in use before anything is recorded: a buffer
 * that was destroyed, belongs to another device, lacks STORAGE usage or is mapped is refused with
 * INVALID_BUFFER naming the argument. Nothing is queued; nothing waits for the GPU (error scopes
 * resolve on the device timeline).
 */
import { WgattnError } from "./errors.ts";
import type { GpuRuntime } from "./device.ts";
import type { AttentionProblem } from "./problem.ts";
import { elementCount, type MaskOperand, type Operand } from "./tensor.ts";

const EMPTY = new Uint8Array(0);

const probeLayouts = new WeakMap<GPUDevice, GPUBindGroupLayout>();

/** A one-binding layout that a caller's buffer must bind to. */
function probeLayout(device: GPUDevice): GPUBindGroupLayout {
  let layout = probeLayouts.get(device);
  if (!layout) {
    layout = device.createBindGroupLayout({
      label: "wgattn buffer check",
      entries: [{ binding: 0, visibility: GPUShaderStage.COMPUTE, buffer: { type: "read-only-storage" } }],
    });
    probeLayouts.set(device, layout);
  }
  return layout;
}

/** The call's GPU tensors with the argument each came from (each buffer once). */
function gpuOperands(p: AttentionProblem): [string, GPUBuffer][] {
  const found: [string, GPUBuffer][] = [];
  const seen = new Set<GPUBuffer>();
  const add = (argument: string, o: Operand | MaskOperand) => {
    if (o.residency !== "gpu" || seen.has(o.buffer)) return;
    seen.add(o.buffer);
    found.push([argument, o.buffer]);
  };
  add("q", p.q.operand);
  add("k", p.k.operand);
  add("v", p.v.operand);
  if (p.mask) add(p.mask.argument ?? "options.attnMask", p.mask.operand);
  for (const x of p.flex?.buffers ?? []) {
    if (x.residency !== "gpu" || seen.has(x.buffer)) continue;
    seen.add(x.buffer);
    found.push([`options.modBuffers.${x.name}`, x.buffer]);
  }
  const serving: [string, { residency: string; buffer?: GPUBuffer } | undefined][] = [
    ["options.sinks", p.sinks ?? undefined],
    ["options.cuSeqlensQ", p.varlen?.cuQ],
    ["options.cuSeqlensK", p.varlen?.cuK],
    ["options.blockTable", p.paged?.table],
    ["options.cacheSeqlens", p.paged?.seqlens],
  ];
  for (const [argument, x] of serving) {
    if (!x?.buffer || seen.has(x.buffer)) continue;
    seen.add(x.buffer);
    found.push([argument, x.buffer]);
  }
  return found;
}

/** The buffers of the call's GPU tensors that hold no element. */
function emptyBuffers(p: AttentionProblem): Set<GPUBuffer> {
  const found = new Set<GPUBuffer>();
  for (const o of [p.q.operand, p.k.operand, p.v.operand, p.mask?.operand]) {
    if (o?.residency === "gpu" && elementCount(o.shape) === 0) found.add(o.buffer);
  }
  return found;
}

function refuse(argument: string, message: string, expected: string, actual: string): never {
  throw new WgattnError("INVALID_BUFFER", `${argument}.buffer ${message}`, { argument, expected, actual });
}

/**
 * Refuses GPU tensors the device in use cannot bind. Run before anything is created or recorded
 * for the call.
 */
export async function checkGpuOperands(p: AttentionProblem, rt: GpuRuntime | null): Promise<void> {
  const operands = gpuOperands(p);
  if (operands.length === 0) return;
  if (!rt) {
    const [argument] = operands[0];
    refuse(argument, "is a GPU tensor but no WebGPU device is in use", "host tensors", "a GPUBuffer");
  }
  for (const [argument, buffer] of operands) {
    if (buffer.mapState !== "unmapped") {
      refuse(argument, "is mapped", "an unmapped buffer (unmap it first)", `mapState ${buffer.mapState}`);
    }
  }
  const device = rt.device;
  const layout = probeLayout(device);
  const empty = emptyBuffers(p);
  // One scope per buffer, pushed and popped with no await between: concurrent calls stay apart.
  const checks = operands.map(([argument, buffer]) => {
    // A binding cannot be empty: an empty tensor's buffer under 4 bytes cannot be probed this way.
    // It holds no element and is never bound or read (an empty call runs no kernel): no harm.
    if (buffer.size < 4 && empty.has(buffer)) {
      return Promise.resolve({ argument, buffer, message: null as string | null });
    }
    device.pushErrorScope("validation");
    try {
      device.createBindGroup({
        layout,
        entries: [{ binding: 0, resource: { buffer, offset: 0, size: 4 } }],
      });
    } catch (e) {
      device.popErrorScope().catch(() => null);
      return Promise.resolve({ argument, buffer, message: (e as Error).message });
    }
    return device.popErrorScope().then(
      (e) => ({ argument, buffer, message: e?.message ?? null }),
      () => ({ argument, buffer, message: null }),
    );
  });
  // Dawn validates a destroyed buffer only where it is used on the queue, not in createBindGroup: an
  // empty write (it queues nothing) asks the queue. Only its "destroyed" answer counts here.
  if (rt.engine.name === "dawn") {
    for (const [argument, buffer] of operands) {
      device.pushErrorScope("validation");
      device.queue.writeBuffer(buffer, 0, EMPTY);
      checks.push(
        device.popErrorScope().then(
          (e) => ({ argument, buffer, message: e && /destroyed/i.test(e.message) ? e.message : null }),
          () => ({ argument, buffer, message: null }),
        ),
      );
    }
  }
  for (const { argument, buffer, message } of await rt.engine.hold(Promise.all(checks))) {
    if (message === null) continue;
    const size = `a ${buffer.size}-byte buffer (${buffer.label ? `label "${buffer.label}"` : "no label"})`;
    if (/destroyed/i.test(message)) {
      refuse(argument, "was destroyed", "a live GPUBuffer", size);
    }
    // Naga: "... device ... does not match"; Dawn: "[Buffer] is associated with [Device], and cannot be
    // used with [Device]".
    if ((/device/i.test(message) && /match/i.test(message)) || /associated with \[Device/i.test(message)) {
      refuse(
        argument,
        "belongs to another GPUDevice",
        `a buffer of the device wgattn uses (getDevice() or options.device; after a device loss, tensors must be made again on the new device)`,
        size,
      );
    }
    if (/usage/i.test(message)) {
      refuse(argument, "lacks STORAGE usage", "a GPUBuffer created with GPUBufferUsage.STORAGE", size);
    }
    refuse(argument, "cannot be bound on the device in use", "a buffer the device can bind", message);
  }
  if (rt.lost) {
    throw new WgattnError("DEVICE_LOST", "the GPU device in use was lost", {
      expected: "a live device (the next call acquires a new one, unless the device is yours)",
      actual: "lost",
    });
  }
}
