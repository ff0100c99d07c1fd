"""Issue 5's benchmark, the peers and the final table: on the same GPU and in the same device run
as bench/gpu/sparse_attention_bench (ours), for Hq=32, Hkv=8, d=128, bf16, prefill of L tokens:
  (a) PyTorch scaled_dot_product_attention, causal (the dense peer): the cuDNN and the
      FlashAttention backends are both timed and the faster is reported;
  (b) PyTorch FlexAttention with a block mask of the same density as ours at each budget (sink 128
      plus a sliding window, budget keys per row: the budget ours spends per row);
  (c) ours, read from the benchmark's CSV lines: selection, attention, end to end;
with TFLOP/s on the pairs each computes and the bf16 matmul rate of the card (8192^3, torch) as
the ceiling. The table is printed last.

Usage (device machine): python3 bench/gpu/sdpa_peer.py --ours=bench.log [--lengths=...]
"""
import argparse
import sys

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128


def bench(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def matmul_tflops():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, reps=20)
    return 2 * n ** 3 / ms / 1e9


def read_ours(path):
    ours = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("CSV,"):
                continue
            p = line.strip().split(",")
            ours[(int(p[1]), int(p[2]))] = dict(
                pairs=int(p[3]), density=float(p[4]), sel=float(p[5]), attn=float(p[6]),
                total=float(p[7]), tflops=float(p[8]), check=",".join(p[10:]))
    return ours


def window_pairs(length, budget):
    # Rows p see min(p + 1, budget) keys under the sink + window mask.
    full = max(0, length - budget)
    return HQ * (budget * (budget + 1) // 2 + full * budget) if length > budget else \
        HQ * length * (length + 1) // 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--budgets", default="2048,4096")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    ours = read_ours(args.ours)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ceiling = matmul_tflops()
    print(f"ceiling: torch bf16 matmul 8192^3 {ceiling:.1f} TFLOP/s", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    sdpa, flexr = {}, {}
    for length in lengths:
        gen = torch.Generator(device="cuda").manual_seed(length)
        q = torch.randn(1, HQ, length, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        kk = k.repeat_interleave(HQ // HKV, dim=1)
        vv = v.repeat_interleave(HQ // HKV, dim=1)
        best = None
        for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("flash", SDPBackend.FLASH_ATTENTION)]:
            try:
                with sdpa_kernel(backend):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True),
                               reps=5 if length >= 65536 else 10)
                print(f"L={length} sdpa {name}: {ms:.3f} ms", flush=True)
                if best is None or ms < best[1]:
                    best = (name, ms)
            except Exception as e:  # A backend may be missing: report and go on.
                print(f"L={length} sdpa {name} failed: {type(e).__name__}: {e}"[:200], flush=True)
        sdpa[length] = best
        del kk, vv
        torch.cuda.empty_cache()
        for budget in budgets:
            try:
                def mask(b, h, qi, ki, budget=budget):
                    return (ki <= qi) & ((ki < 128) | (qi - ki < budget - 128))

                bm = create_block_mask(mask, None, None, length, length, device="cuda",
                                       BLOCK_SIZE=128, _compile=True)
                ms = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
                flexr[(length, budget)] = ms
                print(f"L={length} budget={budget} flex: {ms:.3f} ms", flush=True)
                del bm
            except Exception as e:
                flexr[(length, budget)] = None
                print(f"L={length} budget={budget} flex failed: {type(e).__name__}: {e}"[:300],
                      flush=True)
            torch.cuda.empty_cache()
        del q, k, v
        torch.cuda.empty_cache()

    print()
    print(f"== issue 5 benchmark: Hq={HQ} Hkv={HKV} d={D} bf16 causal prefill, "
          f"{torch.cuda.get_device_name()} ==")
    print(f"ceiling: bf16 matmul {ceiling:.0f} TFLOP/s (torch, 8192^3); TFLOP/s = 4*d*pairs/time")
    print(f"{'L':>6} {'Nb':>5} {'dens':>6} | {'SDPA ms':>8} {'TF/s':>5} | {'Flex ms':>8} "
          f"{'TF/s':>5} | {'sel ms':>7} {'attn ms':>8} {'total':>8} {'sel%':>5} {'TF/s':>5} "
          f"| {'xSDPA':>6} {'xFlex':>6} check")
    for length in lengths:
        dense_pairs = HQ * length * (length + 1) / 2
        s = sdpa.get(length)
        for budget in budgets:
            o = ours.get((length, budget))
            fms = flexr.get((length, budget))
            sms = s[1] if s else float("nan")
            s_tf = 4 * D * dense_pairs / sms / 1e9 if s else float("nan")
            f_tf = 4 * D * window_pairs(length, budget) / fms / 1e9 if fms else float("nan")
            fms = fms if fms else float("nan")
            if o is None:
                print(f"{length:>6} {budget:>5} ours missing")
                continue
            print(f"{length:>6} {budget:>5} {o['density']:>6.3f} | {sms:>8.2f} {s_tf:>5.0f} | "
                  f"{fms:>8.3f} {f_tf:>5.0f} | {o['sel']:>7.3f} {o['attn']:>8.3f} "
                  f"{o['total']:>8.3f} {100 * o['sel'] / o['total']:>5.1f} {o['tflops']:>5.0f} | "
                  f"{sms / o['total']:>6.1f} {fms / o['total']:>6.2f} {o['check']}")
    print("SDPA backend used: " + ", ".join(f"{l}: {s[0]}" for l, s in sdpa.items() if s))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
