"""Codec specs: which encoding pipeline a link applies to the tensors it sends.

A spec is written as ``+``-separated tokens, in any order, for example ``"q8"``,
``"q4+zstd"``, ``"topk0.01+q8+zstd"`` or ``"fp16"``:

==================  ==========================================================================
token               meaning
==================  ==========================================================================
``npy``             values as Flower's ``numpy.ndarray`` bytes (lossless; the default)
``fp16``/``bf16``   values cast to IEEE half or bfloat16
``q{b}``            stochastic uniform quantization to b bits, b in {1, 2, 4, 8, 16},
                    block size 1024; ``q{b}b{n}`` sets the block size to n
``topk{f}``         keep the largest-magnitude fraction f of each tensor (0 < f < 1: a ``.``
                    in the number), or ``topk{k}`` the k largest (an integer)
``zstd``            zstd-compress the whole envelope (level 1); ``zstd{l}`` sets the level
``seed{n}``         seed the quantizer's random numbers, for reproducible encodings
==================  ==========================================================================

``str(spec)`` gives the canonical form, which ``parse_spec`` reads back to an equal spec.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hfl_mqtt.errors import CodecSpecError

__all__ = ["DEFAULT_BLOCK_SIZE", "QUANT_BITS", "CodecSpec", "parse_spec"]

DEFAULT_BLOCK_SIZE = 1024
DEFAULT_ZSTD_LEVEL = 1
QUANT_BITS = (1, 2, 4, 8, 16)
MAX_BLOCK_SIZE = 1 << 24

ValueEncoding = Literal["npy", "fp16", "bf16", "quant"]


class CodecSpec(BaseModel):
    """One encoding pipeline: optional top-k, one value encoding, optional zstd."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    values: ValueEncoding = "npy"
    bits: Literal[1, 2, 4, 8, 16] | None = None
    block_size: Annotated[int, Field(ge=1, le=MAX_BLOCK_SIZE)] = DEFAULT_BLOCK_SIZE
    topk_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    topk_count: Annotated[int, Field(ge=1)] | None = None
    zstd: bool = False
    zstd_level: Annotated[int, Field(ge=-7, le=22)] = DEFAULT_ZSTD_LEVEL
    seed: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CodecSpec:
        if (self.values == "quant") != (self.bits is not None):
            raise ValueError("bits is set exactly when values is 'quant'")
        if self.topk_fraction is not None and self.topk_count is not None:
            raise ValueError("topk_fraction and topk_count exclude each other")
        # Settings that would do nothing are refused, so that str() can always carry a spec.
        if self.values != "quant" and self.block_size != DEFAULT_BLOCK_SIZE:
            raise ValueError("block_size applies only to quantization")
        if not self.zstd and self.zstd_level != DEFAULT_ZSTD_LEVEL:
            raise ValueError("zstd_level applies only with zstd")
        return self

    @property
    def lossless(self) -> bool:
        """True when decoding returns exactly the input."""
        return self.values == "npy" and not self.sparse

    @property
    def sparse(self) -> bool:
        return self.topk_fraction is not None or self.topk_count is not None

    def __str__(self) -> str:
        tokens: list[str] = []
        if self.topk_fraction is not None:
            tokens.append(f"topk{_fraction_token(self.topk_fraction)}")
        elif self.topk_count is not None:
            tokens.append(f"topk{self.topk_count}")
        if self.values == "quant":
            block = "" if self.block_size == DEFAULT_BLOCK_SIZE else f"b{self.block_size}"
            tokens.append(f"q{self.bits}{block}")
        else:
            tokens.append(self.values)
        if self.zstd:
            level = "" if self.zstd_level == DEFAULT_ZSTD_LEVEL else str(self.zstd_level)
            tokens.append(f"zstd{level}")
        if self.seed is not None:
            tokens.append(f"seed{self.seed}")
        return "+".join(tokens)


def _fraction_token(fraction: float) -> str:
    text = repr(fraction)
    return text if "." in text or "e" in text else f"{text}.0"


_QUANT = re.compile(r"q(\d+)(?:b(\d+))?")
_TOPK = re.compile(r"topk(\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+(?:e-?\d+)?)")
_ZSTD = re.compile(r"zstd(-?\d+)?")
_SEED = re.compile(r"seed(\d+)")


def parse_spec(text: str | CodecSpec) -> CodecSpec:
    """Parse a spec string such as ``"topk0.01+q8+zstd"``; a ``CodecSpec`` passes through."""
    if isinstance(text, CodecSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise CodecSpecError(f"codec spec must be a non-empty string, got {text!r}")
    fields: dict[str, object] = {}

    def put(key: str, value: object, token: str) -> None:
        if key in fields:
            raise CodecSpecError(f"codec spec {text!r}: {token!r} repeats a choice already made")
        fields[key] = value

    for token in (t.strip().lower() for t in text.split("+")):
        if token in ("npy", "fp16", "bf16"):
            put("values", token, token)
        elif m := _QUANT.fullmatch(token):
            put("values", "quant", token)
            fields["bits"] = int(m[1])
            if m[2] is not None:
                fields["block_size"] = int(m[2])
        elif m := _TOPK.fullmatch(token):
            number = m[1]
            if any(c in number for c in ".e"):
                put("topk", None, token)
                fields["topk_fraction"] = float(number)
            else:
                put("topk", None, token)
                fields["topk_count"] = int(number)
        elif m := _ZSTD.fullmatch(token):
            put("zstd", True, token)
            if m[1] is not None:
                fields["zstd_level"] = int(m[1])
        elif m := _SEED.fullmatch(token):
            put("seed", int(m[1]), token)
        else:
            raise CodecSpecError(
                f"codec spec {text!r}: unknown token {token!r} "
                "(expected npy, fp16, bf16, q{bits}[b{block}], topk{fraction|count}, "
                "zstd[{level}], seed{n})"
            )
    fields.pop("topk", None)
    try:
        return CodecSpec.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
        raise CodecSpecError(f"codec spec {text!r}: {problems}") from None
