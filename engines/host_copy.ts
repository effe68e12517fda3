/**
 * Large host-memory copies (uploads into mapped staging buffers, results out of mapped read-back
 * buffers) split over several threads. One JavaScript thread copies at memcpy speed (9.5 GB/s on
 * the H200's host, measured) and a fresh result array also pays its page faults on that thread;
 * the seed call moves 33.6 MB, 3.5 ms that way. libc's `memcpy` called through Deno's FFI with
 * `nonblocking: true` runs on Deno's blocking thread pool, so chunks of one copy run side by side.
 *
 * Used when FFI is granted (Dawn needs `--allow-ffi` anyway) and the copy is large; otherwise, and
 * wherever FFI or libc is missing (a browser), the copy is a plain `TypedArray.set` on this thread.
 * The JavaScript thread awaits the chunks and keeps both arrays referenced until they are done;
 * neither backing store moves (V8 never moves an ArrayBuffer's backing store).
 */

/** Tuning for benchmarks: `threads` 1 turns the threaded path off. Set before the first copy. */
export const hostCopyTuning: { threads: number; minBytes: number } = {
  threads: 8,
  minBytes: 1 << 20,
};

type Pointer = Deno.PointerObject | null;
interface Memcpy {
  memcpy(dst: Pointer, src: Pointer, bytes: bigint): Promise<Pointer>;
}

/** libc's memcpy as a nonblocking FFI symbol, or null where that cannot be had. */
let libc: Memcpy | null | undefined;

function threadedMemcpy(): Memcpy | null {
  if (libc !== undefined) return libc;
  libc = null;
  const deno = (globalThis as { Deno?: typeof Deno }).Deno;
  try {
    if (!deno?.dlopen || deno.permissions.querySync({ name: "ffi" }).state !== "granted") return null;
    const names = deno.build.os === "darwin"
      ? ["libSystem.B.dylib"]
      : deno.build.os === "windows"
      ? ["msvcrt.dll"]
      : ["libc.so.6", "libc.so"];
    for (const name of names) {
      try {
        const lib = deno.dlopen(name, {
          memcpy: { parameters: ["pointer", "pointer", "usize"], result: "pointer", nonblocking: true },
        });
        libc = lib.symbols as unknown as Memcpy;
        break;
      } catch { /* try the next name */ }
    }
  } catch { /* no FFI here: plain copies */ }
  return libc;
}

/** Whether copies of `bytes` bytes take the threaded path here. */
export function threadedCopy(bytes: number): boolean {
  return hostCopyTuning.threads > 1 && bytes >= hostCopyTuning.minBytes && threadedMemcpy() !== null;
}

/**
 * Copies `src` into the start of `dst` (which must be at least as long). Resolves at once for small
 * copies or where threads cannot be had; otherwise once every chunk has been copied.
 */
export function hostCopy(dst: Uint8Array, src: Uint8Array): Promise<void> | void {
  const bytes = src.byteLength;
  if (dst.byteLength < bytes) throw new RangeError(`hostCopy: ${dst.byteLength} B < ${bytes} B`);
  if (!threadedCopy(bytes)) {
    dst.set(src);
    return;
  }
  const lib = threadedMemcpy()!;
  const U = Deno.UnsafePointer;
  const pd = U.of(dst), ps = U.of(src);
  // Chunks of at least 512 KiB, 64-byte aligned, one per thread.
  const chunks = Math.min(hostCopyTuning.threads, Math.ceil(bytes / (512 << 10)));
  const chunk = Math.ceil(bytes / chunks / 64) * 64;
  const work: Promise<Pointer>[] = [];
  for (let at = 0; at < bytes; at += chunk) {
    const n = Math.min(chunk, bytes - at);
    work.push(lib.memcpy(U.offset(pd!, at), U.offset(ps!, at), BigInt(n)));
  }
  // The arrays stay referenced by this closure until the copies are done.
  return Promise.all(work).then(() => void (dst.byteLength + src.byteLength));
}
