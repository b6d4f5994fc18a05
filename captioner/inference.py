"""Captioner: load a model once, then caption images, frame sequences and videos.

This is the one inference interface the HTTP service uses; it knows nothing about HTTP, and
it owns everything that needs torch: the device and precision, compilation, warm-up, tensors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioner.checkpoint import Checkpoint, load_checkpoint
from captioner.config import DecodingOptions
from captioner.decoding import generate
from captioner.device import resolve_device, resolve_precision
from captioner.encoder import frame_embeddings, pooled_embedding
from captioner.errors import InvalidMediaError, ModelLoadError, TagsUnavailableError
from captioner.media import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    ImageSource,
    MediaPreparer,
    VideoInfo,
    VideoLimits,
    VideoSource,
)
from captioner.model import frame_mask
from captioner.onnx_encoder import OnnxEncoder, fast_encoder
from captioner.tags import Tag, load_tagger, top_tags

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"


@dataclass(frozen=True)
class Caption:
    """One generated caption, its total log-probability, and the score n-best lists are ranked
    by: log_prob / length**length_penalty (so a longer caption can outrank a likelier one)."""

    text: str
    log_prob: float
    score: float


def best_caption(captions: Sequence[Caption]) -> str:
    """The best of an n-best list (best first), or "" when there is none."""
    return captions[0].text if captions else ""


OUT_OF_DOMAIN = (
    "this input is unlike the data the model was trained on ({domain}), so the caption is "
    "probably wrong; see the model card (MODEL_CARD.md) for what it describes well"
)


@dataclass(frozen=True)
class CaptionResult:
    """What the model says about one input: n-best captions (best first), ImageNet tags when
    asked for, and whether the input looks like the model's training data."""

    captions: list[Caption]
    video: VideoInfo | None = None  # set for videos
    tags: list[Tag] = field(default_factory=list)
    in_domain: bool | None = None  # None: the model has no domain summary (an older checkpoint)
    # The input's distance from the training data in units of the calibrated threshold: at
    # most 1 is in domain (captioner/domain.py).
    domain_score: float | None = None
    warnings: list[str] = field(default_factory=list)  # plain words, for people

    @property
    def caption(self) -> str:
        return best_caption(self.captions)


class Captioner:
    """A loaded model plus its preprocessing; thread-safe for ``prepare_*``, one batch at a time
    for ``caption_*``."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        name: str = "captioner",
        max_batch_size: int = 32,
        encoder_runtime: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_precision(self.device, precision)
        self.checkpoint = checkpoint
        self.model = checkpoint.model.to(self.device).eval()
        self.vocab = checkpoint.vocab
        self.media = MediaPreparer(checkpoint.preprocess)  # decoding, shared with batch jobs
        self.preprocess = self.media.preprocess
        self.name = str(checkpoint.metadata.get("name", name))
        self.version = str(checkpoint.metadata.get("version", "0"))
        self.max_batch_size = max_batch_size
        # The CNN that pixels go through: ONNX Runtime on CPUs where it works (see
        # onnx_encoder), else the model's own encoder; compile() may wrap it.
        self.cnn: torch.nn.Module = fast_encoder(
            self.model.encoder, checkpoint.preprocess.image_size, self.device, encoder_runtime
        )
        self._eager_encoder: torch.nn.Module | None = None  # set by compile()
        tagger, self.tags_unavailable = load_tagger(
            self.model.encoder, checkpoint.preprocess.image_size
        )
        self.tagger = tagger.to(self.device) if tagger is not None else None
        # One sentence on what the model was trained to describe (its checkpoint says).
        self.domain = str(checkpoint.metadata.get("domain") or "its training data")

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        num_threads: int | None = None,
        max_batch_size: int = 32,
        encoder_runtime: str = "auto",
    ) -> Captioner:
        """Load a checkpoint folder; ``None`` loads the default model shipped with the package.

        On CPUs, ``num_threads`` (default: PyTorch's, the CPUs this process may use) sizes the
        CNN. When the CNN runs on ONNX Runtime, PyTorch is left with the decoder and is set to
        half of them (see ``_decoder_threads``): a process-wide setting, as ``num_threads`` is.
        """
        if path is None:
            path = DEFAULT_MODEL_DIR
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"no default model at {path}; train one with `captioner train` "
                    "and pass it with --model"
                )
        if resolve_device(device).type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        checkpoint = load_checkpoint(path)
        captioner = cls(
            checkpoint,
            device=device,
            precision=precision,
            name=Path(path).name,
            max_batch_size=max_batch_size,
            encoder_runtime=encoder_runtime,
        )
        if isinstance(captioner.cnn, OnnxEncoder):
            torch.set_num_threads(_decoder_threads(captioner.cnn.parts))
        return captioner

    # -- options -------------------------------------------------------------------------

    def options(self, base: DecodingOptions | None = None, **overrides: Any) -> DecodingOptions:
        """The model's default decoding options with ``overrides`` applied, validated."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        options = replace(base or self.checkpoint.decoding, **overrides).validate()
        if options.tags and self.tagger is None:
            raise TagsUnavailableError(f"this model cannot give tags: {self.tags_unavailable}")
        return options

    @property
    def num_frames(self) -> int:
        return self.checkpoint.preprocess.num_frames

    # -- preprocessing (CPU work, safe to run in worker threads) ---------------------------

    def prepare_image(
        self,
        source: ImageSource,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        label: str | None = None,
    ) -> tuple[torch.Tensor, ImageInfo]:
        """An image as a one-frame sequence tensor (1, 3, S, S), and what the image was.

        Errors name the image by ``label`` when given (else by its path or size).
        """
        return self.media.image(source, max_pixels=max_pixels, label=label)

    def prepare_frames(
        self, frames: Sequence[ImageSource], *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, ImageInfo]:
        """An ordered frame sequence as a (T, 3, S, S) tensor, and what its first frame was.

        A frame that cannot be read is named by its position: ``frames[2]``.
        """
        return self.media.frames(list(frames), max_pixels=max_pixels)

    def prepare_video(
        self,
        source: VideoSource,
        num_frames: int | None = None,
        limits: VideoLimits | None = None,
        *,
        label: str | None = None,
    ) -> tuple[torch.Tensor, VideoInfo]:
        """``num_frames`` frames sampled uniformly over a video, as a (T, 3, S, S) tensor.

        Errors name the video by ``label`` when given (a server's upload is "video", not the
        path of its temporary file).
        """
        return self.media.video(source, num_frames, limits, label=label)

    # -- serving set-up ------------------------------------------------------------------

    def compile(self) -> None:
        """Compile the CNN with ``torch.compile``: faster batches after a slow first call.

        Compilation happens on the first call, so ``warm_up`` next; if it fails there, the
        warm-up logs why and goes back to the eager CNN.
        """
        if isinstance(self.cnn, OnnxEncoder):
            log.info("the CNN runs on ONNX Runtime, which needs no torch.compile: skipping it")
            return
        self._eager_encoder = self.cnn
        self.cnn = torch.compile(self.cnn)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the shapes serving will use (images in ``batch_sizes``, a clip, a clip beside an
        image), so that the first requests pay no one-off costs."""
        started = time.perf_counter()
        try:
            self._run_warm_up(batch_sizes)
        except Exception:
            if self._eager_encoder is None:
                raise
            log.warning("torch.compile failed; serving the eager encoder", exc_info=True)
            self.cnn, self._eager_encoder = self._eager_encoder, None
            self._run_warm_up(batch_sizes)
        log.info("warm-up took %.2f s", time.perf_counter() - started)

    def _run_warm_up(self, batch_sizes: Sequence[int]) -> None:
        picture = Image.new("RGB", (320, 240), (128, 96, 64))
        image, _ = self.prepare_image(picture)
        clip, _ = self.prepare_frames([picture] * self.num_frames)
        options = self.options()
        batches = [[image] * size for size in batch_sizes] + [[clip], [clip, image]]
        for batch in batches:
            self.caption_tensors(batch, [options] * len(batch))

    # -- the batched model call ----------------------------------------------------------

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.dtype == torch.float32:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield

    @torch.inference_mode()
    def caption_tensors(
        self,
        sequences: Sequence[torch.Tensor],
        options: DecodingOptions | Sequence[DecodingOptions] | None = None,
    ) -> list[CaptionResult]:
        """Caption a batch of frame sequences (each (T_i, 3, S, S)) in one encoder pass.

        ``options`` is one set for all, or one per sequence: sequences are encoded together and
        then decoded in groups of equal options, so mixed requests still share the CNN.
        """
        return self.caption_and_embed(sequences, options)[0]

    @torch.inference_mode()
    def caption_and_embed(
        self,
        sequences: Sequence[torch.Tensor],
        options: DecodingOptions | Sequence[DecodingOptions] | None = None,
        *,
        features: bool = False,
    ) -> tuple[list[CaptionResult], np.ndarray]:
        """Results and pooled encoder embeddings (N, E) of a batch, from one encoder pass.

        With ``features=True`` the sequences are encoder outputs (each (T_i, D)), as a feature
        cache holds them, and the CNN does not run. The embeddings are what retrieval compares.
        """
        if not sequences:
            return [], np.zeros((0, 0), dtype=np.float32)
        if any(len(sequence) == 0 for sequence in sequences):
            raise InvalidMediaError("a frame sequence needs at least one frame")
        per_item = _per_item_options(options or self.checkpoint.decoding, len(sequences))
        results: list[CaptionResult] = []
        embeddings = []
        for start in range(0, len(sequences), self.max_batch_size):
            chunk = sequences[start : start + self.max_batch_size]
            captions, embedded = self._caption_chunk(
                chunk, per_item[start : start + len(chunk)], features
            )
            results.extend(captions)
            embeddings.append(embedded)
        return results, np.concatenate(embeddings)

    @torch.inference_mode()
    def embed(self, sequences: Sequence[torch.Tensor], *, features: bool = False) -> np.ndarray:
        """Pooled encoder embeddings (N, E) of frame sequences, or of cached encoder outputs."""
        rows = []
        for start in range(0, len(sequences), self.max_batch_size):
            with self._autocast():
                _, _, embedded = self._encode(
                    sequences[start : start + self.max_batch_size], features
                )
            rows.append(embedded.float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def _encode(
        self, sequences: Sequence[torch.Tensor], features: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pad a batch and run the CNN on it (unless it is cached features already).

        Returns lengths (B,), encoder outputs (B, T, D) and pooled embeddings (B, E).
        """
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        padded = torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True)
        padded = padded.to(self.device, non_blocking=True)  # (B, T, 3, S, S) or (B, T, D)
        encoded = padded if features else self.model.frame_features(padded, lengths, self.cnn)
        return lengths, encoded, pooled_embedding(encoded, lengths, self.model.config.encoder)

    def _caption_chunk(
        self, sequences: Sequence[torch.Tensor], options: list[DecodingOptions], features: bool
    ) -> tuple[list[CaptionResult], np.ndarray]:
        with self._autocast():
            lengths, encoded, embedded = self._encode(sequences, features)
            visual = self.model.encode(lengths, features=encoded)  # one row per sequence
            captions: list[list[Caption]] = [[] for _ in sequences]
            groups: dict[DecodingOptions, list[int]] = {}
            for index, opts in enumerate(options):
                groups.setdefault(replace(opts, tags=0), []).append(index)
            for opts, indices in groups.items():
                picked = torch.tensor(indices, device=self.device)
                for index, hyps in zip(
                    indices, generate(self.model, visual[picked], self.vocab, opts), strict=True
                ):
                    captions[index] = [
                        Caption(
                            self.vocab.decode(h.tokens), round(h.log_prob, 4), round(h.score, 4)
                        )
                        for h in hyps
                    ]
            tags = self._tags(encoded, lengths, [opts.tags for opts in options])
            scores = self._domain_scores(encoded, lengths)
        results = []
        for index, item_captions in enumerate(captions):
            score = None if scores is None else round(float(scores[index]), 4)
            in_domain = None if score is None else score <= 1.0
            warnings = [OUT_OF_DOMAIN.format(domain=self.domain)] if in_domain is False else []
            results.append(
                CaptionResult(item_captions, None, tags[index], in_domain, score, warnings)
            )
        return results, embedded.float().cpu().numpy()

    def _tags(
        self, encoded: torch.Tensor, lengths: torch.Tensor, wanted: list[int]
    ) -> list[list[Tag]]:
        """Each sequence's top ImageNet classes, its frames' probabilities averaged; only for
        the sequences that asked, so a batch without tags runs nothing more."""
        if not any(wanted):
            return [[] for _ in wanted]
        if self.tagger is None:
            raise TagsUnavailableError(f"this model cannot give tags: {self.tags_unavailable}")
        asked = [i for i, k in enumerate(wanted) if k]
        valid = frame_mask(lengths[asked], encoded.shape[1])  # (A, T)
        frames = encoded[asked][valid]  # (n, D): the real frames of the sequences that asked
        probabilities = self.tagger(frames).float().softmax(-1)  # (n, 1000)
        per_sequence = probabilities.split(lengths[asked].tolist())
        tags: list[list[Tag]] = [[] for _ in wanted]
        for index, frame_probabilities in zip(asked, per_sequence, strict=True):
            tags[index] = top_tags(frame_probabilities.mean(0).cpu(), wanted[index])
        return tags

    def _domain_scores(self, encoded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """Each sequence's distance from the training data (None: no summary to measure it)."""
        if self.model.domain is None:
            return None
        frames = frame_embeddings(encoded, self.model.config.encoder)  # (B, T, E)
        return self.model.domain.score(frames, lengths).cpu()

    # -- convenience entry points --------------------------------------------------------

    def caption_images(
        self, images: Sequence[ImageSource], options: DecodingOptions | None = None
    ) -> list[CaptionResult]:
        """Caption images (PIL images, bytes or paths) in batches."""
        tensors = [self.prepare_image(image)[0] for image in images]
        return self.caption_tensors(tensors, options)

    def caption_frames(
        self, frames: Sequence[ImageSource], options: DecodingOptions | None = None
    ) -> CaptionResult:
        """Describe one ordered frame sequence."""
        return self.caption_tensors([self.prepare_frames(frames)[0]], options)[0]

    def caption_video(
        self,
        source: VideoSource,
        num_frames: int | None = None,
        options: DecodingOptions | None = None,
        limits: VideoLimits | None = None,
    ) -> CaptionResult:
        """Describe a video file (path or bytes) from ``num_frames`` uniformly sampled frames."""
        tensor, info = self.prepare_video(source, num_frames, limits)
        return replace(self.caption_tensors([tensor], options)[0], video=info)

    def describe(self) -> dict[str, Any]:
        """What is loaded, for logs and the service's /v1/models."""
        return {
            "name": self.name,
            "version": self.version,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "encoder": self.model.config.encoder.name,
            "encoder_runtime": "onnxruntime" if isinstance(self.cnn, OnnxEncoder) else "torch",
            "vocab_size": len(self.vocab),
            # Training items in the caption memory a retrieval-augmented model looks up; 0: none.
            "retrieval_items": self.model.config.retrieval_items,
            "tags": self.tagger is not None,
            "tags_unavailable": self.tags_unavailable or None,
            "domain": self.domain if self.model.domain is not None else None,
            "preprocess": vars(self.checkpoint.preprocess),
            "decoding_defaults": vars(self.checkpoint.decoding),
        }


def _decoder_threads(cnn_threads: int) -> int:
    """PyTorch's threads when ONNX Runtime runs the CNN on ``cnn_threads``: half of them.

    The decoder's steps are small matrix products that gain little from a second thread, and
    the cores it leaves free decode the next batch's JPEGs meanwhile. Measured over HTTP on
    2 cores, 1 thread against 2: 640x480 +25% at 1 client and +8% at 16; 4000x3000 +12% at 1
    client, the same at 16. More cores were not measured; half is the guess that keeps room
    for both the decoder and the JPEGs.
    """
    return max(1, cnn_threads // 2)


def _per_item_options(
    options: DecodingOptions | Sequence[DecodingOptions], count: int
) -> list[DecodingOptions]:
    if isinstance(options, DecodingOptions):
        return [options.validate()] * count
    if len(options) != count:
        raise ValueError(f"got {len(options)} option sets for {count} inputs")
    return [o.validate() for o in options]
