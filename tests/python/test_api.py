"""The SDK's surface: the array kinds it takes, context managers, attach/info/release, the documented
exceptions for bad inputs (with the gRPC code and the server's message), and a server that dies or
stops answering raising instead of hanging."""

import array
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest

import dhsa

SHAPES = dict(q_heads=4, kv_heads=2, head_dim=16)


def qkv(rng, n, hq=4, hkv=2, d=16):
    return (rng.standard_normal((hq, n, d)).astype(np.float32),
            rng.standard_normal((hkv, n, d)).astype(np.float32),
            rng.standard_normal((hkv, n, d)).astype(np.float32))


class ArrayLike:
    """Only __array__, as a CPU torch tensor offers."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None):
        return self._a if dtype is None else self._a.astype(dtype)


def test_array_kinds_give_the_same_result(server, rng):
    q, k, v = qkv(rng, 200)
    with dhsa.Client(server.target, timeout=60) as client:
        results = []
        for label, convert in (
                ("numpy", lambda a: a),
                ("__array__", ArrayLike),
                ("memoryview (buffer protocol)", memoryview),
                ("float64, rounded to float32", lambda a: a.astype(np.float64)),
                ("non-contiguous", lambda a: np.ascontiguousarray(a.transpose(1, 0, 2))
                 .transpose(1, 0, 2))):
            with client.create_sequence(**SHAPES) as seq:
                results.append((label, seq.prefill(0, convert(q), convert(k), convert(v))))
    for label, o in results[1:]:
        np.testing.assert_array_equal(o, results[0][1], err_msg=label)


def test_one_dimensional_buffers_are_rejected_with_their_shape(server):
    with dhsa.Client(server.target) as client, client.create_sequence(**SHAPES) as seq:
        flat = array.array("f", [0.0] * (4 * 16))
        with pytest.raises(dhsa.InvalidArgumentError, match=r"q has shape \[64\]"):
            seq.prefill(0, flat, flat, flat)


def test_float16_and_bfloat16_storage_convert_float32_inputs(server, rng):
    """A float32 array sent to a float16 (bfloat16) sequence is rounded to it first: the same as
    sending the rounded array (raw words with dtype=)."""
    q, k, v = qkv(rng, 150)
    with dhsa.Client(server.target, timeout=60) as client:
        for dtype in ("float16", "bfloat16"):
            with client.create_sequence(dtype=dtype, **SHAPES) as a, \
                    client.create_sequence(dtype=dtype, **SHAPES) as b:
                o_float32 = a.prefill(0, q, k, v)
                if dtype == "float16":
                    raw = [x.astype(np.float16).view(np.uint16) for x in (q, k, v)]
                else:
                    raw = [dhsa.float32_to_bfloat16_bits(x) for x in (q, k, v)]
                o_raw = b.prefill(0, *raw, dtype=dtype)
                np.testing.assert_array_equal(o_float32, o_raw, err_msg=dtype)


def test_bfloat16_rounding_is_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5e-3, np.inf, 3.0e38], dtype=np.float32)
    bits = dhsa.float32_to_bfloat16_bits(x)
    # 1 + 2^-8 is a tie: to even (1.0); 1 + 3*2^-8 is a tie: up to 1 + 2^-6.
    assert list(dhsa.bfloat16_bits_to_float32(bits)[:3]) == [1.0, 1.0, 1.015625]
    assert bits[4] == 0x7F80
    assert np.isnan(dhsa.bfloat16_bits_to_float32(dhsa.float32_to_bfloat16_bits(
        np.array([np.nan], dtype=np.float32))))[0]


def test_context_managers_release_and_attach_sees_the_sequence(server, rng):
    q, k, v = qkv(rng, 64)
    with dhsa.Client(server.target, timeout=30) as client:
        with client.create_sequence(id="ctx-test", num_layers=3, budget=1024, **SHAPES) as seq:
            seq.prefill(2, q, k, v)
            other = client.attach("ctx-test")
            assert (other.num_layers, other.q_heads, other.kv_heads, other.head_dim,
                    other.dtype) == (3, 4, 2, 16, "float32")
            info = other.info()
            assert info.layer_lengths == (0, 0, 64)
            assert info.params["budget"] == 1024 and info.kv_bytes > 0 and info.workers
            o = other.decode(2, q[:, :1], k[:, :1], v[:, :1])
            assert o.shape == (4, 1, 16)
        assert seq.released
        with pytest.raises(dhsa.NotFoundError) as e:
            client.attach("ctx-test")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "ctx-test" in e.value.message
        with pytest.raises(dhsa.NotFoundError):
            seq.release()


def test_presets_and_chunk_scores_by_name(server):
    with dhsa.Client(server.target, timeout=30) as client:
        with client.create_sequence(**SHAPES) as seq:
            p = seq.info().params
            assert (p["chunk_score"], p["q_block"], p["score_rows"]) == ("mass", 16, 8), p
        with client.create_sequence(preset="paper", **SHAPES) as seq:
            p = seq.info().params
            assert (p["chunk_score"], p["q_block"], p["chunk_min"], p["chunk_max"]) == (
                "paper", 128, 8, 128), p
        # Explicit parameters override the preset.
        with client.create_sequence(preset="paper", q_block=64, **SHAPES) as seq:
            p = seq.info().params
            assert (p["chunk_score"], p["q_block"]) == ("paper", 64), p
        with pytest.raises(dhsa.InvalidArgumentError, match="unknown chunk_score"):
            client.create_sequence(chunk_score="sharp", **SHAPES)
        with pytest.raises(dhsa.InvalidArgumentError, match="unknown preset"):
            client.create_sequence(preset="fast", **SHAPES)


def test_an_error_inside_the_with_block_is_the_one_raised(server):
    with dhsa.Client(server.target) as client:
        with pytest.raises(KeyError):
            with client.create_sequence(**SHAPES) as seq:
                seq.release()  # Released already: the exit's own release is skipped.
                raise KeyError("mine")


def expect(exc_class, code, text, call, from_server):
    with pytest.raises(exc_class) as e:
        call()
    err = e.value
    assert isinstance(err, dhsa.Error)
    assert err.code == code, err
    assert text in err.message, err
    assert err.from_server == from_server, err
    return err


def test_bad_inputs_raise_the_documented_exceptions(server, rng):
    q, k, v = qkv(rng, 40)
    ia = grpc.StatusCode.INVALID_ARGUMENT
    with dhsa.Client(server.target, timeout=30) as client:
        # Found by the service, with its message.
        expect(dhsa.InvalidArgumentError, ia, "multiple of",
               lambda: client.create_sequence(q_heads=3, kv_heads=2, head_dim=16), True)
        expect(dhsa.InvalidArgumentError, ia, "local",
               lambda: client.create_sequence(local=64, q_block=128, **SHAPES), True)
        with client.create_sequence(num_layers=2, **SHAPES) as seq:
            expect(dhsa.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION,
                   "before any prefill", lambda: seq.decode(1, q[:, :1], k[:, :1], v[:, :1]),
                   True)
            nan = q.copy()
            nan[1, 7, 3] = np.nan
            expect(dhsa.InvalidArgumentError, ia, "non-finite value (nan) at [1, 7, 3]",
                   lambda: seq.prefill(0, nan, k, v), True)
            # Found before calling, with what to do.
            expect(dhsa.InvalidArgumentError, ia, "q has shape [4, 40, 8]",
                   lambda: seq.prefill(0, q[..., :8], k, v), False)
            expect(dhsa.InvalidArgumentError, ia, "same number of tokens",
                   lambda: seq.prefill(0, q, k[:, :39], v), False)
            expect(dhsa.InvalidArgumentError, ia, "out of range: the sequence has 2 layers",
                   lambda: seq.prefill(2, q, k, v), False)
            expect(dhsa.InvalidArgumentError, ia, "decode takes one token",
                   lambda: seq.decode(0, q, k, v), False)
            expect(dhsa.InvalidArgumentError, ia, "dtype='bfloat16'",
                   lambda: seq.prefill(0, q.astype(np.uint16), k, v), False)
            expect(dhsa.InvalidArgumentError, ia, "must be a numpy array",
                   lambda: seq.prefill(0, "q", k, v), False)
            expect(dhsa.InvalidArgumentError, ia, "needs raw 16-bit words",
                   lambda: seq.prefill(0, q, k, v, dtype="bfloat16"), False)
        expect(dhsa.InvalidArgumentError, ia, "unknown parameter 'budgt'",
               lambda: client.create_sequence(budgt=5, **SHAPES), False)
        expect(dhsa.InvalidArgumentError, ia, "unknown policy",
               lambda: client.create_sequence(policy="magic", **SHAPES), False)
        expect(dhsa.InvalidArgumentError, ia, "unsupported dtype",
               lambda: client.create_sequence(dtype="int8", **SHAPES), False)
        ghost = dhsa.Sequence(client, "no-such-sequence", 0, 1, 4, 2, 16, "float32")
        expect(dhsa.NotFoundError, grpc.StatusCode.NOT_FOUND, "no-such-sequence",
               lambda: ghost.prefill(0, q, k, v), True)
    # The exception classes double as the built-in ones.
    assert issubclass(dhsa.InvalidArgumentError, ValueError)
    assert issubclass(dhsa.DeadlineExceededError, TimeoutError)
    assert issubclass(dhsa.UnavailableError, ConnectionError)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_is_unavailable():
    start = time.monotonic()
    with pytest.raises(dhsa.UnavailableError, match="did not answer within 1"):
        dhsa.Client(f"127.0.0.1:{free_port()}", connect_timeout=1)
    assert time.monotonic() - start < 30  # A hang guard, not a speed target.


def test_a_killed_server_raises_instead_of_hanging(fresh_server, rng):
    q, k, v = qkv(rng, 100)
    client = dhsa.Client(fresh_server.target, timeout=20)
    seq = client.create_sequence(**SHAPES)
    seq.prefill(0, q, k, v)
    fresh_server.process.kill()
    fresh_server.process.wait()
    with pytest.raises((dhsa.UnavailableError, dhsa.DeadlineExceededError)) as e:
        seq.decode(0, q[:, :1], k[:, :1], v[:, :1])
    assert e.value.from_server
    with pytest.raises((dhsa.UnavailableError, dhsa.DeadlineExceededError)):
        seq.prefill(0, q, k, v)
    client.close()


def test_a_server_that_stops_answering_hits_the_deadline(fresh_server, rng):
    """SIGSTOP: the connection stays open but nothing answers; the deadline ends the call."""
    q, k, v = qkv(rng, 100)
    with dhsa.Client(fresh_server.target, timeout=30) as client:
        seq = client.create_sequence(**SHAPES)
        fresh_server.process.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(dhsa.DeadlineExceededError) as e:
                seq.prefill(0, q, k, v, timeout=1.5)
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 30  # A hang guard, not a speed target.
            with pytest.raises(dhsa.DeadlineExceededError):
                seq.decode(0, q[:, :1], k[:, :1], v[:, :1], timeout=1)
        finally:
            fresh_server.process.send_signal(signal.SIGCONT)


def test_layers_in_parallel_threads(server, rng):
    """Different layers of one sequence from several threads at once (the engine's pattern when
    it pipelines layers)."""
    layers = 4
    inputs = [qkv(rng, 120) for _ in range(layers)]
    with dhsa.Client(server.target, timeout=60) as client:
        with client.create_sequence(num_layers=layers, **SHAPES) as seq:
            out = [None] * layers
            errors = []

            def work(layer):
                try:
                    out[layer] = seq.prefill(layer, *inputs[layer])
                except dhsa.Error as e:
                    errors.append(e)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(layers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            with client.create_sequence(num_layers=layers, **SHAPES) as serial:
                for layer in range(layers):
                    np.testing.assert_allclose(out[layer], serial.prefill(layer, *inputs[layer]),
                                               rtol=0, atol=1e-6)
