"""The legacy whisper.cpp ggml model file: writer, reader and block quantizers.

whisper.cpp 1.8.5 (bundled by pywhispercpp) still loads the legacy single-file format:
magic, hyper-parameters, mel filterbank, vocabulary, then a tensor table. We write it
ourselves (no model hub, no whisper.cpp tool chain at run time) and read it back to verify
files before handing them to whisper.cpp, which aborts or misbehaves on damaged input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from .ct2 import ModelFormatError

GGML_MAGIC = 0x67676D6C
QNT_VERSION = 2
QNT_VERSION_FACTOR = 1000
QK = 32  # elements per quantization block (q8_0, q5_0)


class TensorType(IntEnum):
    """ggml tensor types. We write F32/F16/Q8_0/Q5_0; the others only need to be *read* (their
    sizes), so files from whisper.cpp's own quantize tool (q4_0, q5_1, k-quants) pass `read_ggml`."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15


# (elements per block, bytes per block) of the block-quantized types, from ggml's type traits.
BLOCK_LAYOUT = {
    TensorType.Q4_0: (32, 18),
    TensorType.Q4_1: (32, 20),
    TensorType.Q5_0: (32, 22),
    TensorType.Q5_1: (32, 24),
    TensorType.Q8_0: (32, 34),
    TensorType.Q8_1: (32, 36),
    TensorType.Q2_K: (256, 84),
    TensorType.Q3_K: (256, 110),
    TensorType.Q4_K: (256, 144),
    TensorType.Q5_K: (256, 176),
    TensorType.Q6_K: (256, 210),
    TensorType.Q8_K: (256, 292),
}


class FileType(IntEnum):
    """`ftype` in the header: what most 2-D weights are stored as."""

    F32 = 0
    F16 = 1
    Q8_0 = 7
    Q5_0 = 8

    @property
    def tensor_type(self) -> TensorType:
        return {
            FileType.F32: TensorType.F32,
            FileType.F16: TensorType.F16,
            FileType.Q8_0: TensorType.Q8_0,
            FileType.Q5_0: TensorType.Q5_0,
        }[self]

    @property
    def header_value(self) -> int:
        """Quantized files carry the quantization version, as whisper.cpp's quantize tool writes."""
        if self in (FileType.F32, FileType.F16):
            return int(self)
        return QNT_VERSION * QNT_VERSION_FACTOR + int(self)

    @classmethod
    def from_name(cls, name: str) -> "FileType":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown model type {name!r}: use f16, q8_0 or q5_0") from None


HPARAM_NAMES = (
    "n_vocab",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
    "n_mels",
    "ftype",
)


@dataclass
class TensorInfo:
    name: str
    ttype: TensorType
    shape: tuple[int, ...]  # numpy order (reversed ggml ne[])
    offset: int  # of the data in the file
    nbytes: int


@dataclass
class GgmlModel:
    """Everything but the tensor data, which stays on disk (`TensorInfo.offset`)."""

    hparams: dict[str, int]
    mel_filters: np.ndarray
    vocab: list[bytes]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_size: int = 0

    @property
    def file_type(self) -> FileType:
        return FileType(self.hparams["ftype"] % QNT_VERSION_FACTOR)


def tensor_nbytes(ttype: TensorType, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape))
    if ttype == TensorType.F32:
        return 4 * n
    if ttype == TensorType.F16:
        return 2 * n
    block, block_bytes = BLOCK_LAYOUT[ttype]
    if shape[-1] % block:
        raise ModelFormatError(f"rows of {shape[-1]} cannot be quantized in blocks of {block}")
    return n // block * block_bytes


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf, which ggml's reference quantizer uses (numpy rounds half to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_q8_0(x: np.ndarray) -> bytes:
    """ggml block_q8_0: per 32 values an f16 scale then 32 int8 (34 bytes)."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, QK)
    amax = np.abs(blocks).max(axis=1)
    d = amax / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = _round_half_away(blocks * inv[:, None]).astype(np.int8)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", QK)])
    out["d"] = d.astype(np.float16)
    out["qs"] = q
    return out.tobytes()


def dequantize_q8_0(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.frombuffer(raw, dtype=[("d", "<f2"), ("qs", "i1", QK)])
    return (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(shape)


def quantize_q5_0(x: np.ndarray) -> bytes:
    """ggml block_q5_0: f16 scale, 32 high bits, 16 bytes of low nibbles (22 bytes per 32 values).

    Mirrors ggml's `quantize_row_q5_0_ref`: the scale is the signed value of largest magnitude
    divided by -16, so that value maps exactly onto the code 0.
    """
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, QK)
    idx = np.abs(blocks).argmax(axis=1)
    vmax = blocks[np.arange(len(blocks)), idx]
    d = vmax / -16.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    # (int8_t)(x*id + 16.5f): C truncation of a positive value is floor; MIN(31, ...).
    xi = np.minimum(31, np.floor(blocks * inv[:, None] + 16.5)).astype(np.uint8)
    lo, hi = xi[:, :16], xi[:, 16:]
    qs = (lo & 0x0F) | ((hi & 0x0F) << 4)
    bits = np.concatenate([(lo >> 4) & 1, (hi >> 4) & 1], axis=1).astype(np.uint32)
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    out["d"] = d.astype(np.float16)
    out["qh"] = qh
    out["qs"] = qs
    return out.tobytes()


def dequantize_q5_0(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.frombuffer(raw, dtype=[("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    qs = blocks["qs"]
    bits = ((blocks["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    lo = (qs & 0x0F) | (bits[:, :16] << 4)
    hi = (qs >> 4) | (bits[:, 16:] << 4)
    q = np.concatenate([lo, hi], axis=1).astype(np.float32) - 16.0
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(shape)


def encode_tensor(arr: np.ndarray, ttype: TensorType) -> bytes:
    if ttype == TensorType.F32:
        return np.ascontiguousarray(arr, dtype="<f4").tobytes()
    if ttype == TensorType.F16:
        return np.ascontiguousarray(arr, dtype="<f2").tobytes()
    if arr.shape[-1] % QK:
        raise ModelFormatError(f"rows of {arr.shape[-1]} cannot be quantized in blocks of {QK}")
    if ttype == TensorType.Q8_0:
        return quantize_q8_0(arr)
    if ttype == TensorType.Q5_0:
        return quantize_q5_0(arr)
    raise ModelFormatError(f"no quantizer for {ttype.name} tensors")


def decode_tensor(raw: bytes, ttype: TensorType, shape: tuple[int, ...]) -> np.ndarray:
    if ttype == TensorType.F32:
        return np.frombuffer(raw, dtype="<f4").reshape(shape)
    if ttype == TensorType.F16:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
    if ttype == TensorType.Q8_0:
        return dequantize_q8_0(raw, shape)
    if ttype == TensorType.Q5_0:
        return dequantize_q5_0(raw, shape)
    raise ModelFormatError(f"no dequantizer for {ttype.name} tensors")


def write_ggml(
    out: BinaryIO,
    hparams: dict[str, int],
    mel_filters: np.ndarray,
    vocab: list[bytes],
    tensors: Iterable[tuple[str, np.ndarray, TensorType]],
) -> None:
    out.write(struct.pack("<I", GGML_MAGIC))
    out.write(struct.pack(f"<{len(HPARAM_NAMES)}i", *(hparams[k] for k in HPARAM_NAMES)))
    n_mels, n_fft = mel_filters.shape
    out.write(struct.pack("<ii", n_mels, n_fft))
    out.write(np.ascontiguousarray(mel_filters, dtype="<f4").tobytes())
    out.write(struct.pack("<i", len(vocab)))
    for tok in vocab:
        out.write(struct.pack("<i", len(tok)))
        out.write(tok)
    for name, arr, ttype in tensors:
        ne = tuple(reversed(arr.shape))
        raw_name = name.encode()
        out.write(struct.pack("<iii", len(ne), len(raw_name), int(ttype)))
        out.write(struct.pack(f"<{len(ne)}i", *ne))
        out.write(raw_name)
        out.write(encode_tensor(arr, ttype))


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ModelFormatError(f"model file truncated while reading {what}")
    return data


def read_ggml(path: str | Path) -> GgmlModel:
    """Parse and check the whole file layout without loading tensor data.

    Raises ModelFormatError for a wrong magic, implausible header, or truncation: exactly the
    cases where whisper.cpp itself would crash or print a vague message.
    """
    path = Path(path)
    try:
        return _read_ggml(path)
    except ModelFormatError as e:
        if str(path) in str(e):
            raise
        raise ModelFormatError(f"{path}: {e}") from None  # name the file in every message


def _read_ggml(path: Path) -> GgmlModel:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise ModelFormatError(f"{path}: empty or truncated model file ({size} bytes)")
        (magic,) = struct.unpack("<I", head)
        if magic != GGML_MAGIC:
            raise ModelFormatError(
                f"{path}: not a whisper.cpp ggml model (magic 0x{magic:08x}, expected 0x{GGML_MAGIC:08x})"
            )
        values = struct.unpack(f"<{len(HPARAM_NAMES)}i", _read(f, 4 * len(HPARAM_NAMES), "header"))
        hparams = dict(zip(HPARAM_NAMES, values))
        if not (0 < hparams["n_vocab"] < 1_000_000 and 0 < hparams["n_mels"] <= 256):
            raise ModelFormatError(f"{path}: implausible header {hparams}")
        n_mels, n_fft = struct.unpack("<ii", _read(f, 8, "mel filters"))
        if not (0 < n_mels <= 256 and 0 < n_fft <= 4096):
            raise ModelFormatError(f"{path}: implausible mel filter size {n_mels}x{n_fft}")
        mel = np.frombuffer(_read(f, 4 * n_mels * n_fft, "mel filters"), dtype="<f4").reshape(n_mels, n_fft)
        (n_tokens,) = struct.unpack("<i", _read(f, 4, "vocabulary"))
        if not 0 <= n_tokens <= hparams["n_vocab"]:
            raise ModelFormatError(f"{path}: vocabulary of {n_tokens} tokens for n_vocab {hparams['n_vocab']}")
        vocab = []
        for _ in range(n_tokens):
            (n,) = struct.unpack("<i", _read(f, 4, "vocabulary"))
            if not 0 <= n <= 1024:
                raise ModelFormatError(f"{path}: corrupt vocabulary entry")
            vocab.append(_read(f, n, "vocabulary"))
        model = GgmlModel(hparams=hparams, mel_filters=mel, vocab=vocab, file_size=size)
        while True:
            head = f.read(12)
            if not head:
                break
            if len(head) < 12:
                raise ModelFormatError(f"{path}: truncated tensor header")
            n_dims, name_len, ttype = struct.unpack("<iii", head)
            if not (1 <= n_dims <= 4 and 0 < name_len < 256):
                raise ModelFormatError(f"{path}: corrupt tensor header")
            ne = struct.unpack(f"<{n_dims}i", _read(f, 4 * n_dims, "tensor shape"))
            if min(ne) <= 0:  # a negative size would seek backwards and loop over the same header
                raise ModelFormatError(f"{path}: corrupt tensor shape {ne}")
            name = _read(f, name_len, "tensor name").decode("utf-8", "replace")
            try:
                tt = TensorType(ttype)
            except ValueError:
                raise ModelFormatError(f"{path}: tensor {name} has unsupported type {ttype}") from None
            shape = tuple(reversed(ne))
            nbytes = tensor_nbytes(tt, shape)
            offset = f.tell()
            if offset + nbytes > size:
                raise ModelFormatError(
                    f"{path}: truncated: tensor {name} needs {nbytes} bytes at {offset}, file has {size}"
                )
            f.seek(nbytes, 1)
            model.tensors[name] = TensorInfo(name, tt, shape, offset, nbytes)
    if not model.tensors:
        raise ModelFormatError(f"{path}: no tensors (truncated model file?)")
    return model


def load_tensor(path: str | Path, info: TensorInfo) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(info.offset)
        return decode_tensor(f.read(info.nbytes), info.ttype, info.shape)
