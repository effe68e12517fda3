"""PyTorch scaled_dot_product_attention on the same GPU: the anchor to hold WGSL kernels against.

Run on the lent GPU machine (PyTorch is installed there), in the same command as the WGSL benchmark:
  python3 bench/torch_sdpa.py --shapes "1,24,4608,128;32,8,128,64" --dtypes fp32,fp16 [--causal]
Prints one JSON line per (shape, dtype, backend): ms is the median of timed runs (CUDA events),
tflops counts 4*b*n*s_q*s_kv*d (halved for causal), as attention benchmarks usually do.
"""
import argparse, json, statistics
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend

torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 math, as WGSL f32 kernels do
torch.backends.cudnn.allow_tf32 = False

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="32,8,128,64;1,24,4608,128")  # b,n,s,d[,s_kv[,n_kv]]
p.add_argument("--dtypes", default="fp32,fp16")
p.add_argument("--causal", action="store_true")
p.add_argument("--reps", type=int, default=20)
a = p.parse_args()
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

def median_ms(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)

for spec in a.shapes.split(";"):
    f = [int(x) for x in spec.split(",")]
    b, n, s, d = f[:4]
    skv = f[4] if len(f) > 4 else s
    nkv = f[5] if len(f) > 5 else n
    flops = 4 * b * n * s * skv * d * (0.5 if a.causal else 1.0)
    for name in a.dtypes.split(","):
        dt = DT[name]
        q = torch.randn(b, n, s, d, dtype=dt, device="cuda")
        k = torch.randn(b, nkv, skv, d, dtype=dt, device="cuda")
        v = torch.randn(b, nkv, skv, d, dtype=dt, device="cuda")
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            row = {"peer": "torch", "torch": torch.__version__, "backend": be.name.lower(), "dtype": name,
                   "b": b, "n": n, "s": s, "s_kv": skv, "n_kv": nkv, "d": d, "causal": a.causal}
            try:
                with sdpa_kernel(be):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=a.causal, enable_gqa=nkv != n)
                    ms = median_ms(fn, a.reps)
                row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2))
            except Exception as ex:  # a backend that does not take this dtype or shape
                row.update(ms=None, tflops=None, unsupported=type(ex).__name__)
            print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
