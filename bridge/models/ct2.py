"""Reader for CTranslate2 `model.bin` files.

The registries ship whisper weights only in CTranslate2 format; whisper.cpp needs ggml. This
module reads the CT2 container (format version 6, as written by ctranslate2 >= 3) into numpy
arrays so `bridge.models.convert` can re-emit them. Layout: docs/models.md, "Conversion".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    # 5 is bfloat16: numpy has no such dtype; read it as raw uint16 and widen on demand.
    5: np.dtype("<u2"),
}


class ModelFormatError(ValueError):
    """A model file is not what it claims to be (bad magic, truncated, unknown layout)."""


@dataclass
class Ct2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following aliases (tied embeddings are stored once)."""
        if name in self.variables:
            return self.variables[name]
        if name in self.aliases:
            return self.get(self.aliases[name])
        raise KeyError(name)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ModelFormatError(f"CTranslate2 file truncated while reading {what}")
    return data


def _u32(f: BinaryIO, what: str) -> int:
    return struct.unpack("<I", _read_exact(f, 4, what))[0]


def _string(f: BinaryIO, what: str) -> str:
    (n,) = struct.unpack("<H", _read_exact(f, 2, what))
    raw = _read_exact(f, n, what)
    return raw.rstrip(b"\0").decode("utf-8")


def read_ct2(path: str | Path) -> Ct2Model:
    """Load every variable of a CT2 model.bin into memory (tiny: 75 MB, base: 145 MB)."""
    with open(path, "rb") as f:
        version = _u32(f, "version")
        if version < 5 or version > 6:
            raise ModelFormatError(f"{path}: unsupported CTranslate2 format version {version}")
        spec = _string(f, "spec name")
        revision = _u32(f, "revision")
        count = _u32(f, "variable count")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = _string(f, "variable name")
            (rank,) = struct.unpack("<B", _read_exact(f, 1, name))
            dims = struct.unpack(f"<{rank}I", _read_exact(f, 4 * rank, name)) if rank else ()
            (dtype_id,) = struct.unpack("<B", _read_exact(f, 1, name))
            nbytes = _u32(f, name)
            if dtype_id not in _DTYPES:
                raise ModelFormatError(f"{name}: unknown CTranslate2 dtype {dtype_id}")
            dtype = _DTYPES[dtype_id]
            raw = _read_exact(f, nbytes, name)
            arr = np.frombuffer(raw, dtype=dtype)
            expected = int(np.prod(dims)) if dims else 1
            if arr.size != expected:
                raise ModelFormatError(f"{name}: {arr.size} values for shape {dims}")
            if dtype_id == 5:
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            variables[name] = arr.reshape(dims) if dims else arr.reshape(())
        aliases: dict[str, str] = {}
        tail = f.read(4)
        if len(tail) == 4:
            (n_alias,) = struct.unpack("<I", tail)
            for _ in range(n_alias):
                alias = _string(f, "alias")
                aliases[alias] = _string(f, "alias target")
    if spec != "WhisperSpec":
        raise ModelFormatError(f"{path}: spec {spec!r} is not a whisper model")
    return Ct2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)
