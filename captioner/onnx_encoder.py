"""ONNX Runtime for the CNN encoder on CPUs: the same weights and outputs, 2.7-4.9x the images/s.

Eager PyTorch runs EfficientNet-Lite0's depthwise convolutions far from what a CPU can do;
ONNX Runtime's CPU kernels fuse them (measured on a 2-core x86 CPU in two runs: 28-42 -> 112-115
images/s at batch 1, 31-38 -> 150-152 at batch 32, max abs difference 3e-5;
``python -m benchmarks.bench_model``).
The encoder is exported once per set of weights, into a cache folder keyed by the SHA-256
of its weights and config, and every new session is checked
against PyTorch on a probe batch before it is used. Anything that goes wrong (the runtime is
not installed, export fails, the outputs differ) leaves the PyTorch encoder in place, with one
log line saying why. GPUs keep PyTorch: there the eager encoder is not the bottleneck.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner.config import EncoderConfig
from captioner.encoder import ImageEncoder

log = logging.getLogger(__name__)

CACHE_ENV = "CAPTIONER_CACHE_DIR"  # where exported encoders go; default ~/.cache/captioner
RUNTIMES = ("auto", "torch")  # auto: ONNX Runtime on CPUs when it is installed and agrees
OPSET = 17
# Agreement asked of a new session against PyTorch on the probe batch: float32 kernels differ
# in summation order only (measured 3e-5 on features of magnitude ~20).
TOLERANCE = 1e-3


def cache_dir() -> Path:
    """The folder for exported encoders: $CAPTIONER_CACHE_DIR/onnx, or ~/.cache/captioner/onnx."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "captioner"
    return Path(root) / "onnx"


class OnnxEncoder(nn.Module):
    """Drop-in for an ImageEncoder in eval mode: pixels (N, 3, S, S) -> features (N, D).

    One image alone runs on ``session``, whose kernels split each layer across the cores. A
    batch runs instead one image per run on ``part_session``, which has one thread per run:
    ``parts`` threads (the caller and a pool) each take the next image as soon as they finish
    one. So 48 small layers cost no hand-offs between threads; a core that the decoder or the
    JPEG threads take for a moment only means the other thread takes more images; and one
    image's activations stay in its core's cache, where a run of 8 images does not. On a
    2-core x86 CPU: 16 images 114 -> 145 images/s and 32 images 110 -> 134, against runs of
    half the batch per core; those were 76-104 -> 90-110 against the 2-thread session (16
    images), and 2 images 86-105 -> 105-118. The outputs are the same rows either way.
    """

    def __init__(
        self,
        session: object,
        config: EncoderConfig,
        path: Path,
        *,
        part_session: object | None = None,
        parts: int = 1,
    ) -> None:
        super().__init__()
        self.session = session
        self.part_session = part_session if parts > 1 else None
        self.parts = parts
        # With the calling thread, these take a batch's images in turn (_one_image_per_run).
        self._pool = (
            ThreadPoolExecutor(parts - 1, thread_name_prefix="onnx-part")
            if self.part_session is not None
            else None
        )
        self.config = config  # what pooled_embedding and the tagger read, as on ImageEncoder
        self.path = path  # the exported graph

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        if self._pool is None or len(array) < 2:
            (features,) = self.session.run(None, {"pixels": array})  # type: ignore[attr-defined]
            return torch.from_numpy(features)
        return torch.from_numpy(self._one_image_per_run(array, self._pool))

    def _one_image_per_run(self, array: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
        """Features of a batch, each image run alone; ``parts`` threads share out the images."""
        rows: list[np.ndarray] = [array[:0]] * len(array)  # each replaced by its image's row
        next_image, lock, failed = itertools.count(), threading.Lock(), threading.Event()
        run = self.part_session.run  # type: ignore[attr-defined]

        def take_images() -> None:
            while not failed.is_set():  # once a run failed, the batch has no use for the rest
                with lock:
                    index = next(next_image)
                if index >= len(array):
                    return
                try:
                    (rows[index],) = run(None, {"pixels": array[index : index + 1]})
                except BaseException:
                    failed.set()
                    raise

        helpers = [pool.submit(take_images) for _ in range(min(self.parts, len(array)) - 1)]
        try:
            take_images()
        finally:
            wait(helpers)  # no run outlives the call, a failed one's included
        for helper in helpers:
            helper.result()  # a helper's error is raised here
        return np.concatenate(rows)


def fingerprint(encoder: ImageEncoder, image_size: int) -> str:
    """SHA-256 of what the exported graph depends on: config, input size and every weight."""
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(encoder.config), image_size, OPSET], default=str).encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export(encoder: ImageEncoder, image_size: int, path: Path) -> None:
    """Write the encoder as an ONNX graph with a dynamic batch size (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = torch.zeros(2, 3, image_size, image_size)
    handle, temporary = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(handle)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns that it is the legacy path; it is the one that
            # needs no onnxscript, and it handles this plain convolutional graph exactly.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder.eval(),
                (probe,),
                temporary,
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def onnx_encoder(
    encoder: ImageEncoder,
    image_size: int,
    *,
    threads: int | None = None,
    folder: Path | None = None,
    spinning: bool = False,
) -> OnnxEncoder | None:
    """The encoder on ONNX Runtime, or None (logged once) when that is not possible here.

    ``spinning`` lets its threads busy-wait between runs: faster for the CNN alone (121 against
    96 images/s at batch 1 on 2 cores), slower for everything else on the machine, so captioner
    leaves it off (over HTTP: 13.7 against 11.6 images/s at 1 client, 34.5 against 26.7 at 16).
    """
    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime is not installed: the CNN encoder runs in PyTorch")
        return None
    path = (folder or cache_dir()) / f"{fingerprint(encoder, image_size)}.onnx"
    try:
        if not path.is_file():
            log.info("exporting the CNN encoder to ONNX at %s (once per set of weights)", path)
            export(encoder, image_size, path)
        threads = threads or torch.get_num_threads()
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        # No busy-waiting between runs by default: PyTorch's decoder and the media threads need
        # the cores the moment the CNN is done.
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        options.log_severity_level = 3  # errors only; the fallback below reports them

        def session(intra_op_threads: int) -> object:
            options.intra_op_num_threads = intra_op_threads
            return onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )

        fast = OnnxEncoder(
            session(threads),
            encoder.config,
            path,
            part_session=session(1) if threads > 1 else None,
            parts=threads,
        )
        # Two images run as two parts, one image as a whole: both sessions are checked.
        probe = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = encoder.eval()(probe).float()
        difference = max(
            (fast(probe) - expected).abs().max().item(),
            (fast(probe[:1]) - expected[:1]).abs().max().item(),
        )
        if not difference <= TOLERANCE * max(1.0, expected.abs().max().item()):
            raise RuntimeError(f"its outputs differ from PyTorch's by {difference:.2e}")
    except Exception as exc:  # any failure here only costs speed: say so and go on
        log.warning("ONNX Runtime encoder unavailable (%s): the CNN encoder runs in PyTorch", exc)
        return None
    log.info("the CNN encoder runs on ONNX Runtime (%s)", path.name[:12])
    return fast


def fast_encoder(
    encoder: ImageEncoder, image_size: int, device: torch.device, runtime: str = "auto"
) -> nn.Module:
    """The encoder to run inference with: ONNX Runtime on CPUs where it works, else ``encoder``.

    A CNN that is being fine-tuned (not frozen) always stays in PyTorch.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"encoder runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "torch" or device.type != "cpu" or not encoder.config.frozen:
        return encoder
    return onnx_encoder(encoder, image_size) or encoder
