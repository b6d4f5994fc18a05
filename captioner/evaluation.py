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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.config import DecodingOptions
from captioner.data.items import CaptionItem
from captioner.errors import DatasetError
from captioner.vocab import tokenize

if TYPE_CHECKING:
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


def predict(
    captioner: Captioner,
    items: Sequence[CaptionItem],
    options: DecodingOptions | None = None,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = False,
) -> tuple[dict[str, str], dict[str, str]]:
    """Caption ``items`` in batches, decoding media in worker processes.

    Returns (predictions by id, errors by id for media that could not be read).
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from captioner.data.features import MediaDataset
    from captioner.inference import best_caption

    loader = DataLoader(
        MediaDataset(items, captioner.checkpoint.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
    )
    predictions: dict[str, str] = {}
    errors: dict[str, str] = {}
    for batch in tqdm(loader, disable=not progress, desc="evaluate", unit="batch"):
        good = [(index, pixels) for index, pixels, _ in batch if pixels is not None]
        errors.update({items[index].id: error for index, pixels, error in batch if pixels is None})
        results = captioner.caption_tensors([pixels for _, pixels in good], options)
        for (index, _), captions in zip(good, results, strict=True):
            predictions[items[index].id] = best_caption(captions)
    return predictions, errors


def evaluate(
    captioner: Captioner,
    items: Sequence[CaptionItem],
    options: DecodingOptions | None = None,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    use_java: bool | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The full report (COCO metrics + scene accuracy) and the predictions.

    Raises DatasetError when nothing can be scored (no item has reference captions, or none
    that has could be read): a metrics file over zero items would look like a result.
    """
    references = {item.id: list(item.captions) for item in items if item.captions}
    if not references:
        raise DatasetError(
            f"nothing to score: none of the {len(items)} items has reference captions; "
            "evaluate a split that has them (--split test or val)"
        )
    predictions, errors = predict(
        captioner, items, options, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
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
    return report, predictions
