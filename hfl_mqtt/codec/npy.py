"""The ``numpy.ndarray`` tensor encoding: the bytes of ``np.save(..., allow_pickle=False)``.

These are byte for byte the bytes of Flower's ``ndarray_to_bytes`` and ``flwr.app.Array.data``,
so Flower tensors cross our links untouched. Writing goes through ``numpy.lib.format`` (the code
``np.save`` itself runs); reading is our own strict parser, because ``np.load`` trusts the header.
"""

from __future__ import annotations

import io
import math
import re
import reprlib
import struct

import numpy as np
import numpy.lib.format as npformat

from hfl_mqtt.errors import FrameError, SchemaError, SizeLimitError, UnsupportedError

__all__ = ["DTYPES", "NPY_STYPE", "check_dtype_name", "npy_bytes", "npy_header", "parse_npy"]

NPY_STYPE = "numpy.ndarray"
NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 4096
"""np.save pads the header to a multiple of 64; 32 dimensions of 20 digits fit well within."""
MAX_NPY_NDIM = 64

# Exactly what np.save writes (numpy.lib.format), spaces for padding, a final newline. A strict
# pattern instead of numpy's literal_eval: nothing is evaluated, and a C decoder can match it.
_NPY_HEADER = re.compile(
    rb"\{'descr': '(?P<descr>[<>|][a-z][0-9]{1,2})', "
    rb"'fortran_order': (?P<fortran>True|False), "
    rb"'shape': \((?P<shape>(?:[0-9]{1,19}, )*[0-9]{1,19},?|)\), \} *\n"
)

DTYPES: dict[str, np.dtype[np.generic]] = {
    name: np.dtype(name)
    for name in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
"""Element types that may travel: plain numbers only (no objects, strings or records)."""

_DESCRS = {dt.newbyteorder("<").str: dt for dt in DTYPES.values()} | {
    dt.newbyteorder(">").str: dt for dt in DTYPES.values()
}


def check_dtype_name(name: object, field: str) -> np.dtype[np.generic]:
    """The numpy dtype for a dtype name from the wire, or ``UnsupportedError``."""
    if not isinstance(name, str) or name not in DTYPES:
        # reprlib: a peer's value may nest deeper than repr() can recurse.
        shown = reprlib.repr(name)
        raise UnsupportedError(field, f"dtype {shown} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def npy_header(array: np.ndarray) -> bytes:
    """The npy header ``np.save`` writes for ``array`` (format 1.0, or 2.0 when it must)."""
    header = npformat.header_data_from_array_1_0(array)
    buf = io.BytesIO()
    try:
        npformat.write_array_header_1_0(buf, header)
    except ValueError:
        buf = io.BytesIO()
        npformat.write_array_header_2_0(buf, header)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """Exactly ``np.save(buf, array, allow_pickle=False)``'s bytes, with one copy of the data."""
    header = npy_header(array)
    if array.flags.c_contiguous:
        body = array.data.cast("B") if array.size else b""
    elif array.flags.f_contiguous:
        body = array.T.data.cast("B")
    else:
        body = np.ascontiguousarray(array).data.cast("B")
    return b"".join((header, body))


def parse_npy(
    data: bytes | memoryview, field: str, max_bytes: int
) -> tuple[np.dtype[np.generic], tuple[int, ...], bool, memoryview]:
    """Check npy bytes without trusting them: dtype, shape, Fortran order and the raw data.

    The data length must equal what the header declares, and the declared size must be within
    ``max_bytes``, before anything is allocated.
    """
    view = memoryview(data)
    if len(view) < 10 or bytes(view[:6]) != NPY_MAGIC:
        raise FrameError(field, "not npy data (bad magic)")
    major, minor = view[6], view[7]
    if (major, minor) != (1, 0):
        raise UnsupportedError(field, f"npy format version {major}.{minor} is not supported")
    (header_len,) = struct.unpack_from("<H", view, 8)
    if header_len > MAX_NPY_HEADER:
        raise SizeLimitError(field, f"npy header of {header_len} bytes exceeds {MAX_NPY_HEADER}")
    start = 10
    if start + header_len > len(view):
        raise FrameError(field, "truncated npy header")
    match = _NPY_HEADER.fullmatch(bytes(view[start : start + header_len]))
    if match is None:
        raise SchemaError(field, "npy header is not in np.save's form")
    descr = match["descr"].decode("ascii")
    if descr not in _DESCRS:
        raise UnsupportedError(field, f"npy dtype {descr!r} is not supported")
    fortran = match["fortran"] == b"True"
    dims = match["shape"].replace(b",", b" ").split()
    if len(dims) > MAX_NPY_NDIM:
        raise SizeLimitError(field, f"npy shape has more than {MAX_NPY_NDIM} dimensions")
    shape = tuple(int(d) for d in dims)
    dtype = np.dtype(descr)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise SizeLimitError(field, f"npy data of {nbytes} bytes exceeds the limit {max_bytes}")
    body = view[start + header_len :]
    if len(body) != nbytes:
        raise FrameError(field, f"npy data holds {len(body)} bytes, its header declares {nbytes}")
    if dtype.kind == "b" and nbytes and np.frombuffer(body, np.uint8).max() > 1:
        raise SchemaError(field, "npy bool data must be bytes 0 or 1")
    return dtype, shape, fortran, body
