"""Arrays in and out of the wire format (proto/dhsa/v1/tensor.proto): raw little-endian elements,
row-major, float32, float16 or bfloat16."""

import numpy as np

from .errors import InternalError, InvalidArgumentError
from .v1 import tensor_pb2

# name -> (proto enum value, bytes per element)
DTYPES = {
    "float32": (tensor_pb2.DTYPE_FLOAT32, 4),
    "float16": (tensor_pb2.DTYPE_FLOAT16, 2),
    "bfloat16": (tensor_pb2.DTYPE_BFLOAT16, 2),
}
_ALIASES = {
    "float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
_NAME_OF_ENUM = {enum: name for name, (enum, _) in DTYPES.items()}


def dtype_name(dtype):
    """The canonical name ("float32", "float16", "bfloat16") of a dtype given as a name, a numpy
    dtype or type (np.float32, np.float16; a dtype named "bfloat16" such as ml_dtypes'), or a
    torch dtype."""
    if isinstance(dtype, str):
        key = dtype.lower()
    else:
        key = getattr(dtype, "name", None) or str(dtype)
        try:
            key = np.dtype(dtype).name
        except TypeError:
            pass
        key = str(key).lower().replace("torch.", "")
    name = _ALIASES.get(key)
    if name is None:
        raise InvalidArgumentError(
            f"unsupported dtype {dtype!r}: use 'float32', 'float16' or 'bfloat16'")
    return name


def dtype_from_proto(enum):
    if enum == tensor_pb2.DTYPE_UNSPECIFIED:
        return "float32"
    try:
        return _NAME_OF_ENUM[enum]
    except KeyError:
        raise InternalError(f"the server answered with an unknown dtype enum {enum}") from None


def as_array(x, name):
    """`x` as a numpy array without copying where possible: numpy arrays, objects with __array__
    (a CPU torch tensor) and objects with the buffer protocol (memoryview, array.array, bytes)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__array__"):
        try:
            return np.asarray(x)
        except Exception as e:  # torch raises RuntimeError for tensors on a GPU or with grad.
            raise InvalidArgumentError(
                f"{name}: could not read it as an array ({type(x).__name__}: {e}); pass a CPU "
                "array (for torch: t.detach().cpu(); bfloat16 as t.view(torch.int16) with "
                "dtype='bfloat16')") from None
    try:
        return np.asarray(memoryview(x))
    except TypeError:
        raise InvalidArgumentError(
            f"{name} must be a numpy array, an object with __array__ (e.g. a CPU torch tensor) or "
            f"a buffer; got {type(x).__name__}") from None


def _float32_to_bfloat16_bits(a):
    """Round to nearest even, as the server's FloatToBFloat16 does; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    nan = np.isnan(a)
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(bits):
    """Raw bfloat16 words (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bfloat16_bits(a):
    """float32 -> raw bfloat16 words (uint16), rounded to nearest even."""
    return _float32_to_bfloat16_bits(np.asarray(a, dtype=np.float32))


def _source_dtype(arr, name, given):
    """The element type the array holds: `given` (the dtype argument) or what its numpy dtype says."""
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if given is not None:
        given = dtype_name(given)
        raw16 = size == 2 and (kind in "iu" or arr.dtype.name == "bfloat16")
        if given == "bfloat16" and not raw16:
            raise InvalidArgumentError(
                f"{name}: dtype='bfloat16' needs raw 16-bit words (uint16 or int16 arrays, e.g. "
                f"torch's t.view(torch.int16)); got {arr.dtype}")
        if given == "float16" and not (size == 2 and kind in "iuf"):
            raise InvalidArgumentError(
                f"{name}: dtype='float16' needs float16 or raw 16-bit words; got {arr.dtype}")
        if given == "float32" and kind != "f":
            raise InvalidArgumentError(
                f"{name}: dtype='float32' needs a floating-point array; got {arr.dtype}")
        return given
    if arr.dtype.name == "bfloat16":
        return "bfloat16"
    if kind == "f" and size == 2:
        return "float16"
    if kind == "f":
        return "float32"  # float32 as is; float64 rounded to float32.
    hint = " (if it holds raw bfloat16 words, pass dtype='bfloat16')" if size == 2 else ""
    raise InvalidArgumentError(
        f"{name} has dtype {arr.dtype}: pass float32 or float16 arrays{hint}")


def encode(x, name, storage, given=None):
    """(array, shape) of `x` converted to the sequence's storage dtype `storage`: a C-contiguous
    little-endian array whose bytes are the wire payload. Float inputs are rounded to the storage
    type (float64 -> float32, float32 -> float16 or bfloat16 to nearest even); raw 16-bit words are
    taken as `given` says."""
    arr = as_array(x, name)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    source = _source_dtype(arr, name, given)
    shape = tuple(int(s) for s in arr.shape)
    if source == "bfloat16":
        bits = arr.view(np.uint16)
        out = bits if storage == "bfloat16" else bfloat16_bits_to_float32(bits).astype(storage)
    else:
        if source == "float16" and arr.dtype.kind in "iu":
            arr = arr.view(np.float16)
        if storage == "bfloat16":
            out = _float32_to_bfloat16_bits(arr.astype(np.float32, copy=False))
        else:
            out = arr.astype(storage, copy=False)
    return np.ascontiguousarray(out), shape


def payload(arr):
    """The bytes of an array from `encode`, as a flat memoryview."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def to_proto(arr, shape, storage):
    return tensor_pb2.Tensor(dtype=DTYPES[storage][0], shape=shape, data=payload(arr).tobytes())


def from_proto(t, name, want_shape=None):
    """A float32 numpy array from a Tensor message of the server (outputs are always float32)."""
    if t.dtype not in (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_UNSPECIFIED):
        raise InternalError(f"the server sent '{name}' as dtype {t.dtype}; expected float32")
    shape = tuple(t.shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(t.data) != 4 * count:
        raise InternalError(
            f"the server sent '{name}' of shape {shape} with {len(t.data)} bytes; expected "
            f"{4 * count}")
    if want_shape is not None and shape != tuple(want_shape):
        raise InternalError(f"the server sent '{name}' of shape {shape}; expected {want_shape}")
    return np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)


class Assembler:
    """Collects the pieces of one streamed float32 tensor into a writable array."""

    def __init__(self, name, shape):
        self.name = name
        self.shape = tuple(shape)
        self.array = np.empty(self.shape, dtype=np.float32)
        self._bytes = payload(self.array)
        self.received = 0
        self.started = False

    @property
    def complete(self):
        return self.started and self.received == len(self._bytes)

    def add(self, piece):
        if piece.name != self.name:
            raise InternalError(f"expected a piece of '{self.name}', got one of '{piece.name}'")
        if not self.started:
            if tuple(piece.shape) != self.shape:
                raise InternalError(
                    f"the server sent '{self.name}' of shape {tuple(piece.shape)}; expected "
                    f"{self.shape}")
            if piece.dtype not in (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_UNSPECIFIED):
                raise InternalError(f"the server sent '{self.name}' as dtype {piece.dtype}")
            self.started = True
        n = len(piece.data)
        if piece.offset != self.received or self.received + n > len(self._bytes):
            raise InternalError(
                f"piece of '{self.name}' at offset {piece.offset} with {n} bytes does not continue "
                f"at byte {self.received} of {len(self._bytes)}")
        self._bytes[self.received:self.received + n] = piece.data
        self.received += n
