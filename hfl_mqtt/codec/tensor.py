"""Encoded tensors as they travel, the expected model they are checked against, and decoding.

An ``EncodedTensor`` describes itself the way ``flwr.app.Array`` does (dtype, shape, stype,
data), so it maps one to one onto Flower's records. ``stype`` names the encoding of ``data``:

=================  ================================================================
``numpy.ndarray``  ``np.save`` bytes (Flower's own format, lossless)
``hfl.fp16``       IEEE half values, little-endian, C order
``hfl.bf16``       bfloat16 values, little-endian, C order
``hfl.quant``      stochastic b-bit block quantization (see ``quantize``)
``hfl.topk``       k largest-magnitude values and their indices (see ``sparsify``)
=================  ================================================================
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from hfl_mqtt.codec.casts import BF16_STYPE, FP16_STYPE, from_bf16, from_fp16
from hfl_mqtt.codec.limits import DecodeLimits
from hfl_mqtt.codec.npy import NPY_STYPE, check_dtype_name, parse_npy
from hfl_mqtt.codec.quantize import QUANT_STYPE, dequantize
from hfl_mqtt.codec.sparsify import TOPK_STYPE, decode_topk
from hfl_mqtt.errors import (
    ModelMismatchError,
    NonFiniteError,
    SchemaError,
    SizeLimitError,
    UnsupportedError,
)

__all__ = [
    "FLOAT_DTYPES",
    "STYPES",
    "EncodedTensor",
    "ModelSpec",
    "TensorSpec",
    "check_npy_record",
    "check_total_size",
    "decode_tensor",
    "tensor_from_wire",
]

STYPES = (NPY_STYPE, FP16_STYPE, BF16_STYPE, QUANT_STYPE, TOPK_STYPE)
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
"""Lossy encodings apply to these; every other dtype always travels as ``numpy.ndarray``."""


@dataclass(frozen=True, slots=True)
class EncodedTensor:
    """One named tensor as it travels: name, encoding, decoded dtype and shape, payload."""

    name: str
    stype: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decoded_nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype one tensor of a model must have."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The tensors a model is made of; decoders check incoming tensors against it."""

    tensors: Mapping[str, TensorSpec]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ModelSpec:
        return cls({k: TensorSpec(tuple(a.shape), a.dtype.name) for k, a in arrays.items()})

    def check(self, tensors: Iterable[EncodedTensor]) -> None:
        """Raise ``ModelMismatchError`` unless ``tensors`` are exactly this model's."""
        seen = set()
        for t in tensors:
            spec = self.tensors.get(t.name)
            field = f"tensors[{t.name!r}]"
            if spec is None:
                raise ModelMismatchError(field, "is not a tensor of the expected model")
            if t.shape != spec.shape:
                raise ModelMismatchError(f"{field}.shape", f"{t.shape} != expected {spec.shape}")
            if t.dtype != spec.dtype:
                raise ModelMismatchError(f"{field}.dtype", f"{t.dtype} != expected {spec.dtype}")
            seen.add(t.name)
        missing = [name for name in self.tensors if name not in seen]
        if missing:
            raise ModelMismatchError("tensors", f"missing {', '.join(map(repr, missing[:5]))}")


def tensor_from_wire(raw: object, index: int, limits: DecodeLimits) -> EncodedTensor:
    """Check one tensor record from a decoded msgpack body and build it; nothing is decoded."""
    field = f"tensors[{index}]"
    if not isinstance(raw, dict):
        raise SchemaError(field, "must be a map")
    if set(raw) != {"name", "stype", "dtype", "shape", "data"}:
        raise SchemaError(field, "must hold exactly name, stype, dtype, shape and data")
    name, stype, dtype, shape, data = (raw[k] for k in ("name", "stype", "dtype", "shape", "data"))
    if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_length:
        raise SchemaError(f"{field}.name", f"must be a string of 1 to {limits.max_name_length}")
    field = f"tensors[{name!r}]"
    if stype not in STYPES:
        # reprlib: a peer's value may nest deeper than repr() can recurse.
        raise UnsupportedError(f"{field}.stype", f"unknown encoding {reprlib.repr(stype)}")
    dt = check_dtype_name(dtype, f"{field}.dtype")
    if stype != NPY_STYPE and dtype not in FLOAT_DTYPES:
        raise SchemaError(f"{field}.dtype", f"{stype} carries only float tensors, not {dtype}")
    if not isinstance(shape, list | tuple) or len(shape) > limits.max_ndim:
        raise SchemaError(f"{field}.shape", f"must be a list of at most {limits.max_ndim} ints")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SchemaError(f"{field}.shape", "dimensions must be non-negative ints")
    if not isinstance(data, bytes):
        raise SchemaError(f"{field}.data", "must be binary")
    nbytes = _size_bound(shape, dt.itemsize)
    if nbytes > limits.max_decoded_bytes:
        raise SizeLimitError(
            f"{field}.shape", f"{nbytes} decoded bytes exceed {limits.max_decoded_bytes}"
        )
    return EncodedTensor(name, stype, dtype, tuple(shape), data)


def _size_bound(shape: Iterable[int], itemsize: int) -> int:
    """Decoded bytes of a tensor of ``shape``, counting zero dimensions as 1.

    That is the decoded size unless the tensor is empty. Bounding it also keeps empty shapes
    such as ``[0, 2**40, 2**40]`` from numpy, which refuses them (ValueError) when reshaping.
    """
    return math.prod(d for d in shape if d) * itemsize


def check_npy_record(
    tensor: EncodedTensor, max_bytes: int
) -> tuple[np.dtype[np.generic], bool, memoryview]:
    """Parse an npy tensor's header and check it agrees with the record's dtype and shape.

    Returns the npy dtype (with its byte order), Fortran order and the raw data; reads no data.
    """
    field = f"tensors[{tensor.name!r}].data"
    dtype, shape, fortran, body = parse_npy(tensor.data, field, max_bytes)
    if dtype.name != tensor.dtype or shape != tensor.shape:
        raise SchemaError(
            field,
            f"npy header says {dtype.name}{list(shape)}, "
            f"the record {tensor.dtype}{list(tensor.shape)}",
        )
    return dtype, fortran, body


def check_total_size(tensors: Iterable[EncodedTensor], limits: DecodeLimits) -> None:
    """Raise ``SizeLimitError`` if the tensors together decode to more than the limit."""
    total = sum(t.decoded_nbytes for t in tensors)
    if total > limits.max_decoded_bytes:
        raise SizeLimitError("tensors", f"{total} decoded bytes exceed {limits.max_decoded_bytes}")


def decode_tensor(tensor: EncodedTensor, limits: DecodeLimits | None = None) -> np.ndarray:
    """Decode one tensor into a new writable array of its declared dtype and shape.

    Raises a ``DecodeError`` subtype on any inconsistency, and ``NonFiniteError`` for NaN/Inf.
    """
    field = f"tensors[{tensor.name!r}]"
    dtype = check_dtype_name(tensor.dtype, f"{field}.dtype")
    max_bytes = (limits or DecodeLimits()).max_decoded_bytes
    nbytes = _size_bound(tensor.shape, dtype.itemsize)
    if nbytes > max_bytes:
        raise SizeLimitError(f"{field}.shape", f"{nbytes} bytes exceed {max_bytes}")
    n = tensor.numel
    data = memoryview(tensor.data)
    if tensor.stype == NPY_STYPE:
        npy_dtype, fortran, body = check_npy_record(tensor, max_bytes)
        view = np.frombuffer(body, npy_dtype, n)
        view = view.reshape(tensor.shape, order="F" if fortran else "C")
        array = np.array(view, dtype=dtype, order="K")
    else:
        if tensor.dtype not in FLOAT_DTYPES:
            raise SchemaError(f"{field}.dtype", f"{tensor.stype} carries only float tensors")
        if tensor.stype == FP16_STYPE:
            flat = from_fp16(data, n, f"{field}.data")
        elif tensor.stype == BF16_STYPE:
            flat = from_bf16(data, n, f"{field}.data")
        elif tensor.stype == QUANT_STYPE:
            flat = dequantize(data, n, f"{field}.data")
        elif tensor.stype == TOPK_STYPE:
            flat = decode_topk(data, n, dtype, f"{field}.data")
        else:
            stype = reprlib.repr(tensor.stype)
            raise UnsupportedError(f"{field}.stype", f"unknown encoding {stype}")
        if flat.dtype == dtype:
            array = flat.reshape(tensor.shape)
        else:
            with np.errstate(over="ignore"):  # to float16: overflow gives Inf, refused below
                array = flat.astype(dtype).reshape(tensor.shape)
    if array.dtype.kind == "f" and not _all_finite(array, tensor.stype):
        raise NonFiniteError(f"{field}.data", "contains NaN or Inf")
    return array


def _all_finite(array: np.ndarray, stype: str) -> bool:
    # Quantized values are finite by construction once lo and scale were checked, unless the
    # float32 result was narrowed to float16.
    if stype == QUANT_STYPE and array.dtype != np.float16:
        return True
    return bool(np.isfinite(array).all())
