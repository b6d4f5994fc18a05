"""The public surface of ``captioner`` and ``app``: what ``__all__`` promises, and nothing else.

A name added to (or dropped from) a package's top level must be added here on purpose.
"""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest

import app
import captioner

CAPTIONER = [
    "Captioner",
    "CaptionerError",
    "ConfigError",
    "DatasetError",
    "DecodingOptions",
    "EncoderConfig",
    "InvalidMediaError",
    "InvalidOptionError",
    "MediaTooLargeError",
    "ModelConfig",
    "ModelLoadError",
    "PreprocessConfig",
    "__version__",
]
APP = ["Settings", "create_app", "get_settings"]


@pytest.mark.parametrize(("package", "expected"), [(captioner, CAPTIONER), (app, APP)])
def test_all_is_the_documented_public_surface(package: ModuleType, expected: list[str]) -> None:
    assert package.__all__ == expected
    assert package.__all__ == sorted(package.__all__)


@pytest.mark.parametrize("package", [captioner, app])
def test_every_public_name_is_exported_and_every_export_resolves(package: ModuleType) -> None:
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public <= set(package.__all__)
    for name in package.__all__:
        assert getattr(package, name) is not None, name


def test_captioner_exports_the_captioner_and_the_error_hierarchy() -> None:
    from captioner.inference import Captioner

    assert captioner.Captioner is Captioner
    errors = [getattr(captioner, n) for n in captioner.__all__ if n.endswith("Error")]
    assert all(issubclass(error, captioner.CaptionerError) for error in errors)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        captioner.Nope  # noqa: B018


def test_importing_captioner_stays_light() -> None:
    # The configs and errors need no torch; Captioner imports it on first use.
    code = (
        "import sys, captioner\n"
        "heavy = [m for m in ('torch', 'PIL', 'av', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "captioner.Captioner\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
