#!/usr/bin/python3
"""Replace a model layer's attention with a call to the DHSA service.

One transformer layer (numpy, generated weights, RoPE, grouped-query attention) runs over a prompt
twice: with its own dense attention, and with attention computed by the service. The change to the
model code is the `attend` function: `seq.prefill(layer, q, k, v)`.

    PYTHONPATH=build/python /usr/bin/python3 clients/python/examples/replace_attention.py \\
        --dhsa build/dhsa --tokens 4096 --budget 1024

With --policy dense the two runs agree to float32 rounding; with dhsa and a budget below the prompt
length they differ by what sparse attention leaves out, which the report measures.
"""

import argparse
import sys

import numpy as np

import dhsa
from tiny_model import LocalAttention, Stopwatch, TinyModel, add_common_flags, target_or_server


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument("--policy", default="dhsa", help="dhsa, block_topk, streaming or dense")
    parser.add_argument("--budget", type=int, default=512, help="keys per query row")
    parser.add_argument("--dtype", default="float32", help="KV storage: float32 or float16")
    args = parser.parse_args()

    model = TinyModel(layers=1, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    h = rng.standard_normal((args.tokens, model.hidden)).astype(np.float32)  # layer input
    positions = np.arange(args.tokens)

    local_time, service_time = Stopwatch(), Stopwatch()
    with local_time:
        want = model.layer(0, h, positions, LocalAttention(model))

    target, server = target_or_server(args)
    try:
        with dhsa.Client(target, timeout=600) as client, client.create_sequence(
                num_layers=1, q_heads=model.q_heads, kv_heads=model.kv_heads,
                head_dim=model.head_dim, dtype=args.dtype, policy=args.policy,
                budget=args.budget) as seq:

            def attend(layer, q, k, v):  # The whole integration: numpy in, numpy out.
                return seq.prefill(layer, q, k, v)

            with service_time:
                got = model.layer(0, h, positions, attend)
            stats = seq.last_stats
    except dhsa.Error as e:
        sys.exit(f"the service failed: {e}")
    finally:
        if server:
            server.__exit__()

    diff = float(np.abs(got - want).max())
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want - h))
    density = stats["computed_pairs"] / max(1, stats["causal_pairs"])
    print(f"one layer, {args.tokens} tokens, Hq={model.q_heads} Hkv={model.kv_heads} "
          f"d={model.head_dim}, policy {args.policy}, budget {args.budget}, KV {args.dtype}")
    print(f"{'':28}{'time':>10}")
    print(f"{'local dense attention':28}{local_time.seconds:>9.3f}s")
    print(f"{'DHSA service attention':28}{service_time.seconds:>9.3f}s")
    print(f"density {100 * density:.2f}% of causal pairs on {stats['workers_used']} workers")
    print(f"layer output: max |difference| {diff:.3g}, relative to the layer's update {rel:.3g}")
    if args.policy == "dense" and args.dtype == "float32" and rel > 1e-4:
        sys.exit("dense attention through the service should equal the local one")


if __name__ == "__main__":
    main()
