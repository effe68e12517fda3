/**
 * Block maps on the GPU: {@link createBlockMask} (FlexAttention's `create_block_mask`) and the
 * per-call map a fused kernel builds when a call has a `maskMod` but no `blockMask`.
 */
import { WgattnError } from "./errors.ts";
import { defaultRuntime, runtimeFor } from "./device.ts";
import { GpuCall, readBuffer } from "./gpu.ts";
import {
  BlockMask,
  checkFlexCompiles,
  type FlexView,
  type MaskMod,
  type ModBufferInput,
  resolveFlex,
} from "./flex.ts";
import { checkOptions, describeValue, GPU_DEVICE_RULE } from "./options.ts";
import { blockMaskKernel } from "../wgsl/flex.ts";
import type { AttentionProblem } from "./problem.ts";

/** Options of {@link createBlockMask}. */
export interface BlockMaskOptions {
  /** Batch size; 1 or left out broadcasts (the mask is evaluated at b = 0). */
  b?: number;
  /** Query heads; 1 or left out broadcasts (evaluated at h = 0). */
  n?: number;
  /** Query sequence length. */
  sQ: number;
  /** Key sequence length. */
  sKv: number;
  /** Mod buffers the mask reads; calls with the block mask bind them too. */
  modBuffers?: Readonly<Record<string, ModBufferInput>>;
  /** Rows and keys per block, one size or [query, key]. Default 128, FlexAttention's. */
  blockSize?: number | readonly [number, number];
  /** The device to build it on; default wgattn's. */
  device?: GPUDevice;
}

const SIZE = (expected: string) => ({
  test: (x: unknown) => Number.isInteger(x) && (x as number) >= 1,
  expected,
});

/**
 * Evaluates `maskMod` on the GPU over every (query block, key block) of a `[b, n, sQ, sKv]` call and
 * returns a {@link BlockMask} to pass as `options.blockMask`: fused kernels then skip the empty tiles
 * and the per-element test on full ones. Reusable across calls of that shape on that device; its
 * buffer is freed by `destroy()`. Queued without waiting.
 *
 * @example
 * ```ts
 * import { attentionForward, createBlockMask, documentMask } from "jsr:@wgattn/attention";
 * const s = 256;
 * const ids = Int32Array.from({ length: s }, (_, i) => Math.floor(i / 64)); // 4 documents
 * const doc = documentMask(ids);
 * const blockMask = await createBlockMask(doc.maskMod, { sQ: s, sKv: s, modBuffers: doc.modBuffers });
 * const t = { data: new Float32Array(2 * s * 32).fill(0.1), shape: [1, 2, s, 32] };
 * const out = await attentionForward(t, t, t, { ...doc, blockMask });
 * console.log(await blockMask.counts()); // { empty: 2, partial: 2, full: 0 }: 128-blocks, 2 documents each
 * blockMask.destroy();
 * ```
 */
export async function createBlockMask(maskMod: MaskMod, options: BlockMaskOptions): Promise<BlockMask> {
  checkOptions(options, {
    b: SIZE("an integer >= 1"),
    n: SIZE("an integer >= 1"),
    sQ: SIZE("an integer >= 1"),
    sKv: SIZE("an integer >= 1"),
    modBuffers: "object",
    blockSize: {
      test: (x) =>
        (Number.isInteger(x) && (x as number) >= 1) ||
        (Array.isArray(x) && x.length === 2 && x.every((y) => Number.isInteger(y) && y >= 1)),
      expected: "an integer >= 1 or [query, key] of integers >= 1",
    },
    device: GPU_DEVICE_RULE,
  }, "createBlockMask options");
  for (const key of ["sQ", "sKv"] as const) {
    if (options?.[key] === undefined) {
      throw new WgattnError("INVALID_OPTION", `createBlockMask needs options.${key}`, {
        argument: `options.${key}`,
        expected: "an integer >= 1",
        actual: describeValue(undefined),
      });
    }
  }
  const b = options.b ?? 1, n = options.n ?? 1;
  const flex = resolveFlex({ maskMod, modBuffers: options.modBuffers }, {
    b,
    n,
    sQ: options.sQ,
    sKv: options.sKv,
  })!;
  const rt = options.device ? await runtimeFor(options.device) : await defaultRuntime();
  if (!rt) {
    throw new WgattnError("NO_BACKEND", "createBlockMask needs a WebGPU device", {
      expected: "a WebGPU adapter (without one, calls run on cpu, which needs no block mask)",
      actual: "no adapter",
    });
  }
  await checkFlexCompiles(rt, flex);
  const [blockQ, blockKv] = typeof options.blockSize === "number"
    ? [options.blockSize, options.blockSize]
    : options.blockSize ?? [128, 128];
  const nq = Math.ceil(options.sQ / blockQ), nk = Math.ceil(options.sKv / blockKv);
  const bytes = b * n * nq * nk * 4;
  const buffer = rt.device.createBuffer({
    size: Math.max(16, Math.ceil(bytes / 16) * 16),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC,
    label: "wgattn block mask",
  });
  const call = new GpuCall(rt, "wgattn createBlockMask");
  try {
    await encodeBlockStates(call, flex, buffer, { b, n, sQ: options.sQ, sKv: options.sKv, blockQ, blockKv });
  } catch (e) {
    call.abandon();
    buffer.destroy();
    throw e;
  }
  const { outOfMemory, validation } = await call.errors();
  const refused = outOfMemory ?? validation ?? await call.submit();
  if (refused) {
    buffer.destroy();
    throw new WgattnError(outOfMemory ? "OUT_OF_MEMORY" : "GPU_ERROR", `createBlockMask: ${refused.message}`);
  }
  return new BlockMask({
    b,
    n,
    sQ: options.sQ,
    sKv: options.sKv,
    blockQ,
    blockKv,
    maskMod: flex.maskMod!,
    buffers: flex.buffers,
    device: rt.device,
    buffer,
    read: async () => new Uint32Array(await readBuffer(rt.device, buffer, bytes)),
  });
}

/** Records the block-map pass: states of [b, n, ceil(sQ / blockQ), ceil(sKv / blockKv)] into `out`. */
async function encodeBlockStates(
  call: GpuCall,
  flex: FlexView,
  out: GPUBuffer,
  size: { b: number; n: number; sQ: number; sKv: number; blockQ: number; blockKv: number },
  bound?: Record<string, GPUBuffer>,
): Promise<void> {
  const kernel = blockMaskKernel(flex.maskMod!.wgsl, flex.buffers);
  const pipeline = await call.pipeline(kernel);
  const buffers: Record<string, GPUBuffer> = { flex_map: out };
  for (const x of flex.buffers) {
    buffers[x.name] = bound?.[x.name] ??
      (x.residency === "gpu" ? x.buffer : call.upload(x.data, `wgattn mod buffer ${x.name}`));
  }
  const nq = Math.ceil(size.sQ / size.blockQ), nk = Math.ceil(size.sKv / size.blockKv);
  call.dispatch(pipeline, kernel, buffers, {
    n: size.n,
    s_q: size.sQ,
    s_kv: size.sKv,
    bq: size.blockQ,
    bk: size.blockKv,
    nq,
    nk,
  }, size.b * size.n * nq * nk);
}

/** The block map a fused kernel reads, with the uniforms that describe it. */
export interface BoundBlockMap {
  buffer: GPUBuffer;
  uniforms: Record<string, number>;
}

/**
 * The block map for a fused kernel's call: the call's `blockMask`, or (with a `maskMod` and no
 * handle) one built now at the kernel's tile size into a scratch buffer, its pass recorded before
 * the kernel's.
 */
export async function blockMapFor(
  call: GpuCall,
  p: AttentionProblem,
  io: { flex?: Record<string, GPUBuffer> },
  tileQ: number,
  tileKv: number,
): Promise<BoundBlockMap> {
  const f = p.flex!;
  const h = f.blockMask;
  if (h) {
    const nq = h.queryBlocks, nk = h.keyBlocks;
    return {
      buffer: h.buffer,
      uniforms: {
        fb_bq: h.blockQ,
        fb_bk: h.blockKv,
        fb_nq: nq,
        fb_nk: nk,
        fb_sb: h.b === 1 ? 0 : h.n * nq * nk,
        fb_sh: h.n === 1 ? 0 : nq * nk,
      },
    };
  }
  const nq = Math.ceil(p.sQ / tileQ), nk = Math.ceil(p.sKv / tileKv);
  const buffer = call.scratch(p.b * p.n * nq * nk * 4, "wgattn flex block map");
  await encodeBlockStates(call, f, buffer, {
    b: p.b,
    n: p.n,
    sQ: p.sQ,
    sKv: p.sKv,
    blockQ: tileQ,
    blockKv: tileKv,
  }, io.flex);
  return {
    buffer,
    uniforms: { fb_bq: tileQ, fb_bk: tileKv, fb_nq: nq, fb_nk: nk, fb_sb: p.n * nq * nk, fb_sh: nq * nk },
  };
}
