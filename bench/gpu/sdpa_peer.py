"""Peer timings on the GPU: PyTorch SDPA (dense causal, FlashAttention backend) and FlexAttention
with a block mask of the same density as DHSA at budget 2048, Hq=32, Hkv=8, d=128, bf16.
Run on the device machine (PyTorch is installed there): python3 bench/gpu/sdpa_peer.py"""
import sys

import torch
import torch.nn.functional as F


def bench(fn, reps=10):
    for _ in range(3):
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


def main():
    hq, hkv, d = 32, 8, 128
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'L':>8} {'kernel':<34} {'median_ms':>10} {'TFLOP/s':>8}")
    for length in [8192, 32768, 131072]:
        q = torch.randn(1, hq, length, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16)
        pairs = hq * length * (length + 1) / 2
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            kk = k.repeat_interleave(hq // hkv, dim=1)
            vv = v.repeat_interleave(hq // hkv, dim=1)
            ms = bench(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True))
        print(f"{length:>8} {'sdpa flash (dense causal)':<34} {ms:>10.3f} {4 * pairs * d / ms / 1e9:>8.1f}")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            budget, block = 2048, 128

            def mask(b, h, qi, ki):
                # Sink 128 + last (budget - 128) keys: the density of a 2048-key budget.
                return (ki <= qi) & ((ki < 128) | (qi - ki < budget - 128))

            bm = create_block_mask(mask, None, None, length, length, BLOCK_SIZE=block)
            flex = torch.compile(flex_attention)
            sparse_pairs = hq * sum(min(p + 1, budget) for p in range(0, length, 64)) * 64
            ms = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
            print(f"{length:>8} {'flex_attention (budget-2048 mask)':<34} {ms:>10.3f} "
                  f"{4 * sparse_pairs * d / ms / 1e9:>8.1f}")
        except Exception as e:  # FlexAttention is optional: report and go on.
            print(f"{length:>8} flex_attention failed: {type(e).__name__}: {e}"[:200])
        del q, k, v
        torch.cuda.empty_cache()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
