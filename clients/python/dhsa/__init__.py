"""dhsa: Python SDK of the DHSA attention service (Dynamic Hierarchical Sparse Attention).

    import dhsa
    with dhsa.Client("127.0.0.1:50051") as client, \\
         client.create_sequence(num_layers=2, q_heads=8, kv_heads=2, head_dim=128) as seq:
        o = seq.prefill(0, q, k, v)   # numpy in, numpy out: o [Hq, n, d] float32

See clients/python/README.md for the API, and clients/python/examples/ for a transformer layer
whose attention is the service and a chunked prefill + decode loop.
"""

try:
    from .v1 import attention_pb2 as _check_stubs  # noqa: F401 (generated at build time)
except ImportError as e:  # Imported from the source tree instead of <build>/python.
    raise ImportError(
        "dhsa's gRPC stubs are generated at build time: build the target dhsa_python "
        "(cmake --build build --target dhsa_python) and put <build>/python on PYTHONPATH "
        f"({e})") from None

from .client import PARAMS, Client, Sequence, SequenceInfo
from .errors import (CancelledError, DeadlineExceededError, Error, FailedPreconditionError,
                     InternalError, InvalidArgumentError, NotFoundError, ResourceExhaustedError,
                     UnavailableError)
from .tensors import DTYPES, bfloat16_bits_to_float32, float32_to_bfloat16_bits

__version__ = "0.1.0"

__all__ = [
    "Client", "Sequence", "SequenceInfo", "PARAMS", "DTYPES",
    "Error", "InvalidArgumentError", "NotFoundError", "FailedPreconditionError",
    "ResourceExhaustedError", "UnavailableError", "DeadlineExceededError", "CancelledError",
    "InternalError", "bfloat16_bits_to_float32", "float32_to_bfloat16_bits",
]
