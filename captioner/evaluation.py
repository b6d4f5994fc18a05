"""Evaluation: COCO caption metrics (pycocoevalcap) and, on the scenes corpus, attribute accuracy.

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D come from pycocoevalcap (its ``Cider`` scorer is the
CIDEr-D variant used by the COCO server). METEOR and the PTB tokenizer need Java; without it the
report says so in ``notes``, tokenizes with captioner's PTB-like tokenizer, and still gives BLEU,
ROUGE-L and CIDEr-D. SPICE is not computed: it needs downloads that cannot happen offline.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from captioner.config import DecodingOptions, to_dict
from captioner.data.items import CaptionItem
from captioner.errors import DatasetError
from captioner.progress import progress_bar
from captioner.retrieval import CONSENSUS_K, RetrievalPool
from captioner.vocab import tokenize

if TYPE_CHECKING:
    from captioner.data.features import FeatureCache
    from captioner.inference import Captioner

ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr-D")


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenized(captions: Mapping[str, Sequence[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress to stdout
            return PTBTokenizer().tokenize(
                {k: [{"caption": c} for c in v] for k, v in captions.items()}
            )
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def coco_metrics(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    *,
    metrics: Iterable[str] = ALL_METRICS,
    use_java: bool | None = None,
) -> dict[str, Any]:
    """Corpus-level caption metrics of ``predictions`` (id -> caption) against references."""
    metrics = set(metrics)
    ids = [i for i in predictions if references.get(i)]
    if not ids:
        return {"notes": ["no prediction has references"]}
    use_java = java_available() if use_java is None else use_java
    notes = []
    if not use_java:
        reason = "java disabled" if java_available() else "java not found"
        notes.append(f"{reason}: METEOR skipped, captioner's tokenizer used instead of PTB")
    gts = _tokenized({i: list(references[i]) for i in ids}, use_java)
    res = _tokenized({i: [predictions[i]] for i in ids}, use_java)
    scores: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints as it goes
        if "BLEU" in metrics:
            from pycocoevalcap.bleu.bleu import Bleu

            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores.update({f"BLEU-{n + 1}": round(float(b), 4) for n, b in enumerate(bleu)})
        if "METEOR" in metrics and use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                scores["METEOR"] = round(float(scorer.compute_score(gts, res)[0]), 4)
            finally:
                _stop_meteor(scorer)
        if "ROUGE_L" in metrics:
            from pycocoevalcap.rouge.rouge import Rouge

            scores["ROUGE-L"] = round(float(Rouge().compute_score(gts, res)[0]), 4)
        if "CIDEr-D" in metrics:
            from pycocoevalcap.cider.cider import Cider

            scores["CIDEr-D"] = round(float(Cider().compute_score(gts, res)[0]), 4)
    scores["num_predictions"] = len(ids)
    if notes:
        scores["notes"] = notes
    return scores


def _stop_meteor(scorer: Any) -> None:
    """End METEOR's Java process and close all its pipes (pycocoevalcap leaves two open)."""
    process = scorer.meteor_p
    with scorer.lock:
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
        process.kill()
        process.wait()
    scorer.meteor_p = _Stopped()


class _Stopped:
    """Stands in for the stopped process so that Meteor.__del__ finds nothing left to do."""

    stdin = io.BytesIO()

    def kill(self) -> None:
        pass

    def wait(self) -> int:
        return 0


def scene_accuracy(items: Sequence[CaptionItem], predictions: Mapping[str, str]) -> dict[str, Any]:
    """Attribute accuracy (every object's colour and shape) by scene type, and motion accuracy.

    Only items whose ``meta`` comes from the scenes generator are scored; others are ignored.
    """
    from captioner.data.scenes import score_caption

    attributes: dict[str, list[bool]] = defaultdict(list)
    motion: list[bool] = []
    for item in items:
        if item.id not in predictions or "objects" not in item.meta:
            continue
        score = score_caption(predictions[item.id], item.meta)
        scene = item.meta.get("scene", "unknown")
        attributes["clips" if scene == "motion" else scene].append(score["attributes"])
        if "motion" in score:
            motion.append(score["motion"])
    if not attributes:
        return {}
    everything = [ok for oks in attributes.values() for ok in oks]
    by_scene = {scene: _rate(oks) for scene, oks in sorted(attributes.items())}
    result: dict[str, Any] = {
        "attribute_accuracy": {"overall": _rate(everything), **by_scene},
        "scored_items": {scene: len(oks) for scene, oks in sorted(attributes.items())},
    }
    if motion:
        result["motion_accuracy"] = _rate(motion)
    return result


def _rate(flags: Sequence[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def write_predictions(path: str | Path, predictions: Mapping[str, str]) -> None:
    """Predictions in the COCO results format: [{"image_id", "caption"}]."""
    records = [
        {"image_id": int(i) if i.isdigit() else i, "caption": c} for i, c in predictions.items()
    ]
    Path(path).write_text(json.dumps(records, indent=1), encoding="utf-8")


@dataclass
class Predictions:
    """What captioning a set of items gave: best captions, retrieval embeddings, failures."""

    captions: dict[str, str] = field(default_factory=dict)  # id -> best caption ("" if none)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # id -> (E,) unit vector
    errors: dict[str, str] = field(default_factory=dict)  # id -> why its media was unreadable
    # id -> whether the input looks like the training data (models with a domain summary)
    in_domain: dict[str, bool] = field(default_factory=dict)


def predict(
    captioner: Captioner,
    items: Sequence[CaptionItem],
    options: DecodingOptions | None = None,
    *,
    features: FeatureCache | None = None,
    embed_only: bool = False,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = False,
) -> Predictions:
    """Caption ``items`` in batches, decoding media in worker processes.

    Items held by ``features`` (a cache made with this model's encoder) are captioned from
    their cached encoder outputs, without running the CNN. With ``embed_only``, only the
    retrieval embeddings are computed (for a retrieval pool).
    """
    from torch.utils.data import DataLoader

    from captioner.data.features import MediaDataset

    result = Predictions()
    cached: list[CaptionItem] = []
    if features is not None:
        check_cache_matches(features, captioner)
        position = features.position()
        cached = [item for item in items if item.id in position and item.id not in features.failed]
        result.errors.update(
            {i.id: features.failed[i.id] for i in items if i.id in features.failed}
        )
    held = {item.id for item in cached} | set(result.errors)
    to_load = [item for item in items if item.id not in held]

    def record(batch: Sequence[CaptionItem], tensors: list, from_features: bool) -> None:
        if embed_only:
            embeddings = captioner.embed(tensors, features=from_features)
        else:
            captioned, embeddings = captioner.caption_and_embed(
                tensors, options, features=from_features
            )
            for item, captioned_item in zip(batch, captioned, strict=True):
                result.captions[item.id] = captioned_item.caption
                if captioned_item.in_domain is not None:
                    result.in_domain[item.id] = captioned_item.in_domain
        result.embeddings.update(zip((i.id for i in batch), embeddings, strict=True))

    bar = progress_bar(total=len(items), disable=not progress, desc="evaluate", unit="item")
    for start in range(0, len(cached), batch_size):
        batch = cached[start : start + batch_size]
        record(batch, [features.tensor(position[i.id]) for i in batch], True)  # type: ignore[union-attr]
        bar.update(len(batch))
    loader = DataLoader(
        MediaDataset(to_load, captioner.checkpoint.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
    )
    for loaded in loader:
        good = [(to_load[index], pixels) for index, pixels, _ in loaded if pixels is not None]
        result.errors.update(
            {to_load[i].id: error for i, pixels, error in loaded if pixels is None}
        )
        if good:
            record([item for item, _ in good], [pixels for _, pixels in good], False)
        bar.update(len(loaded))
    bar.close()
    return result


def check_cache_matches(cache: FeatureCache, captioner: Captioner) -> None:
    """Raise unless ``cache`` was made with this model's encoder and preprocessing.

    A loaded checkpoint carries its CNN's weights, not where they came from (``pretrained`` is
    None), so that field is not compared; a fine-tuned CNN is told apart by ``frozen``.
    """

    def comparable(encoder: Any, preprocess: Any) -> list[Any]:
        encoder = {k: v for k, v in dict(encoder or {}).items() if k != "pretrained"}
        return json.loads(json.dumps([encoder, preprocess]))

    model = to_dict(captioner.model.config.encoder)
    wanted = comparable(model, to_dict(captioner.checkpoint.preprocess))
    if comparable(cache.meta.get("encoder"), cache.meta.get("preprocess")) != wanted:
        raise DatasetError(
            f"{cache.folder}: the feature cache was made with another encoder or preprocessing "
            "than this model's; extract it again for this model, or leave --features out"
        )


def retrieval_baselines(
    pool: RetrievalPool,
    references: Mapping[str, Sequence[str]],
    embeddings: Mapping[str, np.ndarray],
    *,
    k: int = CONSENSUS_K,
    use_java: bool | None = None,
) -> dict[str, Any]:
    """Nearest-neighbour and consensus re-ranking captions of the items, scored like the model."""
    ids = [i for i in references if i in embeddings]
    queries = np.stack([embeddings[i] for i in ids])
    chosen = {
        "nearest_neighbour": pool.nearest_neighbour(queries),
        "consensus": pool.consensus(queries, k),
    }
    report: dict[str, Any] = {"pool_items": len(pool.captions), "consensus_k": k}
    for name, captions in chosen.items():
        scores = coco_metrics(references, dict(zip(ids, captions, strict=True)), use_java=use_java)
        scores.pop("notes", None)  # the model's report already says which scorer ran
        report[name] = scores
    return report


def evaluate(
    captioner: Captioner,
    items: Sequence[CaptionItem],
    options: DecodingOptions | None = None,
    *,
    pool_items: Sequence[CaptionItem] | None = None,
    features: FeatureCache | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    use_java: bool | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The full report (COCO metrics + scene accuracy) and the predictions.

    With ``pool_items`` (the training split), the report also gives the retrieval baselines
    (:mod:`captioner.retrieval`) on the same items, scored the same way, under "baselines".
    Raises DatasetError when nothing can be scored (no item has reference captions, or none
    that has could be read): a metrics file over zero items would look like a result.
    """
    references = {item.id: list(item.captions) for item in items if item.captions}
    if not references:
        raise DatasetError(
            f"nothing to score: none of the {len(items)} items has reference captions; "
            "evaluate a split that has them (--split test or val)"
        )
    kwargs = dict(features=features, batch_size=batch_size, num_workers=num_workers)
    predicted = predict(captioner, items, options, progress=progress, **kwargs)
    predictions, errors = predicted.captions, predicted.errors
    if not any(item_id in references for item_id in predictions):
        raise DatasetError(
            f"nothing to score: none of the {len(references)} items with reference captions "
            f"could be read ({len(errors)} unreadable); first: {next(iter(errors.values()), '')}"
        )
    report: dict[str, Any] = {"model": captioner.name, "items": len(items)}
    report.update(coco_metrics(references, predictions, use_java=use_java))
    report.update(scene_accuracy(items, predictions))
    if errors:
        report["unreadable_items"] = len(errors)
    if predicted.in_domain:  # how much of this set the model calls like its training data
        flags = list(predicted.in_domain.values())
        report["in_domain_share"] = round(sum(flags) / len(flags), 4)
    if pool_items is not None:
        pooled = [item for item in pool_items if item.captions]
        embedded = predict(captioner, pooled, embed_only=True, progress=progress, **kwargs)
        kept = [item for item in pooled if item.id in embedded.embeddings]
        if not kept:
            raise DatasetError("no training item with captions could be read for the baselines")
        pool = RetrievalPool(
            np.stack([embedded.embeddings[item.id] for item in kept]),
            [list(item.captions) for item in kept],
        )
        scored = {i: r for i, r in references.items() if i in predictions}
        report["baselines"] = retrieval_baselines(
            pool, scored, predicted.embeddings, use_java=use_java
        )
    return report, predictions
