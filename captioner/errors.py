"""The library's exception hierarchy: every error captioner raises on purpose is one of these.

The HTTP layer maps these types to status codes in exactly one place (``app/errors.py``);
the CLI prints their message on one line.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class for every error the library raises on purpose."""


class InvalidMediaError(CaptionerError):
    """An image, video or frame could not be decoded, or is not a supported format."""


class MediaTooLargeError(InvalidMediaError):
    """The media exceeds a configured limit (pixels, frames, duration)."""


class DecodeTimeoutError(MediaTooLargeError):
    """A video took longer to decode than its wall-clock budget (``VideoLimits.max_decode_s``)."""


class StillImageError(InvalidMediaError):
    """A still image was given where a video was expected (caption it as an image)."""


class ModelLoadError(CaptionerError):
    """A checkpoint or pretrained weights file is missing, corrupt or incompatible."""


class ConfigError(CaptionerError):
    """A configuration value is invalid or unknown."""


class DatasetError(CaptionerError):
    """A dataset file or item is malformed or points at a missing file."""


class InvalidOptionError(CaptionerError, ValueError):
    """A decoding option is outside its documented range."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TagsUnavailableError(InvalidOptionError):
    """Tags were asked of a model whose CNN has no ImageNet classifier to give them."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "tags")


__all__ = [
    "CaptionerError",
    "ConfigError",
    "DatasetError",
    "DecodeTimeoutError",
    "InvalidMediaError",
    "InvalidOptionError",
    "MediaTooLargeError",
    "ModelLoadError",
    "StillImageError",
    "TagsUnavailableError",
]
