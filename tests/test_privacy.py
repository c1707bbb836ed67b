"""Differential privacy: clipping and noise, adaptive clipping, the accountant, the settings."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from hfl_mqtt.accounting import PrivacyAccountant, noise_for_epsilon, require_accounting
from hfl_mqtt.aggregation.base import Update
from hfl_mqtt.aggregation.privacy import CentralPrivacy, LocalPrivacy, PrivateMean, privatize
from hfl_mqtt.aggregation.robust import l2_norm
from hfl_mqtt.config import FederationConfig, NodeConfig
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.sim import simulate
from tests.fakes import needs_mosquitto


def update(sender: str, values: np.ndarray, examples: int = 10) -> Update:
    return Update(sender, 0, {"w": values.astype(np.float32)}, examples, f"id-{sender}")


def test_without_noise_the_private_mean_is_the_equal_weight_mean_of_clipped_deltas() -> None:
    strategy = PrivateMean(CentralPrivacy(clip_norm=1.0, noise_multiplier=0.0), children=3)
    model = {"w": np.zeros(2, np.float32)}
    result = strategy.aggregate(
        model,
        [
            update("a", np.array([0.5, 0.0])),  # inside the bound
            update("b", np.array([0.0, 10.0]), examples=10**6),  # clipped; examples ignored
            update("c", np.array([-0.3, 0.0])),
        ],
    )
    np.testing.assert_allclose(result["w"], [0.2 / 3, 1.0 / 3], rtol=1e-6)
    assert strategy.rounds == 1


def test_the_noise_has_standard_deviation_z_c_over_the_children() -> None:
    z, c, m = 2.0, 0.5, 4
    strategy = PrivateMean(CentralPrivacy(clip_norm=c, noise_multiplier=z, seed=3), children=m)
    model = {"w": np.zeros(200_000, np.float32)}
    zeros = [update(str(i), np.zeros(200_000)) for i in range(m)]
    noise = strategy.aggregate(model, zeros)["w"]
    assert np.std(noise) == pytest.approx(z * c / m, rel=0.01)
    assert abs(np.mean(noise)) < 0.01 * z * c / m


def test_local_privacy_clips_then_noises() -> None:
    settings = LocalPrivacy(clip_norm=1.0, noise_multiplier=0.0)
    delta = {"w": np.full(100, 3.0, np.float32)}
    assert l2_norm(privatize(delta, settings, np.random.default_rng(0))) == pytest.approx(1.0)
    noisy = LocalPrivacy(clip_norm=1.0, noise_multiplier=3.0)
    out = privatize({"w": np.zeros(100_000, np.float32)}, noisy, np.random.default_rng(0))
    assert out["w"].dtype == np.float32
    assert np.std(out["w"]) == pytest.approx(3.0, rel=0.02)


def test_adaptive_clipping_moves_the_bound_to_the_target_quantile() -> None:
    norms = np.linspace(1.0, 9.0, 9)  # median 5
    strategy = PrivateMean(
        CentralPrivacy(clip_norm=0.1, noise_multiplier=0.0, target_quantile=0.5, clip_lr=0.3),
        children=9,
    )
    model = {"w": np.zeros(1, np.float32)}
    for _ in range(200):
        strategy.aggregate(model, [update(str(i), np.array([n])) for i, n in enumerate(norms)])
    assert 4.0 <= strategy.clip_norm <= 6.0


def test_adaptive_clipping_shares_the_budget_with_the_count() -> None:
    settings = CentralPrivacy(clip_norm=1, noise_multiplier=1.0, target_quantile=0.5)
    strategy = PrivateMean(settings, children=100)  # count noise: max(100 / 20, 1) = 5
    assert strategy.count_noise == 5
    assert strategy.sum_noise_multiplier == pytest.approx((1 - 0.1**2) ** -0.5)
    assert strategy.sum_noise_multiplier > 1.0
    with pytest.raises(ValueError, match=r"count_noise 0\.4 must exceed"):
        PrivateMean(settings.model_copy(update={"count_noise": 0.4}), children=8)


def test_a_checkpointed_strategy_draws_the_same_noise_again() -> None:
    settings = CentralPrivacy(clip_norm=1, noise_multiplier=1, target_quantile=0.5, seed=7)
    model = {"w": np.zeros(5, np.float32)}
    rounds = [update(str(i), np.full(5, i / 3)) for i in range(4)]
    first = PrivateMean(settings, children=4)
    first.aggregate(model, rounds)
    values, models = first.state()
    again = PrivateMean(settings.model_copy(update={"seed": 99}), children=4)
    again.load(values, models)
    np.testing.assert_array_equal(
        first.aggregate(model, rounds)["w"], again.aggregate(model, rounds)["w"]
    )
    assert again.rounds == 2
    assert again.clip_norm == first.clip_norm


def test_epsilon_grows_with_releases_and_noise_for_epsilon_inverts_it() -> None:
    accountant = PrivacyAccountant("central", 1.1, 1e-5)
    assert accountant.epsilon == 0
    one = accountant.spend()
    hundred = accountant.spend(99)
    assert 0 < one < hundred
    assert accountant.releases == 100
    z = noise_for_epsilon(3.0, 1e-5, 40)
    assert PrivacyAccountant("central", z, 1e-5).spend(40) == pytest.approx(3.0, rel=1e-3)
    # A local release may differ by 2C: twice the noise for the same epsilon.
    assert noise_for_epsilon(3.0, 1e-5, 40, kind="local") == pytest.approx(2 * z, rel=1e-3)
    unbounded = PrivacyAccountant("local", 0.0, 1e-5)
    assert math.isinf(unbounded.spend())
    assert unbounded.to_dict()["epsilon"] is None


def test_a_missing_accounting_library_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ConfigError, match=r"pip install 'hfl-mqtt\[privacy\]'"):
        require_accounting()


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="clip_norm"):
        CentralPrivacy(clip_norm=0, noise_multiplier=1)
    with pytest.raises(ValidationError, match="privacy works with mode: sync only"):
        FederationConfig.model_validate(
            {
                "levels": [
                    {
                        "name": "c",
                        "mode": "fedasync",
                        "privacy": {"clip_norm": 1, "noise_multiplier": 1},
                    },
                    {"name": "w"},
                ],
                "fanout": [2],
            }
        )
    with pytest.raises(ValidationError, match=r"levels\.1\.privacy: count_noise 0\.4 must exceed"):
        FederationConfig.model_validate(
            {
                "levels": [
                    {"name": "c"},
                    {
                        "name": "e",
                        "privacy": {
                            "clip_norm": 1,
                            "noise_multiplier": 1,
                            "target_quantile": 0.5,
                            "count_noise": 0.4,
                        },
                    },
                    {"name": "w"},
                ],
                "fanout": [2, 2],
            }
        )
    with pytest.raises(ValidationError, match=r"levels\.0\.local_privacy: local privacy applies"):
        FederationConfig.model_validate(
            {
                "levels": [
                    {"name": "c", "local_privacy": {"clip_norm": 1, "noise_multiplier": 1}},
                    {"name": "w"},
                ],
                "fanout": [2],
            }
        )
    with pytest.raises(ValidationError, match="local_privacy applies to workers only"):
        NodeConfig.model_validate(
            {
                "federation": "f",
                "node": "e",
                "upstream": {
                    "parent": "c",
                    "local_privacy": {"clip_norm": 1, "noise_multiplier": 1},
                },
                "downstream": {"children": ["w"]},
            }
        )


def test_the_workers_level_gives_every_worker_its_local_privacy() -> None:
    config = FederationConfig.model_validate(
        {
            "levels": [
                {"name": "c", "privacy": {"clip_norm": 1, "noise_multiplier": 0.5}},
                {"name": "w", "local_privacy": {"clip_norm": 2, "noise_multiplier": 1}},
            ],
            "fanout": [2],
        }
    )
    nodes = {n.node: n for n in config.node_configs({})}
    assert nodes["c"].downstream is not None
    assert nodes["c"].downstream.privacy == CentralPrivacy(clip_norm=1, noise_multiplier=0.5)
    upstream = nodes["w-0"].upstream
    assert upstream is not None
    assert upstream.local_privacy == LocalPrivacy(clip_norm=2, noise_multiplier=1)


@needs_mosquitto
@pytest.mark.anyio
async def test_a_federation_with_central_and_local_privacy_reports_epsilon(tmp_path: Path) -> None:
    """Real Mosquitto: edges noise their children's deltas, workers noise their own; every
    node's report, metrics record and the summary give the epsilon spent."""
    config = FederationConfig.model_validate(
        {
            "federation": "dp",
            "levels": [
                {"name": "cloud", "rounds": 3},
                {
                    "name": "edge",
                    "rounds": 2,
                    "privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5, "target_quantile": 0.5},
                },
                {
                    "name": "worker",
                    "uplink_codec": "q8",
                    "local_privacy": {"clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-6},
                },
            ],
            "fanout": [2, 3],
            "task": {"dataset": "digits", "model": "softmax", "partition": {"scheme": "iid"}},
        }
    )
    summary = await asyncio.wait_for(simulate(config, tmp_path / "out", processes=1), 60)
    edge_releases = 3 * 2
    central = PrivacyAccountant("central", 0.5, 1e-5).spend(edge_releases)
    local = PrivacyAccountant("local", 0.1, 1e-6).spend(3)
    assert summary["privacy"]["edge"] == {
        "kind": "central",
        "epsilon": round(central, 4),
        "delta": 1e-5,
        "releases": edge_releases,
        "noise_multiplier": 0.5,
        "nodes": 2,
    }
    assert summary["privacy"]["worker"]["kind"] == "local"
    assert summary["privacy"]["worker"]["nodes"] == 6
    assert summary["privacy"]["worker"]["epsilon"] >= round(local, 4)
    edges = [n for n in summary["nodes"] if n["role"] == "aggregator"]
    assert all(n["privacy"]["clip_norm"] > 0 for n in edges)
    assert summary["final_accuracy"] is not None
    records = [
        json.loads(line)["payload"]
        for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
        if "/metrics" in json.loads(line).get("topic", "")
    ]
    assert any((r.get("privacy") or {}).get("kind") == "central" for r in records)
    assert any((r.get("privacy") or {}).get("kind") == "local" for r in records)
