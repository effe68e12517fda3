"""PyTorch (and flash-attn where installed) on the shapes of bench/serving_bench.ts, for the same command.

    python3 bench/serving_torch.py

One JSON line per run, timed by CUDA events (best of 3 medians of 30):
  packed: 16 causal sequences of 256..4096 (n 32/8, d 128, fp16): SDPA on the batch padded to 4096
          (boolean mask = key padding and causal), SDPA per sequence (a loop: no padded work), and
          flash_attn_varlen_func when flash_attn imports.
  paged decode: b 16, n 32/8, s_kv 8192, d 128, fp16: SDPA on the dense cache (GQA), and
          flash_attn_with_kvcache with a shuffled block table of pages of 64 when flash_attn imports.
A run that cannot happen prints its error instead.
"""
import json

N, NKV, D = 32, 8, 128
PEAK = 4.3e12


def line(**fields):
    print(json.dumps({"bench": "serving-torch", **fields}), flush=True)


try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001
    line(error=f"torch: {e}")
    raise SystemExit(0)

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except Exception as e:  # noqa: BLE001
    flash_attn_varlen_func = flash_attn_with_kvcache = None
    line(note=f"flash_attn not available: {e}")

dev, dt = "cuda", torch.float16


def best_ms(fn, reps=30):
    fn()
    torch.cuda.synchronize()
    trials = []
    for _ in range(3):
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        trials.append(sorted(times)[len(times) // 2])
    return min(trials)


def run(part, name, fn, **extra):
    try:
        ms = best_ms(fn)
        line(part=part, run=name, ms=round(ms, 3), **{k: (v(ms) if callable(v) else v) for k, v in extra.items()})
    except Exception as e:  # noqa: BLE001
        line(part=part, run=name, error=str(e)[:200])


# ---- packed ----
lens = [256 * (i + 1) for i in range(16)]
L = max(lens)
total = sum(lens)
cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(16)], dtype=torch.int32, device=dev)
q = torch.randn(total, N, D, device=dev, dtype=dt)
k = torch.randn(total, NKV, D, device=dev, dtype=dt)
v = torch.randn(total, NKV, D, device=dev, dtype=dt)
flops = sum(2 * N * l * l * D for l in lens)
useful = lambda ms: round(flops / ms / 1e9, 1)  # noqa: E731

qp = torch.zeros(16, N, L, D, device=dev, dtype=dt)
kp = torch.zeros(16, N, L, D, device=dev, dtype=dt)  # GQA expanded: SDPA with a mask takes no enable_gqa everywhere
vp = torch.zeros(16, N, L, D, device=dev, dtype=dt)
for i, l in enumerate(lens):
    s = slice(int(cu[i]), int(cu[i + 1]))
    qp[i, :, :l] = q[s].transpose(0, 1)
    kp[i, :, :l] = k[s].transpose(0, 1).repeat_interleave(N // NKV, 0)
    vp[i, :, :l] = v[s].transpose(0, 1).repeat_interleave(N // NKV, 0)
keep = torch.zeros(16, L, dtype=torch.bool, device=dev)
for i, l in enumerate(lens):
    keep[i, :l] = True
causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
mask = (keep[:, None, None, :] & causal[None, None]).expand(16, 1, L, L)
shape = f"16 seqs 256..4096 ({total} tokens), n{N}/{NKV} d{D} fp16 causal"
run("packed", "torch sdpa, padded + mask", lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask), shape=shape, usefulTflops=useful)
run(
    "packed",
    "torch sdpa, padded, causal only (no key padding: a floor for padding)",
    lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True),
    shape=shape,
    usefulTflops=useful,
)


def per_sequence():
    for i in range(16):
        s = slice(int(cu[i]), int(cu[i + 1]))
        F.scaled_dot_product_attention(
            q[s].transpose(0, 1)[None], k[s].transpose(0, 1)[None], v[s].transpose(0, 1)[None], is_causal=True, enable_gqa=True
        )


run("packed", "torch sdpa, one call per sequence", per_sequence, shape=shape, usefulTflops=useful)
if flash_attn_varlen_func:
    run(
        "packed",
        "flash_attn_varlen_func",
        lambda: flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True),
        shape=shape,
        usefulTflops=useful,
    )
del qp, kp, vp, mask

# ---- paged decode ----
b, skv = 16, 8192
kvbytes = 2 * b * NKV * skv * D * 2
bw = lambda ms: round(kvbytes / ms / 1e6)  # noqa: E731
of_peak = lambda ms: round(kvbytes * 1e3 / ms / PEAK, 3)  # noqa: E731
qd = torch.randn(b, N, 1, D, device=dev, dtype=dt)
kd = torch.randn(b, NKV, skv, D, device=dev, dtype=dt)
vd = torch.randn(b, NKV, skv, D, device=dev, dtype=dt)
shape = f"b{b} n{N}/{NKV} s_kv{skv} d{D} fp16"
run(
    "paged decode",
    "torch sdpa, dense cache (enable_gqa)",
    lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True),
    shape=shape + ", dense cache",
    GBps=bw,
    ofPeak=of_peak,
)
for page in (64, 256) if flash_attn_with_kvcache else ():  # FA2 wants pages of 256; 64 prints its error
    pages = b * skv // page
    kc = torch.randn(pages, page, NKV, D, device=dev, dtype=dt)
    vc = torch.randn(pages, page, NKV, D, device=dev, dtype=dt)
    table = torch.randperm(pages, device=dev, dtype=torch.int32).reshape(b, skv // page)
    lens_t = torch.full((b,), skv, dtype=torch.int32, device=dev)
    qf = qd.transpose(1, 2).contiguous()  # [b, 1, n, d]
    run(
        "paged decode",
        "flash_attn_with_kvcache",
        lambda: flash_attn_with_kvcache(qf, kc, vc, cache_seqlens=lens_t, block_table=table),
        shape=shape + f", pages of {page}",
        GBps=bw,
        ofPeak=of_peak,
    )
