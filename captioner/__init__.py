"""captioner: image and video captioning with a CNN encoder and LSTM decoders.

``import captioner`` stays light: ``Captioner`` (and with it torch) is imported on first use.
"""

import typing as _typing

from captioner.config import DecodingOptions, EncoderConfig, ModelConfig, PreprocessConfig
from captioner.errors import (
    CaptionerError,
    ConfigError,
    DatasetError,
    InvalidMediaError,
    InvalidOptionError,
    MediaTooLargeError,
    ModelLoadError,
)

if _typing.TYPE_CHECKING:
    from captioner.inference import Captioner

__version__ = "0.1.0"

__all__ = [
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


def __getattr__(name: str) -> _typing.Any:  # PEP 562: import Captioner on first use
    if name == "Captioner":
        from captioner.inference import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
