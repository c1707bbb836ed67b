"""The topic scheme: builders, and ``parse_topic`` on good topics and junk."""

from __future__ import annotations

import pytest
from paho.mqtt.client import topic_matches_sub

from hfl_mqtt.topics import (
    ParsedTopic,
    check_id,
    chunk_topic,
    ctl_topic,
    metrics_filter,
    metrics_topic,
    model_topic,
    parse_topic,
    status_topic,
    up_filter,
    up_topic,
)


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (model_topic("lab", "cloud"), "hfl/lab/cloud/model"),
        (up_topic("lab", "edge-0", "worker-3"), "hfl/lab/edge-0/up/worker-3"),
        (up_filter("lab", "edge-0"), "hfl/lab/edge-0/up/+"),
        (status_topic("lab", "worker-3"), "hfl/lab/worker-3/status"),
        (ctl_topic("lab", "edge-0"), "hfl/lab/edge-0/ctl"),
        (metrics_topic("lab", "worker-3"), "hfl/lab/worker-3/metrics"),
        (metrics_filter("lab"), "hfl/lab/+/metrics"),
        (chunk_topic("hfl/lab/cloud/model", 0), "hfl/lab/cloud/model/chunk/0"),
        (chunk_topic("hfl/lab/cloud/model", 12), "hfl/lab/cloud/model/chunk/12"),
    ],
)
def test_builders(built: str, expected: str) -> None:
    assert built == expected


def test_up_filter_matches_exactly_the_children_topics() -> None:
    pattern = up_filter("lab", "edge-0")
    assert topic_matches_sub(pattern, up_topic("lab", "edge-0", "worker-3"))
    assert not topic_matches_sub(pattern, up_topic("lab", "edge-1", "worker-3"))
    assert not topic_matches_sub(pattern, up_topic("other", "edge-0", "worker-3"))
    assert not topic_matches_sub(pattern, model_topic("lab", "edge-0"))


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("hfl/lab/cloud/model", ParsedTopic("lab", "cloud", "model")),
        ("hfl/lab/cloud/model/chunk/0", ParsedTopic("lab", "cloud", "model")),
        ("hfl/lab/cloud/model/chunk/41", ParsedTopic("lab", "cloud", "model")),
        ("hfl/lab/edge-0/up/worker-3", ParsedTopic("lab", "edge-0", "up", "worker-3")),
        ("hfl/lab/w.1_x/status", ParsedTopic("lab", "w.1_x", "status")),
        ("hfl/lab/edge-0/ctl", ParsedTopic("lab", "edge-0", "ctl")),
        ("hfl/lab/edge-0/metrics", ParsedTopic("lab", "edge-0", "metrics")),
        ("hfl/lab/edge-0/metrics/x", None),
        # junk (parse_topic splits levels; it does not validate ids: receivers compare them
        # with the ids they know)
        ("", None),
        ("hfl", None),
        ("hfl/lab/cloud", None),
        ("mqtt/lab/cloud/model", None),
        ("HFL/lab/cloud/model", None),
        ("/hfl/lab/cloud/model", None),
        ("hfl/lab/cloud/weights", None),
        ("hfl/lab/cloud/model/", None),
        ("hfl/lab/cloud/model/chunk", None),
        ("hfl/lab/cloud/model/chunk/1/2", None),
        ("hfl/lab/cloud/model/piece/1", None),
        ("hfl/lab/edge-0/up", None),
        ("hfl/lab/edge-0/up/a/b", None),
        ("hfl/lab/edge-0/status/x", None),
        ("hfl/lab/edge-0/ctl/x", None),
    ],
)
def test_parse_topic(topic: str, expected: ParsedTopic | None) -> None:
    assert parse_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        model_topic("f", "n"),
        chunk_topic(model_topic("f", "n"), 3),
        up_topic("f", "n", "c"),
        status_topic("f", "n"),
        ctl_topic("f", "n"),
    ],
)
def test_builders_and_parse_agree(topic: str) -> None:
    parsed = parse_topic(topic)
    assert parsed is not None
    assert (parsed.federation, parsed.node) == ("f", "n")


@pytest.mark.parametrize("good", ["a", "edge-0", "w.1_x", "A" * 128])
def test_check_id_accepts(good: str) -> None:
    assert check_id(good) == good


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "A" * 129, "é", "a\n"])
def test_check_id_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="node"):
        check_id(bad, "node")
