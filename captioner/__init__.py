"""captioner: image and video captioning with a CNN encoder and LSTM decoders."""

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

__version__ = "0.1.0"

__all__ = [
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
