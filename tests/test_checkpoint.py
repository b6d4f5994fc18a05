from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import (
    CONFIG_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    TrainState,
    copy_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from captioner.config import preset
from captioner.errors import ConfigError, ModelLoadError
from tests.conftest import make_tiny_model


def _saved(tmp_path: Path, vocab) -> tuple[Path, torch.nn.Module]:
    model = make_tiny_model(vocab, seed=3)
    with torch.no_grad():  # perturb every weight so a silent re-init could not pass
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.01)
    _, preprocess = preset("test-tiny")
    save_checkpoint(
        Checkpoint(model, vocab, preprocess, metadata={"data": "unit"}), tmp_path / "ck"
    )
    return tmp_path / "ck", model


def test_round_trip_restores_every_tensor_and_config(tmp_path, tiny_vocab) -> None:
    directory, model = _saved(tmp_path, tiny_vocab)
    loaded = load_checkpoint(directory)
    original = model.state_dict()
    restored = loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert loaded.vocab == tiny_vocab
    assert loaded.model.config == model.config
    assert loaded.metadata["data"] == "unit"
    frames = torch.randn(1, 2, 3, 64, 64)
    after = loaded.model.encode(torch.tensor([2]), frames=frames)
    before = model.eval().encode(torch.tensor([2]), frames=frames)
    for name in ("summary", "keys", "values"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name))
    assert not list(directory.glob("*.tmp"))


def _corrupt(directory: Path, case: str) -> None:
    config_path, weights = directory / "config.json", directory / "model.safetensors"
    config = json.loads(config_path.read_text())
    if case == "missing-config":
        config_path.unlink()
    elif case == "bad-json":
        config_path.write_text("{not json")
    elif case == "future-version":
        config["format_version"] = 99
    elif case == "old-version":
        config["format_version"] = 1
    elif case == "not-a-checkpoint":
        config["format"] = "something-else"
    elif case == "missing-weights":
        weights.unlink()
    elif case == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "truncated-weights-no-checksum":
        weights.write_bytes(weights.read_bytes()[:1000])
        del config["weights"]
    elif case == "mismatched-shapes":
        config["model"]["decoder_hidden"] += 1
    elif case == "vocab-mismatch":
        config["vocab"]["tokens"].append("zebra")
    elif case == "unknown-config-key":
        config["model"]["colour"] = "blue"
    if config_path.exists() and case not in ("bad-json",):
        config_path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-config", "config.json is missing"),
        ("bad-json", "not valid JSON"),
        ("future-version", "newer than this captioner supports"),
        ("old-version", "pre-release captioner"),
        ("not-a-checkpoint", "not a captioner checkpoint"),
        ("missing-weights", "weights file is missing"),
        ("truncated-weights", "checksum does not match"),
        ("truncated-weights-no-checksum", "cannot read weights"),
        ("mismatched-shapes", "wrong shape"),
        ("vocab-mismatch", "does not match"),
        ("unknown-config-key", "unknown key"),
    ],
)
def test_each_broken_checkpoint_fails_with_one_clear_message(
    tmp_path, tiny_vocab, case, message
) -> None:
    directory, _ = _saved(tmp_path, tiny_vocab)
    _corrupt(directory, case)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_checkpoint(directory)
    assert str(directory) in str(info.value)


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")


def test_weights_are_safetensors_not_pickles(tmp_path, tiny_vocab) -> None:
    import struct

    from safetensors import safe_open

    directory, model = _saved(tmp_path, tiny_vocab)
    raw = (directory / "model.safetensors").read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_length])  # safetensors: a JSON header, then raw data
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        assert set(weights.keys()) == set(model.state_dict())


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("decoding", "beam_size", 50, "beam_size must be between"),
        ("model", "decoder_hidden", -1, "cannot build the model"),
    ],
)
def test_invalid_values_in_config_json_fail_at_load(
    tmp_path, tiny_vocab, section, key, value, message
) -> None:
    directory, _ = _saved(tmp_path, tiny_vocab)
    config = json.loads((directory / "config.json").read_text())
    config[section][key] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(directory)


def test_copy_checkpoint_copies_the_checkpoint_not_the_training_state(tmp_path, tiny_vocab):
    directory, model = _saved(tmp_path, tiny_vocab)
    (directory / STATE_FILE).write_text("{}")
    (directory / OPTIMIZER_FILE).write_bytes(b"")
    copied = copy_checkpoint(directory, tmp_path / "export" / "best")
    assert sorted(p.name for p in copied.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert load_checkpoint(copied).model.config == model.config


def _optimizer(seed: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        layer(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_training_state_round_trip_restores_the_optimizer_exactly(tmp_path) -> None:
    state = TrainState(phase="finetune", phase_start=2, epoch=3, step=30, best=0.5, stale=1)
    state.history.append({"epoch": 3, "CIDEr-D": 0.5})
    optimizer, scheduler = _optimizer(seed=0)
    save_train_state(tmp_path, state, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == [OPTIMIZER_FILE, STATE_FILE]
    assert load_train_state(tmp_path) == state

    fresh, fresh_scheduler = _optimizer(seed=1)
    load_optimizer_state(tmp_path, fresh, fresh_scheduler)
    saved, restored = optimizer.state_dict(), fresh.state_dict()
    for index, values in saved["state"].items():
        for name, value in values.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(restored["state"][index][name])
            )
    assert fresh_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_a_new_phase_starts_where_the_last_one_ended() -> None:
    state = TrainState(epoch=4, step=40, best=0.3, stale=2, stopped=True)
    state.begin("finetune")
    assert (state.phase, state.phase_start, state.stale, state.stopped) == ("finetune", 4, 0, False)
    assert (state.epoch, state.step, state.best) == (4, 40, 0.3)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot resume"),
        ("{not json", "cannot resume"),
        # What releases before the TrainState wrote: a flat dict of counters.
        ('{"epoch": 2, "step": 10, "best": 0.1, "optimizer_phase": "frozen"}', "older captioner"),
    ],
)
def test_a_state_that_cannot_resume_says_to_start_afresh(tmp_path, content, problem) -> None:
    if content is not None:
        (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(ConfigError, match=f"{problem}.*start without --resume"):
        load_train_state(tmp_path)
