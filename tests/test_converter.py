"""The ggml writer/reader and quantizers against hand-derived values, and the real tiny.en conversion.

Format tests use small synthetic files (fast, exact); one group converts the real CT2 weights and
checks the tensor table whisper.cpp will load, plus that the data is the source's, rearranged.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from bridge.models.convert import _bytes_to_unicode, convert, mel_filterbank, storage_type
from bridge.models.ct2 import ModelFormatError, read_ct2
from bridge.models.ggml import (
    GGML_MAGIC,
    HPARAM_NAMES,
    FileType,
    TensorType,
    dequantize_q5_0,
    dequantize_q8_0,
    load_tensor,
    quantize_q5_0,
    quantize_q8_0,
    read_ggml,
    tensor_nbytes,
    write_ggml,
)
from bridge.models.registry import locate
from bridge.models.store import check_layout, expected_tensors

F16_ONE = b"\x00\x3c"  # 1.0 as IEEE half, little-endian
F16_MINUS_HALF = b"\x00\xb8"  # -0.5

VOCAB = [
    b"",
    b"hello",
    " the".encode(),
    "é".encode(),  # 2 bytes
    "日本".encode(),  # 6 bytes
    "🙂".encode(),  # 4 bytes
    bytes([0xE6]),  # a lone lead byte: BPE tokens need not be valid UTF-8
    b"\x00\xff",
]

TINY_HP = {
    "n_vocab": 64,
    "n_audio_ctx": 8,
    "n_audio_state": 32,
    "n_audio_head": 2,
    "n_audio_layer": 1,
    "n_text_ctx": 8,
    "n_text_state": 32,
    "n_text_head": 2,
    "n_text_layer": 2,
    "n_mels": 80,
}


def synthetic_tensors(ftype: FileType, seed: int = 0) -> list[tuple[str, np.ndarray, TensorType]]:
    rng = np.random.default_rng(seed)
    return [
        (name, rng.standard_normal(shape).astype(np.float32), storage_type(name, np.empty(shape), ftype))
        for name, shape in expected_tensors(TINY_HP).items()
    ]


def write_synthetic(path, ftype: FileType = FileType.Q8_0, seed: int = 0):
    hp = dict(TINY_HP, ftype=ftype.header_value)
    mel = mel_filterbank()
    tensors = synthetic_tensors(ftype, seed)
    with open(path, "wb") as f:
        write_ggml(f, hp, mel, VOCAB, tensors)
    return hp, mel, tensors


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("ftype", [FileType.F32, FileType.F16, FileType.Q8_0, FileType.Q5_0])
def test_synthetic_file_round_trips_exactly(tmp_path, ftype):
    path = tmp_path / "m.bin"
    hp, mel, tensors = write_synthetic(path, ftype)
    m = read_ggml(path)

    assert m.hparams == hp
    assert m.file_type == ftype
    assert m.mel_filters.dtype == np.float32 and np.array_equal(m.mel_filters, mel)
    assert m.vocab == VOCAB
    assert list(m.tensors) == [name for name, _, _ in tensors]  # file order kept

    # Offsets derived independently from the layout: header, mels, vocab, then per tensor
    # (n_dims, name_len, ttype, ne[], name) followed by its data.
    offset = 4 + 4 * len(HPARAM_NAMES) + 8 + 4 * mel.size + 4 + sum(4 + len(t) for t in VOCAB)
    for name, arr, ttype in tensors:
        info = m.tensors[name]
        offset += 12 + 4 * arr.ndim + len(name.encode())
        assert (info.ttype, info.shape, info.offset) == (ttype, arr.shape, offset), name
        assert info.nbytes == tensor_nbytes(ttype, arr.shape)
        offset += info.nbytes
        back = load_tensor(path, info)
        if ttype == TensorType.F32:
            np.testing.assert_array_equal(back, arr)
        elif ttype == TensorType.F16:
            np.testing.assert_array_equal(back, arr.astype(np.float16).astype(np.float32))
        elif ttype == TensorType.Q8_0:
            np.testing.assert_array_equal(back, dequantize_q8_0(quantize_q8_0(arr), arr.shape))
        else:
            np.testing.assert_array_equal(back, dequantize_q5_0(quantize_q5_0(arr), arr.shape))
    assert offset == m.file_size == path.stat().st_size
    check_layout(m, path)  # the store's whisper.cpp layout check accepts what the writer wrote


def test_ne_is_reversed_numpy_shape_on_disk(tmp_path):
    path = tmp_path / "m.bin"
    write_synthetic(path, FileType.F16)
    info = read_ggml(path).tensors["encoder.conv1.weight"]  # numpy (32, 80, 3)
    with open(path, "rb") as f:
        f.seek(info.offset - 12 - len("encoder.conv1.weight") - 12)
        n_dims, name_len, ttype, *ne = struct.unpack("<6i", f.read(24))
    assert (n_dims, name_len, ttype, tuple(ne)) == (3, 20, int(TensorType.F16), (3, 80, 32))


# --------------------------------------------------------------------------- quantizers


def test_q8_0_known_block_matches_ggml_reference():
    # amax 127 -> d = 127/127 = 1.0 exactly; q = roundf(x) with halves away from zero
    # (ggml uses C roundf; numpy's round-half-even would give 2 for 2.5 and -100 for -100.5).
    x = np.array(
        [-127, -100.5, -2.5, -0.5, 0.5, 1.5, 2.5, 3.49, 126.5, 0, 7, -7] + [0.25 * i for i in range(20)],
        dtype=np.float32,
    )
    q = [-127, -101, -3, -1, 1, 2, 3, 3, 127, 0, 7, -7] + [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5]
    # 0.25*i: 0, .25, .5->1, .75->1, 1, 1.25, 1.5->2, 1.75, 2, 2.25, 2.5->3, ...
    expected = F16_ONE + bytes(v & 0xFF for v in q)
    raw = quantize_q8_0(x)
    assert len(raw) == 34
    assert raw == expected
    np.testing.assert_array_equal(dequantize_q8_0(raw, (32,)), np.array(q, dtype=np.float32))


def test_q8_0_zero_block_is_all_zero_bytes():
    assert quantize_q8_0(np.zeros(32, np.float32)) == bytes(34)
    np.testing.assert_array_equal(dequantize_q8_0(bytes(34), (32,)), np.zeros(32))


def test_q5_0_known_block_matches_ggml_reference():
    # x = -16..15: the largest magnitude is -16, so d = -16 / -16 = 1.0 and code = floor(x + 16.5) = x + 16.
    # Low nibbles: qs[j] = (j & 15) | ((j + 16) & 15) << 4 = 17 * j; the fifth bit is set exactly
    # for the second half (codes 16..31), i.e. qh = 0xFFFF0000.
    x = np.arange(-16, 16, dtype=np.float32)
    expected = F16_ONE + struct.pack("<I", 0xFFFF0000) + bytes(17 * j for j in range(16))
    raw = quantize_q5_0(x)
    assert len(raw) == 22
    assert raw == expected
    np.testing.assert_array_equal(dequantize_q5_0(raw, (32,)), x)


def test_q5_0_positive_max_maps_to_code_zero():
    # max 8 -> d = 8 / -16 = -0.5, id = -2: 8 -> floor(-16 + 16.5) = 0; 0.25 -> floor(-0.5 + 16.5) = 16;
    # -0.25 -> floor(0.5 + 16.5) = 17; -8 -> floor(16 + 16.5) = 32 -> clamped to 31.
    x = np.zeros(32, np.float32)
    x[:4] = [8, 0.25, -0.25, -8]
    codes = np.full(32, 16, np.uint8)
    codes[:4] = [0, 16, 17, 31]
    qs = bytes(int(codes[j] & 15) | int(codes[j + 16] & 15) << 4 for j in range(16))
    qh = sum(int(codes[j] >> 4 & 1) << j for j in range(32))
    raw = quantize_q5_0(x)
    assert raw == F16_MINUS_HALF + struct.pack("<I", qh) + qs
    deq = dequantize_q5_0(raw, (32,))
    np.testing.assert_array_equal(deq[:4], [8, 0, -0.5, -7.5])  # -8 clamps: one step off


def _block_scales(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact f32 scale d and the stored f16 scale per block."""
    b = x.reshape(-1, 32)
    if kind == "q8_0":
        d = np.abs(b).max(axis=1) / 127.0
    else:
        d = b[np.arange(len(b)), np.abs(b).argmax(axis=1)] / -16.0
    return np.abs(d), np.abs(d.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 30.0])
def test_q8_0_error_bound(scale):
    x = (np.random.default_rng(1).standard_normal((64, 96)) * scale).astype(np.float32)
    err = np.abs(dequantize_q8_0(quantize_q8_0(x), x.shape) - x).reshape(-1, 32).max(axis=1)
    d, d16 = _block_scales(x, "q8_0")
    # round-to-nearest with the exact scale, then the f16 rounding of the scale times |q| <= 127
    bound = d / 2 + 127 * np.abs(d - d16) + 1e-6 * d
    assert np.all(err <= bound)
    # Where the scale is a normal f16 (>= 2**-14) its rounding adds at most 127 * 2**-11 = 6 %.
    normal = d >= 2.0**-14
    assert np.all(err[normal] <= 0.5625 * d[normal])


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_q5_0_error_bound(scale):
    x = (np.random.default_rng(2).standard_normal((64, 96)) * scale).astype(np.float32)
    deq = dequantize_q5_0(quantize_q5_0(x), x.shape)
    err = np.abs(deq - x).reshape(-1, 32)
    d, d16 = _block_scales(x, "q5_0")
    # Values round to the nearest of 32 levels; only those near -max clamp at code 31 (one step).
    bound = d + 16 * np.abs(d - d16) + 1e-6 * d
    assert np.all(err.max(axis=1) <= bound)
    b = x.reshape(-1, 32)
    vmax = b[np.arange(len(b)), np.abs(b).argmax(axis=1)]
    unclamped = (b * np.sign(vmax)[:, None]) > -0.9 * np.abs(vmax)[:, None]
    assert np.all(err <= np.where(unclamped, (d / 2 + 16 * np.abs(d - d16) + 1e-6 * d)[:, None], np.inf))
    assert np.abs(deq - x).mean() < 0.3 * d.mean()  # uniform rounding error: mean d/4


def test_quantizer_rejects_rows_not_multiple_of_block():
    from bridge.models.ggml import encode_tensor

    with pytest.raises(ModelFormatError, match="blocks of 32"):
        encode_tensor(np.zeros((4, 48), np.float32), TensorType.Q8_0)


def test_sizes_of_types_written_by_whisper_cpp_quantize():
    # Files quantized by whisper.cpp's own tool (q4_0, q5_1, k-quants) must at least be readable.
    assert tensor_nbytes(TensorType.Q4_0, (384, 384)) == 384 * 384 // 32 * 18
    assert tensor_nbytes(TensorType.Q5_1, (384, 384)) == 384 * 384 // 32 * 24
    assert tensor_nbytes(TensorType.Q6_K, (512, 512)) == 512 * 512 // 256 * 210


# --------------------------------------------------------------------------- mel, vocabulary


def test_mel_filterbank_shape_and_shape_of_filters():
    mel = mel_filterbank()
    assert mel.shape == (80, 201) and mel.dtype == np.float32
    assert np.all(mel >= 0)
    for i, row in enumerate(mel):
        nz = np.flatnonzero(row)
        assert len(nz) >= 1, i
        assert np.array_equal(nz, np.arange(nz[0], nz[-1] + 1)), f"filter {i} support not contiguous"
        peak = int(np.argmax(row))
        assert np.sum(row == row[peak]) == 1, f"filter {i} has a flat top"
        rise, fall = np.diff(row[: peak + 1]), np.diff(row[peak:])
        assert np.all(rise >= 0) and np.all(fall <= 0), f"filter {i} peaks more than once"
    peaks = mel.argmax(axis=1)
    assert np.all(np.diff(peaks) >= 0)  # centres ascend with the mel index
    # Slaney normalisation: height 2 / bandwidth, so each triangle has unit area in Hz (bins are 40 Hz;
    # sampling the narrow low filters at bin centres costs a few per cent).
    area = mel.sum(axis=1) * (8000 / 200)
    assert np.allclose(area, 1.0, atol=0.1)


def test_bytes_to_unicode_round_trip():
    table = _bytes_to_unicode()  # printable char -> byte
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert all(c.isprintable() and not c.isspace() for c in table)
    inverse = {b: c for c, b in table.items()}
    for raw in [b" the", "naïve 日本 🙂".encode(), bytes(range(256))]:
        text = "".join(inverse[b] for b in raw)
        assert bytes(table[c] for c in text) == raw
    assert "".join(inverse[b] for b in b" the") == "\u0120the"  # GPT-2's 'Ġthe'


# --------------------------------------------------------------------------- damaged files


def test_empty_file(tmp_path):
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"empty\.bin: empty or truncated model file \(0 bytes\)"):
        read_ggml(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGUF" + bytes(200))
    with pytest.raises(ModelFormatError, match=r"not a whisper\.cpp ggml model \(magic 0x46554747"):
        read_ggml(p)


def _tensor(m, i):
    return list(m.tensors.values())[i]


@pytest.mark.parametrize(
    "where,pattern",
    [
        (lambda m: 20, lambda m: "truncated while reading header"),
        (lambda m: 100, lambda m: "truncated while reading mel filters"),
        (lambda m: 4 + 44 + 8 + 80 * 201 * 4 + 4 + 6, lambda m: "truncated while reading vocabulary"),
        (lambda m: _tensor(m, 2).offset + 5, lambda m: f"truncated: tensor {_tensor(m, 2).name} needs"),
        (lambda m: _tensor(m, 2).offset - 3, lambda m: "truncated while reading tensor name"),
        (lambda m: _tensor(m, 2).offset - len(_tensor(m, 2).name) - 2, lambda m: "truncated while reading tensor shape"),
        (lambda m: _tensor(m, 2).offset - len(_tensor(m, 2).name) - 8 - 12 + 7, lambda m: "truncated tensor header"),
        (lambda m: m.file_size - 1, lambda m: f"truncated: tensor {_tensor(m, -1).name} needs"),
    ],
)
def test_truncated_file(tmp_path, where, pattern):
    full = tmp_path / "full.bin"
    write_synthetic(full, FileType.Q5_0)
    model = read_ggml(full)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(full.read_bytes()[: where(model)])
    with pytest.raises(ModelFormatError, match=re.escape(pattern(model))) as exc:
        read_ggml(cut)
    assert str(exc.value).startswith(f"{cut}: ")  # every message names the file


def test_file_cut_right_after_vocabulary_has_no_tensors(tmp_path):
    full = tmp_path / "full.bin"
    write_synthetic(full)
    cut = tmp_path / "cut.bin"
    first = list(read_ggml(full).tensors.values())[0]
    cut.write_bytes(full.read_bytes()[: first.offset - 12 - 4 * 2 - len("encoder.positional_embedding")])
    with pytest.raises(ModelFormatError, match="no tensors"):
        read_ggml(cut)


def test_magic_constant():
    assert struct.pack("<I", GGML_MAGIC) == b"lmgg"


# --------------------------------------------------------------------------- real tiny.en


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = locate("tiny.en")
    out = tmp_path_factory.mktemp("tiny")
    return {
        "src": src,
        "ct2": read_ct2(src.parts[0]),
        FileType.F16: convert(src.files_dir, out / "f16.bin", FileType.F16),
        FileType.Q8_0: convert(src.files_dir, out / "q8_0.bin", FileType.Q8_0),
    }


@pytest.mark.parametrize("ftype", [FileType.F16, FileType.Q8_0])
def test_tiny_en_tensor_table(tiny, ftype):
    m = read_ggml(tiny[ftype])
    assert m.hparams == {
        "n_vocab": 51864,
        "n_audio_ctx": 1500,
        "n_audio_state": 384,
        "n_audio_head": 6,
        "n_audio_layer": 4,
        "n_text_ctx": 448,
        "n_text_state": 384,
        "n_text_head": 6,
        "n_text_layer": 4,
        "n_mels": 80,
        "ftype": 1 if ftype == FileType.F16 else 2007,
    }
    expected = expected_tensors(m.hparams)
    assert len(m.tensors) == len(expected) == 167
    assert set(m.tensors) == set(expected)
    weight = TensorType.F16 if ftype == FileType.F16 else TensorType.Q8_0
    for name, info in m.tensors.items():
        assert info.shape == expected[name], name
        if name in ("encoder.positional_embedding", "decoder.positional_embedding") or name.endswith("conv1.bias") \
                or name.endswith("conv2.bias") or len(info.shape) == 1:
            want = TensorType.F32
        elif len(info.shape) == 3:
            want = TensorType.F16  # conv kernels stay f16 in quantized files, as whisper.cpp expects
        else:
            want = weight
        assert info.ttype == want, name
    assert m.tensors["decoder.token_embedding.weight"].shape == (51864, 384)
    assert m.tensors["encoder.conv1.weight"].shape == (384, 80, 3)
    assert "encoder.blocks.0.attn.key.bias" not in m.tensors
    check_layout(m, tiny[ftype])


def test_tiny_en_vocabulary_decodes(tiny):
    vocab = read_ggml(tiny[FileType.F16]).vocab
    assert len(vocab) == 50256  # ids below <|endoftext|>; whisper.cpp adds the specials
    assert vocab[262] == b" the"
    assert vocab[0] == b"!" and vocab[220] == b" "
    assert vocab.index(b" hello") == 23748
    assert all(tok for tok in vocab)  # no special tokens among .en text ids
    # GPT-2 byte-level tokens: some are partial UTF-8 sequences, all are raw bytes.
    assert any(t.decode("utf-8", "replace") != t.decode("latin-1") for t in vocab)
    assert b" caf\xc3\xa9" in vocab or " café".encode() in vocab


def test_tiny_en_data_is_the_source_rearranged(tiny):
    ct2 = tiny["ct2"]
    path = tiny[FileType.F16]
    m = read_ggml(path)
    fused = ct2.get("encoder/layer_1/self_attention/linear_0/weight")
    np.testing.assert_array_equal(
        load_tensor(path, m.tensors["encoder.blocks.1.attn.key.weight"]), fused[384:768].astype(np.float32)
    )
    kv = ct2.get("decoder/layer_2/attention/linear_1/weight")
    np.testing.assert_array_equal(
        load_tensor(path, m.tensors["decoder.blocks.2.cross_attn.value.weight"]), kv[384:].astype(np.float32)
    )
    pos = ct2.get("encoder/position_encodings/encodings").astype(np.float32)
    np.testing.assert_array_equal(load_tensor(path, m.tensors["encoder.positional_embedding"]), pos)

    q = read_ggml(tiny[FileType.Q8_0])
    emb = ct2.get("decoder/embeddings/weight").astype(np.float32)
    back = load_tensor(tiny[FileType.Q8_0], q.tensors["decoder.token_embedding.weight"])
    d = np.abs(emb).reshape(-1, 32).max(axis=1) / 127
    assert np.all(np.abs(back - emb).reshape(-1, 32).max(axis=1) <= 0.57 * d + 1e-7)


def test_corrupt_tensor_shape_is_an_error_not_a_loop(tmp_path):
    p = tmp_path / "m.bin"
    write_synthetic(p, FileType.F16)
    info = _tensor(read_ggml(p), 1)  # encoder.conv1.weight, 3 dims
    raw = bytearray(p.read_bytes())
    ne0 = info.offset - len(info.name) - 12
    raw[ne0 : ne0 + 4] = struct.pack("<i", -5)
    p.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match=r"corrupt tensor shape \(-5, 80, 32\)"):
        read_ggml(p)
