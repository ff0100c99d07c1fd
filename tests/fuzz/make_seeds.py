#!/usr/bin/python3
"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/seed-*): small valid
inputs of every kind, from which libFuzzer mutates. Needs numpy, protobuf and protoc:
  /usr/bin/python3 tests/fuzz/make_seeds.py
"""
import io
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.join(here, "..", "..")
stubs = tempfile.mkdtemp()
subprocess.run(["protoc", "-I", os.path.join(root, "proto"), "--python_out", stubs] +
               [f"dhsa/v1/{p}.proto" for p in ("attention", "config", "tensor", "worker")],
               check=True)
sys.path.insert(0, stubs)
from dhsa.v1 import attention_pb2, config_pb2, tensor_pb2, worker_pb2  # noqa: E402


def write(target, name, data):
    os.makedirs(os.path.join(here, "corpus", target), exist_ok=True)
    with open(os.path.join(here, "corpus", target, "seed-" + name), "wb") as f:
        f.write(data)


rng = np.random.default_rng(1)
for dtype in ("<f4", "<f2", "<f8"):
    for shape in ((2, 3, 4), (0,), (5,), ()):
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal(shape).astype(dtype))
        write("npy", f"{dtype[1:]}-{'x'.join(map(str, shape)) or 'scalar'}", buf.getvalue())
buf = io.BytesIO()
np.save(buf, np.asfortranarray(rng.standard_normal((3, 2)).astype("<f4")))
write("npy", "fortran", buf.getvalue())


def safetensors(tensors, metadata=None):
    header, data, offset = {}, b"", 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


q = rng.standard_normal((2, 3, 4)).astype("<f4")
write("safetensors", "qkv", safetensors({
    "q": ("F32", [2, 3, 4], q.tobytes()),
    "k": ("F16", [1, 3, 4], q[:1].astype("<f2").tobytes()),
    "v": ("BF16", [1, 3, 4], (q[:1].view("<u4") >> 16).astype("<u2").tobytes()),
}, {"format": "pt"}))
write("safetensors", "empty", safetensors({}))


def piece(name, dtype, shape, offset, data):
    p = tensor_pb2.TensorPiece(name=name, dtype=dtype, shape=shape, offset=offset, data=data)
    return p.SerializeToString()


raw = q.tobytes()
t = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3, 4], data=raw)
write("wire", "whole-then-pieces", bytes([20]) + t.SerializeToString() + b"\xff\xfe" +
      piece("q", tensor_pb2.DTYPE_FLOAT32, [2, 3, 4], 0, raw[:40]) + b"\xff\xfe" +
      piece("q", 0, [], 40, raw[40:]))
write("wire", "one-piece", bytes([12]) + b"\xff\xfe" +
      piece("q", tensor_pb2.DTYPE_FLOAT16, [1, 2, 2], 0, b"\x00\x3c" * 4))
write("wire", "empty-tensor", bytes([3]) + b"\xff\xfe" + piece("q", tensor_pb2.DTYPE_BFLOAT16,
                                                               [4, 0, 2], 0, b""))

params = config_pb2.DhsaParams(policy=config_pb2.POLICY_DHSA, budget=256, sink=16, local=64,
                               q_block=32, block=32)
req = attention_pb2.CreateSequenceRequest(sequence_id="s-1", config=attention_pb2.SequenceConfig(
    num_layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype=tensor_pb2.DTYPE_FLOAT32,
    params=params))
write("request", "create", b"\x00" + req.SerializeToString())
write("request", "create-defaults", b"\x00" + attention_pb2.CreateSequenceRequest().SerializeToString())
header = worker_pb2.AttendHeader(sequence_id="s-1", block_size=32, first_block=0, num_blocks=2,
                                 num_rows=40, q_begin=0, head_dim=32, q_heads=4, kv_heads=2)
for h in range(2):
    for b in range(2):
        e = header.entries.add()
        e.begin.extend([0, 20])
        e.end.extend([10, 30 + b])
write("request", "attend", b"\x01" + header.SerializeToString())

for name in ("router.json", "worker.json"):
    with open(os.path.join(root, "k8s", "base", "config", name), "rb") as f:
        write("config", name, f.read())
write("config", "params", json.dumps({"listenAddress": "127.0.0.1:0", "maxMessageBytes": 4194304,
                                      "defaultParams": {"policy": "POLICY_BLOCK_TOPK",
                                                        "budget": "512"}}).encode())
write("config", "empty", b"{}")
