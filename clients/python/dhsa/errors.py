"""Exceptions of the dhsa SDK: one class per gRPC status code, each carrying the code and the message.

Every error the SDK raises is a :class:`dhsa.Error`. ``err.code`` is the ``grpc.StatusCode`` (the
server's, or the one the SDK assigns to a problem it finds before calling), ``err.message`` the
server's message (or the SDK's), and ``err.from_server`` tells which side found it. The classes
also derive from the matching built-in exception where one fits, so ``except ValueError`` catches
bad inputs and ``except TimeoutError`` catches deadlines.
"""

import grpc


class Error(Exception):
    """A failed dhsa call: ``code`` (grpc.StatusCode), ``message`` (str), ``from_server`` (bool)."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message, code=None, from_server=False, method=None):
        if code is not None:
            self.code = code
        self.message = message
        self.from_server = from_server
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{self.code.name}: {message}")


class InvalidArgumentError(Error, ValueError):
    """Bad shapes, dtypes, parameters, layer or sequence ids (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(Error, LookupError):
    """Unknown or already released sequence (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(Error):
    """A call in the wrong state: decode before prefill, overlapping calls on one layer, or a layer
    left unusable by an earlier failure (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(Error):
    """KV capacity of the workers or the request queue is full (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(Error, ConnectionError):
    """The router, or a worker holding the sequence, cannot be reached (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(Error, TimeoutError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(Error):
    """The call was cancelled (CANCELLED)."""

    code = grpc.StatusCode.CANCELLED


class InternalError(Error):
    """The server failed, or answered something the SDK cannot read (INTERNAL)."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
    )
}


def from_rpc_error(err, method):
    """The dhsa.Error for a grpc.RpcError raised by `method` (e.g. "Prefill")."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, Error)
    return cls(details or code.name, code=code, from_server=True, method=method)
