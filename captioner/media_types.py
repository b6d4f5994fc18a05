"""File-name suffixes that say whether a file is an image or a video.

Kept apart from ``media.py`` so that dataset readers can tell kinds apart without importing
torch or PyAV, and so that there is one list: the CLI, the readers and the media loader agree.
"""

from __future__ import annotations

from pathlib import Path

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".webm", ".avi", ".mov", ".mkv", ".gif", ".mpg"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


def is_video_path(path: str | Path) -> bool:
    """True when the file name's suffix is a video container's."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
