"""Progress bars that suit where their output goes.

On a terminal, tqdm's bar redraws in place. Elsewhere (CI, ``docker logs``, a file) every
redraw is a new line of carriage-return noise, so there the bar updates at most once a minute.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

QUIET_INTERVAL_S = 60.0  # seconds between updates when stderr is not a terminal


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, updating at most once a minute off a terminal."""
    if not sys.stderr.isatty():
        options.setdefault("mininterval", QUIET_INTERVAL_S)
        options.setdefault("maxinterval", QUIET_INTERVAL_S)
    return tqdm(iterable, **options)
