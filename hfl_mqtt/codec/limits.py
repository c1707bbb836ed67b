"""Bounds a decoder enforces before it allocates or decompresses anything a peer declared."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "DecodeLimits"]


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Upper bounds on what one message may declare.

    The defaults admit a model of about 100M float32 parameters and stop a hostile peer from
    making a node allocate gigabytes with a few bytes (a zstd bomb or an absurd shape).
    """

    max_message_bytes: int = 512 << 20
    """Size of a whole frame as received (compressed, if it is)."""
    max_raw_bytes: int = 512 << 20
    """Size of the envelope body after decompression."""
    max_decoded_bytes: int = 1 << 30
    """Sum over all tensors of elements x itemsize once decoded."""
    max_tensors: int = 10_000
    max_ndim: int = 32
    max_name_length: int = 256
    max_metrics: int = 256
    max_string_length: int = 4096
    max_body_objects: int = 250_000
    """msgpack objects in a body (each container, key, value and item counts): about 20 per
    tensor and 2 per metric in a real message. Bounds what unpacking may build."""

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeLimits.{name} must be >= 1")


DEFAULT_LIMITS = DecodeLimits()
