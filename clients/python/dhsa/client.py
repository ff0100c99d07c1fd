"""Client and Sequence: the DHSA attention service (proto/dhsa/v1/attention.proto) from Python.

    import dhsa
    with dhsa.Client("127.0.0.1:50051", timeout=60) as client:
        with client.create_sequence(num_layers=32, q_heads=32, kv_heads=8, head_dim=128,
                                    dtype="float16", budget=2048) as seq:
            o = seq.prefill(0, q, k, v)      # q [Hq, n, d], k and v [Hkv, n, d] -> o [Hq, n, d]
            o = seq.decode(0, q1, k1, v1)    # one token: [Hq, 1, d] (or [Hq, d]) and [Hkv, 1, d]

Outputs are float32 numpy arrays. Tensors larger than a gRPC message travel in pieces; that is
hidden here. Every failure raises a dhsa.Error subclass carrying the gRPC code and the message.
"""

import dataclasses

import grpc
import numpy as np

from . import tensors
from .errors import Error, InternalError, InvalidArgumentError, UnavailableError, from_rpc_error
from .v1 import attention_pb2, attention_pb2_grpc, config_pb2, tensor_pb2

# Room for a piece's name, dtype, shape and offset inside a message (as the C++ SDK keeps).
_PIECE_OVERHEAD_BYTES = 1024
_DEFAULT = object()

_POLICIES = {
    "dhsa": config_pb2.POLICY_DHSA,
    "block_topk": config_pb2.POLICY_BLOCK_TOPK,
    "streaming": config_pb2.POLICY_STREAMING,
    "dense": config_pb2.POLICY_DENSE,
    "oracle_topk": config_pb2.POLICY_ORACLE_TOPK,
}
_BOUNDARY_MODES = {
    "dynamic": config_pb2.BOUNDARY_MODE_DYNAMIC,
    "fixed": config_pb2.BOUNDARY_MODE_FIXED,
}
# DhsaParams fields accepted as keyword arguments of create_sequence.
PARAMS = ("policy", "budget", "sink", "local", "q_block", "boundary_mode", "chunk_mean",
          "chunk_min", "chunk_max", "boundary_window", "block", "shared_heads", "mean_summaries",
          "scale", "chunk_score", "score_rows", "preset")
_CHUNK_SCORES = {"paper": config_pb2.CHUNK_SCORE_PAPER, "mass": config_pb2.CHUNK_SCORE_MASS}
_PRESETS = {"default": config_pb2.PRESET_DEFAULT, "paper": config_pb2.PRESET_PAPER}


def _params_proto(params):
    out = config_pb2.DhsaParams()
    for key, value in params.items():
        if key not in PARAMS:
            raise InvalidArgumentError(
                f"unknown parameter '{key}'; the DHSA parameters are: {', '.join(PARAMS)}")
        if value is None:
            continue
        if key == "policy":
            if value not in _POLICIES:
                raise InvalidArgumentError(
                    f"unknown policy {value!r}; use one of {', '.join(_POLICIES)}")
            value = _POLICIES[value]
        elif key == "boundary_mode":
            if value not in _BOUNDARY_MODES:
                raise InvalidArgumentError(
                    f"unknown boundary_mode {value!r}; use 'dynamic' or 'fixed'")
            value = _BOUNDARY_MODES[value]
        elif key == "chunk_score":
            if value not in _CHUNK_SCORES:
                raise InvalidArgumentError(f"unknown chunk_score {value!r}; use 'mass' or 'paper'")
            value = _CHUNK_SCORES[value]
        elif key == "preset":
            if value not in _PRESETS:
                raise InvalidArgumentError(f"unknown preset {value!r}; use 'default' or 'paper'")
            value = _PRESETS[value]
        elif key in ("shared_heads", "mean_summaries"):
            value = bool(value)
        elif key == "scale":
            value = float(value)
        else:
            if isinstance(value, bool) or int(value) != value:
                raise InvalidArgumentError(f"{key} must be an integer; got {value!r}")
            value = int(value)
        setattr(out, key, value)
    return out


def _stats_dict(stats):
    """CallStats as a dict of plain numbers (seconds, pairs, bytes, workers_used)."""
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}


@dataclasses.dataclass(frozen=True)
class SequenceInfo:
    """What the service holds for a sequence (GetSequenceInfo)."""

    id: str
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    layer_lengths: tuple  # Tokens stored per layer.
    kv_bytes: int  # KV cache bytes on the workers, all layers.
    workers: tuple  # Addresses of the workers holding its stripes.
    params: dict  # DHSA parameters with the server's defaults filled in.


class Client:
    """A connection to the DHSA router at `target` ("host:port" or any gRPC target).

    timeout: deadline of each call in seconds (None: no deadline). It reaches the workers, and it
        is what turns a server that stops answering into a DeadlineExceededError instead of a hang.
    connect_timeout: seconds to wait for the router at construction (UnavailableError after it);
        0 or None connects lazily on the first call.
    max_message_bytes: largest gRPC message sent; tensors go in pieces below it. What comes back
        is taken in whatever pieces the server cuts (below its own limit).
    """

    def __init__(self, target, timeout=600.0, connect_timeout=10.0, max_message_bytes=4 << 20):
        if not target:
            raise InvalidArgumentError("the router target is empty; pass 'host:port'")
        if max_message_bytes < 4096:
            raise InvalidArgumentError(f"max_message_bytes must be >= 4096; got {max_message_bytes}")
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = int(max_message_bytes)
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", -1),
        ])
        self._stub = attention_pb2_grpc.AttentionStub(self._channel)
        if connect_timeout:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
            except grpc.FutureTimeoutError:
                self._channel.close()
                raise UnavailableError(
                    f"the DHSA router at '{target}' did not answer within {connect_timeout} s "
                    "(is `dhsa serve` running there?)") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method, request, timeout):
        timeout = self.timeout if timeout is _DEFAULT else timeout
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None

    def create_sequence(self, num_layers=1, q_heads=1, kv_heads=1, head_dim=64, dtype="float32",
                        id="", timeout=_DEFAULT, **params):
        """Creates a sequence (no tokens yet) and returns its Sequence.

        dtype: storage type of the keys and values ("float32", "float16", "bfloat16"; numpy dtypes
            work too); inputs are converted to it.
        id: a client-chosen id (letters, digits, '-', '_', '.'), or "" for a server-made one.
        params: DHSA parameters (policy="dhsa"|"block_topk"|"streaming"|"dense", budget, sink,
            local, q_block, boundary_mode="dynamic"|"fixed", chunk_mean, chunk_min, chunk_max,
            boundary_window, block, shared_heads, mean_summaries, scale); unset ones take the
            server's defaults.
        """
        storage = tensors.dtype_name(dtype)
        config = attention_pb2.SequenceConfig(
            num_layers=int(num_layers), q_heads=int(q_heads), kv_heads=int(kv_heads),
            head_dim=int(head_dim), dtype=tensors.DTYPES[storage][0],
            params=_params_proto(params))
        response = self._call(
            "CreateSequence",
            attention_pb2.CreateSequenceRequest(sequence_id=id or "", config=config), timeout)
        return Sequence(self, response.sequence_id, response.capacity_tokens, int(num_layers),
                        int(q_heads), int(kv_heads), int(head_dim), storage)

    def attach(self, sequence_id, timeout=_DEFAULT):
        """The Sequence of an existing id (NotFoundError if the service does not know it)."""
        info = Sequence(self, sequence_id, 0, 0, 0, 0, 0, "float32").info(timeout=timeout)
        return Sequence(self, sequence_id, 0, info.num_layers, info.q_heads, info.kv_heads,
                        info.head_dim, info.dtype)


class Sequence:
    """One sequence's KV cache in the service. Use as a context manager to release it at the end.

    Calls on different layers may run from several threads at once; calls on one layer must not
    overlap (the service answers FAILED_PRECONDITION).
    """

    def __init__(self, client, sequence_id, capacity_tokens, num_layers, q_heads, kv_heads,
                 head_dim, dtype):
        self.client = client
        self.id = sequence_id
        self.capacity_tokens = capacity_tokens  # Tokens the service can still hold, all layers.
        self.num_layers = num_layers
        self.q_heads = q_heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype  # Storage type: "float32", "float16" or "bfloat16".
        self.released = False
        # CallStats of the last prefill or decode (seconds per stage, pairs, bytes, workers).
        self.last_stats = None

    def __repr__(self):
        return (f"dhsa.Sequence(id={self.id!r}, layers={self.num_layers}, Hq={self.q_heads}, "
                f"Hkv={self.kv_heads}, d={self.head_dim}, dtype={self.dtype})")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.released:
            return False
        try:
            self.release()
        except Error:
            if exc_type is None:
                raise  # Otherwise the exception already in flight is the one that matters.
        return False

    def _check_layer(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise InvalidArgumentError(f"layer must be an int; got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(
                f"layer {layer} is out of range: the sequence has {self.num_layers} layers")

    def _encode_qkv(self, q, k, v, dtype, decode):
        """(q, k, v) as wire arrays with shapes checked against the sequence; decode also takes
        [H, d] rows (returned as [H, 1, d])."""
        out = []
        for name, x, heads in (("q", q, self.q_heads), ("k", k, self.kv_heads),
                               ("v", v, self.kv_heads)):
            arr, shape = tensors.encode(x, name, self.dtype, dtype)
            if decode and len(shape) == 2:
                shape = (shape[0], 1, shape[1])
                arr = arr.reshape(shape)
            want = f"[{heads}, {'1' if decode else 'n'}, {self.head_dim}]"
            if len(shape) != 3 or shape[0] != heads or shape[2] != self.head_dim:
                raise InvalidArgumentError(
                    f"{name} has shape {list(shape)}; this sequence wants {want} "
                    f"(Hq={self.q_heads}, Hkv={self.kv_heads}, d={self.head_dim})")
            if decode and shape[1] != 1:
                raise InvalidArgumentError(
                    f"decode takes one token: {name} has shape {list(shape)}, wants {want}; "
                    "use prefill for several tokens")
            out.append((arr, shape))
        n = out[0][1][1]
        if n < 1:
            raise InvalidArgumentError("prefill needs at least one token; q has 0")
        if out[1][1][1] != n or out[2][1][1] != n:
            raise InvalidArgumentError(
                f"q, k and v must hold the same number of tokens; got {out[0][1][1]}, "
                f"{out[1][1][1]}, {out[2][1][1]}")
        return out

    def _requests(self, header, qkv):
        yield attention_pb2.PrefillRequest(header=header)
        piece_bytes = max(1, self.client.max_message_bytes - _PIECE_OVERHEAD_BYTES)
        for name, (arr, shape) in zip(("q", "k", "v"), qkv):
            data = tensors.payload(arr)
            enum = tensors.DTYPES[self.dtype][0]
            offset = 0
            while True:
                chunk = data[offset:offset + piece_bytes]
                piece = tensor_pb2.TensorPiece(name=name, offset=offset, data=chunk.tobytes())
                if offset == 0:
                    piece.dtype = enum
                    piece.shape.extend(shape)
                yield attention_pb2.PrefillRequest(piece=piece)
                offset += len(chunk)
                if offset >= len(data):
                    break

    def prefill(self, layer, q, k, v, *, dtype=None, return_lse=False, timeout=_DEFAULT):
        """Appends n tokens to `layer` and returns their attention output o [Hq, n, d] float32
        (with return_lse: (o, lse), lse [Hq, n] natural log).

        q [Hq, n, d], k and v [Hkv, n, d]: numpy arrays, objects with __array__ (CPU torch tensors)
        or buffers, float32/float16 (float64 is rounded); raw bfloat16 words (uint16/int16) with
        dtype="bfloat16". They are converted to the sequence's dtype. The queries sit at the
        positions after the tokens this layer already holds (chunked prefill: call again).
        """
        self._check_layer(layer)
        qkv = self._encode_qkv(q, k, v, dtype, decode=False)
        hq, n, d = qkv[0][1]
        header = attention_pb2.PrefillHeader(sequence_id=self.id, layer=int(layer), num_tokens=n,
                                             want_lse=bool(return_lse))
        timeout = self.client.timeout if timeout is _DEFAULT else timeout
        o = tensors.Assembler("o", (hq, n, d))
        lse = tensors.Assembler("lse", (hq, n))
        result = None
        call = self.client._stub.Prefill(self._requests(header, qkv), timeout=timeout)
        try:
            for response in call:
                if response.HasField("piece"):
                    (lse if o.complete else o).add(response.piece)
                elif response.HasField("result"):
                    result = response.result
        except grpc.RpcError as e:
            raise from_rpc_error(e, "Prefill") from None
        except InternalError:
            call.cancel()
            raise
        if result is None:
            raise InternalError("the Prefill answer ended without a result", method="Prefill")
        if not o.complete or (return_lse and not lse.complete):
            raise InternalError("the Prefill answer is missing output pieces", method="Prefill")
        self.last_stats = _stats_dict(result.stats)
        return (o.array, lse.array) if return_lse else o.array

    def decode(self, layer, q, k, v, *, dtype=None, return_lse=False, timeout=_DEFAULT):
        """Appends one token to `layer` and returns its attention output.

        q [Hq, 1, d] (or [Hq, d]), k and v [Hkv, 1, d] (or [Hkv, d]); o comes back float32 in q's
        layout, and with return_lse: (o, lse) with lse [Hq, 1] (or [Hq]).
        """
        self._check_layer(layer)
        rows = tensors.as_array(q, "q").ndim == 2
        qkv = self._encode_qkv(q, k, v, dtype, decode=True)
        protos = [tensors.to_proto(arr, shape, self.dtype) for arr, shape in qkv]
        request = attention_pb2.DecodeRequest(sequence_id=self.id, layer=int(layer), q=protos[0],
                                              k=protos[1], v=protos[2],
                                              want_lse=bool(return_lse))
        response = self.client._call("Decode", request, timeout)
        o = tensors.from_proto(response.o, "o", (self.q_heads, 1, self.head_dim))
        self.last_stats = _stats_dict(response.stats)
        if rows:
            o = o.reshape(self.q_heads, self.head_dim)
        if not return_lse:
            return o
        lse = tensors.from_proto(response.lse, "lse", (self.q_heads, 1))
        return o, (lse.reshape(self.q_heads) if rows else lse)

    def info(self, timeout=_DEFAULT):
        """A SequenceInfo: shapes, parameters, tokens stored per layer, KV bytes, workers."""
        r = self.client._call("GetSequenceInfo",
                              attention_pb2.GetSequenceInfoRequest(sequence_id=self.id), timeout)
        p = r.config.params
        params = {name: getattr(p, name) for name in PARAMS}
        params["policy"] = {v: k for k, v in _POLICIES.items()}.get(p.policy, p.policy)
        params["boundary_mode"] = {v: k for k, v in _BOUNDARY_MODES.items()}.get(
            p.boundary_mode, p.boundary_mode)
        params["chunk_score"] = {v: k for k, v in _CHUNK_SCORES.items()}.get(
            p.chunk_score, p.chunk_score)
        params["preset"] = {v: k for k, v in _PRESETS.items()}.get(p.preset, p.preset)
        return SequenceInfo(id=r.sequence_id, num_layers=r.config.num_layers,
                            q_heads=r.config.q_heads, kv_heads=r.config.kv_heads,
                            head_dim=r.config.head_dim,
                            dtype=tensors.dtype_from_proto(r.config.dtype),
                            layer_lengths=tuple(r.layer_lengths), kv_bytes=r.kv_bytes,
                            workers=tuple(r.workers), params=params)

    def release(self, timeout=_DEFAULT):
        """Frees the KV cache on every worker; returns the bytes freed. A second release is a
        NotFoundError from the service."""
        r = self.client._call("ReleaseSequence",
                              attention_pb2.ReleaseSequenceRequest(sequence_id=self.id), timeout)
        self.released = True
        return r.freed_bytes


__all__ = ["Client", "Sequence", "SequenceInfo", "PARAMS"]
