"""Recordings any node can serve: written on the node's disk while live, shelved in the archive
(`storage.recordings_dir`, a shared mount in a cluster) when the call ends, and served from there
by another node. The archive is a real tmpfs, so the move crosses filesystems as it does onto NFS."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from bench import corpus
from bench.calls import speech_bounds
from bridge.audio.wav import WavRecorder, read_wav
from bridge.client.stream import StreamClient
from bridge.jobs import Job, JobSource
from bridge.recordings import Recordings, move_file
from bridge.cluster import recover_recordings
from bridge.stores import open_stores
from tests.serving import API_KEY, start_server


@pytest.fixture
def other_fs(tmp_path):
    """A folder on another filesystem (a small tmpfs), unmounted afterwards."""
    where = tmp_path / "shared"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root or CAP_SYS_ADMIN: {r.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_move_across_filesystems_is_whole_and_leaves_nothing_behind(tmp_path, other_fs):
    src = tmp_path / "live" / "job.wav"
    src.parent.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    assert os.stat(src).st_dev != os.stat(other_fs).st_dev  # the EXDEV path, not a rename
    dst = other_fs / "recordings" / "job.wav"
    move_file(src, dst)
    assert dst.read_bytes() == data
    assert not src.exists()
    assert [p.name for p in dst.parent.iterdir()] == ["job.wav"]  # no .part left


async def test_shelve_keeps_the_local_file_when_the_archive_is_unwritable(tmp_path):
    live = tmp_path / "live"
    archive = tmp_path / "archive"
    rec = Recordings(live, archive)
    rec.prepare()
    path = rec.live_path("job_x")
    path.write_bytes(b"RIFF....")
    (archive / "job_x.wav").mkdir()  # a directory where the file should go: the move fails, even as root
    assert await rec.shelve("job_x", str(path)) is None
    assert path.read_bytes() == b"RIFF...."


def _speech() -> tuple[str, bytes]:
    sentence = "Please send the invoice to the billing department today."
    voice = corpus.synthesize(sentence, rate=160)
    a, b = speech_bounds(voice)
    return sentence, np.concatenate([np.zeros(4800, np.int16), voice[a:b], np.zeros(8000, np.int16)]).tobytes()


async def _stream(url: str, pcm: bytes) -> tuple[str, list[str]]:
    finals = []
    async with StreamClient(url, api_key=API_KEY, interim_results=False) as s:
        for i in range(0, len(pcm), 3200):
            await s.send_audio(pcm[i:i + 3200])
            await asyncio.sleep(0.005)
        await s.end()
        async for ev in s:
            if ev["type"] == "final":
                finals.append(ev["text"])
        return s.job_id, finals


async def test_a_finished_call_is_shelved_and_served_by_another_node(tmp_path, other_fs, pool):
    """Node A records locally and shelves into the shared archive; node B (its own data dir, the
    same database and archive) serves the audio and the transcript."""
    archive = other_fs / "recordings"
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = await start_server(tmp_path / "a", pool, **{"storage.url": db, "storage.recordings_dir": str(archive)})
    try:
        sentence, pcm = _speech()
        job_id, finals = await _stream(a.url, pcm)
        assert finals and corpus.wer(sentence, " ".join(finals)) < 0.35, finals
        job = await a.service.store.get_job(job_id)
        assert job.audio_path == str(archive / f"{job_id}.wav")
        assert not (tmp_path / "a" / "recordings" / f"{job_id}.wav").exists()
        pcm_saved, sr, _ = read_wav(job.audio_path)
        assert sr == 16000 and pcm_saved.size == len(pcm) // 2  # every sample received is in it
    finally:
        await a.stop()
    b = await start_server(tmp_path / "b", pool, **{"storage.url": db, "storage.recordings_dir": str(archive)})
    try:
        async with aiohttp.ClientSession(b.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            async with http.get(f"/v1/jobs/{job_id}/audio") as r:
                assert r.status == 200
                body = await r.read()
            assert body == Path(archive / f"{job_id}.wav").read_bytes()
            async with http.get(f"/v1/jobs/{job_id}/transcript", params={"format": "txt"}) as r:
                assert r.status == 200
                assert finals[0].split()[0] in await r.text()
            async with http.delete(f"/v1/jobs/{job_id}") as r:
                assert r.status == 204
        assert not (archive / f"{job_id}.wav").exists()  # deleted from the shared archive by node B
    finally:
        await b.stop()


async def test_a_recording_recovered_after_a_crash_is_shelved(tmp_path, other_fs):
    """A job cut off by a crash: its repaired recording moves to the archive and the job names it."""
    live, archive = tmp_path / "data" / "recordings", other_fs / "recordings"
    rec = Recordings(live, archive)
    rec.prepare()
    stores = await open_stores(f"sqlite:///{tmp_path / 'data' / 'callbridge.db'}")
    try:
        job = Job(id="job_crashed", owner="k", source=JobSource.STREAM, speakers=["caller"],
                  audio_path=str(rec.live_path("job_crashed")))
        await stores.jobs.create_job(job)
        w = WavRecorder(Path(job.audio_path), channels=1)
        w.write_frames([np.ones(16000, np.int16)])
        w.flush()  # header says 1 s; the crash leaves it there
        await recover_recordings(stores.jobs, [job.id], rec)
        saved = await stores.jobs.get_job(job.id)
        assert saved.audio_path == str(archive / "job_crashed.wav")
        assert not rec.live_path("job_crashed").exists()
        assert read_wav(saved.audio_path)[0].size == 16000
    finally:
        await stores.close()


async def test_a_live_calls_audio_is_forwarded_from_the_node_recording_it(tmp_path, pool):
    """Node B asked for the audio of a call live on node A forwards to A (only A knows what it has
    flushed), with the caller's credentials and Range; a forwarded request is never forwarded again."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = await start_server(tmp_path / "a", pool, **{"storage.url": db, "credits.usage_interval_s": "0.2"})
    b = await start_server(tmp_path / "b", pool, **{"storage.url": db})
    try:
        _, pcm = _speech()
        async with StreamClient(a.url, api_key=API_KEY, interim_results=False) as s:
            await s.send_audio(pcm[:32000 * 2])  # 2 s
            path = a.service.recordings.live_path(s.job_id)

            async def flushed() -> bool:
                return path.exists() and path.stat().st_size >= 44 + 32000 * 2

            deadline = asyncio.get_running_loop().time() + 30
            while not await flushed():
                assert asyncio.get_running_loop().time() < deadline, "node A never flushed its recording"
                await asyncio.sleep(0.1)
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                async with http.get(f"{b.url}/v1/jobs/{s.job_id}/audio") as r:
                    assert r.status == 200 and r.headers["Content-Type"] == "audio/wav"
                    assert r.headers["X-Callbridge-Node"] == a.service.node_id  # read by A, through B
                    body = await r.read()
                async with http.get(f"{b.url}/v1/jobs/{s.job_id}/audio", headers={"Range": "bytes=0-43"}) as r:
                    assert r.status == 206 and await r.read() == body[:44]
                async with http.get(f"{b.url}/v1/jobs/{s.job_id}/audio",
                                    headers={"Authorization": "Bearer cbk_wrong_00000000000000000000000"}) as r:
                    assert r.status == 401  # node B checks the caller before forwarding anything
                # a request already forwarded once is answered from B's own view (no loop)
                async with http.get(f"{b.url}/v1/jobs/{s.job_id}/audio",
                                    headers={"X-Callbridge-Forwarded-By": "node_x"}) as r:
                    assert r.status == 200  # this host can read A's file: same machine
                    assert r.headers["X-Callbridge-Node"] == b.service.node_id
            assert body[:4] == b"RIFF" and len(body) >= 44 + 32000 * 2
            assert body[44:44 + 32000 * 2] == pcm[:32000 * 2]  # the audio A recorded, as B served it
    finally:
        await b.stop()
        await a.stop()


async def test_a_recording_shelved_before_its_new_path_was_saved_is_still_found(tmp_path, pool):
    """The move comes before the database write of the new path; a node that stopped between the
    two leaves a job naming its old, local path: the API and the recovery find the archived file."""
    archive = tmp_path / "archive"
    srv = await start_server(tmp_path / "data", pool, **{"storage.recordings_dir": str(archive)})
    try:
        rec = srv.service.recordings
        job = Job(id="job_moved", owner=(await srv.service.keys.verify_key(API_KEY)).id, source=JobSource.STREAM,
                  speakers=["caller"], audio_path=str(rec.live_path("job_moved")))
        await srv.service.store.create_job(job)
        w = WavRecorder(archive / "job_moved.wav", channels=1)
        w.write_frames([np.ones(8000, np.int16)])
        w.close()
        async with aiohttp.ClientSession(srv.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            async with http.get("/v1/jobs/job_moved") as r:
                assert (await r.json())["audio_path"] == "/v1/jobs/job_moved/audio"
            async with http.get("/v1/jobs/job_moved/audio") as r:
                assert r.status == 200 and await r.read() == (archive / "job_moved.wav").read_bytes()
        await recover_recordings(srv.service.store, ["job_moved"], rec)
        assert (await srv.service.store.get_job("job_moved")).audio_path == str(archive / "job_moved.wav")
    finally:
        await srv.stop()
