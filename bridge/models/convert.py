"""CTranslate2 whisper -> whisper.cpp ggml, optionally quantized (q8_0, q5_0).

Our own converter, so that the bundled model needs no model hub and no whisper.cpp or
PyTorch tool chain. Name mapping and layout: docs/models.md, "Conversion".
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from .ct2 import Ct2Model, ModelFormatError, read_ct2
from .ggml import FileType, TensorType, write_ggml


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default, htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sr: int = 16000, n_fft: int = 400, n_mels: int = 80) -> np.ndarray:
    """The Slaney-normalized triangular filterbank whisper was trained with (librosa.filters.mel)."""
    fftfreqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    return (weights * enorm[:, None]).astype(np.float32)


def _bytes_to_unicode() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used in vocabulary.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def read_vocabulary(path: Path, n_tokens: int) -> list[bytes]:
    """The first `n_tokens` entries of CT2's vocabulary.txt as raw bytes."""
    table = _bytes_to_unicode()
    lines = path.read_text(encoding="utf-8").split("\n")
    if len(lines) < n_tokens:
        raise ModelFormatError(f"{path}: {len(lines)} tokens, need {n_tokens}")
    out = []
    for tok in lines[:n_tokens]:
        if tok.startswith("<|") and tok.endswith("|>"):
            out.append(b"")  # a special token placed among text ids; whisper.cpp names its own
            continue
        try:
            out.append(bytes(table[c] for c in tok))
        except KeyError:
            out.append(tok.encode("utf-8"))
    return out


def _layers(model: Ct2Model, side: str) -> int:
    idx = {int(m.group(1)) for name in model.variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    if not idx or idx != set(range(len(idx))):
        raise ModelFormatError(f"{side}: missing or non-contiguous layers {sorted(idx)}")
    return len(idx)


def _scalar(model: Ct2Model, name: str, default: int) -> int:
    try:
        return int(model.get(name))
    except KeyError:
        return default


def _split(w: np.ndarray, parts: int) -> list[np.ndarray]:
    if w.shape[0] % parts:
        raise ModelFormatError(f"fused projection of {w.shape[0]} rows does not split in {parts}")
    return np.split(w, parts, axis=0)


def _check_zero_bias(name: str, b: np.ndarray) -> None:
    if np.any(np.asarray(b, dtype=np.float32) != 0):
        raise ModelFormatError(f"{name}: whisper key projections have no bias, found non-zero values")


def _mapped_tensors(m: Ct2Model, n_enc: int, n_dec: int) -> Iterator[tuple[str, np.ndarray]]:
    g = m.get
    for i in (1, 2):
        yield f"encoder.conv{i}.weight", g(f"encoder/conv{i}/weight")
        yield f"encoder.conv{i}.bias", g(f"encoder/conv{i}/bias").reshape(-1, 1)
    yield "encoder.positional_embedding", g("encoder/position_encodings/encodings")

    def attn(src: str, dst: str, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{dst}.{prefix}attn_ln.weight", g(f"{src}/layer_norm/gamma")
        yield f"{dst}.{prefix}attn_ln.bias", g(f"{src}/layer_norm/beta")

    def self_attn(src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
        yield from attn(src, dst, "")
        q, k, v = _split(g(f"{src}/linear_0/weight"), 3)
        qb, kb, vb = _split(g(f"{src}/linear_0/bias"), 3)
        _check_zero_bias(f"{src} key", kb)
        yield f"{dst}.attn.query.weight", q
        yield f"{dst}.attn.query.bias", qb
        yield f"{dst}.attn.key.weight", k
        yield f"{dst}.attn.value.weight", v
        yield f"{dst}.attn.value.bias", vb
        yield f"{dst}.attn.out.weight", g(f"{src}/linear_1/weight")
        yield f"{dst}.attn.out.bias", g(f"{src}/linear_1/bias")

    def mlp(src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{dst}.mlp_ln.weight", g(f"{src}/ffn/layer_norm/gamma")
        yield f"{dst}.mlp_ln.bias", g(f"{src}/ffn/layer_norm/beta")
        yield f"{dst}.mlp.0.weight", g(f"{src}/ffn/linear_0/weight")
        yield f"{dst}.mlp.0.bias", g(f"{src}/ffn/linear_0/bias")
        yield f"{dst}.mlp.2.weight", g(f"{src}/ffn/linear_1/weight")
        yield f"{dst}.mlp.2.bias", g(f"{src}/ffn/linear_1/bias")

    for n in range(n_enc):
        src, dst = f"encoder/layer_{n}", f"encoder.blocks.{n}"
        yield from self_attn(f"{src}/self_attention", dst)
        yield from mlp(src, dst)
    yield "encoder.ln_post.weight", g("encoder/layer_norm/gamma")
    yield "encoder.ln_post.bias", g("encoder/layer_norm/beta")

    yield "decoder.token_embedding.weight", g("decoder/embeddings/weight")
    yield "decoder.positional_embedding", g("decoder/position_encodings/encodings")
    for n in range(n_dec):
        src, dst = f"decoder/layer_{n}", f"decoder.blocks.{n}"
        yield from self_attn(f"{src}/self_attention", dst)
        ca = f"{src}/attention"
        yield f"{dst}.cross_attn_ln.weight", g(f"{ca}/layer_norm/gamma")
        yield f"{dst}.cross_attn_ln.bias", g(f"{ca}/layer_norm/beta")
        yield f"{dst}.cross_attn.query.weight", g(f"{ca}/linear_0/weight")
        yield f"{dst}.cross_attn.query.bias", g(f"{ca}/linear_0/bias")
        k, v = _split(g(f"{ca}/linear_1/weight"), 2)
        kb, vb = _split(g(f"{ca}/linear_1/bias"), 2)
        _check_zero_bias(f"{ca} key", kb)
        yield f"{dst}.cross_attn.key.weight", k
        yield f"{dst}.cross_attn.value.weight", v
        yield f"{dst}.cross_attn.value.bias", vb
        yield f"{dst}.cross_attn.out.weight", g(f"{ca}/linear_2/weight")
        yield f"{dst}.cross_attn.out.bias", g(f"{ca}/linear_2/bias")
        yield from mlp(src, dst)
    yield "decoder.ln.weight", g("decoder/layer_norm/gamma")
    yield "decoder.ln.bias", g("decoder/layer_norm/beta")


_F32_ALWAYS = {"encoder.positional_embedding", "decoder.positional_embedding", "encoder.conv1.bias", "encoder.conv2.bias"}


def storage_type(name: str, arr: np.ndarray, ftype: FileType) -> TensorType:
    """What whisper.cpp expects each tensor to be stored as, for a file of type `ftype`.

    1-D tensors, conv biases and positional embeddings are f32; conv kernels (3-D) are f16
    in every non-f32 file; 2-D weights take the file type.
    """
    if ftype == FileType.F32 or arr.ndim < 2 or name in _F32_ALWAYS:
        return TensorType.F32
    if arr.ndim == 3:
        return TensorType.F16
    return ftype.tensor_type


def convert(ct2_dir: str | Path, out_path: str | Path, ftype: FileType = FileType.F16) -> Path:
    """Convert a CT2 whisper directory (model.bin + vocabulary.txt) to one ggml file, atomically."""
    ct2_dir, out_path = Path(ct2_dir), Path(out_path)
    model = read_ct2(ct2_dir / "model.bin")
    emb = model.get("decoder/embeddings/weight")
    n_vocab, d_text = emb.shape
    enc_pos = model.get("encoder/position_encodings/encodings")
    dec_pos = model.get("decoder/position_encodings/encodings")
    conv1 = model.get("encoder/conv1/weight")
    n_enc, n_dec = _layers(model, "encoder"), _layers(model, "decoder")
    hparams = {
        "n_vocab": n_vocab,
        "n_audio_ctx": enc_pos.shape[0],
        "n_audio_state": enc_pos.shape[1],
        "n_audio_head": _scalar(model, "encoder/num_heads", enc_pos.shape[1] // 64),
        "n_audio_layer": n_enc,
        "n_text_ctx": dec_pos.shape[0],
        "n_text_state": d_text,
        "n_text_head": _scalar(model, "decoder/num_heads", d_text // 64),
        "n_text_layer": n_dec,
        "n_mels": conv1.shape[1],
        "ftype": ftype.header_value,
    }
    # whisper.cpp adds special tokens itself: write the text tokens only (ids below <|endoftext|>).
    n_text_tokens = 50257 if n_vocab >= 51865 else 50256
    vocab = read_vocabulary(ct2_dir / "vocabulary.txt", n_text_tokens)
    mel = mel_filterbank(n_mels=hparams["n_mels"])
    tensors = (
        (name, arr, storage_type(name, arr, ftype)) for name, arr in _mapped_tensors(model, n_enc, n_dec)
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_ggml(f, hparams, mel, vocab, tensors)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
