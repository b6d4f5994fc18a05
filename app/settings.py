"""Service settings, read from ``CAPTIONER_*`` environment variables (pydantic-settings).

``create_app`` takes a ``Settings`` (tests pass their own) or reads the environment once through
the cached ``get_settings``; routes receive the app's through ``app.deps.SettingsDep``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob of the service; each field is the env var ``CAPTIONER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore", frozen=True)

    # -- model -------------------------------------------------------------------------------
    model_path: Path | None = Field(
        None, description="checkpoint folder; unset = the model shipped inside the package"
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = fp32 on CPU, bf16/fp16 autocast on CUDA"
    )
    encoder_runtime: Literal["auto", "torch"] = Field(
        "auto",
        description="auto = the CNN on ONNX Runtime on CPUs (exported once per model into "
        "CAPTIONER_CACHE_DIR, falling back to PyTorch with a log line); torch = always PyTorch",
    )
    compile: bool = Field(
        False, description="torch.compile the encoder at start-up (when it runs in PyTorch)"
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for the model's CNN; unset = the CPUs this process may use. "
        "When the CNN runs on ONNX Runtime, the PyTorch decoder gets half of them",
    )

    # -- server ------------------------------------------------------------------------------
    host: str = "0.0.0.0"  # a service in a container listens on every interface
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(True, description="one JSON line per request on the access logger")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    # -- slow clients and connections --------------------------------------------------------
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection must send a whole request head within this (from when it "
        "opens, or its last answer); else it is closed",
    )
    body_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a request body must arrive in full within this (from its head); past it, 408",
    )
    body_idle_timeout_s: float = Field(
        30.0, gt=0, description="the longest pause between two pieces of a body; past it, 408"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle keep-alive connection is closed after this"
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="open connections (and requests in progress) at once; beyond, uvicorn's 503",
    )

    # -- engine ------------------------------------------------------------------------------
    # 16, measured over HTTP on 2 cores against 8: +6% at 16 clients and +11% at 64 (640x480),
    # +5% at 16 (4000x3000). 32 was 3% slower than 8 at 16 clients, where one batch of all 16
    # requests leaves the JPEG threads nothing to decode while it runs.
    max_batch_size: int = Field(16, ge=1, le=256, description="inputs per model call")
    max_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="how long a batch waits to fill up before it runs"
    )
    max_queue: int = Field(
        64,
        ge=1,
        description="inputs that may wait for preprocessing, and for the model; more get 429",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="per request; past it, 504")
    preprocess_workers: int | None = Field(
        None, ge=1, description="threads decoding and resizing media; unset = CPU count"
    )
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header on 429 and 503")

    # -- limits ------------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * MiB, ge=1, description="per image (and per frame)")
    max_video_bytes: int = Field(200 * MiB, ge=1, description="per video file")
    max_images: int = Field(16, ge=1, description="images per /v1/captions/images request")
    max_pixels: int = Field(
        40_000_000, ge=1, description="per image or frame: a decompression-bomb guard"
    )
    max_frames: int = Field(
        32, ge=1, description="the largest num_frames, and the most frames in a frame list"
    )
    max_video_duration_s: float = Field(600.0, gt=0, description="longest video accepted")
    max_video_pixels: int = Field(4096 * 2160, ge=1, description="per video frame")
    max_decode_s: float = Field(
        20.0,
        gt=0,
        description="wall-clock budget to read one video (checked between packets); past it, "
        "413 decode_timeout and the worker is free again. Keep it under request_timeout_s",
    )

    # -- auth --------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated; when set, requests need 'Authorization: Bearer <key>'",
    )
    auth_exempt_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/health/live", "/health/ready", "/metrics"],
        description="comma-separated paths that never need a key (probes and metrics)",
    )

    @field_validator("api_keys", "auth_exempt_paths", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
