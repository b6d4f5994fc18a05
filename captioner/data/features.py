"""Feature cache: run the frozen encoder once per frame and keep the results on disk.

A cache folder holds ``features.f16`` (a float16 memory-mapped array, one row per frame),
``index.json`` (which rows belong to which item) and ``progress.json``. Extraction streams
items through a DataLoader, writes each batch straight into the memmap and records progress,
so RAM stays bounded whatever the dataset size, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.config import EncoderConfig, PreprocessConfig, to_dict
from captioner.data.items import CaptionItem
from captioner.encoder import ImageEncoder
from captioner.errors import CaptionerError, DatasetError
from captioner.media import Preprocessor, load_image, read_video, sample_indices
from captioner.onnx_encoder import fast_encoder
from captioner.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT = "captioner-features"
FORMAT_VERSION = 1


def item_frame_count(item: CaptionItem, num_frames: int) -> int:
    """How many frames an item contributes: 1 for an image, ``num_frames`` for a video."""
    return 1 if item.kind == "image" else num_frames


def load_item_frames(item: CaptionItem, preprocess: Preprocessor, num_frames: int) -> torch.Tensor:
    """An item's pixels as (T, 3, S, S): the image, or ``num_frames`` uniformly sampled frames."""
    if item.kind == "image":
        return preprocess(load_image(item.paths[0])).unsqueeze(0)
    if item.is_frame_sequence:
        picked = [item.paths[i] for i in sample_indices(len(item.paths), num_frames)]
        return preprocess.frames([load_image(p) for p in picked])
    frames, _ = read_video(item.paths[0], num_frames)
    return preprocess.frames(frames)


class MediaDataset(Dataset):
    """Items -> (index, pixels or None); unreadable media yields None instead of raising."""

    def __init__(
        self, items: Sequence[CaptionItem], preprocess: PreprocessConfig, start: int = 0
    ) -> None:
        self.items, self.start = items, start
        self.preprocess = Preprocessor(preprocess)
        self.num_frames = preprocess.num_frames

    def __len__(self) -> int:
        return len(self.items) - self.start

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        index = self.start + i
        try:
            return index, load_item_frames(self.items[index], self.preprocess, self.num_frames), ""
        except CaptionerError as exc:
            return index, None, str(exc)


def _collate(batch: list) -> list:
    return batch


@dataclass
class FeatureCache:
    """A finished (or partly written) cache, opened for reading."""

    folder: Path
    ids: list[str]
    offsets: np.ndarray
    lengths: np.ndarray
    failed: set[str]
    array: np.ndarray  # (total_frames, D) float16 memmap
    meta: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> FeatureCache:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "index.json").read_text())
            progress = json.loads((folder / "progress.json").read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{folder}: not a feature cache ({exc})") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{folder}: not a version-{FORMAT_VERSION} feature cache")
        if progress["done"] < len(meta["ids"]):
            raise DatasetError(
                f"{folder}: extraction stopped at item {progress['done']} of {len(meta['ids'])}; "
                "run `captioner features extract` again to resume it"
            )
        shape = (int(meta["total_frames"]), int(meta["feature_dim"]))
        array = np.memmap(folder / "features.f16", dtype=np.float16, mode="r", shape=shape)
        return cls(
            folder,
            meta["ids"],
            np.asarray(meta["offsets"]),
            np.asarray(meta["lengths"]),
            set(progress.get("failed", {})),
            array,
            meta,
        )

    def position(self) -> dict[str, int]:
        return {item_id: i for i, item_id in enumerate(self.ids)}

    def features(self, index: int) -> np.ndarray:
        """(T, D) float16 features of the item at ``index`` (a view into the memmap)."""
        start = int(self.offsets[index])
        return self.array[start : start + int(self.lengths[index])]

    def tensor(self, index: int) -> torch.Tensor:
        """(T, D) float32 features of the item at ``index``, as the model reads them."""
        return torch.from_numpy(np.asarray(self.features(index), dtype=np.float32))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights: what its outputs depend on beyond its config."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _encoder_identity(encoder: dict) -> dict:
    """The encoder config without ``pretrained``: where the weights came from does not change
    the features, and a saved checkpoint records None there (its weights are inside it), so a
    resumed run would otherwise not recognise its own cache. The weights' digest stands in."""
    return {k: v for k, v in json.loads(json.dumps(encoder)).items() if k != "pretrained"}


def _plan(
    items: Sequence[CaptionItem],
    encoder: EncoderConfig,
    preprocess: PreprocessConfig,
    weights: str | None = None,
) -> dict:
    lengths = [item_frame_count(item, preprocess.num_frames) for item in items]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist() if items else []
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                _encoder_identity(to_dict(encoder)),
                weights,
                to_dict(preprocess),
                [(i.id, [str(p) for p in i.paths]) for i in items],
            ]
        ).encode()
    ).hexdigest()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "weights_sha256": weights,
        "encoder": to_dict(encoder),
        "preprocess": to_dict(preprocess),
        "feature_dim": encoder.feature_dim,
        "total_frames": int(sum(lengths)),
        "ids": [item.id for item in items],
        "paths": [[str(p) for p in item.paths] for item in items],
        "offsets": offsets,
        "lengths": lengths,
    }


def extract_features(
    items: Sequence[CaptionItem],
    encoder: ImageEncoder,
    preprocess: PreprocessConfig,
    folder: str | Path,
    *,
    batch_frames: int = 32,
    num_workers: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureCache:
    """Run ``encoder`` over every item's frames into a cache at ``folder``; resumes if possible."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = _plan(items, encoder.config, preprocess, weights_digest(encoder))
    index_path, progress_path = folder / "index.json", folder / "progress.json"
    state = {"done": 0, "failed": {}}
    if index_path.exists() and progress_path.exists():
        old = json.loads(index_path.read_text())
        if old.get("fingerprint") == plan["fingerprint"]:
            state = json.loads(progress_path.read_text())
            log.info("resuming feature extraction at item %d of %d", state["done"], len(items))
        elif _covers(folder, old, plan, items):
            log.info("%s already holds features of these items: reusing it", folder)
            return FeatureCache.open(folder)
        else:
            log.warning(
                "%s holds features of other items or another encoder: starting over", folder
            )
    if state["done"] == 0:
        index_path.write_text(json.dumps(plan))
        _write_progress(progress_path, state)
    shape = (max(plan["total_frames"], 1), plan["feature_dim"])
    array_path = folder / "features.f16"
    expected_bytes = shape[0] * shape[1] * np.dtype(np.float16).itemsize
    if state["done"] > 0 and (
        not array_path.exists() or array_path.stat().st_size != expected_bytes
    ):
        log.warning("%s is missing or truncated: extracting every item again", array_path)
        state = {"done": 0, "failed": {}}
        index_path.write_text(json.dumps(plan))
        _write_progress(progress_path, state)
    mode = "r+" if state["done"] > 0 else "w+"
    array = np.memmap(array_path, dtype=np.float16, mode=mode, shape=shape)

    device = torch.device(device)
    encoder = encoder.to(device).eval()
    cnn = fast_encoder(encoder, preprocess.image_size, device)  # ONNX Runtime on CPUs
    loader = DataLoader(
        MediaDataset(items, preprocess, start=state["done"]),
        # Items per loader batch: about ``batch_frames`` frames when half of them are videos.
        batch_size=max(1, 2 * batch_frames // (preprocess.num_frames + 1)),
        num_workers=num_workers,
        collate_fn=_collate,
    )
    bar = progress_bar(
        total=len(items), initial=state["done"], disable=not progress, desc="features", unit="item"
    )
    with torch.inference_mode():
        for batch in loader:
            good = [(i, pixels) for i, pixels, _ in batch if pixels is not None]
            for index, _, error in batch:
                if error:
                    state["failed"][items[index].id] = error
                    log.warning("skipping %s: %s", items[index].id, error)
            if good:
                pixels = torch.cat([p for _, p in good]).to(device)
                features = (
                    torch.cat([cnn(chunk) for chunk in pixels.split(batch_frames)])
                    .float()
                    .cpu()
                    .numpy()
                )
                row = 0
                for index, item_pixels in good:
                    start = plan["offsets"][index]
                    array[start : start + len(item_pixels)] = features[row : row + len(item_pixels)]
                    row += len(item_pixels)
            array.flush()
            state["done"] = batch[-1][0] + 1
            _write_progress(progress_path, state)  # only after the rows are on disk
            bar.update(len(batch))
    bar.close()
    if state["failed"]:
        log.warning("%d items could not be read and were left out", len(state["failed"]))
    return FeatureCache.open(folder)


def _covers(folder: Path, old: dict, plan: dict, items: Sequence[CaptionItem]) -> bool:
    """Whether a finished cache made with the same encoder and preprocessing holds every item.

    Then a run over a subset (training's train and val items, after one extraction of a whole
    dataset) reads it instead of extracting again.
    """
    same = json.loads(json.dumps(plan["preprocess"]))  # tuples as lists
    if old.get("preprocess") != same or (
        _encoder_identity(old.get("encoder", {})) != _encoder_identity(plan["encoder"])
    ):
        return False
    if None not in (old.get("weights_sha256"), plan.get("weights_sha256")) and (
        old["weights_sha256"] != plan["weights_sha256"]
    ):
        return False  # older caches have no digest: their encoder config is all there is
    try:
        cache = FeatureCache.open(folder)
    except DatasetError:
        return False  # unfinished or damaged: extract anew
    held = dict(zip(cache.ids, old.get("paths", ()), strict=False))  # older caches: no paths
    return all(held.get(item.id) == [str(p) for p in item.paths] for item in items)


def _write_progress(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
