"""Converted-model cache: install once, check cheaply on every start, verify thoroughly on demand.

Conversion is fast (about 1 s for tiny.en) but must never leave a half-written or stale file
that whisper.cpp would load and then abort on, so: conversion happens in a temporary file in the
cache dir, lands by atomic rename under an fcntl lock, and a sidecar JSON manifest records the
source package versions, the converter version and the sha256. Startup trusts the manifest while
the file's stat (size, mtime, ctime, inode) is the one last hashed; `verify` always re-hashes and
also runs one real transcription.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import registry
from .convert import convert, storage_type
from .ct2 import ModelFormatError
from .ggml import QNT_VERSION_FACTOR, FileType, GgmlModel, TensorType, read_ggml
from .registry import ModelError

try:  # POSIX only; without it concurrent installs are merely not serialized (rename stays atomic)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# Chosen with bench/quantization.py (tiny.en, 36 espeak-ng clips, 2 cores): against f16, q8_0 is
# 0.56x the file, 0.76x the peak RSS and decodes 1.13x (2 threads) / 1.17x (1 thread) / 1.19x
# (streaming-sized audio_ctx) as fast; word errors vs f16 of 434 words: +1 clean, 0 streaming, +7 on
# mu-law phone audio (4 clips flipping either way on speech f16 already gets 35 % wrong).
# q5_0 is smaller (0.38x) but 0.92x as fast on this CPU and changes 17/36 transcripts (fit-mode WER
# +4.4 pp), so it is only worth it where memory is the limit.
DEFAULT_FTYPE = FileType.Q8_0

# Bump when the converter's output changes on purpose; the code digest below catches the rest.
CONVERTER_VERSION = 1
MANIFEST_FORMAT = "callbridge-model/1"
FTYPE_CHOICES = ("f16", "q8_0", "q5_0")

CHECK_WAV = Path(__file__).parent / "data" / "check.wav"
CHECK_TEXT = "Please call me back tomorrow morning."  # espeak-ng -v en-us -s 155, 16 kHz mono
CHECK_KEYWORDS = ("call", "back", "tomorrow", "morning")


class VerifyError(ModelError):
    """The file exists but is damaged or does not transcribe: reinstall or replace it."""


# --------------------------------------------------------------------------- paths and names


def model_dir(cache_dir: str | Path | None = None) -> Path:
    """Cache directory: argument, else $CALLBRIDGE_MODEL_DIR, else ~/.cache/callbridge/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CALLBRIDGE_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "callbridge" / "models"


def as_ftype(ftype: FileType | str | None) -> FileType:
    if ftype is None:
        return DEFAULT_FTYPE
    if isinstance(ftype, FileType):
        return ftype
    try:
        return FileType.from_name(str(ftype))
    except ValueError as e:
        raise ModelError(str(e)) from None


def ftype_name(ftype: FileType) -> str:
    return ftype.name.lower()


def model_filename(name: str, ftype: FileType | str | None = None) -> str:
    return f"ggml-{name}-{ftype_name(as_ftype(ftype))}.bin"


def cached_path(name: str, ftype: FileType | str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Where `install(name, ftype)` puts the model (whether or not it is there yet)."""
    registry.get(name)
    return model_dir(cache_dir) / model_filename(name, ftype)


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def converter_version() -> str:
    """CONVERTER_VERSION plus a digest of the converter's code, so edits to it invalidate caches."""
    global _CONVERTER_VERSION
    if _CONVERTER_VERSION is None:
        h = hashlib.sha256()
        here = Path(__file__).parent
        for mod in ("ct2.py", "ggml.py", "convert.py"):
            try:
                h.update((here / mod).read_bytes())
            except OSError:  # zipped or stripped install: the explicit number alone
                pass
        _CONVERTER_VERSION = f"{CONVERTER_VERSION}+{h.hexdigest()[:12]}"
    return _CONVERTER_VERSION


_CONVERTER_VERSION: str | None = None


# --------------------------------------------------------------------------- manifest


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> dict[str, int]:
    """What must not change for a previously hashed file to be trusted without re-hashing.

    ctime is included because it cannot be set back by a tool that restores mtime.
    """
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The sidecar manifest of a model file, or None if absent or not ours."""
    try:
        data = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(directory: Path, filename: str) -> Iterator[None]:
    """An exclusive fcntl lock per cached file: one converter at a time, others wait and reuse."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    # The lock file is never deleted: removing it would let two processes lock different inodes.
    fd = os.open(directory / f".{filename}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _manifest_matches(m: dict[str, Any] | None, name: str, ftype: FileType, versions: dict[str, str | None]) -> bool:
    if not m or m.get("model") != name or m.get("ftype") != ftype_name(ftype):
        return False
    if m.get("converter_version") != converter_version():
        return False
    recorded = (m.get("source") or {}).get("packages") or {}
    # A source package that is no longer installed cannot make the cache stale: keep using it.
    return all(v is None or recorded.get(d) == v for d, v in versions.items())


def _hash_and_stat(path: Path) -> tuple[str, os.stat_result]:
    """sha256 and the stat of the very inode that was hashed (not whatever the name points to later)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest(), st


def _restamp(path: Path, m: dict[str, Any], hashed: os.stat_result) -> None:
    """Record that the file as it is now has been hashed; best effort (the cache may be read-only)."""
    try:
        if _stamp(path.stat()) != _stamp(hashed):  # replaced meanwhile: leave it to its writer
            return
        m["checked"] = _stamp(hashed)
        _write_json_atomic(manifest_path(path), m)
    except OSError:
        pass


def _cache_state(path: Path, name: str, ftype: FileType, versions: dict[str, str | None]) -> str:
    """'ok', 'stale' (no or outdated manifest, no file) or 'corrupt'.

    A file whose stat changed since it was last hashed (copied, restored, unpacked from an image
    layer) is hashed again and is 'ok' if it matches the manifest; reading needs no lock.
    """
    m = read_manifest(path)
    if not _manifest_matches(m, name, ftype, versions):
        return "stale"
    assert m is not None
    try:
        st = path.stat()
    except OSError:
        return "stale"
    if st.st_size != m.get("size"):
        return "corrupt"
    if m.get("checked") == _stamp(st):
        return "ok"
    digest, hashed = _hash_and_stat(path)
    if digest != m.get("sha256") or hashed.st_size != m.get("size"):
        return "corrupt"
    _restamp(path, m, hashed)
    return "ok"


# --------------------------------------------------------------------------- layout checks


# ggml ftype (header value modulo 1000) -> tensor type of the 2-D weights, for files written by
# whisper.cpp's own tools as well as ours.
_WEIGHT_TYPE = {
    0: TensorType.F32,
    1: TensorType.F16,
    2: TensorType.Q4_0,
    3: TensorType.Q4_1,
    7: TensorType.Q8_0,
    8: TensorType.Q5_0,
    9: TensorType.Q5_1,
    10: TensorType.Q2_K,
    11: TensorType.Q3_K,
    12: TensorType.Q4_K,
    13: TensorType.Q5_K,
    14: TensorType.Q6_K,
}


def expected_tensors(hp: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every tensor whisper.cpp loads for these hyper-parameters, with its numpy-order shape."""
    a, t = hp["n_audio_state"], hp["n_text_state"]
    out: dict[str, tuple[int, ...]] = {
        "encoder.positional_embedding": (hp["n_audio_ctx"], a),
        "encoder.conv1.weight": (a, hp["n_mels"], 3),
        "encoder.conv1.bias": (a, 1),
        "encoder.conv2.weight": (a, a, 3),
        "encoder.conv2.bias": (a, 1),
        "encoder.ln_post.weight": (a,),
        "encoder.ln_post.bias": (a,),
        "decoder.positional_embedding": (hp["n_text_ctx"], t),
        "decoder.token_embedding.weight": (hp["n_vocab"], t),
        "decoder.ln.weight": (t,),
        "decoder.ln.bias": (t,),
    }

    def block(prefix: str, d: int, attns: tuple[str, ...]) -> None:
        out.update({f"{prefix}.mlp_ln.weight": (d,), f"{prefix}.mlp_ln.bias": (d,)})
        out.update({f"{prefix}.mlp.0.weight": (4 * d, d), f"{prefix}.mlp.0.bias": (4 * d,)})
        out.update({f"{prefix}.mlp.2.weight": (d, 4 * d), f"{prefix}.mlp.2.bias": (d,)})
        for attn in attns:
            out.update({f"{prefix}.{attn}_ln.weight": (d,), f"{prefix}.{attn}_ln.bias": (d,)})
            for proj in ("query", "key", "value", "out"):
                out[f"{prefix}.{attn}.{proj}.weight"] = (d, d)
                if proj != "key":  # whisper's key projections have no bias
                    out[f"{prefix}.{attn}.{proj}.bias"] = (d,)

    for i in range(hp["n_audio_layer"]):
        block(f"encoder.blocks.{i}", a, ("attn",))
    for i in range(hp["n_text_layer"]):
        block(f"decoder.blocks.{i}", t, ("attn", "cross_attn"))
    return out


def _expected_type(name: str, shape: tuple[int, ...], header_ftype: int) -> TensorType:
    weight_type = _WEIGHT_TYPE[header_ftype % QNT_VERSION_FACTOR]
    if weight_type in (TensorType.F32, TensorType.F16):
        return storage_type(name, np.broadcast_to(np.float32(0), shape), FileType(int(weight_type)))
    # Quantized file: same rules with the 2-D weights taking the quantized type.
    base = storage_type(name, np.broadcast_to(np.float32(0), shape), FileType.Q8_0)
    return weight_type if base == TensorType.Q8_0 else base


def check_layout(model: GgmlModel, path: str | Path) -> None:
    """Raise ModelFormatError unless the file is exactly what whisper.cpp expects to load.

    whisper.cpp aborts or fails vaguely on a missing, extra, mis-shaped or mis-typed tensor;
    we say which one.
    """
    hp = model.hparams
    if hp["ftype"] % QNT_VERSION_FACTOR not in _WEIGHT_TYPE:
        raise ModelFormatError(f"{path}: unsupported ftype {hp['ftype']}")
    if model.mel_filters.shape[0] != hp["n_mels"]:
        raise ModelFormatError(f"{path}: {model.mel_filters.shape[0]} mel filters for n_mels {hp['n_mels']}")
    for side in ("audio", "text"):
        state, head, layers = hp[f"n_{side}_state"], hp[f"n_{side}_head"], hp[f"n_{side}_layer"]
        if not (0 < head <= state and state % head == 0 and 0 < layers <= 64):
            raise ModelFormatError(f"{path}: implausible {side} hparams state={state} heads={head} layers={layers}")
    expected = expected_tensors(hp)
    present = model.tensors
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFormatError(
            f"{path}: {len(missing)} tensor(s) missing for a {hp['n_audio_layer']}+{hp['n_text_layer']}-layer "
            f"model: {', '.join(missing[:3])}{more}"
        )
    extra = [n for n in present if n not in expected]
    if extra:
        raise ModelFormatError(f"{path}: unexpected tensor(s) whisper.cpp would reject: {', '.join(extra[:3])}")
    for n, shape in expected.items():
        info = present[n]
        if info.shape != shape:
            raise ModelFormatError(f"{path}: tensor {n} has shape {info.shape}, expected {shape}")
        want = _expected_type(n, shape, hp["ftype"])
        if info.ttype != want:
            raise ModelFormatError(f"{path}: tensor {n} is {info.ttype.name}, expected {want.name} for this file type")


def _read_and_check(path: Path) -> GgmlModel:
    model = read_ggml(path)
    check_layout(model, path)
    return model


def _with_path(path: Path, e: Exception) -> str:
    msg = str(e)
    return msg if str(path) in msg else f"{path}: {msg}"


# --------------------------------------------------------------------------- install / resolve


def install(
    name: str,
    ftype: FileType | str | None = None,
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
) -> Path:
    """Convert a registry model into the cache once and return its path.

    A repeated call costs a manifest read and a stat. The file is re-hashed only when its stat
    changed since the last hash (works on a read-only cache too); a corrupt or stale file is
    rebuilt. Safe to run concurrently
    from several processes: one converts, the others wait on the lock and reuse its result.
    """
    ft = as_ftype(ftype)
    src = registry.get(name)
    root = model_dir(cache_dir)
    out = root / model_filename(name, ft)
    versions = registry.source_versions(src)
    state = "stale" if force else _cache_state(out, name, ft, versions)
    if state == "ok":
        return out
    if state == "stale":
        registry.locate(src)  # fail before creating anything when a source package is missing
    try:
        return _install_locked(name, src, ft, root, out, versions, force)
    except OSError as e:
        raise ModelError(f"installing {name} into {root} failed: {e} (CALLBRIDGE_MODEL_DIR picks the cache)") from e


def _install_locked(
    name: str,
    src: registry.ModelSource,
    ft: FileType,
    root: Path,
    out: Path,
    versions: dict[str, str | None],
    force: bool,
) -> Path:
    with _locked(root, out.name):
        if not force and _cache_state(out, name, ft, versions) == "ok":
            return out
        files = registry.locate(src)  # ModelError naming the `pip install` when a package is missing
        with tempfile.TemporaryDirectory(dir=root, prefix=".convert-") as tmp:
            tmp_dir = Path(tmp)
            ct2 = registry.ct2_dir(files, tmp_dir / "ct2")
            tmp_out = tmp_dir / out.name
            try:
                convert(ct2, tmp_out, ft)
                _read_and_check(tmp_out)  # never cache a file whisper.cpp would reject
            except ModelFormatError as e:
                raise ModelError(f"converting {name} from {', '.join(files.versions)} failed: {e}") from e
            digest = sha256_file(tmp_out)
            # Readers without the lock see either no manifest (and wait for us) or the final pair.
            manifest_path(out).unlink(missing_ok=True)
            os.replace(tmp_out, out)
        st = out.stat()
        _write_json_atomic(
            manifest_path(out),
            {
                "format": MANIFEST_FORMAT,
                "model": name,
                "file": out.name,
                "ftype": ftype_name(ft),
                "size": st.st_size,
                "sha256": digest,
                "source": {"packages": files.versions, "ct2_bytes": files.size},
                "converter_version": converter_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "checked": _stamp(st),
            },
        )
    return out


def _split_name(spec: str) -> tuple[str, str | None] | None:
    """'tiny.en' or 'tiny.en:q5_0' -> (name, ftype); None when not a registry name."""
    if spec in registry.REGISTRY:
        return spec, None
    name, sep, ft = spec.rpartition(":")
    if sep and name in registry.REGISTRY:
        return name, ft
    return None


def resolve(
    name_or_path: str | Path,
    ftype: FileType | str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A registry name (installed on first use; 'tiny.en:q5_0' picks the type) or a ggml file path.

    Paths are checked with `read_ggml` and the tensor layout first, so a missing, truncated or
    foreign file is a ModelError naming the file, never a whisper.cpp abort.
    """
    spec = str(name_or_path)
    split = _split_name(spec) if not isinstance(name_or_path, Path) else None
    if split:
        name, ft = split
        return install(name, ft or ftype, cache_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model {spec!r} is neither a known model ({', '.join(registry.names())}) nor a file: {path}")
    if not path.is_file():
        raise ModelError(f"{path}: not a model file")
    try:
        _read_and_check(path)
    except ModelFormatError as e:
        raise ModelError(_with_path(path, e)) from e
    except OSError as e:
        raise ModelError(f"{path}: cannot read model file: {e.strerror or e}") from e
    return path.resolve()


# --------------------------------------------------------------------------- verify


def load_wav(path: str | Path) -> np.ndarray:
    """16-bit PCM WAV -> mono float32 at 16 kHz (what whisper.cpp takes)."""
    from ..audio.wav import read_wav

    try:
        pcm, rate, channels = read_wav(path)
    except ValueError as e:
        raise ModelError(str(e)) from e
    audio = pcm.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0
    if rate != 16000:
        import soxr

        audio = soxr.resample(audio, rate, 16000).astype(np.float32)
    return audio


def check_clip() -> np.ndarray:
    """The bundled check clip, or the same sentence from espeak-ng if the data file is missing."""
    if CHECK_WAV.is_file():
        return load_wav(CHECK_WAV)
    import shutil
    import subprocess

    if not shutil.which("espeak-ng"):
        raise ModelError(f"{CHECK_WAV} is missing and espeak-ng is not installed: use verify without transcription")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "check.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "155", "-w", str(wav), CHECK_TEXT], check=True)
        return load_wav(wav)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def transcribe_check(path: str | Path, n_threads: int = 2) -> str:
    """Transcribe the check clip with pywhispercpp (English, greedy); whisper.cpp logs silenced."""
    from pywhispercpp.model import Model

    model = Model(
        str(Path(path).resolve()),
        redirect_whispercpp_logs_to=None,
        n_threads=n_threads,
        print_progress=False,
        print_realtime=False,
        language="en",
    )
    segments = model.transcribe(check_clip())
    return " ".join(s.text.strip() for s in segments).strip()


@dataclass
class VerifyResult:
    path: Path
    hparams: dict[str, int]
    n_tensors: int
    weight_type: str
    sha256: str | None = None  # computed when a manifest exists
    manifest: dict[str, Any] | None = None
    transcript: str | None = None
    checks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        hp = self.hparams
        lines = [
            f"{self.path}: OK",
            f"  layout: {self.n_tensors} tensors, {hp['n_audio_layer']}+{hp['n_text_layer']} layers, "
            f"width {hp['n_audio_state']}, vocab {hp['n_vocab']}, weights {self.weight_type}",
        ]
        lines += [f"  {c}" for c in self.checks]
        return "\n".join(lines)


def verify(path: str | Path, transcribe: bool = True, n_threads: int = 2) -> VerifyResult:
    """Check a ggml file thoroughly: layout, sha256 against its manifest, and one transcription.

    Raises VerifyError (a ModelError) naming the first problem; ModelError if the file is absent.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        model = _read_and_check(path)
    except ModelFormatError as e:
        raise VerifyError(_with_path(path, e)) from e
    hp = model.hparams
    result = VerifyResult(
        path=path,
        hparams=hp,
        n_tensors=len(model.tensors),
        weight_type=_WEIGHT_TYPE[hp["ftype"] % QNT_VERSION_FACTOR].name.lower(),
    )
    manifest = read_manifest(path)
    if manifest:
        fix = f"reinstall with `callbridge models install {manifest.get('model')} --type {manifest.get('ftype')}`"
        st = path.stat()
        if st.st_size != manifest.get("size"):
            raise VerifyError(f"{path}: size {st.st_size} differs from the manifest's {manifest.get('size')}: {fix}")
        digest, hashed = _hash_and_stat(path)
        if digest != manifest.get("sha256"):
            raise VerifyError(f"{path}: sha256 {digest[:16]}... differs from the manifest's: corrupt file, {fix}")
        _restamp(path, manifest, hashed)
        result.sha256, result.manifest = digest, manifest
        pkgs = ", ".join(f"{k} {v}" for k, v in (manifest.get("source") or {}).get("packages", {}).items())
        result.checks.append(f"sha256 matches manifest ({digest[:16]}...; from {pkgs})")
    else:
        result.checks.append("no manifest: checksum not checked")
    if transcribe:
        t0 = time.monotonic()
        text = transcribe_check(path, n_threads=n_threads)
        words = set(_words(text))
        missing = [k for k in CHECK_KEYWORDS if k not in words]
        if missing:
            raise VerifyError(
                f"{path}: test transcription {text!r} lacks {', '.join(missing)} (expected {CHECK_TEXT!r})"
            )
        result.transcript = text
        result.checks.append(f"transcribed check clip in {time.monotonic() - t0:.2f} s: {text!r}")
    return result


# --------------------------------------------------------------------------- listing


@dataclass
class CachedFile:
    ftype: str
    path: Path
    size: int
    manifest_ok: bool  # manifest present and size matches (no hashing: listing must be quick)


@dataclass
class ModelStatus:
    name: str
    description: str
    available: bool  # source packages installed
    missing: list[str]
    install_hint: str
    versions: dict[str, str | None]
    cached: list[CachedFile]


def status(cache_dir: str | Path | None = None) -> list[ModelStatus]:
    """Registry entries with whether they can be converted and which types are cached."""
    out = []
    root = model_dir(cache_dir)
    for name, src in registry.REGISTRY.items():
        missing = registry.missing_packages(src)
        cached = []
        for ft in (*FTYPE_CHOICES, "f32"):
            p = root / model_filename(name, ft)
            if p.is_file():
                m = read_manifest(p)
                size = p.stat().st_size
                cached.append(CachedFile(ft, p, size, bool(m) and m.get("size") == size))
        out.append(
            ModelStatus(
                name=name,
                description=src.description,
                available=not missing,
                missing=missing,
                install_hint=src.install_hint,
                versions=registry.source_versions(src),
                cached=cached,
            )
        )
    return out
