"""PyTorch FlexAttention on the cases of bench/flex_bench.ts, for the same command on the H200.

    python3 bench/flex_torch.py [--quick] [--s 8192] [--n 16] [--d 128] [--dtype fp32]

One JSON line per case (name, ms by CUDA events, TFLOP/s dense-equivalent, speedup or ratio vs plain),
or one line with the error where flex_attention cannot run (it needs torch.compile and Triton).
TF32 is off, as in .gpu/torch_sdpa.py, so fp32 stays fp32.
"""
import json
import math
import sys


def arg(name, default):
    return sys.argv[sys.argv.index(f"--{name}") + 1] if f"--{name}" in sys.argv else default


quick = "--quick" in sys.argv
s = int(arg("s", "1024" if quick else "8192"))
n = int(arg("n", "4" if quick else "16"))
d = int(arg("d", "64" if quick else "128"))
dtype_name = arg("dtype", "fp32")
try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    dev = "cuda"
    q, k, v = (torch.rand(1, n, s, d, device=dev, dtype=dtype) * 2 - 1 for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    doc_len = s // 8
    ids = torch.arange(s, device=dev) // doc_len
    slopes = torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)], device=dev, dtype=torch.float32)

    def doc_mask(b, h, qi, kv):
        return ids[qi] == ids[kv]

    def alibi(score, b, h, qi, kv):
        return score + slopes[h] * (kv - qi)

    def softcap(score, b, h, qi, kv):
        return 20.0 * torch.tanh(score / 20.0)

    block_mask = create_block_mask(doc_mask, None, None, s, s, device=dev)

    def time_ms(f, reps=10 if quick else 20):
        f()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            f()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    flops = 4 * n * s * s * d
    cases = [
        ("plain (flex, no mods)", lambda: flex(q, k, v)),
        ("documents 8 (block mask)", lambda: flex(q, k, v, block_mask=block_mask)),
        ("alibi (score_mod)", lambda: flex(q, k, v, score_mod=alibi)),
        ("soft-cap 20 (score_mod)", lambda: flex(q, k, v, score_mod=softcap)),
        ("sdpa math (no mask)", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
    ]
    plain = None
    for name, f in cases:
        try:
            ms = time_ms(f)
        except Exception as e:  # one case failing (e.g. a compile limit) leaves the others
            print(json.dumps({"torch": name, "error": str(e).splitlines()[0][:300]}))
            continue
        line = {"torch": name, "shape": [1, n, s, d], "dtype": dtype_name, "ms": round(ms, 4),
                "tflops": round(flops / ms / 1e9, 2)}
        if name.startswith("plain"):
            plain = ms
        elif plain and name.startswith("documents"):
            line["speedupVsPlain"] = round(plain / ms, 2)
        elif plain and "score_mod" in name:
            line["ratioVsPlain"] = round(ms / plain, 3)
        print(json.dumps(line), flush=True)
except Exception as e:
    print(json.dumps({"torch": "flex_attention", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}))
