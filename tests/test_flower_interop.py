"""Interop with Flower: npy bytes, ArrayRecord, legacy Parameters, torch state dicts."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common import (
    Parameters,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.serde import (
    parameters_from_proto,
    parameters_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from hfl_mqtt.codec import Compressor, DecodeLimits, EncodedTensor, ModelSpec, decode_tensor
from hfl_mqtt.codec.npy import NPY_STYPE, npy_bytes
from hfl_mqtt.errors import (
    DecodeError,
    EncodeError,
    FrameError,
    ModelMismatchError,
    SchemaError,
    SizeLimitError,
    UnsupportedError,
)
from hfl_mqtt.flower.codec import (
    HFL_TENSOR_TYPE,
    array_record_to_arrays,
    arrays_to_array_record,
    from_array_record,
    from_parameters,
    state_dict_to_tensors,
    tensors_to_state_dict,
    to_array_record,
    to_parameters,
)

pytestmark = pytest.mark.flower

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
LOSSY_SPECS = ["fp16", "bf16", "q1", "q4", "q8b64", "q16", "topk0.2+q8", "topk3", "topk0.5+fp16"]


def model_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc.weight": np.asfortranarray(rng.standard_normal((5, 7))),
        "fc.bias": rng.standard_normal(5).astype(np.float16),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
        "mask": rng.random((2, 3)) > 0.5,
        "empty": np.zeros((0, 4), np.float32),
    }


def roundtrip_proto(record: ArrayRecord) -> ArrayRecord:
    """Through Flower's protobuf serialization (``flwr.common.serde``), as bytes."""
    wire = recorddict_to_proto(RecordDict({"arrays": record})).SerializeToString()
    restored = recorddict_from_proto(ProtoRecordDict.FromString(wire))["arrays"]
    assert isinstance(restored, ArrayRecord)
    return restored


def roundtrip_object_store(record: ArrayRecord) -> ArrayRecord:
    """Through Flower's object-store path: deflate into content-addressed objects, inflate back."""
    objects = get_all_nested_objects(record)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    restored = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(restored, ArrayRecord)
    return restored


# --- npy bytes -------------------------------------------------------------------------------


@st.composite
def flower_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    x = draw(hnp.arrays(dtype, shape, elements=elements))
    layout = draw(st.sampled_from(["C", "F", "step", "transposed step"]))
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "step" and x.ndim:
        x = x[::2]
    elif layout == "transposed step" and x.ndim:
        x = x.T[..., ::-2]
    return x


@settings(max_examples=120)
@given(flower_arrays())
def test_npy_tensors_are_flowers_bytes(x: np.ndarray) -> None:
    tensor = Compressor("npy").encode({"x": x})[0]
    assert tensor.data == npy_bytes(x) == ndarray_to_bytes(x) == Array(x).data
    assert (tensor.dtype, tensor.shape) == (Array(x).dtype, Array(x).shape)
    np.testing.assert_array_equal(bytes_to_ndarray(tensor.data), x, strict=True)

    record = to_array_record([tensor])
    assert record["x"].data is tensor.data  # passed through, not copied
    np.testing.assert_array_equal(record["x"].numpy(), x, strict=True)
    assert from_array_record(record) == [tensor]
    assert from_array_record(ArrayRecord([x])) == [EncodedTensor("0", *_fields(tensor))]

    params = to_parameters([tensor])
    assert params.tensor_type == NPY_STYPE
    np.testing.assert_array_equal(parameters_to_ndarrays(params)[0], x, strict=True)
    assert from_parameters(ndarrays_to_parameters([x]), ["x"]) == [tensor]


def _fields(t: EncodedTensor) -> tuple[str, str, tuple[int, ...], bytes]:
    return t.stype, t.dtype, t.shape, t.data


# --- Flower's containers, decoded with ours ----------------------------------------------------


def test_flower_parameters_decode_with_ours() -> None:
    arrays = model_arrays()
    params = ndarrays_to_parameters(list(arrays.values()))

    tensors = from_parameters(params, list(arrays))
    assert from_parameters(params, ModelSpec.from_arrays(arrays)) == tensors
    decoded = {t.name: decode_tensor(t) for t in tensors}
    for name, x in arrays.items():
        np.testing.assert_array_equal(decoded[name], x, strict=True)

    back = to_parameters(tensors)
    assert back.tensor_type == params.tensor_type == NPY_STYPE
    assert back.tensors == params.tensors
    assert to_parameters(Compressor("npy").encode(arrays)).tensors == params.tensors


def test_flower_array_record_from_ndarrays_decodes_with_ours() -> None:
    arrays = model_arrays()
    record = ArrayRecord(list(arrays.values()))

    decoded = array_record_to_arrays(record)
    assert list(decoded) == [str(i) for i in range(len(arrays))]
    for x, y in zip(arrays.values(), decoded.values(), strict=True):
        np.testing.assert_array_equal(y, x, strict=True)

    back = to_array_record(from_array_record(record))
    assert back == record  # same keys, Arrays equal field by field, data byte for byte
    ours = arrays_to_array_record(dict(zip(record, arrays.values(), strict=True)))
    assert ours == record


def test_flower_big_endian_array_is_read_by_name() -> None:
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    record = ArrayRecord([x])
    assert record["0"].dtype == ">f4"  # Flower stores str(ndarray.dtype)

    (tensor,) = from_array_record(record)
    assert (tensor.dtype, tensor.data) == ("float32", record["0"].data)
    y = decode_tensor(tensor)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)


def test_model_spec_is_checked() -> None:
    arrays = model_arrays()
    spec = ModelSpec.from_arrays(arrays)
    record = arrays_to_array_record(arrays)
    assert [t.name for t in from_array_record(record, expect=spec)] == list(arrays)

    del record["mask"]
    with pytest.raises(ModelMismatchError, match="missing 'mask'"):
        from_array_record(record, expect=spec)
    other = ModelSpec.from_arrays({**arrays, "fc.bias": np.zeros(6, np.float16)})
    params = to_parameters(Compressor("npy").encode(arrays))
    with pytest.raises(ModelMismatchError, match=r"fc\.bias.*shape"):
        from_parameters(params, other)


# --- torch -------------------------------------------------------------------------------------


def torch_model() -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    model.train()
    model(torch.randn(2, 3, 3, 3))  # move the BatchNorm statistics off their defaults
    return model


def test_flower_torch_state_dict_decodes_with_ours() -> None:
    torch = pytest.importorskip("torch")
    state_dict = torch_model().state_dict()
    state_dict["transposed"] = torch.arange(12.0).reshape(3, 4).T  # not contiguous
    tracked = state_dict["1.num_batches_tracked"]
    assert (tracked.dtype, tracked.shape) == (torch.int64, ())

    record = ArrayRecord(state_dict)
    tensors = from_array_record(record)
    assert tensors[list(state_dict).index("1.num_batches_tracked")].dtype == "int64"
    restored = tensors_to_state_dict(tensors)
    assert list(restored) == list(state_dict)
    for name, value in state_dict.items():
        assert restored[name].dtype == value.dtype
        assert torch.equal(restored[name], value)

    ours = state_dict_to_tensors(state_dict)
    assert ours == tensors  # Flower's bytes, byte for byte
    assert to_array_record(ours) == record


def test_our_state_dict_loads_through_flower() -> None:
    torch = pytest.importorskip("torch")
    model = torch_model()
    state_dict = model.state_dict()

    flower_sd = to_array_record(state_dict_to_tensors(state_dict)).to_torch_state_dict()
    for name, value in state_dict.items():
        assert flower_sd[name].dtype == value.dtype
        assert torch.equal(flower_sd[name], value)

    fresh = torch_model()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(tensors_to_state_dict(from_array_record(ArrayRecord(state_dict))))
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, state_dict[name])


def test_quantized_state_dict() -> None:
    torch = pytest.importorskip("torch")
    state_dict = torch_model().state_dict()
    tensors = state_dict_to_tensors(state_dict, Compressor("q8", seed=1))
    stypes = {t.name: t.stype for t in tensors}
    assert stypes["0.weight"] == "hfl.quant"
    assert stypes["1.num_batches_tracked"] == NPY_STYPE  # non-float travels as npy

    restored = tensors_to_state_dict(from_array_record(roundtrip_proto(to_array_record(tensors))))
    for name, value in state_dict.items():
        assert restored[name].dtype == value.dtype
        span = float(value.max() - value.min()) if value.dtype.is_floating_point else 0.0
        assert torch.allclose(restored[name], value, rtol=0, atol=span / 255 + 1e-6)


def test_torch_dtypes_without_numpy_equivalent_are_refused() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(EncodeError, match=r"'w'.*bfloat16"):
        state_dict_to_tensors({"w": torch.zeros(3, dtype=torch.bfloat16)})
    with pytest.raises(EncodeError, match=r"'w'.*not a torch\.Tensor"):
        state_dict_to_tensors({"w": np.zeros(3)})  # type: ignore[dict-item]


# --- our encodings riding in Flower's containers ------------------------------------------------


@pytest.mark.parametrize("spec", LOSSY_SPECS)
def test_lossy_tensors_ride_in_array_record(spec: str) -> None:
    arrays = model_arrays()
    tensors = Compressor(spec, seed=3).encode(arrays)
    expected = {t.name: decode_tensor(t) for t in tensors}
    assert {t.stype for t in tensors} - {NPY_STYPE}  # something is lossy

    record = to_array_record(tensors)
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        record.to_numpy_ndarrays()  # Flower cannot read our stypes...
    for restored in (record, roundtrip_proto(record), roundtrip_object_store(record)):
        assert from_array_record(restored) == tensors  # ...but carries them intact
        decoded = array_record_to_arrays(restored, expect=ModelSpec.from_arrays(arrays))
        for name, y in decoded.items():
            np.testing.assert_array_equal(y, expected[name], strict=True)


@pytest.mark.parametrize("spec", LOSSY_SPECS)
def test_lossy_tensors_ride_in_parameters(spec: str) -> None:
    arrays = model_arrays()
    tensors = Compressor(spec, seed=3).encode(arrays)

    params = to_parameters(tensors)
    assert params.tensor_type == HFL_TENSOR_TYPE
    t = tensors[0]
    item = {"stype": t.stype, "dtype": t.dtype, "shape": list(t.shape), "data": t.data}
    assert msgpack.unpackb(params.tensors[0]) == item
    restored = parameters_from_proto(parameters_to_proto(params))
    assert from_parameters(restored, list(arrays)) == tensors
    for t, u in zip(tensors, from_parameters(restored, ModelSpec.from_arrays(arrays)), strict=True):
        np.testing.assert_array_equal(decode_tensor(u), decode_tensor(t), strict=True)


def test_large_custom_stype_array_is_chunked_and_reassembled() -> None:
    # Flower cuts Array data into 5 MB chunks in its object store; ours must come back whole.
    x = np.random.default_rng(0).standard_normal(3_000_000).astype(np.float32)
    tensors = Compressor("fp16").encode({"big": x})
    record = to_array_record(tensors)
    assert len(record["big"].slice_array()) == 2
    assert from_array_record(roundtrip_object_store(record)) == tensors


def test_duplicate_names_are_refused() -> None:
    t = Compressor().encode({"a": np.zeros(2)})[0]
    with pytest.raises(EncodeError, match="twice"):
        to_array_record([t, t])
    params = to_parameters([t, t])
    with pytest.raises(ValueError, match="unique"):
        from_parameters(params, ["a", "a"])


# --- bad Flower-side input ---------------------------------------------------------------------


def good_array() -> Array:
    return Array(np.arange(6, dtype=np.float32).reshape(2, 3))


def quant_array() -> Array:
    t = Compressor("q8").encode({"w": np.ones((2, 3), np.float32)})[0]
    return Array(dtype=t.dtype, shape=t.shape, stype=t.stype, data=t.data)


def _with(array: Array, **changes: Any) -> Array:
    for name, value in changes.items():
        setattr(array, name, value)  # Flower does not re-check assignments
    return array


BAD_ARRAYS = [
    pytest.param(_with(good_array(), stype="torch.Tensor"), UnsupportedError, "stype", id="stype"),
    pytest.param(_with(good_array(), dtype="float64"), SchemaError, "npy header", id="dtype"),
    pytest.param(_with(good_array(), shape=(3, 2)), SchemaError, "npy header", id="shape"),
    pytest.param(_with(good_array(), shape=(6,)), SchemaError, "npy header", id="ndim"),
    pytest.param(_with(good_array(), data=b"garbage!" * 4), FrameError, "magic", id="garbage"),
    pytest.param(
        _with(good_array(), data=good_array().data[:-1]), FrameError, "holds", id="truncated"
    ),
    pytest.param(_with(good_array(), dtype="complex64"), UnsupportedError, "dtype", id="complex"),
    pytest.param(_with(good_array(), dtype="<U3"), UnsupportedError, "dtype", id="unicode"),
    pytest.param(_with(good_array(), dtype=None), UnsupportedError, "dtype", id="dtype-none"),
    pytest.param(_with(good_array(), shape=(-2, -3)), SchemaError, "non-negative", id="negative"),
    pytest.param(_with(good_array(), shape=None), SchemaError, "shape", id="shape-none"),
    pytest.param(_with(good_array(), data="text"), SchemaError, "binary", id="data-str"),
    pytest.param(_with(quant_array(), dtype="int32"), SchemaError, "only float", id="quant-int"),
    pytest.param(
        _with(quant_array(), shape=(1 << 20, 1 << 20)), SizeLimitError, "exceed", id="huge"
    ),
    pytest.param(np.zeros(3), SchemaError, "not a flwr.app.Array", id="not-array"),
]


@pytest.mark.parametrize(("array", "error", "reason"), BAD_ARRAYS)
def test_bad_arrays_are_refused(array: Any, error: type[DecodeError], reason: str) -> None:
    with pytest.raises(error, match=reason) as info:
        from_array_record({"w": array})
    assert info.value.field.startswith("tensors['w']")


@pytest.mark.parametrize(
    ("array", "error"),
    [
        (_with(quant_array(), data=quant_array().data[:-1]), FrameError),
        (_with(quant_array(), stype="hfl.fp16"), FrameError),
    ],
    ids=["quant-truncated", "fp16-length"],
)
def test_bad_payloads_fail_when_decoded(array: Array, error: type[DecodeError]) -> None:
    with pytest.raises(error):
        array_record_to_arrays({"w": array})


def test_non_finite_npy_is_refused() -> None:
    record = ArrayRecord([np.array([1.0, np.nan])])
    from_array_record(record)  # the data is not read here...
    with pytest.raises(DecodeError, match="NaN"):
        array_record_to_arrays(record)  # ...but is when decoding


def test_too_many_tensors() -> None:
    record = ArrayRecord([np.zeros(1)] * 3)
    with pytest.raises(SizeLimitError):
        from_array_record(record, limits=DecodeLimits(max_tensors=2))
    with pytest.raises(SizeLimitError):
        from_array_record(record, limits=DecodeLimits(max_decoded_bytes=16))


def record_item(**changes: Any) -> bytes:
    fields = {"stype": "hfl.fp16", "dtype": "float32", "shape": [2], "data": b"\0" * 4}
    fields.update(changes)
    return msgpack.packb({k: v for k, v in fields.items() if v is not ...})


BAD_PARAMETERS = [
    pytest.param(Parameters([ndarray_to_bytes(np.zeros(2))], "bogus"), UnsupportedError, id="type"),
    pytest.param(Parameters([], NPY_STYPE), ModelMismatchError, id="count"),
    pytest.param(Parameters([b"\x93NUMPY garbage"], NPY_STYPE), DecodeError, id="npy-garbage"),
    pytest.param(Parameters([b"x" * 3], NPY_STYPE), FrameError, id="npy-short"),
    pytest.param(Parameters(["text"], NPY_STYPE), SchemaError, id="npy-str"),
    pytest.param(Parameters(None, NPY_STYPE), SchemaError, id="tensors-none"),
    pytest.param(Parameters([b"\xc1"], HFL_TENSOR_TYPE), SchemaError, id="msgpack-garbage"),
    pytest.param(Parameters([b"\x92\x01"], HFL_TENSOR_TYPE), SchemaError, id="msgpack-short"),
    pytest.param(Parameters([msgpack.packb([1, 2])], HFL_TENSOR_TYPE), SchemaError, id="list"),
    pytest.param(Parameters([record_item(name="w")], HFL_TENSOR_TYPE), SchemaError, id="extra"),
    pytest.param(Parameters([record_item(data=...)], HFL_TENSOR_TYPE), SchemaError, id="missing"),
    pytest.param(
        Parameters([record_item(stype="hfl.zip")], HFL_TENSOR_TYPE), UnsupportedError, id="stype"
    ),
    pytest.param(
        Parameters([record_item(dtype="object")], HFL_TENSOR_TYPE), UnsupportedError, id="dtype"
    ),
    pytest.param(Parameters([record_item(data="x")], HFL_TENSOR_TYPE), SchemaError, id="data-str"),
    pytest.param(Parameters([record_item(shape=7)], HFL_TENSOR_TYPE), SchemaError, id="shape-int"),
    pytest.param(
        Parameters([record_item(shape=[1] * 40)], HFL_TENSOR_TYPE), SchemaError, id="ndim"
    ),
    pytest.param(
        Parameters(
            [record_item(stype=NPY_STYPE, data=ndarray_to_bytes(np.zeros(3)))], "hfl.tensor"
        ),
        SchemaError,
        id="npy-header-mismatch",
    ),
]


@pytest.mark.parametrize(("params", "error"), BAD_PARAMETERS)
def test_bad_parameters_are_refused(params: Parameters, error: type[DecodeError]) -> None:
    with pytest.raises(error):
        from_parameters(params, ["w"])


@settings(max_examples=150)
@given(
    stype=st.sampled_from([NPY_STYPE, "hfl.fp16", "hfl.bf16", "hfl.quant", "hfl.topk", "x"]),
    dtype=st.sampled_from([*DTYPES, ">f4", "<f8", "object", ""]),
    shape=st.lists(st.integers(-1, 6), max_size=3).map(tuple),
    data=st.binary(max_size=200),
    seed_array=flower_arrays(),
    cut=st.integers(0, 300),
)
def test_fuzzed_flower_input_raises_only_decode_errors(
    stype: str,
    dtype: str,
    shape: tuple[int, ...],
    data: bytes,
    seed_array: np.ndarray,
    cut: int,
) -> None:
    real = ndarray_to_bytes(seed_array)
    candidates = [
        Array(dtype=dtype, shape=shape, stype=stype, data=data),
        Array(dtype=dtype, shape=shape, stype=stype, data=real[:cut] + data),
        _with(Array(seed_array), data=real[:cut] + data[: len(real) - cut]),
    ]
    for array in candidates:
        with contextlib.suppress(DecodeError):
            array_record_to_arrays({"w": array})
    for items, tensor_type in (
        ([data], HFL_TENSOR_TYPE),
        ([real[:cut] + data], NPY_STYPE),
        ([record_item(stype=stype, dtype=dtype, shape=list(shape), data=data)], HFL_TENSOR_TYPE),
    ):
        with contextlib.suppress(DecodeError):
            for t in from_parameters(Parameters(items, tensor_type), ["w"]):
                decode_tensor(t)
