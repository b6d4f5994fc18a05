from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_checkpoint, load_train_state
from captioner.cli import main
from captioner.data.scenes import generate_corpus
from captioner.training import caption_loss

CONFIG = """
preset = "test-tiny"
name = "tiny-scenes"
epochs = 2
batch_size = 16
lr = 0.003
warmup_steps = 5
patience = 5
num_workers = 0
[data]
min_count = 1
max_val_items = 20
"""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("scenes"), 40, 12, seed=3, image_size=64)


def _config(tmp_path: Path, manifest: Path, extra: str = "") -> Path:
    path = tmp_path / "train.toml"
    text = CONFIG.replace("[data]", f'out_dir = "{tmp_path / "run"}"\n{extra}\n[data]')
    path.write_text(text + f'train = "{manifest}"\n')
    return path


def test_train_writes_best_checkpoint_metrics_and_curves(tmp_path, manifest, capsys) -> None:
    assert main(["train", "--config", str(_config(tmp_path, manifest))]) == 0
    run = tmp_path / "run"
    assert capsys.readouterr().out.strip() == str(run / "best")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert {"CIDEr-D", "val_BLEU-4", "val_attribute_accuracy", "val_motion_accuracy"} <= set(
        records[0]
    )
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best = load_checkpoint(run / "best")
    assert best.metadata["name"] == "tiny-scenes"
    assert best.metadata["validation"]["CIDEr-D"] == max(r["CIDEr-D"] for r in records)


def test_training_is_deterministic_on_cpu(tmp_path, manifest) -> None:
    weights = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        assert main(["train", "--config", str(_config(folder, manifest)), "epochs=1"]) == 0
        weights.append((folder / "run" / "last" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(
    tmp_path, manifest, monkeypatch
) -> None:
    import captioner.training as training

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    assert main(["train", "--config", str(_config(straight, manifest))]) == 0

    real_validate, calls = training.validate, []

    def killed_in_epoch_two(*args, **kwargs):  # the process dies before epoch 2 is saved
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(training, "validate", killed_in_epoch_two)
    config = str(_config(resumed, manifest))
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", config])
    monkeypatch.setattr(training, "validate", real_validate)
    assert main(["train", "--config", config, "--resume"]) == 0

    run = resumed / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    weights = "last/model.safetensors"
    assert (run / weights).read_bytes() == (straight / "run" / weights).read_bytes()


def test_loss_ignores_padding() -> None:
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 0], [3, 0, 0]])
    full = caption_loss(logits, targets, pad_id=0)
    manual = torch.nn.functional.cross_entropy(logits[targets != 0], targets[targets != 0])
    torch.testing.assert_close(full, manual)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, manifest) -> None:
    config = _config(tmp_path, manifest)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        f"--master-port={_free_port()}", "-m", "captioner.cli",
        "train", "--config", str(config), "epochs=2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2  # only rank 0 validates and logs
    single_steps = -(-(40 * 5 * 0.8) // 16)  # what one process would take per epoch, at least
    assert json.loads(records[0])["step"] < single_steps  # the data was split across 2 ranks
    assert load_checkpoint(tmp_path / "run" / "best").metadata["name"] == "tiny-scenes"


def test_finetuning_phase_trains_the_cnn_on_pixels(tmp_path, manifest) -> None:
    config = str(_config(tmp_path, manifest))
    assert (
        main(
            ["train", "--config", config, "epochs=1", "finetune_epochs=1", "finetune_batch_size=8"]
        )
        == 0
    )
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["frozen", "finetune"]
    from captioner.config import preset
    from captioner.encoder import ImageEncoder

    torch.manual_seed(0)  # train() seeds with config.seed (0) before it builds the model
    before = ImageEncoder(preset("test-tiny")[0].encoder).state_dict()
    after = load_checkpoint(run / "last").model
    assert after.config.encoder.frozen is False
    changed = [k for k, v in after.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "fine-tuning left every CNN weight as it was"


@pytest.fixture
def restore_threads():
    """Put back torch's thread count, which ``cpu_threads`` sets for the whole process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_resume_in_the_finetuning_phase_continues_exactly(
    tmp_path, monkeypatch, restore_threads
) -> None:
    import captioner.training as training

    # Fine-tuning decodes pixels every step: a small corpus of images keeps this test short.
    manifest = generate_corpus(tmp_path / "scenes", 20, 0, seed=3, image_size=64)
    # One thread: on a busy 2-core machine, two spinning OpenMP threads take 20x longer.
    recipe = ["epochs=1", "finetune_epochs=2", "finetune_batch_size=8", "cpu_threads=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    assert main(["train", "--config", str(_config(straight, manifest)), *recipe]) == 0

    real_validate, calls = training.validate, []

    def killed_in_the_second_finetuning_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(training, "validate", killed_in_the_second_finetuning_epoch)
    config = str(_config(resumed, manifest))
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", config, *recipe])
    assert load_train_state(resumed / "run" / "last").phase == "finetune"
    monkeypatch.setattr(training, "validate", real_validate)
    assert main(["train", "--config", config, *recipe, "--resume"]) == 0

    run = resumed / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"]) for r in records] == [
        (1, "frozen"),
        (2, "finetune"),
        (3, "finetune"),
    ]
    weights = "last/model.safetensors"
    assert (run / weights).read_bytes() == (straight / "run" / weights).read_bytes()


def _with_missing_files(manifest: Path, tmp_path: Path, count: int) -> Path:
    """A copy of ``manifest`` (beside it, so its paths resolve) with ``count`` lines whose
    files do not exist."""
    lines = manifest.read_text().splitlines()
    bad = [json.dumps({"path": f"gone-{n}.png", "captions": ["x"], "split": "train"}) for n in
           range(count)]  # fmt: skip
    copy = manifest.parent / f"with-{count}-missing-{tmp_path.name}.jsonl"
    copy.write_text("\n".join(lines + bad) + "\n")
    return copy


def test_training_stops_when_a_large_share_of_the_data_is_skipped(
    tmp_path, manifest, capsys
) -> None:
    total = len(manifest.read_text().splitlines())
    broken = _with_missing_files(manifest, tmp_path, count=total // 10)
    config = _config(tmp_path, broken)
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("captioner: error: ")
    assert f"skipped {total // 10} of {total + total // 10} entries" in error
    assert "file not found" in error and "data.max_skipped_share" in error
    assert not (tmp_path / "run" / "best").exists()
    # Opting in to a larger share trains on what is left.
    assert main(["train", "--config", str(config), "epochs=1", "data.max_skipped_share=0.2"]) == 0


def test_retrieval_training_builds_a_caption_memory_of_the_train_items(tmp_path, manifest) -> None:
    config = _config(tmp_path, manifest)
    assert main(["train", "--config", str(config), "epochs=2", "model.retrieval_k=3"]) == 0
    best = load_checkpoint(tmp_path / "run" / "best")
    train_items = [line for line in manifest.read_text().splitlines() if '"split": "train"' in line]
    assert best.model.config.retrieval_items == len(train_items)
    assert best.model.retrieval is not None
    keys = best.model.retrieval.keys.float()
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(len(keys)), rtol=0, atol=2e-3)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
