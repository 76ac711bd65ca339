"""Where a call's WAV lives: written on the node's own disk while the call is live, then shelved.

Why two places: a live recording is appended to 50 times a second and its header rewritten every
flush, which a network filesystem does badly and a local disk does well; a finished one must be
readable by every node of a cluster (REST audio, exports, deletion), which only a shared location
gives. So `Recordings.live_path` is always under `<data_dir>/recordings`, and `shelve` moves the
closed file to `storage.recordings_dir` (a shared mount in a cluster, mounted at the same path on
every node) when one is configured; without one the live folder is also the archive and nothing moves.

The move is atomic for readers: on another filesystem the file is copied to a hidden temporary
name beside its destination, synced, and renamed into place before the local copy is deleted, so
a reader sees either no archived file (and the job still names the local one) or the whole file.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from bridge.logs import get_logger

__all__ = ["Recordings", "move_file"]

log = get_logger("bridge.recordings")


def move_file(src: Path, dst: Path) -> None:
    """Move `src` to `dst` so that `dst` appears whole or not at all (blocking)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)  # same filesystem: one rename
        return
    except OSError as e:
        if e.errno != 18:  # EXDEV: another filesystem; anything else is a real failure
            raise
    part = dst.with_name(f".{dst.name}.part")
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1024 * 1024)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, part)
        os.replace(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    src.unlink()


class Recordings:
    """The node's live folder and the archive every node reads (the same folder on one box)."""

    def __init__(self, live_dir: Path, archive_dir: Path | None = None) -> None:
        self.live_dir = Path(live_dir)
        self.archive_dir = Path(archive_dir) if archive_dir is not None else self.live_dir

    @property
    def moves(self) -> bool:
        """True when finished recordings leave the live folder."""
        return self.archive_dir.resolve() != self.live_dir.resolve()

    def prepare(self) -> None:
        self.live_dir.mkdir(parents=True, exist_ok=True)
        self.archive_dir.mkdir(parents=True, exist_ok=True)

    def live_path(self, job_id: str) -> Path:
        return self.live_dir / f"{job_id}.wav"

    def locate(self, job_id: str, path: str | None) -> str | None:
        """Where the job's recording is (blocking): the path the job names, or, if that is gone,
        the archive's file of the same name: a recording shelved whose new path had not reached the
        database when the node stopped (the move comes first, bridge/calls.py)."""
        if path and os.path.isfile(path):
            return path
        archived = self.archive_dir / f"{job_id}.wav"
        if self.moves and archived.is_file():
            return str(archived)
        return path

    async def shelve(self, job_id: str, path: str | None) -> str | None:
        """Move a closed recording to the archive; returns its new path, or None when it stays
        where it is (no archive configured, no file, or the move failed: then the local file is
        kept and named by the job, and the failure logged, so no audio is lost)."""
        if not self.moves or not path:
            return None
        src = Path(path)
        if src.parent.resolve() != self.live_dir.resolve() or not src.exists():
            return None
        dst = self.archive_dir / src.name
        try:
            await asyncio.to_thread(move_file, src, dst)
        except OSError as e:
            log.error("recording_not_shelved", job_id=job_id, path=str(src), archive=str(self.archive_dir),
                      error=repr(e))
            return None
        log.info("recording_shelved", job_id=job_id, path=str(dst))
        return str(dst)
