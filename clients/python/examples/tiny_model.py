"""A small decoder-only transformer in numpy (generated weights) whose attention is pluggable: the
model code an inference engine has, with attention as the one call that goes to the DHSA service.

Layer: RMSNorm -> Q, K, V projections (grouped-query: Hq query heads share Hkv key/value heads) ->
rotary position embeddings on Q and K -> attention -> output projection -> residual -> RMSNorm ->
SwiGLU MLP -> residual. Attention is `attend(layer, q [Hq, n, d], k [Hkv, n, d], v [Hkv, n, d])`
returning o [Hq, n, d] for the n new tokens, which sit after the tokens the layer has seen.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np


class TinyModel:
    def __init__(self, layers=2, hidden=256, q_heads=8, kv_heads=2, head_dim=32, vocab=512,
                 ffn=512, rope_theta=10000.0, seed=0):
        assert q_heads % kv_heads == 0
        self.layers, self.hidden, self.vocab = layers, hidden, vocab
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        rng = np.random.default_rng(seed)

        def w(*shape):  # Scaled so activations stay O(1) through the layers.
            return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

        self.embed = rng.standard_normal((vocab, hidden)).astype(np.float32)
        self.blocks = [dict(attn_norm=np.ones(hidden, np.float32), wq=w(hidden, q_heads * head_dim),
                            wk=w(hidden, kv_heads * head_dim), wv=w(hidden, kv_heads * head_dim),
                            wo=w(q_heads * head_dim, hidden), mlp_norm=np.ones(hidden, np.float32),
                            w_gate=w(hidden, ffn), w_up=w(hidden, ffn), w_down=w(ffn, hidden))
                       for _ in range(layers)]
        self.final_norm = np.ones(hidden, np.float32)
        self.lm_head = w(hidden, vocab)
        self.inv_freq = (1.0 / rope_theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(
            np.float64)

    @staticmethod
    def rms_norm(x, weight, eps=1e-6):
        return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight).astype(np.float32)

    def rope(self, x, positions):
        """Rotary embedding (rotate-half form) of x [H, n, d] at absolute `positions` [n]."""
        angles = positions[:, None].astype(np.float64) * self.inv_freq[None, :]  # [n, d/2]
        cos = np.cos(angles).astype(np.float32)
        sin = np.sin(angles).astype(np.float32)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def layer(self, i, h, positions, attend):
        """h [n, hidden] of n new tokens at `positions` -> h after layer i."""
        b = self.blocks[i]
        n = h.shape[0]
        x = self.rms_norm(h, b["attn_norm"])
        q = (x @ b["wq"]).reshape(n, self.q_heads, self.head_dim).transpose(1, 0, 2)
        k = (x @ b["wk"]).reshape(n, self.kv_heads, self.head_dim).transpose(1, 0, 2)
        v = (x @ b["wv"]).reshape(n, self.kv_heads, self.head_dim).transpose(1, 0, 2)
        q, k = self.rope(q, positions), self.rope(k, positions)
        o = attend(i, np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v))
        h = h + o.transpose(1, 0, 2).reshape(n, self.q_heads * self.head_dim) @ b["wo"]
        x = self.rms_norm(h, b["mlp_norm"])
        gate = x @ b["w_gate"]
        return h + ((gate / (1 + np.exp(-gate))) * (x @ b["w_up"])) @ b["w_down"]

    def forward(self, tokens, start, attend):
        """Logits [n, vocab] of `tokens` at positions start, start+1, ... through every layer."""
        h = self.embed[np.asarray(tokens)]
        positions = np.arange(start, start + len(tokens))
        for i in range(self.layers):
            h = self.layer(i, h, positions, attend)
        return self.rms_norm(h, self.final_norm) @ self.lm_head


class LocalAttention:
    """The layer's original attention: dense causal softmax over a numpy KV cache per layer."""

    def __init__(self, model):
        self.model = model
        self.k = [np.zeros((model.kv_heads, 0, model.head_dim), np.float32)] * model.layers
        self.v = list(self.k)

    def __call__(self, layer, q, k, v):
        self.k[layer] = np.concatenate([self.k[layer], k], axis=1)
        self.v[layer] = np.concatenate([self.v[layer], v], axis=1)
        keys, values = self.k[layer], self.v[layer]
        hq, n, d = q.shape
        total = keys.shape[1]
        group = hq // keys.shape[0]
        kk = np.repeat(keys, group, axis=0)  # GQA: query head g uses KV head g // group.
        vv = np.repeat(values, group, axis=0)
        s = np.einsum("hnd,hkd->hnk", q, kk) / np.sqrt(d)
        rows = np.arange(total - n, total)[:, None]
        s = np.where(np.arange(total)[None, :] <= rows, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return (np.einsum("hnk,hkd->hnd", p, vv) / p.sum(-1)[..., None]).astype(np.float32)


class Server:
    """`dhsa serve` started by an example when no --target is given (stopped on exit)."""

    def __init__(self, dhsa_binary, workers=2):
        binary = dhsa_binary or shutil.which("dhsa")
        if not binary:
            sys.exit("no --target and no dhsa binary: pass --target HOST:PORT of a running "
                     "`dhsa serve`, or --dhsa build/dhsa to start one")
        self.process = subprocess.Popen(
            [binary, "serve", "--workers", str(workers), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()
        m = re.search(r"router on (\S+:\d+)", line)
        if not m:
            self.process.kill()
            sys.exit(f"dhsa serve did not start: {line}{self.process.stdout.read()}")
        self.target = m.group(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait()
        return False


def target_or_server(args):
    """(target, server or None): the --target given, or a `dhsa serve` started here."""
    if args.target:
        return args.target, None
    server = Server(args.dhsa)
    print(f"started dhsa serve on {server.target}", file=sys.stderr)
    return server.target, server


class Stopwatch:
    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start
        return False


def add_common_flags(parser):
    parser.add_argument("--target", default=os.environ.get("DHSA_TARGET", ""),
                        help="router HOST:PORT (default $DHSA_TARGET; empty: start dhsa serve)")
    parser.add_argument("--dhsa", default="", help="dhsa binary to start when there is no --target")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
