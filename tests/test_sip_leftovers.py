"""sip.leftovers with real processes: what a new service may end and remove, and what never."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from sip.leftovers import OWNER_FILE, ProcessId, WorkerPidFile, remove_dead_sock_dirs, stop_stale_workers

pytestmark = pytest.mark.timeout(60)


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level):
        return lambda event, **kw: self.events.append(event)


async def _proc(*argv: str) -> tuple[asyncio.subprocess.Process, ProcessId]:
    """A process blocked on its stdin until we close it (or it is killed)."""
    p = await asyncio.create_subprocess_exec(sys.executable, "-c", "import sys; sys.stdin.read()", *argv,
                                             stdin=asyncio.subprocess.PIPE)
    pid = ProcessId.of(p.pid)
    assert pid is not None
    return p, pid


async def _dead() -> ProcessId:
    p, pid = await _proc()
    p.stdin.close()
    await p.wait()
    assert not pid.alive()
    return pid


async def test_only_a_dead_owners_own_workers_are_stopped(tmp_path):
    control = str(tmp_path / "callbridge-sip-x" / "control.sock")
    stranger, stranger_id = await _proc()  # in the pid file, but not a worker of that socket
    other, other_id = await _proc("-m", "sip.worker", "--control", "/elsewhere/control.sock")
    worker, worker_id = await _proc("-m", "sip.worker", "--control", control)
    pid_file = WorkerPidFile(tmp_path)
    try:
        # the owner is alive (another service on this data dir): nothing is touched
        pid_file.write(control, [stranger_id, other_id, worker_id])
        log = _Log()
        assert await stop_stale_workers(pid_file, log) == []
        assert "sip_pid_file_owner_alive" in log.events and worker_id.alive()
        # the owner is dead: only its worker of that control socket is ended
        data = json.loads(pid_file.path.read_text())
        data["owner"] = (await _dead()).to_json()
        pid_file.path.write_text(json.dumps(data))
        assert await stop_stale_workers(pid_file, _Log()) == [worker_id.pid]
        assert await asyncio.wait_for(worker.wait(), 10) is not None
        assert stranger_id.alive() and other_id.alive()
        assert not pid_file.path.exists()
    finally:
        for p in (stranger, other, worker):
            if p.returncode is None:
                p.kill()
                await p.wait()


async def test_a_reused_pid_is_not_the_recorded_process(tmp_path):
    p, pid = await _proc("-m", "sip.worker", "--control", "/c.sock")
    try:
        assert ProcessId(pid.pid, pid.start + 1).alive() is False
        assert pid.alive()
    finally:
        p.kill()
        await p.wait()


async def test_socket_dirs_of_dead_owners_are_removed(tmp_path):
    dead, alive = tmp_path / "callbridge-sip-dead", tmp_path / "callbridge-sip-alive"
    unrelated = tmp_path / "something-else"
    for d in (dead, alive, unrelated):
        d.mkdir()
    (dead / OWNER_FILE).write_text(json.dumps((await _dead()).to_json()))
    (alive / OWNER_FILE).write_text(json.dumps(ProcessId.me().to_json()))
    (unrelated / OWNER_FILE).write_text(json.dumps((await _dead()).to_json()))
    assert remove_dead_sock_dirs(_Log(), str(tmp_path)) == [str(dead)]
    assert not dead.exists() and alive.is_dir() and unrelated.is_dir()
