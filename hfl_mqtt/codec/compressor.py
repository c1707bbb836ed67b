"""Sender side: turn named arrays into ``EncodedTensor`` s as a codec spec says.

A ``Compressor`` belongs to one outgoing link. It holds the quantizer's random state (seeded for
reproducible runs) and, with error feedback on, the residual of every tensor: what compression
left out of earlier sends is added to the next one, so nothing is lost for good, only delayed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hfl_mqtt.codec.casts import BF16_STYPE, FP16_STYPE, to_bf16, to_fp16
from hfl_mqtt.codec.limits import DecodeLimits
from hfl_mqtt.codec.npy import DTYPES, NPY_STYPE, npy_bytes
from hfl_mqtt.codec.quantize import QUANT_STYPE, quantize
from hfl_mqtt.codec.sparsify import TOPK_STYPE, encode_topk, select_topk, topk_count
from hfl_mqtt.codec.spec import CodecSpec, parse_spec
from hfl_mqtt.codec.tensor import FLOAT_DTYPES, EncodedTensor, decode_tensor
from hfl_mqtt.errors import CodecSpecError, EncodeError

__all__ = ["Compressor", "encode_array"]

_OWN_OUTPUT = DecodeLimits(max_decoded_bytes=1 << 62)
"""Decoding what we encoded ourselves (for error feedback) needs no size bound."""


def encode_array(
    name: str, array: np.ndarray, spec: CodecSpec, rng: np.random.Generator
) -> EncodedTensor:
    """Encode one array as ``spec`` says.

    Non-float arrays, and every array under a lossless spec, go as npy; float16 arrays go as
    fp16 (exact) where the spec says bf16.
    """
    array = np.asarray(array)
    dtype = array.dtype.name
    if dtype not in DTYPES:
        raise EncodeError(f"tensor {name!r}: dtype {dtype} cannot travel (plain numbers only)")
    shape = tuple(array.shape)
    if spec.lossless or dtype not in FLOAT_DTYPES:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise EncodeError(f"tensor {name!r} contains NaN or Inf")
        return EncodedTensor(name, NPY_STYPE, dtype, shape, npy_bytes(array))
    flat = array.reshape(-1)
    values = spec.values
    if values == "bf16" and dtype == "float16":
        values = "fp16"  # exact for float16, where bf16 would lose bits and overflow near 65504
    try:
        if spec.sparse:
            k = topk_count(flat.size, spec.topk_fraction, spec.topk_count)
            indices = select_topk(flat, k)
            if values == "npy" and not np.isfinite(flat[indices]).all():
                raise EncodeError("contains NaN or Inf")
            bits = spec.bits or 8
            data = encode_topk(
                flat,
                indices,
                "raw" if values == "npy" else values,
                lambda v: quantize(v, bits, spec.block_size, rng),
            )
            return EncodedTensor(name, TOPK_STYPE, dtype, shape, data)
        if values == "fp16":
            return EncodedTensor(name, FP16_STYPE, dtype, shape, to_fp16(flat))
        if values == "bf16":
            return EncodedTensor(name, BF16_STYPE, dtype, shape, to_bf16(flat))
        data = quantize(flat, spec.bits or 8, spec.block_size, rng)
        return EncodedTensor(name, QUANT_STYPE, dtype, shape, data)
    except EncodeError as exc:
        raise EncodeError(f"tensor {name!r}: {exc}") from None


class Compressor:
    """Encodes the tensors of one outgoing link; keeps random state and error-feedback residuals."""

    def __init__(
        self,
        spec: CodecSpec | str = "npy",
        *,
        error_feedback: bool = False,
        seed: int | None = None,
    ) -> None:
        self.spec = parse_spec(spec)
        if error_feedback and self.spec.bits == 1:
            # Error feedback needs a compressor whose error is smaller than its input; stochastic
            # 1-bit quantization's is not, so the residual would grow without bound.
            raise CodecSpecError(
                f"error feedback cannot be used with {self.spec}: 1-bit quantization is not "
                "contractive; use 2 bits or more"
            )
        self.error_feedback = error_feedback and not self.spec.lossless
        self._rng = np.random.default_rng(self.spec.seed if seed is None else seed)
        self._residuals: dict[str, np.ndarray] = {}

    def encode(self, arrays: Mapping[str, np.ndarray]) -> list[EncodedTensor]:
        """Encode every array; with error feedback, add and then update each residual."""
        if not self.error_feedback:
            return [encode_array(k, a, self.spec, self._rng) for k, a in arrays.items()]
        encoded = []
        for name, value in arrays.items():
            array = np.asarray(value)
            if array.dtype.name not in FLOAT_DTYPES:
                encoded.append(encode_array(name, array, self.spec, self._rng))
                continue
            residual = self._residuals.get(name)
            if residual is not None and residual.shape == array.shape:
                target = array + residual
            else:
                target = array.copy()
            tensor = encode_array(name, target, self.spec, self._rng)
            target -= decode_tensor(tensor, _OWN_OUTPUT)
            self._residuals[name] = target
            encoded.append(tensor)
        return encoded

    def residual(self, name: str) -> np.ndarray | None:
        """What error feedback still owes for tensor ``name`` (None before its first send)."""
        return self._residuals.get(name)

    def reset(self) -> None:
        """Forget all residuals (for example after the model was replaced)."""
        self._residuals.clear()

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The random generator's state and the residuals (for a checkpoint)."""
        return {"rng": self._rng.bit_generator.state}, dict(self._residuals)

    def load(self, values: Mapping[str, Any], residuals: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state`` gave."""
        self._rng.bit_generator.state = dict(values["rng"])
        self._residuals = dict(residuals)
