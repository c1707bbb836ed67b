"""Federation and node configs: the examples, the tree, per-node configs, and clear errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from hfl_mqtt.config import (
    BrokerAddress,
    DownstreamConfig,
    FederationConfig,
    LevelConfig,
    NodeConfig,
    UpstreamConfig,
    load_federation,
    load_node,
)
from hfl_mqtt.errors import ConfigError, HflError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


EXAMPLES = [
    # name, levels, fanout, workers, each aggregator level's mode (root first)
    ("two_level.yaml", ["cloud", "worker"], [32], 32, ["sync"]),
    ("three_level.yaml", ["cloud", "edge", "worker"], [4, 8], 32, ["sync", "sync"]),
    (
        "four_level.yaml",
        ["cloud", "region", "edge", "worker"],
        [2, 2, 8],
        32,
        ["sync", "sync", "sync"],
    ),
    ("async_edges_fedbuff.yaml", ["cloud", "edge", "worker"], [4, 8], 32, ["sync", "fedbuff"]),
    ("async_edges_fedasync.yaml", ["cloud", "edge", "worker"], [4, 8], 32, ["sync", "fedasync"]),
    ("async_everywhere.yaml", ["cloud", "edge", "worker"], [4, 8], 32, ["fedbuff", "fedbuff"]),
    ("fleet.yaml", ["cloud", "edge", "worker"], [2, 4], 8, ["sync", "sync"]),
]


def test_every_shipped_config_is_an_example_here() -> None:
    assert sorted(path.name for path in CONFIGS.glob("*.y*ml")) == sorted(e[0] for e in EXAMPLES)


@pytest.mark.parametrize(("name", "levels", "fanout", "workers", "modes"), EXAMPLES)
def test_example_configs_load(
    name: str, levels: list[str], fanout: list[int], workers: int, modes: list[str]
) -> None:
    config = load_federation(CONFIGS / name)
    assert [level.name for level in config.levels] == levels
    assert config.fanout == fanout
    assert config.num_workers == workers
    assert [level.mode for level in config.levels[:-1]] == modes
    nodes = config.node_configs({})
    assert len(nodes) == len(config.tree()) + workers
    assert sum(n.role == "root" for n in nodes) == 1
    leaves = [n for n in nodes if n.role == "worker"]
    if config.heterogeneity is None:
        assert all(n.device is None for n in leaves)
    else:
        assert all(n.device is not None for n in leaves)
        slow = [n for n in leaves if n.device is not None and n.device.slowdown > 1]
        assert len(slow) == round(config.heterogeneity.stragglers * workers)


@pytest.mark.parametrize("name", [e[0] for e in EXAMPLES])
def test_example_configs_say_how_to_run_them(name: str) -> None:
    """Each example opens with comments that end in the command that runs it."""
    lines = (CONFIGS / name).read_text().splitlines()
    header = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
    assert len(header) >= 2, "a header comment saying what the example shows"
    assert header[-1] == f"# hfl-mqtt sim configs/{name} --out out/{name.removesuffix('.yaml')}"


def federation(fanout: list[int], **extra: object) -> FederationConfig:
    """Levels named after the usual tiers; each level's codecs tell the levels apart."""
    names = ["cloud", "region", "edge", "worker"][-(len(fanout) + 1) :]
    names[0] = "cloud"
    levels = [
        LevelConfig(
            name=name,
            rounds=depth + 1,
            deadline_s=10.0 + depth,
            uplink_codec=f"q{2 ** (depth + 1)}",
            downlink_codec="fp16" if depth % 2 else "npy",
        )
        for depth, name in enumerate(names)
    ]
    return FederationConfig(federation="t", levels=levels, fanout=fanout, **extra)  # type: ignore[arg-type]


def workers(first: int, count: int) -> list[str]:
    return [f"worker-{i}" for i in range(first, first + count)]


@pytest.mark.parametrize(
    ("fanout", "tree"),
    [
        ([32], {"cloud": workers(0, 32)}),
        (
            [4, 8],
            {
                "cloud": ["edge-0", "edge-1", "edge-2", "edge-3"],
                **{f"edge-{i}": workers(8 * i, 8) for i in range(4)},
            },
        ),
        (
            [2, 2, 8],
            {
                "cloud": ["region-0", "region-1"],
                "region-0": ["edge-0", "edge-1"],
                "region-1": ["edge-2", "edge-3"],
                **{f"edge-{i}": workers(8 * i, 8) for i in range(4)},
            },
        ),
    ],
)
def test_tree(fanout: list[int], tree: dict[str, list[str]]) -> None:
    assert federation(fanout).tree() == tree


@pytest.mark.parametrize("fanout", [[32], [4, 8], [2, 2, 8]])
def test_node_configs(fanout: list[int]) -> None:
    config = federation(fanout)
    tree = config.tree()
    parents = {kid: parent for parent, kids in tree.items() for kid in kids}
    nodes = config.node_configs({})
    by_name = {n.node: n for n in nodes}
    assert len(by_name) == len(nodes) == 1 + sum(len(kids) for kids in tree.values())
    assert nodes[0].node == "cloud"
    assert nodes[0].role == "root"
    for node in nodes:
        assert node.federation == "t"
        level = config.levels[node.level]
        assert node.node == "cloud" or node.node.startswith(f"{level.name}-")
        if node.upstream is not None:
            assert node.upstream.parent == parents[node.node]
            assert by_name[node.upstream.parent].level == node.level - 1
            assert node.upstream.codec == level.uplink_codec
        else:
            assert node.node == "cloud"
        if node.downstream is not None:
            assert node.downstream.children == tree[node.node]
            assert node.downstream.codec == level.downlink_codec
            assert node.downstream.rounds == level.rounds
            assert node.downstream.deadline_s == level.deadline_s
            assert node.partition is None
        else:
            assert node.role == "worker"
            assert node.level == len(fanout)
    leaves = [n for n in nodes if n.role == "worker"]
    assert [n.partition for n in leaves] == list(range(config.num_workers))
    assert [n.node for n in leaves] == workers(0, config.num_workers)
    assert {n.num_partitions for n in nodes} == {config.num_workers}
    roles = {n.role for n in nodes}
    assert roles == ({"root", "worker"} if len(fanout) == 1 else {"root", "aggregator", "worker"})


CLOUD = BrokerAddress(host="cloud", port=1883)
SITE0 = BrokerAddress(host="site0", port=1884)
SITE1 = BrokerAddress(host="site1", port=1885)


@pytest.mark.parametrize(
    ("mode", "node", "up", "down"),
    [
        ("per_edge", "cloud", None, CLOUD),
        ("per_edge", "region-0", CLOUD, CLOUD),
        ("per_edge", "edge-0", SITE0, SITE0),  # an edge reaches its parent via its bridge
        ("per_edge", "edge-1", SITE1, SITE1),
        ("per_edge", "edge-2", CLOUD, CLOUD),  # no broker of its own: the root's
        ("per_edge", "worker-0", SITE0, None),
        ("per_edge", "worker-15", SITE1, None),
        ("per_edge", "worker-16", CLOUD, None),
        ("single", "edge-0", CLOUD, CLOUD),
        ("single", "worker-0", CLOUD, None),
    ],
)
def test_broker_mapping(
    mode: str, node: str, up: BrokerAddress | None, down: BrokerAddress | None
) -> None:
    config = federation([2, 2, 8], brokers=mode)
    nodes = {
        n.node: n for n in config.node_configs({"cloud": CLOUD, "edge-0": SITE0, "edge-1": SITE1})
    }
    upstream, downstream = nodes[node].upstream, nodes[node].downstream
    assert (upstream.broker if upstream else None) == up
    assert (downstream.broker if downstream else None) == down


def test_brokers_default_to_localhost() -> None:
    nodes = federation([2]).node_configs({})
    assert {n.upstream.broker for n in nodes if n.upstream} == {BrokerAddress()}


@pytest.mark.parametrize(
    ("min_fraction", "min_children", "children", "expected"),
    [
        (0.5, None, 32, 16),
        (0.5, None, 3, 2),
        (0.5, None, 1, 1),
        (0.75, None, 4, 3),
        (0.3, None, 10, 3),  # 0.3 * 10 is 3.0000000000000004 in floats: still 3
        (0.1, None, 3, 1),
        (0.01, None, 2, 1),  # never 0
        (1.0, None, 8, 8),
        (0.5, 5, 8, 5),  # min_children overrides min_fraction
        (0.5, 5, 3, 3),  # but never more than there are children
        (1.0, 1, 8, 1),
    ],
)
def test_min_count(
    min_fraction: float, min_children: int | None, children: int, expected: int
) -> None:
    config = DownstreamConfig(children=["a"], min_fraction=min_fraction, min_children=min_children)
    assert config.min_count(children) == expected


GOOD = """\
federation: lab
levels:
  - {name: cloud, rounds: 3}
  - {name: edge, rounds: 2, uplink_codec: q8}
  - {name: worker, uplink_codec: q4}
fanout: [2, 3]
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("levels: [", "not valid YAML"),
        ("", "(top level): Input should be a valid dictionary"),
        ("- a\n- b\n", "(top level): Input should be a valid dictionary"),
        (GOOD.replace("rounds: 2", "rounds: 0"), "levels.1.rounds: Input should be greater"),
        (GOOD.replace("rounds: 3", "rounds: many"), "levels.0.rounds: Input should be"),
        (GOOD.replace("uplink_codec: q8", "uplink_codec: q3"), "levels.1.uplink_codec:"),
        (GOOD.replace("uplink_codec: q4", "uplink_codec: zip"), "levels.2.uplink_codec:"),
        (GOOD.replace("rounds: 3}", "rounds: 3, downlink_codec: ''}"), "levels.0.downlink_codec"),
        (GOOD.replace("rounds: 3}", "rounds: 3, colour: red}"), "levels.0.colour: Extra inputs"),
        (GOOD.replace("rounds: 3}", "rounds: 3, min_fraction: 0}"), "levels.0.min_fraction"),
        (GOOD.replace("rounds: 3}", "rounds: 3, min_fraction: 1.5}"), "levels.0.min_fraction"),
        (GOOD.replace("rounds: 3}", "rounds: 3, deadline_s: -1}"), "levels.0.deadline_s"),
        (GOOD.replace("rounds: 3}", "rounds: 3, server_lr: .inf}"), "levels.0.server_lr"),
        (GOOD.replace("rounds: 3}", "rounds: 3, server_lr: .nan}"), "levels.0.server_lr"),
        (GOOD.replace("[2, 3]", "[2, 0]"), "fanout.1: Input should be greater"),
        (GOOD.replace("[2, 3]", "[2]"), "(top level): Value error, fanout has 1 entries"),
        (GOOD.replace("name: edge", "name: cloud"), "level names must be unique"),
        (GOOD.replace("name: edge", "name: 'a/b'"), "levels.1.name: String should match"),
        (GOOD.replace("federation: lab", "federation: 'l b'"), "federation: String should match"),
        (GOOD.replace("federation: lab", "brokers: many"), "brokers: Input should be"),
        (GOOD + "task: {dataset: mnist}\n", "task.dataset: Input should be"),
        (GOOD + "task: {partition: {scheme: x}}\n", "task.partition.scheme: Input should be"),
        (GOOD + "chunk_size: 10\n", "chunk_size: Input should be greater"),
        (GOOD.replace("levels:\n", "levels: 7\nx:\n"), "levels: Input should be a valid list"),
    ],
)
def test_federation_errors_name_the_file_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_federation(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, HflError)


def test_good_federation_text_loads(tmp_path: Path) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(GOOD)
    config = load_federation(path)
    assert config.tree() == {
        "cloud": ["edge-0", "edge-1"],
        "edge-0": ["worker-0", "worker-1", "worker-2"],
        "edge-1": ["worker-3", "worker-4", "worker-5"],
    }


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"^{path}: cannot read"):
        load_federation(path)
    with pytest.raises(ConfigError, match=f"^{path}: cannot read"):
        load_node(path)


WORKER = {
    "federation": "lab",
    "node": "worker-0",
    "upstream": {"parent": "edge-0", "codec": "q4"},
    "partition": 0,
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"upstream": {"parent": "edge-0", "codec": "q3"}}, "upstream.codec: Value error"),
        ({"upstream": {"parent": "e/0"}}, "upstream.parent: String should match"),
        ({"upstream": {"parent": "e", "broker": {"port": 0}}}, "upstream.broker.port"),
        ({"downstream": {"children": []}}, "downstream.children: List should have at least 1"),
        ({"downstream": {"children": ["a"], "codec": "q5"}}, "downstream.codec: Value error"),
        ({"partition": None}, "(top level): Value error, a worker (no downstream) needs"),
        ({"upstream": None}, "(top level): Value error, a node needs an upstream link"),
        ({"partition": -1}, "partition: Input should be greater"),
        ({"role": "worker"}, "role: Extra inputs are not permitted"),
    ],
)
def test_node_errors_name_the_file_and_field(
    tmp_path: Path, change: dict[str, object], expected: str
) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({**WORKER, **change}))
    with pytest.raises(ConfigError) as caught:
        load_node(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (UpstreamConfig, "codec"),
        (DownstreamConfig, "codec"),
        (LevelConfig, "uplink_codec"),
        (LevelConfig, "downlink_codec"),
    ],
)
@pytest.mark.parametrize("codec", ["q3", "q8+q4", "topk2.5", "fp16+bf16", "gzip", "q4b0", ""])
def test_bad_codec_strings_rejected(model: type[BaseModel], field: str, codec: str) -> None:
    required = {"parent": "p", "children": ["a"], "name": "n"}
    kwargs = {k: v for k, v in required.items() if k in model.model_fields}
    with pytest.raises(ValueError, match=field):
        model.model_validate({**kwargs, field: codec})


@pytest.mark.parametrize("codec", ["npy", "fp16", "bf16", "q4", "q8+zstd", "topk0.01+q8", "q2b64"])
def test_good_codec_strings_accepted(codec: str) -> None:
    assert LevelConfig(name="n", uplink_codec=codec, downlink_codec=codec).uplink_codec == codec


@pytest.mark.parametrize("name", [e[0] for e in EXAMPLES])
def test_node_file_round_trip(tmp_path: Path, name: str) -> None:
    config = load_federation(CONFIGS / name)
    brokers = {"cloud": CLOUD, "edge-0": SITE0}
    for node in config.node_configs(brokers):
        path = tmp_path / f"{node.node}.yaml"
        path.write_text(yaml.safe_dump(node.model_dump()))
        loaded = load_node(path)
        assert loaded == node
        assert loaded.role == node.role


def test_node_config_is_frozen() -> None:
    node = NodeConfig.model_validate(WORKER)
    with pytest.raises(ValueError, match="frozen"):
        node.partition = 3


@pytest.mark.parametrize("setting", [{"publish_every_steps": 2}, {"publish_on_rebase": False}])
def test_publishing_settings_are_for_asynchronous_levels(setting: dict[str, object]) -> None:
    LevelConfig.model_validate({"name": "edge", "mode": "fedbuff", **setting})
    with pytest.raises(ValueError, match="apply to mode: fedasync or fedbuff"):
        LevelConfig.model_validate({"name": "edge", **setting})
