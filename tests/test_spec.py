"""Codec specs: parsing, canonical form, round trips and clear errors for bad strings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hfl_mqtt.codec.spec import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    QUANT_BITS,
    CodecSpec,
    parse_spec,
)
from hfl_mqtt.errors import CodecSpecError, HflError

# --- valid strings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fields", "canonical"),
    [
        ("npy", {}, "npy"),
        ("fp16", {"values": "fp16"}, "fp16"),
        ("bf16", {"values": "bf16"}, "bf16"),
        ("q1", {"values": "quant", "bits": 1}, "q1"),
        ("q2", {"values": "quant", "bits": 2}, "q2"),
        ("q4", {"values": "quant", "bits": 4}, "q4"),
        ("q8", {"values": "quant", "bits": 8}, "q8"),
        ("q16", {"values": "quant", "bits": 16}, "q16"),
        ("q4b256", {"values": "quant", "bits": 4, "block_size": 256}, "q4b256"),
        ("q8b1", {"values": "quant", "bits": 8, "block_size": 1}, "q8b1"),
        ("q8b1024", {"values": "quant", "bits": 8}, "q8"),
        ("q8+zstd", {"values": "quant", "bits": 8, "zstd": True}, "q8+zstd"),
        ("q4+zstd", {"values": "quant", "bits": 4, "zstd": True}, "q4+zstd"),
        (
            "topk0.01+q8+zstd",
            {"values": "quant", "bits": 8, "topk_fraction": 0.01, "zstd": True},
            "topk0.01+q8+zstd",
        ),
        ("topk100+fp16", {"values": "fp16", "topk_count": 100}, "topk100+fp16"),
        ("topk0.5", {"topk_fraction": 0.5}, "topk0.5+npy"),
        ("topk.25+bf16", {"values": "bf16", "topk_fraction": 0.25}, "topk0.25+bf16"),
        ("topk1e-05+q2", {"values": "quant", "bits": 2, "topk_fraction": 1e-5}, "topk1e-05+q2"),
        ("topk1", {"topk_count": 1}, "topk1+npy"),
        ("zstd", {"zstd": True}, "npy+zstd"),
        ("zstd3", {"zstd": True, "zstd_level": 3}, "npy+zstd3"),
        ("zstd1", {"zstd": True}, "npy+zstd"),
        ("zstd-7", {"zstd": True, "zstd_level": -7}, "npy+zstd-7"),
        ("zstd22", {"zstd": True, "zstd_level": 22}, "npy+zstd22"),
        ("seed7", {"seed": 7}, "npy+seed7"),
        ("seed0+q8", {"values": "quant", "bits": 8, "seed": 0}, "q8+seed0"),
        # Order, case and spaces around tokens do not matter; the canonical form fixes them.
        ("zstd+q8+topk0.01", {"values": "quant", "bits": 8, "topk_fraction": 0.01, "zstd": True},
         "topk0.01+q8+zstd"),
        (" Q8 + ZSTD5 ", {"values": "quant", "bits": 8, "zstd": True, "zstd_level": 5}, "q8+zstd5"),
        ("seed3+fp16+zstd2+topk10", {"values": "fp16", "topk_count": 10, "zstd": True,
         "zstd_level": 2, "seed": 3}, "topk10+fp16+zstd2+seed3"),
    ],
)  # fmt: skip
def test_valid_specs(text: str, fields: dict[str, object], canonical: str) -> None:
    spec = parse_spec(text)
    assert spec == CodecSpec(**fields)  # type: ignore[arg-type]
    assert str(spec) == canonical
    assert parse_spec(canonical) == spec
    assert str(parse_spec(canonical)) == canonical


@pytest.mark.parametrize(
    ("text", "lossless", "sparse"),
    [("npy", True, False), ("npy+zstd9", True, False), ("fp16", False, False),
     ("q8", False, False), ("topk5", False, True), ("topk0.1+q4", False, True)],
)  # fmt: skip
def test_lossless_and_sparse(text: str, lossless: bool, sparse: bool) -> None:
    spec = parse_spec(text)
    assert spec.lossless is lossless
    assert spec.sparse is sparse


def test_defaults() -> None:
    spec = parse_spec("q8")
    assert spec.block_size == DEFAULT_BLOCK_SIZE == 1024
    assert spec.zstd is False
    assert spec.zstd_level == 1
    assert spec.seed is None
    assert spec.topk_fraction is None
    assert spec.topk_count is None


def test_a_spec_passes_through() -> None:
    spec = CodecSpec(values="quant", bits=4)
    assert parse_spec(spec) is spec


def test_specs_are_frozen() -> None:
    spec = parse_spec("q8")
    with pytest.raises(ValueError, match="frozen"):
        spec.bits = 4


# --- canonical form round trips -------------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn) -> CodecSpec:
    """Any valid spec in which every field is one the canonical string can carry.

    ``block_size`` only means something for ``quant`` and ``zstd_level`` only with ``zstd``, so
    they are left at their defaults otherwise (``str`` omits them there).
    """
    fields: dict[str, object] = {}
    values = draw(st.sampled_from(["npy", "fp16", "bf16", "quant"]))
    fields["values"] = values
    if values == "quant":
        fields["bits"] = draw(st.sampled_from(QUANT_BITS))
        fields["block_size"] = draw(
            st.one_of(st.integers(1, 4096), st.integers(1, MAX_BLOCK_SIZE), st.just(1024))
        )
    topk = draw(st.sampled_from(["none", "fraction", "count"]))
    if topk == "fraction":
        fields["topk_fraction"] = draw(
            st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)
        )
    elif topk == "count":
        fields["topk_count"] = draw(st.integers(1, 2**63))
    if draw(st.booleans()):
        fields["zstd"] = True
        fields["zstd_level"] = draw(st.integers(-7, 22))
    if draw(st.booleans()):
        fields["seed"] = draw(st.integers(0, 2**128))
    return CodecSpec(**fields)  # type: ignore[arg-type]


@given(specs())
def test_canonical_form_round_trips(spec: CodecSpec) -> None:
    text = str(spec)
    assert parse_spec(text) == spec
    assert str(parse_spec(text)) == text
    # The canonical form survives the token order and case a human might use.
    shuffled = "+".join(reversed(text.upper().split("+")))
    assert parse_spec(shuffled) == spec


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True))
def test_any_fraction_round_trips_exactly(fraction: float) -> None:
    spec = parse_spec(f"topk{fraction!r}")
    assert spec.topk_fraction == fraction
    assert parse_spec(str(spec)).topk_fraction == fraction


# --- invalid strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("foo", "unknown token 'foo'"),
        ("q3", "bits"),
        ("q0", "bits"),
        ("q32", "bits"),
        ("q8+q4", "repeats"),
        ("npy+fp16", "repeats"),
        ("q8+npy", "repeats"),
        ("topk0", "topk_count"),
        ("topk1.5", "topk_fraction"),
        ("topk1.0", "topk_fraction"),
        ("topk0.0", "topk_fraction"),
        ("topk1e5", "topk_fraction"),
        ("topk-1", "unknown token"),
        ("topk", "unknown token"),
        ("topk5+topk0.1", "repeats"),
        ("zstd99", "zstd_level"),
        ("zstd-8", "zstd_level"),
        ("zstd+zstd3", "repeats"),
        ("seed1+seed2", "repeats"),
        ("seed-1", "unknown token"),
        ("q8b0", "block_size"),
        (f"q8b{MAX_BLOCK_SIZE + 1}", "block_size"),
        ("q8+", "unknown token ''"),
        ("+q8", "unknown token ''"),
        ("q8++zstd", "unknown token ''"),
        ("q8,zstd", "unknown token"),
        ("fp32", "unknown token"),
        ("int8", "unknown token"),
    ],
)
def test_invalid_specs(text: str, match: str) -> None:
    with pytest.raises(CodecSpecError, match=match) as info:
        parse_spec(text)
    message = str(info.value)
    # The whole spec is quoted so the user can find it in their configuration.
    if text.strip():
        assert repr(text) in message


@pytest.mark.parametrize("value", [None, 8, b"q8", ["q8"]])
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(CodecSpecError, match="non-empty string"):
        parse_spec(value)  # type: ignore[arg-type]


def test_codec_spec_error_is_a_value_error_and_an_hfl_error() -> None:
    with pytest.raises(ValueError, match="unknown token") as info:
        parse_spec("nonsense")
    assert isinstance(info.value, HflError)
    assert not isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    "fields",
    [
        {"values": "quant"},  # quant without bits
        {"values": "fp16", "bits": 8},  # bits without quant
        {"topk_fraction": 0.1, "topk_count": 3},
        {"values": "quant", "bits": 3},
        {"block_size": 0},
        {"seed": -1},
        {"unknown": 1},
    ],
)
def test_inconsistent_fields_are_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        CodecSpec(**fields)  # type: ignore[arg-type]


@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_codec_spec_error(text: str) -> None:
    try:
        spec = parse_spec(text)
    except CodecSpecError:
        return
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "fields",
    [{"values": "fp16", "block_size": 7}, {"zstd_level": 5}, {"values": "npy", "block_size": 64}],
)
def test_settings_that_would_do_nothing_are_refused(fields: dict[str, object]) -> None:
    # str() could not carry them, so parse_spec(str(spec)) would differ from spec.
    with pytest.raises(ValueError, match="applies only"):
        CodecSpec.model_validate(fields)
