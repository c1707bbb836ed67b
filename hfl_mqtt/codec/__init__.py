"""The wire codec: envelopes, tensor encodings, codec specs and chunking.

Encode with ``encode_message(header, arrays, codec)``; decode with ``decode_message(data)``.
Every decoding failure is a ``DecodeError`` subtype (see ``hfl_mqtt.errors``).
"""

from hfl_mqtt.codec.compressor import Compressor, encode_array
from hfl_mqtt.codec.envelope import (
    FORMAT_VERSION,
    Envelope,
    Header,
    Message,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_message,
)
from hfl_mqtt.codec.limits import DEFAULT_LIMITS, DecodeLimits
from hfl_mqtt.codec.npy import NPY_STYPE, npy_bytes
from hfl_mqtt.codec.spec import CodecSpec, parse_spec
from hfl_mqtt.codec.tensor import STYPES, EncodedTensor, ModelSpec, TensorSpec, decode_tensor

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "NPY_STYPE",
    "STYPES",
    "CodecSpec",
    "Compressor",
    "DecodeLimits",
    "EncodedTensor",
    "Envelope",
    "Header",
    "Message",
    "ModelSpec",
    "TensorSpec",
    "decode_envelope",
    "decode_message",
    "decode_tensor",
    "encode_array",
    "encode_envelope",
    "encode_message",
    "npy_bytes",
    "parse_spec",
]
