"""Conversions between our ``EncodedTensor`` s and Flower's formats (the ``flower`` extra).

Import this module explicitly (``hfl_mqtt.codec`` does not); it imports ``flwr`` and ``torch``
only inside the functions that need them, so it loads without either installed.

Message API (``flwr.app.ArrayRecord``)
    One ``Array(dtype, shape, stype, data)`` per tensor, keyed by its name: the fields of an
    ``EncodedTensor`` map one to one, and the bytes pass through untouched. Flower itself reads
    only ``stype == "numpy.ndarray"`` (``Array.numpy()``, ``ArrayRecord.to_numpy_ndarrays()``,
    ``to_torch_state_dict()``); our ``hfl.*`` encodings are opaque to it but survive its
    serialization (protobuf and the object store alike), and ``from_array_record`` reads them.

Legacy API (``flwr.common.Parameters``)
    ``Parameters`` holds only ``tensors: list[bytes]`` and one ``tensor_type``, and no names.

    ``tensor_type == "numpy.ndarray"``
        Each item is npy bytes: exactly what ``ndarrays_to_parameters`` builds, so Flower's
        ``parameters_to_ndarrays`` reads it. ``to_parameters`` writes this whenever every tensor
        is ``numpy.ndarray``.
    ``tensor_type == "hfl.tensor"`` (only we read it)
        Each item is a msgpack map of exactly four entries, an envelope tensor record without its
        name::

            {"stype": str, "dtype": str, "shape": [int, ...], "data": bin}

        A later layout would get a new ``tensor_type``.

    ``from_parameters`` takes the names, in order, from the caller (or a ``ModelSpec``); for
    npy items dtype and shape come from the npy header, without reading the data.

Every ``from_*`` function checks what Flower hands it as our wire decoder checks a peer's
envelope and raises only ``DecodeError`` subtypes, naming the tensor.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from hfl_mqtt.codec.compressor import Compressor
from hfl_mqtt.codec.limits import DEFAULT_LIMITS, DecodeLimits
from hfl_mqtt.codec.msgpack_scan import check_object_count
from hfl_mqtt.codec.npy import DTYPES, NPY_STYPE, parse_npy
from hfl_mqtt.codec.spec import CodecSpec
from hfl_mqtt.codec.tensor import (
    EncodedTensor,
    ModelSpec,
    check_npy_record,
    check_total_size,
    decode_tensor,
    tensor_from_wire,
)
from hfl_mqtt.errors import (
    EncodeError,
    ModelMismatchError,
    SchemaError,
    SizeLimitError,
    UnsupportedError,
)

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord
    from flwr.common import Parameters

__all__ = [
    "HFL_TENSOR_TYPE",
    "array_record_bytes",
    "array_record_to_arrays",
    "arrays_to_array_record",
    "from_array_record",
    "from_parameters",
    "read_array_record",
    "state_dict_to_tensors",
    "tensors_to_state_dict",
    "to_array_record",
    "to_parameters",
]

HFL_TENSOR_TYPE = "hfl.tensor"
"""``Parameters.tensor_type`` of a list of msgpack tensor records (see the module docstring)."""

_RECORD_KEYS = frozenset({"stype", "dtype", "shape", "data"})

_BYTE_ORDER_NAMES = {dt.newbyteorder(">").str: name for name, dt in DTYPES.items()}
"""Flower names a dtype ``str(ndarray.dtype)``, which is ``">f4"`` for a big-endian float32."""


@contextmanager
def _extra(extra: str) -> Iterator[None]:
    """Turn a failed import of an optional dependency into a message saying what to install."""
    try:
        yield
    except ImportError as exc:
        raise ImportError(
            f"{exc.name or 'a dependency'} is not installed, and hfl_mqtt.flower.codec needs "
            f"it here: pip install 'hfl-mqtt[{extra}]'"
        ) from exc


# --- Message API: ArrayRecord -------------------------------------------------------------------


def to_array_record(tensors: Iterable[EncodedTensor]) -> ArrayRecord:
    """An ``ArrayRecord`` with one ``Array`` per tensor, keyed by name; the bytes are shared."""
    with _extra("flower"):
        from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for t in tensors:
        if t.name in record:
            raise EncodeError(f"tensor {t.name!r} appears twice")
        record[t.name] = Array(
            dtype=t.dtype, shape=tuple(map(int, t.shape)), stype=t.stype, data=t.data
        )
    return record


def from_array_record(
    record: Mapping[str, Any],
    *,
    expect: ModelSpec | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> list[EncodedTensor]:
    """The tensors of an ``ArrayRecord`` (or any mapping of name to ``Array``), checked.

    Each ``Array`` is checked like a tensor record of our envelope; for ``numpy.ndarray`` the npy
    header must agree with ``dtype`` and ``shape`` (the data is not read). With ``expect``, the
    tensors must be exactly that model's.
    """
    if len(record) > limits.max_tensors:
        raise SizeLimitError("tensors", f"{len(record)} tensors exceed {limits.max_tensors}")
    tensors = []
    for index, (key, array) in enumerate(record.items()):
        try:
            raw = {
                "name": key,
                "stype": array.stype,
                "dtype": array.dtype,
                "shape": array.shape,
                "data": array.data,
            }
        except AttributeError:
            raise SchemaError(f"tensors[{key!r}]", "is not a flwr.app.Array") from None
        if isinstance(raw["dtype"], str):
            raw["dtype"] = _BYTE_ORDER_NAMES.get(raw["dtype"], raw["dtype"])
        tensors.append(_checked(tensor_from_wire(raw, index, limits), limits))
    check_total_size(tensors, limits)
    if expect is not None:
        expect.check(tensors)
    return tensors


def arrays_to_array_record(
    arrays: Mapping[str, np.ndarray], codec: Compressor | CodecSpec | str = "npy"
) -> ArrayRecord:
    """Encode named arrays with ``codec`` (a spec, or a link's ``Compressor``) into a record."""
    return to_array_record(_compressor(codec).encode(arrays))


def array_record_to_arrays(
    record: Mapping[str, Any],
    *,
    expect: ModelSpec | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> dict[str, np.ndarray]:
    """Decode every ``Array`` of a record, whatever its stype, into a new writable array."""
    return _decode_all(from_array_record(record, expect=expect, limits=limits), limits)


# --- Legacy API: Parameters ---------------------------------------------------------------------


def to_parameters(tensors: Sequence[EncodedTensor]) -> Parameters:
    """Legacy ``Parameters``: Flower's npy layout when every tensor is npy, else ``hfl.tensor``."""
    with _extra("flower"):
        from flwr.common import Parameters

    if all(t.stype == NPY_STYPE for t in tensors):
        return Parameters(tensors=[t.data for t in tensors], tensor_type=NPY_STYPE)
    items = [
        msgpack.packb(
            {"stype": t.stype, "dtype": t.dtype, "shape": list(t.shape), "data": t.data},
            use_bin_type=True,
        )
        for t in tensors
    ]
    return Parameters(tensors=items, tensor_type=HFL_TENSOR_TYPE)


def from_parameters(
    parameters: Parameters,
    names: Sequence[str] | ModelSpec,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> list[EncodedTensor]:
    """The tensors of legacy ``Parameters``, named in order by ``names``, checked.

    ``names`` lists the tensor names in the order of ``parameters.tensors``; a ``ModelSpec``
    gives them in its own order and is then also checked against (names, shapes, dtypes).
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of tensor names, not one string")
    expect = names if isinstance(names, ModelSpec) else None
    order = list(names.tensors) if isinstance(names, ModelSpec) else list(names)
    if len(set(order)) != len(order):
        raise ValueError("tensor names must be unique")
    tensor_type = getattr(parameters, "tensor_type", None)
    items = getattr(parameters, "tensors", None)
    if not isinstance(items, list | tuple):
        raise SchemaError("parameters.tensors", "must be a list of bytes")
    if len(items) > limits.max_tensors:
        raise SizeLimitError("tensors", f"{len(items)} tensors exceed {limits.max_tensors}")
    if len(items) != len(order):
        raise ModelMismatchError(
            "parameters.tensors", f"holds {len(items)} tensors, {len(order)} names were given"
        )
    if tensor_type == NPY_STYPE:
        read = _npy_item
    elif tensor_type == HFL_TENSOR_TYPE:
        read = _hfl_item
    else:
        raise UnsupportedError(
            "parameters.tensor_type",
            f"{reprlib.repr(tensor_type)} is neither {NPY_STYPE!r} nor {HFL_TENSOR_TYPE!r}",
        )
    tensors = []
    for index, (name, item) in enumerate(zip(order, items, strict=True)):
        if not isinstance(item, bytes):
            raise SchemaError(f"tensors[{name!r}]", "must be binary")
        raw = read(item, f"tensors[{name!r}]", limits)
        raw["name"] = name
        tensor = tensor_from_wire(raw, index, limits)
        # npy items were described from their own header; records must agree with theirs.
        tensors.append(tensor if read is _npy_item else _checked(tensor, limits))
    check_total_size(tensors, limits)
    if expect is not None:
        expect.check(tensors)
    return tensors


def _npy_item(item: bytes, field: str, limits: DecodeLimits) -> dict[str, object]:
    dtype, shape, _, _ = parse_npy(item, f"{field}.data", limits.max_decoded_bytes)
    return {"stype": NPY_STYPE, "dtype": dtype.name, "shape": shape, "data": item}


def _hfl_item(item: bytes, field: str, limits: DecodeLimits) -> dict[str, object]:
    # A record is 9 objects plus its shape's items; the slack lets the schema check below name
    # a shape that is merely too long.
    check_object_count(item, 16 + 2 * limits.max_ndim)
    try:
        raw = msgpack.unpackb(
            item,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(item),
            max_str_len=limits.max_string_length,
            max_array_len=limits.max_ndim,
            max_map_len=len(_RECORD_KEYS),
            max_ext_len=0,
        )
    # As in the envelope decoder: the msgpack parser reports malformed input with several
    # exception types (ValueError and UnpackException subclasses, TypeError); all mean bad data.
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SchemaError(field, f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or set(raw) != _RECORD_KEYS:
        raise SchemaError(field, "must be a map of exactly stype, dtype, shape and data")
    return raw


# --- torch state dicts --------------------------------------------------------------------------


def state_dict_to_tensors(
    state_dict: Mapping[str, torch.Tensor], codec: Compressor | CodecSpec | str = "npy"
) -> list[EncodedTensor]:
    """Encode a torch ``state_dict`` with ``codec``; npy output equals Flower's byte for byte.

    Like Flower, each tensor is detached and moved to the CPU. Tensors with no numpy
    equivalent (bfloat16, quantized) are refused with ``EncodeError``: cast them first.
    """
    with _extra("torch"):
        import torch

    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise EncodeError(f"tensor {name!r}: {type(value).__name__} is not a torch.Tensor")
        try:
            arrays[name] = value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as exc:
            raise EncodeError(
                f"tensor {name!r}: torch {value.dtype} has no numpy equivalent ({exc})"
            ) from None
    return _compressor(codec).encode(arrays)


def tensors_to_state_dict(
    tensors: Iterable[EncodedTensor],
    *,
    expect: ModelSpec | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> dict[str, torch.Tensor]:
    """Decode tensors into a torch ``state_dict`` (CPU tensors owning their memory)."""
    with _extra("torch"):
        import torch

    tensors = list(tensors)
    if expect is not None:
        expect.check(tensors)
    return {name: torch.from_numpy(a) for name, a in _decode_all(tensors, limits).items()}


# --- helpers ------------------------------------------------------------------------------------


def _compressor(codec: Compressor | CodecSpec | str) -> Compressor:
    return codec if isinstance(codec, Compressor) else Compressor(codec)


def _checked(tensor: EncodedTensor, limits: DecodeLimits) -> EncodedTensor:
    """An npy tensor's header must agree with its record (the data is not read)."""
    if tensor.stype == NPY_STYPE:
        check_npy_record(tensor, limits.max_decoded_bytes)
    return tensor


def _decode_all(tensors: Iterable[EncodedTensor], limits: DecodeLimits) -> dict[str, np.ndarray]:
    return {t.name: decode_tensor(t, limits) for t in tensors}


def array_record_bytes(model: Mapping[str, np.ndarray]) -> bytes:
    """``model`` as Flower's serialized ``ArrayRecord`` protobuf message (npy tensors)."""
    with _extra("flower"):
        from flwr.common.serde import array_record_to_proto

    return bytes(array_record_to_proto(arrays_to_array_record(model, "npy")).SerializeToString())


def read_array_record(path: Path | str) -> ArrayRecord:
    """The ``ArrayRecord`` of a file written by ``hfl-mqtt export --format flower``."""
    with _extra("flower"):
        from flwr.common.serde import array_record_from_proto
        from flwr.proto.recorddict_pb2 import ArrayRecord as ArrayRecordProto

    record: ArrayRecord = array_record_from_proto(
        ArrayRecordProto.FromString(Path(path).read_bytes())
    )
    return record
