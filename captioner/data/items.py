"""The one item type every dataset reader yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CaptionItem:
    """One captioned example: an image, a video file, or an ordered list of frame images.

    ``paths`` holds one path for an image or a video file, and several for a frame sequence.
    ``kind`` is "image" or "video" (a video file or a frame sequence).
    ``meta`` carries dataset-specific ground truth (the scenes generator stores its objects
    and motion there so that captions can be scored for attribute accuracy).
    """

    id: str
    paths: tuple[Path, ...]
    kind: str
    captions: tuple[str, ...]
    split: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_frame_sequence(self) -> bool:
        return len(self.paths) > 1
