"""Inputs and fp64 references for the SDK tests: structured Q/K/V, .npy/.safetensors writers, and
attention over a selection (the JSON of `dhsa attend --selection-out`) or over all causal keys."""

import json
import struct

import numpy as np


def segmented_qkv(rng, hq, hkv, n, d, dtype=np.float32):
    """Q [hq, n, d], K and V [hkv, n, d] with structure: keys in topic segments of random length
    (so dynamic boundaries and chunk selection have something to find) and queries that point at
    earlier segments' topics."""
    k = np.empty((hkv, n, d))
    q = np.empty((hq, n, d))
    group = hq // hkv
    for h in range(hkv):
        starts = np.sort(rng.choice(np.arange(1, n), size=max(1, n // 40), replace=False))
        starts = np.concatenate([[0], starts, [n]])
        topics = rng.standard_normal((len(starts) - 1, d)) * 2.0
        for s in range(len(starts) - 1):
            a, b = starts[s], starts[s + 1]
            k[h, a:b] = topics[s] + 0.5 * rng.standard_normal((b - a, d))
        for g in range(group):
            picks = rng.integers(0, len(starts) - 1, size=n)
            q[h * group + g] = topics[picks] * 0.7 + rng.standard_normal((n, d))
    v = rng.standard_normal((hkv, n, d))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def write_safetensors(path, tensors):
    """tensors: name -> (dtype tag "F32"/"F16"/"BF16", numpy array of the raw elements)."""
    header, blobs, offset = {}, [], 0
    for name, (tag, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def attention_over_selection(q, k, v, selection, dtype=np.float64):
    """O [Hq, Lq, d] and LSE [Hq, Lq] of softmax attention over the selected keys of each query
    block (cut causally at each row), in `dtype`. The queries are the last Lq positions."""
    hq, lq, d = q.shape
    hkv, lk, _ = k.shape
    t0 = lk - lq
    group = hq // hkv
    bq = selection["q_block"]
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    scale = dtype(1.0 / np.sqrt(d))
    o = np.full((hq, lq, d), np.nan, dtype=dtype)
    lse = np.full((hq, lq), np.nan, dtype=dtype)
    for entry in selection["selection"]:
        h, block = entry["kv_head"], entry["block"]
        keys = np.concatenate([np.arange(a, b) for a, b in entry["spans"]] or [np.arange(0)])
        rows = np.arange(max(t0, block * bq), min(lk, (block + 1) * bq))
        if rows.size == 0:
            continue
        heads = slice(h * group, (h + 1) * group)
        s = np.einsum("grd,kd->grk", q[heads, rows - t0], k[h, keys]) * scale
        s = np.where(keys[None, None, :] <= rows[None, :, None], s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - m)
        z = p.sum(axis=-1, keepdims=True)
        o[heads, rows - t0] = np.einsum("grk,kd->grd", p / z, v[h, keys])
        lse[heads, rows - t0] = (m + np.log(z))[..., 0]
    return o, lse


def dense_attention(q, k, v, dtype=np.float64):
    """Causal softmax attention over every key, queries at the last Lq positions."""
    hkv, lk, _ = k.shape
    selection = {"q_block": lk, "selection": [
        {"kv_head": h, "block": 0, "spans": [[0, lk]]} for h in range(hkv)]}
    return attention_over_selection(q, k, v, selection, dtype)
