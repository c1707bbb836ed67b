"""The model registry (kept versions, cards, atomic files, reopening), load_model, and export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hfl_mqtt.cli import main
from hfl_mqtt.errors import EncodeError, HflError, ModelFileError
from hfl_mqtt.export import encode, export
from hfl_mqtt.files import atomic_write
from hfl_mqtt.flower.codec import read_array_record
from hfl_mqtt.registry import ModelCard, ModelRegistry, load_model
from hfl_mqtt.tasks.numpy_models import init_params

LAYERS = [64, 16, 10]


def model(seed: int = 0) -> dict[str, np.ndarray]:
    return dict(init_params(LAYERS, seed))


def record(registry: ModelRegistry, version: int, accuracy: float) -> ModelCard:
    return registry.record(
        version, model(version), accuracy=accuracy, loss=1 - accuracy, round=version, seconds=2.5
    )


def version_of(card: ModelCard | None) -> int | None:
    return None if card is None else card.version


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_card_says_what_the_model_is(tmp_path: Path) -> None:
    registry = ModelRegistry(
        tmp_path, config_hash="abc123", codecs={"uplink": "q8", "downlink": "fp16"}
    )
    card = registry.record(3, model(), accuracy=0.91, loss=0.3, round=7, seconds=12.5)
    raw = json.loads((tmp_path / "v3.json").read_text())
    assert raw["format"] == 1
    assert raw["version"] == 3
    assert raw["round"] == 7
    assert (raw["accuracy"], raw["loss"], raw["seconds"]) == (0.91, 0.3, 12.5)
    assert raw["time"].endswith("Z")
    assert raw["config_hash"] == "abc123"
    assert raw["codecs"] == {"uplink": "q8", "downlink": "fp16"}
    assert raw["file"] == "v3.safetensors"
    assert raw["tensors"][0] == {"name": "fc1.weight", "shape": [16, 64], "dtype": "float32"}
    assert [t["name"] for t in raw["tensors"]] == list(model())
    assert ModelCard.from_json(raw, "v3.json") == card
    assert files(tmp_path) == ["v3.json", "v3.safetensors"]


def test_keeps_the_last_k_and_the_best_newer_on_a_tie(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep_last=2)
    for version, accuracy in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.8)]:
        record(registry, version, accuracy)
    assert [c.version for c in registry.cards()] == [2, 4, 5]
    assert files(tmp_path) == [f"v{v}.{ext}" for v in (2, 4, 5) for ext in ("json", "safetensors")]
    assert version_of(registry.best()) == 2
    record(registry, 6, 0.9)  # as good as v2, and newer
    assert [c.version for c in registry.cards()] == [5, 6]
    assert version_of(registry.best()) == 6
    assert version_of(registry.latest()) == 6
    assert len(list(tmp_path.iterdir())) == 4


def test_a_non_finite_accuracy_is_never_the_best(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep_last=1)
    record(registry, 1, 0.2)
    record(registry, 2, math.nan)
    assert [c.version for c in registry.cards()] == [1, 2]
    card = load_model(tmp_path, latest=True)[1]
    assert math.isnan(card.accuracy)
    assert json.loads((tmp_path / "v2.json").read_text())["accuracy"] is None


def test_a_reopened_registry_goes_on_with_its_cards(tmp_path: Path) -> None:
    first = ModelRegistry(tmp_path, keep_last=2)
    for version, accuracy in [(1, 0.9), (2, 0.5), (3, 0.6)]:
        record(first, version, accuracy)
    again = ModelRegistry(tmp_path, keep_last=2)
    assert again.cards() == first.cards()
    record(again, 4, 0.7)
    assert [c.version for c in again.cards()] == [1, 3, 4]
    assert version_of(again.best()) == 1


def test_a_version_recorded_again_replaces_it_and_the_newer_ones(tmp_path: Path) -> None:
    """A root resumed from an earlier checkpoint produces versions it had already recorded."""
    registry = ModelRegistry(tmp_path)
    for version in (1, 2, 3):
        record(registry, version, 0.5)
    resumed = ModelRegistry(tmp_path)
    card = resumed.record(2, model(9), accuracy=0.6, loss=0.4, round=2, seconds=1.0)
    assert [c.version for c in resumed.cards()] == [1, 2]
    assert not (tmp_path / "v3.json").exists()
    loaded, loaded_card = load_model(tmp_path / "v2.json")
    assert loaded_card == card
    np.testing.assert_array_equal(loaded["fc1.weight"], model(9)["fc1.weight"])


def test_writes_leave_no_temporary_files_and_a_crash_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path)
    for version in range(1, 4):
        record(registry, version, 0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    target = tmp_path / "file.bin"
    atomic_write(target, b"old")

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_opening_removes_what_a_crash_left(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    record(registry, 1, 0.5)
    (tmp_path / ".v2.safetensors.x1y2.tmp").write_bytes(b"half")
    (tmp_path / "v2.safetensors").write_bytes(b"a model whose card was never written")
    (tmp_path / "notes.txt").write_text("not ours")
    ModelRegistry(tmp_path)
    assert files(tmp_path) == ["notes.txt", "v1.json", "v1.safetensors"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"format": 9}', "format is 9"),
        ("\udcff", "not UTF-8"),
    ],
)
def test_a_corrupt_card_is_reported_naming_it(tmp_path: Path, content: str, message: str) -> None:
    registry = ModelRegistry(tmp_path)
    record(registry, 1, 0.5)
    (tmp_path / "v2.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ModelFileError, match=message) as opening:
        ModelRegistry(tmp_path)
    assert "v2.json" in str(opening.value)
    with pytest.raises(ModelFileError, match=r"v2\.json"):
        load_model(tmp_path)


def test_a_card_with_a_bad_field_or_name_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    record(registry, 1, 0.5)
    raw = json.loads((tmp_path / "v1.json").read_text())
    for bad, message in [
        ({**raw, "version": "1"}, "version must be an integer"),
        ({**raw, "extra": 1}, "unknown \\['extra'\\]"),
        ({**raw, "file": "../v1.safetensors"}, "file must be a file name"),
        ({**raw, "tensors": [{"name": "a", "shape": [-1], "dtype": "f4"}]}, "shape"),
        ({**raw, "version": 4}, "must keep its own name"),
    ]:
        (tmp_path / "v1.json").write_text(json.dumps(bad))
        with pytest.raises(ModelFileError, match=message):
            load_model(tmp_path / "v1.json")


def test_a_tampered_or_truncated_tensor_file_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    record(registry, 1, 0.5)
    path = tmp_path / "v1.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelFileError, match="sha256"):
        load_model(tmp_path)
    copy = tmp_path / "elsewhere" / "model.safetensors"
    copy.parent.mkdir()
    for broken in (b"", b"\xff" * 8 + b"{}", data[:-4]):
        copy.write_bytes(broken)
        with pytest.raises(ModelFileError, match=r"model\.safetensors"):
            load_model(copy)
    path.unlink()
    with pytest.raises(ModelFileError, match="cannot read the model file"):
        load_model(tmp_path / "v1.json")


def test_load_model_by_file_card_or_directory(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep_last=3)
    for version, accuracy in [(1, 0.8), (2, 0.6), (3, 0.7)]:
        record(registry, version, accuracy)
    for path in (tmp_path / "v2.safetensors", tmp_path / "v2.json"):
        loaded, card = load_model(path)
        assert card.version == 2
        assert list(loaded) == list(model(2))
        for name, array in model(2).items():
            np.testing.assert_array_equal(loaded[name], array)
    assert load_model(tmp_path)[1].version == 1  # the best
    assert load_model(tmp_path, latest=True)[1].version == 3
    assert load_model(tmp_path, version=2)[1].version == 2
    with pytest.raises(ModelFileError, match=r"no version 7 \(it keeps 1, 2, 3\)"):
        load_model(tmp_path, version=7)
    with pytest.raises(ModelFileError, match="not a registry directory"):
        load_model(tmp_path / "v1.json", latest=True)
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelFileError, match="is not a model"):
        load_model(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="holds no model"):
        load_model(empty)


def test_a_tensor_file_alone_carries_its_card(tmp_path: Path) -> None:
    """Names, order, dtypes and the card survive a copy of the .safetensors alone."""
    weights = {
        "z.last_first": np.arange(6, dtype=np.float16).reshape(2, 3),
        "a.count": np.array([3, -1], dtype=np.int64),
        "m.mask": np.array([True, False]),
        "b.scalar": np.float64(2.5) * np.ones(()),
        "big_endian": np.arange(3, dtype=">f4"),
    }
    registry = ModelRegistry(tmp_path / "models", config_hash="h", codecs={"up": "q8"})
    card = registry.record(5, weights, accuracy=0.5, loss=1.5, round=4, seconds=3.0)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((tmp_path / "models" / "v5.safetensors").read_bytes())
    loaded, bare = load_model(copy)
    assert bare == dataclasses.replace(card, file="copy.safetensors")
    assert list(loaded) == list(weights)
    for name, array in weights.items():
        assert loaded[name].dtype == array.dtype.newbyteorder("=")
        np.testing.assert_array_equal(loaded[name], array)
    assert loaded["z.last_first"].flags.writeable


def test_a_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(path))
    with pytest.raises(ModelFileError, match="no hfl-mqtt model card"):
        load_model(path)


def test_unstorable_tensors_and_bad_arguments(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(EncodeError, match="'s'"):
        registry.record(1, {"s": np.array(["x"])}, accuracy=0, loss=0, round=0, seconds=0)
    with pytest.raises(ValueError, match="keep_last"):
        ModelRegistry(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="not both"):
        load_model(tmp_path, version=1, latest=True)


def test_only_the_registry_loads_safetensors() -> None:
    code = (
        "import sys, hfl_mqtt.registry, hfl_mqtt.roles.node, hfl_mqtt.cli; "
        "print('safetensors' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "False"


# --- export ---------------------------------------------------------------------------------


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    registry = ModelRegistry(tmp_path / "models", keep_last=2)
    for version, accuracy in [(1, 0.9), (2, 0.5), (3, 0.6)]:
        record(registry, version, accuracy)
    return tmp_path / "models"


def test_export_npz(registry_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "model.npz"
    card = export(registry_dir, "npz", out, latest=True)
    assert card.version == 3
    with np.load(out, allow_pickle=False) as npz:
        assert list(npz.keys()) == list(model(3))
        for name, array in model(3).items():
            np.testing.assert_array_equal(npz[name], array)
    assert encode({"file": np.ones(1)}, "npz")  # a name np.savez's keywords would refuse


@pytest.mark.torch
def test_export_torch_loads_into_the_torch_model(registry_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from hfl_mqtt.tasks.torch_models import MLP

    out = tmp_path / "model.pt"
    assert export(registry_dir, "torch", out).version == 1
    state_dict = torch.load(out, weights_only=True)
    net = MLP(LAYERS)
    net.load_state_dict(state_dict, strict=True)
    for name, tensor in net.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), model(1)[name])


@pytest.mark.flower
def test_export_flower_round_trips_with_flower(registry_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord
    from flwr.common.serde import array_record_from_proto
    from flwr.proto.recorddict_pb2 import ArrayRecord as ArrayRecordProto

    out = tmp_path / "model.arrayrecord.pb"
    export(registry_dir, "flower", out, version=2)
    record = array_record_from_proto(ArrayRecordProto.FromString(out.read_bytes()))
    assert isinstance(record, ArrayRecord)
    assert list(record) == list(model(2))
    for (name, array), ndarray in zip(model(2).items(), record.to_numpy_ndarrays(), strict=True):
        np.testing.assert_array_equal(ndarray, array)
        np.testing.assert_array_equal(record[name].numpy(), array)
    assert list(read_array_record(out)) == list(model(2))


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")] + ["flwr"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"hfl-mqtt\[flower\]"):
        encode(model(), "flower")
    with pytest.raises(ImportError, match=r"hfl-mqtt\[torch\]"):
        encode(model(), "torch")


def test_cli_export(registry_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "best.npz"
    assert main(["export", str(registry_dir), "--format", "npz", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert "version 1" in printed
    assert "accuracy 0.9000" in printed
    with np.load(out) as npz:
        np.testing.assert_array_equal(npz["fc2.bias"], model(1)["fc2.bias"])

    args = ["export", str(registry_dir / "v3.json"), "--format", "npz", "--out", str(out)]
    assert main(args) == 0
    assert "version 3" in capsys.readouterr().out
    assert main([*args[:2], "--format", "npz", "--out", str(out), "--version", "3"]) == 2
    assert "ModelFileError" in capsys.readouterr().err
    bad = ["export", str(registry_dir), "--format", "npz", "--out", str(out), "--version", "9"]
    assert main(bad) == 2
    assert "no version 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*bad, "--latest"])  # one or the other
    (tmp_path / "a_file").write_text("")
    unwritable = str(tmp_path / "a_file" / "x.npz")
    assert main(["export", str(registry_dir), "--format", "npz", "--out", unwritable]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert issubclass(ModelFileError, HflError)
