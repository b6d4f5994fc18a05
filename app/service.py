"""The serving engine: loads and warms the model, decodes media in a worker pool, batches.

It owns the one ``Captioner`` of this process and orchestrates the preprocessing pool, the
batcher and the deadlines; the ``Captioner`` does everything that needs torch. Routes hand it
bytes and options and get captions back. It never sees HTTP: when it cannot serve, it raises
the engine's errors (``app.engine_errors``), which ``app/errors.py`` turns into answers.
Nothing heavy runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.batching import Batched, Batcher
from app.engine_errors import InputFailed, NotReady, QueueFull, RequestTimeout, TooManyFrames
from app.metrics import Metrics
from app.settings import Settings
from captioner.config import DecodingOptions
from captioner.errors import CaptionerError
from captioner.inference import Caption, Captioner, CaptionResult
from captioner.media import VideoInfo, VideoLimits, sample_indices

log = logging.getLogger(__name__)

T = TypeVar("T")


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


@dataclass(frozen=True)
class Prepared:
    """One input ready for the model: the opaque tensor from ``Captioner.prepare_*``."""

    tensor: Any
    input: dict[str, Any]
    preprocess_s: float


@dataclass(frozen=True)
class Captioned:
    """One input's captions, what it was, and where the time went (seconds)."""

    result: CaptionResult  # captions, tags, the domain flag
    input: dict[str, Any]
    preprocess_s: float
    queue_s: float
    inference_s: float

    @property
    def captions(self) -> list[Caption]:
        return self.result.captions

    @property
    def caption(self) -> str:
        return self.result.caption


class CaptionService:
    """The one model of this process, behind a preprocessing pool and a dynamic batcher."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.LOADING
        self.load_error: str | None = None
        self.captioner: Captioner | None = None
        self.batcher: Batcher[Any, DecodingOptions, CaptionResult] | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by serve.run: stop the server
        self.workers = settings.preprocess_workers or available_cpus()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="preprocess")
        self._preprocessing = 0  # jobs submitted to the pool and not finished

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load, optionally compile, and warm up the model; then start taking requests."""
        started = time.perf_counter()
        try:
            self.captioner = await asyncio.to_thread(self._load)
        except Exception as exc:
            self.state = State.FAILED
            self.load_error = str(exc)
            # A ModelLoadError's message names the problem and the fix; anything else is a bug.
            log.error("model failed to load: %s", exc, exc_info=not isinstance(exc, CaptionerError))
            if self.on_fatal is not None:
                self.on_fatal()
            return
        if self.state is State.DRAINING:  # shut down while loading
            return
        self.batcher = Batcher(
            self.captioner.caption_tensors,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000,
            max_queue=self.settings.max_queue,
            metrics=self.metrics,
            upstream=lambda: self._preprocessing,
        )
        self.batcher.start()
        self.state = State.READY
        self.metrics.ready.set(1)
        c = self.captioner
        log.info(
            "ready in %.2f s: model %s v%s on %s (%s, CNN on %s)",
            time.perf_counter() - started,
            c.name,
            c.version,
            c.device,
            str(c.dtype).removeprefix("torch."),
            c.describe()["encoder_runtime"],
        )

    def _load(self) -> Captioner:
        s = self.settings
        captioner = Captioner.load(
            s.model_path,
            device=s.device,
            precision=s.precision,
            num_threads=s.torch_threads,
            max_batch_size=s.max_batch_size,
            encoder_runtime=s.encoder_runtime,
        )
        if s.compile:
            captioner.compile()
        captioner.warm_up(batch_sizes=(1, s.max_batch_size))
        return captioner

    def begin_drain(self) -> None:
        """Stop taking new requests (they get 503); in-flight ones still finish."""
        if self.state is not State.FAILED:  # a failed load stays the reason for the exit code
            self.state = State.DRAINING
        self.metrics.ready.set(0)

    async def close(self) -> None:
        """Drain: finish what is queued (within the shutdown timeout), then free the pools."""
        self.begin_drain()
        if self.batcher is not None:
            await self.batcher.close(self.settings.shutdown_timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ------------------------------------------------------------------------------

    def require_ready(self) -> Captioner:
        """The captioner; ``NotReady`` while loading, after a failure, or draining."""
        if self.state is State.READY and self.captioner is not None:
            return self.captioner
        message = {
            State.LOADING: "the model is still loading",
            State.FAILED: "the model failed to load; see the server log",
            State.DRAINING: "the server is shutting down",
        }[self.state]
        raise NotReady(message)

    def options(self, overrides: dict[str, Any]) -> DecodingOptions:
        """The model's decoding defaults with ``overrides``, validated (``InvalidOptionError``
        names the option out of range)."""
        return self._model.options(**overrides)

    def num_frames(self, requested: int | None) -> int:
        """The frames to sample: ``requested`` or the model's default, within the limit."""
        count = requested or self._model.num_frames
        if count > self.settings.max_frames:
            raise TooManyFrames(
                f"num_frames is {count}, over the limit of {self.settings.max_frames}"
            )
        return count

    async def caption_image(self, data: bytes, options: DecodingOptions) -> Captioned:
        async with self._deadline():
            self._admit(1)
            prepared = await self._prepare(self._prepare_image, data, kind="image")
            return (await self._infer([prepared], options))[0]

    async def caption_images(
        self, images: Sequence[bytes | Exception], options: DecodingOptions
    ) -> list[Captioned | Exception]:
        """Each image captioned, or the error that image alone caused, in input order.

        An image that failed before it got here (an exception in place of its bytes) keeps its
        error; one that cannot be read gets an ``InputFailed``.
        """
        async with self._deadline():
            self._admit(sum(isinstance(image, bytes) for image in images))

            async def prepare(index: int, image: bytes | Exception) -> Prepared | Exception:
                if not isinstance(image, bytes):
                    return image
                try:
                    return await self._prepare(
                        self._prepare_image,
                        image,
                        f"images[{index}]",
                        kind="image",
                        param=f"images[{index}]",
                    )
                except InputFailed as exc:
                    return exc

            prepared = await asyncio.gather(*(prepare(i, image) for i, image in enumerate(images)))
            good = [p for p in prepared if isinstance(p, Prepared)]
            done = iter(await self._infer(good, options))
            return [next(done) if isinstance(p, Prepared) else p for p in prepared]

    async def caption_video(
        self, path: Path, num_frames: int, options: DecodingOptions
    ) -> Captioned:
        async with self._deadline():
            self._admit(1)
            prepared = await self._prepare(
                self._prepare_video, path, num_frames, kind="video", param="video"
            )
            return (await self._infer([prepared], options))[0]

    async def caption_frames(
        self, frames: list[bytes], num_frames: int | None, options: DecodingOptions
    ) -> Captioned:
        if num_frames is not None and num_frames < len(frames):
            frames = [frames[i] for i in sample_indices(len(frames), num_frames)]
        async with self._deadline():
            self._admit(1)
            prepared = await self._prepare(
                self._prepare_frames, frames, kind="frames", param="frames"
            )
            return (await self._infer([prepared], options))[0]

    # -- the pipeline --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                yield
        except TimeoutError as exc:
            limit = self.settings.request_timeout_s
            raise RequestTimeout(f"the request took longer than {limit:g} s") from exc

    def _admit(self, count: int) -> None:
        """Refuse work (``QueueFull``) that would overfill the preprocessing or the model queue."""
        assert self.batcher is not None
        waiting = max(0, self._preprocessing - self.workers)
        if waiting + count > self.settings.max_queue or not self.batcher.has_room(count):
            raise QueueFull("the server is at capacity")

    async def _prepare(
        self, job: Callable[..., T], *args: Any, kind: str, param: str | None = None
    ) -> T:
        """Run a media job in the worker pool; any error it raises becomes ``InputFailed``."""
        loop = asyncio.get_running_loop()
        self._preprocessing += 1
        self._update_depth()

        def finished(_: object) -> None:
            self._preprocessing -= 1
            self._update_depth()

        # Counted until the job really ends, even when its caller has timed out.
        future = self._pool.submit(job, *args)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(finished, f))
        try:
            return await asyncio.wrap_future(future)
        except Exception as exc:
            media: Literal["image", "video"] = "image" if kind == "image" else "video"
            raise InputFailed(exc, media=media, param=param or media) from exc

    def _update_depth(self) -> None:
        waiting = max(0, self._preprocessing - self.workers)
        self.metrics.queue_depth.labels(stage="preprocess").set(waiting)

    async def _infer(
        self, prepared: Sequence[Prepared], options: DecodingOptions
    ) -> list[Captioned]:
        assert self.batcher is not None
        results = await self.batcher.submit_many([(p.tensor, options) for p in prepared])
        return [_captioned(p, r) for p, r in zip(prepared, results, strict=True)]

    # -- preprocessing jobs (worker threads) ---------------------------------------------------

    @property
    def _model(self) -> Captioner:
        assert self.captioner is not None, "requests are admitted only once the model is loaded"
        return self.captioner

    def _timed(self, kind: str, started: float) -> float:
        seconds = time.perf_counter() - started
        self.metrics.preprocess_duration.labels(kind=kind).observe(seconds)
        return seconds

    def _prepare_image(self, data: bytes, label: str = "image") -> Prepared:
        started = time.perf_counter()
        tensor, info = self._model.prepare_image(
            data, max_pixels=self.settings.max_pixels, label=label
        )
        return Prepared(tensor, asdict(info), self._timed("image", started))

    def _prepare_video(self, path: Path, num_frames: int) -> Prepared:
        started = time.perf_counter()
        s = self.settings
        limits = VideoLimits(
            max_duration_s=s.max_video_duration_s,
            max_pixels=s.max_video_pixels,
            max_decode_s=s.max_decode_s,
        )
        # Named "video" in errors: the path is the server's temporary file, not the client's.
        tensor, info = self._model.prepare_video(path, num_frames, limits, label="video")
        return Prepared(tensor, _video_input(info), self._timed("video", started))

    def _prepare_frames(self, frames: list[bytes]) -> Prepared:
        started = time.perf_counter()
        tensor, first = self._model.prepare_frames(frames, max_pixels=self.settings.max_pixels)
        info = {  # a frame list has no timing or codec; its size is its first frame's
            "frames_used": len(frames),
            "duration_s": None,
            "fps": None,
            "codec": None,
            "width": first.width,
            "height": first.height,
        }
        return Prepared(tensor, info, self._timed("frames", started))


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity where the OS has one (Linux), else all."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _video_input(info: VideoInfo) -> dict[str, Any]:
    return {
        "frames_used": info.frames_used,
        "duration_s": info.duration_s,
        "fps": info.fps,
        "codec": info.codec,
        "width": info.width,
        "height": info.height,
    }


def _captioned(prepared: Prepared, result: Batched[CaptionResult]) -> Captioned:
    return Captioned(
        result=result.value,
        input=prepared.input,
        preprocess_s=prepared.preprocess_s,
        queue_s=result.queue_s,
        inference_s=result.inference_s,
    )
