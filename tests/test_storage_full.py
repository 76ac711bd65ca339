"""A full data directory: a real tmpfs mounted at the data dir, filled by the recordings or by a file.

Mounting needs root (or CAP_SYS_ADMIN); the tests say so and skip where mount is not permitted.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from bridge.audio.wav import WavRecorder
from bridge.client.stream import StreamClient, StreamError
from bridge.storage import EMERGENCY_BYTES, RESERVE_FILE, StorageGuard
from tests.serving import API_KEY, start_server
from tests.test_service_process import ROOT, Serve
from tests.test_stream_api import EN, SR, finals, sil, speech, text_of

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs at tmp_path/data, unmounted afterwards; `mount(size)` mounts it."""
    where = tmp_path / "data"
    where.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root or CAP_SYS_ADMIN: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """A filler file that leaves about `leave` bytes free (0: the disk is full)."""
    f = path / f"filler-{len(list(path.glob('filler-*')))}"
    with open(f, "wb", buffering=0) as fh:
        want = max(0, free_bytes(path) - leave)
        try:
            while want > 0:
                want -= fh.write(b"\xab" * min(want, MiB))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return f


def wav_matches_file(path: str | Path) -> float:
    """The header's length, after checking it is exactly the whole frames the file holds."""
    with wave.open(str(path)) as w:
        frames, block, rate = w.getnframes(), w.getnchannels() * w.getsampwidth(), w.getframerate()
    assert os.path.getsize(path) == 44 + frames * block, (os.path.getsize(path), frames)
    return frames / rate


# --------------------------------------------------------------------------- the recorder


def test_recorder_on_a_full_disk_keeps_whole_frames_and_a_true_header(tmpfs):
    d = tmpfs(1 * MiB)
    x = (np.arange(SR * 20) % 2000 - 1000).astype(np.int16)
    rec = WavRecorder(d / "a.wav", channels=2)
    with pytest.raises(OSError) as e:
        for i in range(0, len(x), 7999):  # odd-sized batches: the disk fills in the middle of a frame
            rec.write_frames([x[i:i + 7999], -x[i:i + 7999]])
    assert e.value.errno == errno.ENOSPC
    seconds = wav_matches_file(d / "a.wav")  # at once, not only after close: a crash may follow
    assert 15 < seconds < 17  # 1 MiB of 64 kB/s stereo: everything the disk took is kept
    with wave.open(str(d / "a.wav")) as w:
        got = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
    np.testing.assert_array_equal(got[:, 0], x[: len(got)])
    np.testing.assert_array_equal(got[:, 1], -x[: len(got)])
    rec.abandon()
    assert wav_matches_file(d / "a.wav") == seconds
    # a recording that cannot even get its header leaves no file behind
    with pytest.raises(OSError):
        WavRecorder(d / "b.wav", channels=1)
    assert sorted(p.name for p in d.iterdir()) == ["a.wav"]


def test_a_flush_after_abandon_is_a_no_op(tmp_path):
    """The usage tick flushes the recording in a worker thread; the event loop may abandon it (the
    disk filled) in between. That flush must not raise, or the tick task dies and usage stops."""
    rec = WavRecorder(tmp_path / "a.wav", channels=1)
    rec.write(0, np.ones(SR, np.int16))
    rec.abandon()
    rec.flush()
    assert wav_matches_file(tmp_path / "a.wav") == 1.0
    rec.close()  # idempotent too
    with pytest.raises(ValueError):  # audio sent to a closed recording is still an error, never dropped
        rec.write(0, np.ones(10, np.int16))


# --------------------------------------------------------------------------- the guard


def test_with_no_reserve_configured_the_emergency_file_is_not_spent_on_recordings(tmpfs):
    """min_free_disk_mb = 0: right after a write failed and the emergency file was deleted, the
    room it left must not read as "space is back" (the file recreated, live calls recording into
    it). The disk counts as full until there is room for the file and as much again."""
    d = tmpfs(8 * MiB)
    guard = StorageGuard(d, reserve_bytes=0)
    assert guard.refusal() is None and (d / RESERVE_FILE).stat().st_size == EMERGENCY_BYTES
    filler = fill(d)
    guard.exhaust(OSError(errno.ENOSPC, "No space left on device"))
    assert not (d / RESERVE_FILE).exists() and free_bytes(d) >= EMERGENCY_BYTES  # the room it left
    state = guard.state()
    assert state.exhausted and guard.refusal() is not None
    assert not (d / RESERVE_FILE).exists()  # the room stays for ending the calls
    filler.unlink()
    some = fill(d, leave=EMERGENCY_BYTES + EMERGENCY_BYTES // 2)  # room for the file, not twice
    assert guard.state().exhausted and not (d / RESERVE_FILE).exists()
    some.unlink()  # space is really back
    assert not guard.state().exhausted and guard.refusal() is None
    assert (d / RESERVE_FILE).stat().st_size == EMERGENCY_BYTES


# --------------------------------------------------------------------------- the service


async def _get(http: aiohttp.ClientSession, url: str, **kw) -> tuple[int, str, object]:
    async with http.get(url, **kw) as r:
        return r.status, r.content_type, await r.json(content_type=None)


async def stream_until_refused(srv, pcm: np.ndarray) -> tuple[StreamClient, list[dict]]:
    """Send `pcm` unpaced while reading events; stops sending once the server ends the session."""
    s = StreamClient(srv.url, api_key=API_KEY)
    await s.__aenter__()
    events: list[dict] = []

    async def read() -> None:
        async for ev in s:
            events.append(ev)

    reader = asyncio.ensure_future(read())
    step = SR // 5 * 2
    data = pcm.tobytes()
    for i in range(0, len(data), step):
        if reader.done():
            break
        try:
            await s.send_audio(data[i:i + step])
        except (ConnectionError, RuntimeError):
            break
        await asyncio.sleep(0)
    else:
        await s.end()
    await asyncio.wait_for(reader, 60)
    await s.aclose()
    return s, events


async def test_stream_on_a_full_disk_ends_failed_with_storage_full_and_the_service_recovers(tmpfs, pool):
    data = tmpfs(16 * MiB)
    srv = await start_server(data, pool, **{"limits.min_free_disk_mb": "3"})
    hdr = {"Authorization": f"Bearer {API_KEY}"}
    try:
        async with aiohttp.ClientSession() as http:
            assert (await _get(http, srv.url + "/healthz"))[2]["status"] == "ok"
            # another process takes the disk down to 1 MiB above the 3 MiB reserve: still admitted
            filler = fill(data, leave=4 * MiB)
            pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.5), sil(200.0)])  # 6.4 MB: far more than fits
            s, events = await stream_until_refused(srv, pcm)

            # the client is told why, with a code, before the close; what it saw was saved
            assert s.error is not None and s.error["code"] == "STORAGE_FULL", events[-3:]
            assert s.close_code == 4507
            status, _, job = await _get(http, f"{srv.url}/v1/jobs/{s.job_id}", headers=hdr)
            assert status == 200 and job["status"] == "failed" and job["error"]["code"] == "STORAGE_FULL"
            assert [g["text"] for g in job["segments"]] == [e["text"] for e in finals(events)]
            assert "order" in text_of(finals(events))  # the sentence before the disk filled was transcribed
            recorded = wav_matches_file(data / "recordings" / f"{s.job_id}.wav")
            assert recorded > len(speech(EN[0])) / SR
            # the duration (what is billed) is the audio taken in whole; the batch the disk cut short
            # is not counted (nor transcribed), though the whole frames of it that fit are in the file
            assert recorded - 0.2 <= job["duration_s"] <= recorded

            # while the disk is full: /healthz says so, and new sessions are refused up front
            status, _, health = await _get(http, srv.url + "/healthz")
            assert status == 200 and health["status"] == "degraded" and health["disk"]["status"] == "full"
            with pytest.raises(StreamError) as refused:
                async with StreamClient(srv.url, api_key=API_KEY):
                    pass
            assert refused.value.code == "STORAGE_FULL" and "disk" in refused.value.message
            async with http.post(f"{srv.url}/v1/webrtc/offer", headers=hdr,
                                 json={"sdp": "v=0", "type": "offer"}) as r:
                assert r.status == 507 and (await r.json())["error"]["code"] == "STORAGE_FULL"
            jobs = (await _get(http, f"{srv.url}/v1/jobs", headers=hdr))[2]["jobs"]
            assert [j["id"] for j in jobs] == [s.job_id]  # the refusals created no job
            wavs = sorted(p.name for p in (data / "recordings").iterdir())
            assert wavs == [f"{s.job_id}.wav"]  # and no empty recordings

            # a REST write that finds no room answers JSON, not a text/plain 500
            last = fill(data)
            seg = job["segments"][0]["id"]
            async with http.patch(f"{srv.url}/v1/jobs/{s.job_id}", headers=hdr,
                                  json={"segments": [{"id": seg, "text": "corrected"}]}) as r:
                assert r.status == 507 and r.content_type == "application/json"
                assert (await r.json())["error"]["code"] == "STORAGE_FULL"
            last.unlink()

            # space can be freed through the API: the failed job is not stuck live
            async with http.delete(f"{srv.url}/v1/jobs/{s.job_id}", headers=hdr) as r:
                assert r.status == 204
            filler.unlink()
            status, _, health = await _get(http, srv.url + "/healthz")
            assert status == 200 and health["status"] == "ok" and health["disk"]["status"] == "ok"
            assert (data / "space.reserve").stat().st_size > 0  # the emergency reserve is back
        async with StreamClient(srv.url, api_key=API_KEY) as again:
            await again.send_audio(np.concatenate([sil(0.3), speech(EN[1]), sil(1.2)]))
            await again.end()
            evs = [e async for e in again]
        assert again.completed and "charged" in text_of(finals(evs))
    finally:
        await srv.stop()


async def test_sessions_are_refused_under_the_reserve(tmp_path, pool):
    """The reserve alone (no write failed yet): streams get STORAGE_FULL at `start`, WebRTC 507."""
    srv = await start_server(tmp_path / "data", pool, **{"limits.min_free_disk_mb": str(1 << 40)})
    try:
        with pytest.raises(StreamError) as refused:
            async with StreamClient(srv.url, api_key=API_KEY):
                pass
        assert refused.value.code == "STORAGE_FULL" and "reserve" in refused.value.message
        async with aiohttp.ClientSession() as http:
            hdr = {"Authorization": f"Bearer {API_KEY}"}
            async with http.post(f"{srv.url}/v1/webrtc/offer", headers=hdr,
                                 json={"sdp": "v=0", "type": "offer"}) as r:
                body = await r.json()
            assert r.status == 507 and body["error"]["code"] == "STORAGE_FULL"
            status, _, health = await _get(http, srv.url + "/healthz")
            assert status == 200 and health["status"] == "degraded" and health["disk"]["status"] == "low"
            assert (await _get(http, f"{srv.url}/v1/jobs", headers=hdr))[2]["jobs"] == []
        assert list((tmp_path / "data" / "recordings").iterdir()) == []
    finally:
        await srv.stop()


async def test_no_reserve_configured_a_full_disk_still_leaves_no_empty_recordings(tmpfs, pool):
    """With min_free_disk_mb = 0 admission cannot see it coming: the recording cannot be created,
    the start is refused with STORAGE_FULL, and nothing is left behind, however often clients retry."""
    data = tmpfs(8 * MiB)
    srv = await start_server(data, pool, **{"limits.min_free_disk_mb": "0"})
    try:
        fill(data)
        for _ in range(3):
            with pytest.raises(StreamError) as refused:
                async with StreamClient(srv.url, api_key=API_KEY):
                    pass
            assert refused.value.code == "STORAGE_FULL"
        assert list((data / "recordings").iterdir()) == []
        assert (await srv.service.store.list_jobs())[0] == []
    finally:
        await srv.stop()


# --------------------------------------------------------------------------- restart


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing_database"])
async def test_serve_on_a_disk_too_full_to_start_prints_one_line(tmpfs, existing):
    data = tmpfs(2 * MiB)
    if existing:  # a database closed cleanly (no -wal/-shm files) and no emergency reserve file
        from bridge.stores.sqlite.jobs import SqliteJobStore

        SqliteJobStore(data / "callbridge.db").close()
    fill(data)
    env = {"CALLBRIDGE_API_KEYS": API_KEY}
    srv = Serve(data, env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", "--data-dir", str(data), "--http-port", str(srv.port),
        cwd=str(ROOT), env=srv.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1
    lines = [x for x in err.decode().splitlines() if not x.startswith("{")]  # JSON log lines aside
    assert lines == [f"callbridge: error: cannot start: the data directory {data} is full (0.0 MiB free); "
                     "free space there and start again"], err.decode()


async def test_restart_on_a_full_disk_recovers_and_refuses_sessions(tmpfs):
    """kill -9 with a live stream, the disk then full: `serve` recovers the job (failed, header
    matching its audio) and starts refusing sessions; deleting jobs frees space and it takes them again."""
    data = tmpfs(16 * MiB)
    # A reserve above the 2 MiB emergency file the restart frees: the restarted service is low on
    # disk by that alone, not by whatever bytes its start happens to write (SQLite may reuse its WAL).
    env = {"CALLBRIDGE_API_KEYS": API_KEY, "CALLBRIDGE_LIMITS_MIN_FREE_DISK_MB": "3"}
    hdr = {"Authorization": f"Bearer {API_KEY}"}
    async with Serve(data, env) as srv:
        live = StreamClient(srv.url, api_key=API_KEY)
        await live.__aenter__()
        await live.send_audio(sil(2.0))
        await live.send_audio(sil(0.5))
        async with aiohttp.ClientSession() as http:
            while (await _get(http, f"{srv.url}/v1/jobs/{live.job_id}", headers=hdr))[2]["duration_s"] < 2.5:
                await asyncio.sleep(0.05)
        srv.proc.kill()
        await srv.proc.wait()
        await live.aclose()
    fill(data)
    async with Serve(data, env, until=("degraded",)) as again:
        async with aiohttp.ClientSession() as http:
            _, _, job = await _get(http, f"{again.url}/v1/jobs/{live.job_id}", headers=hdr)
            assert job["status"] == "failed" and job["duration_s"] == pytest.approx(2.5)
            assert wav_matches_file(data / "recordings" / f"{live.job_id}.wav") == pytest.approx(2.5)
            with pytest.raises(StreamError) as refused:
                async with StreamClient(again.url, api_key=API_KEY):
                    pass
            assert refused.value.code == "STORAGE_FULL"
            warning = [x for x in again.log.read_text().splitlines() if x.startswith("callbridge: warning")]
            assert len(warning) == 1 and "refused" in warning[0], again.log.read_text()[-2000:]
            for f in data.glob("filler-*"):
                f.unlink()
            async with http.delete(f"{again.url}/v1/jobs/{live.job_id}", headers=hdr) as r:
                assert r.status == 204
            status, _, health = await _get(http, again.url + "/healthz")
            assert status == 200 and health["status"] == "ok"


async def test_sip_invites_get_503_while_the_disk_is_low(tmpfs, pool, tmp_path):
    from tests.test_sip_service import CALLER, peer, speech_wav, wait_job_done

    data = tmpfs(16 * MiB)
    srv = await start_server(data, pool, **{"sip.enabled": "true", "server.sip_port": "0", "sip.workers": "1",
                                            "limits.min_free_disk_mb": "3"})
    try:
        filler = fill(data, leave=2 * MiB)  # under the 3 MiB reserve
        wav = speech_wav(tmp_path / "c.wav", CALLER, tail=0.5)
        uri = f"sip:support@127.0.0.1:{srv.service.sip.port}"
        rc, info, err = await peer("call", uri, "--play", str(wav))
        assert info is not None and info["sip_code"] == 503, (rc, info, err[-2000:])
        assert (await srv.service.store.list_jobs())[0] == [] and list((data / "recordings").iterdir()) == []
        filler.unlink()  # space is back: calls are answered again
        rc, info, err = await peer("call", uri, "--play", str(wav))
        assert rc == 0 and info["sip_code"] == 200, err[-2000:]
        (job,) = await wait_job_done(srv.service.store)
        assert job.source.value == "sip"
    finally:
        await srv.stop()


async def test_sip_call_when_the_disk_fills_is_hung_up_and_failed(tmpfs, pool, tmp_path):
    from tests.test_sip_service import CALLER, peer, speech_wav

    data = tmpfs(16 * MiB)
    srv = await start_server(data, pool, **{"sip.enabled": "true", "server.sip_port": "0", "sip.workers": "1",
                                            "limits.min_free_disk_mb": "1"})
    try:
        wav = speech_wav(tmp_path / "c.wav", CALLER, tail=20.0)
        call = asyncio.ensure_future(peer("call", f"sip:support@127.0.0.1:{srv.service.sip.port}", "--play", str(wav)))
        while not srv.service.calls.calls or next(iter(srv.service.calls.calls.values())).finals == 0:
            assert not call.done(), call.result()
            await asyncio.sleep(0.1)  # the sentence has been transcribed and saved
        live = next(iter(srv.service.calls.calls.values()))
        fill(data)  # another process takes the rest of the disk while the call goes on
        rc, info, err = await asyncio.wait_for(call, 60)
        assert info["sip_code"] == 200 and info["hangup_by"] == "remote", err[-2000:]
        assert info["sent_seconds"] < 15  # hung up by the service, long before the caller's audio ran out
        job = await srv.service.store.get_job(live.id)
        assert job.status.value == "failed" and job.error["code"] == "STORAGE_FULL"
        assert job.metadata["ended_by"] == "storage_full"
        assert [g.text for g in await srv.service.store.segments(job.id)], "the final before the disk filled is kept"
        assert wav_matches_file(job.audio_path) >= job.duration_s > 0
    finally:
        await srv.stop()


# --------------------------------------------------------------------------- any other REST failure


async def test_rest_failure_answers_json_500_and_logs_one_line(tmp_path, pool, capfd):
    """A handler that raises (here: a job row the code cannot read) answers JSON, not text/plain."""
    import sqlite3

    srv = await start_server(tmp_path / "data", pool)
    try:
        async with StreamClient(srv.url, api_key=API_KEY) as s:
            await s.send_audio(sil(0.5))
        db = sqlite3.connect(tmp_path / "data" / "callbridge.db")
        db.execute("UPDATE jobs SET metadata = '{not json' WHERE id = ?", (s.job_id,))
        db.commit()
        db.close()
        capfd.readouterr()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/v1/jobs/{s.job_id}", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                body = await r.json(content_type=None)
                assert r.status == 500 and r.content_type == "application/json", body
        assert body["error"]["code"] == "INTERNAL" and "JSONDecodeError" in body["error"]["message"]
        out = capfd.readouterr()
        logged = (out.out + out.err).splitlines()
        assert len([x for x in logged if "request_failed" in x]) == 1 and "Traceback" not in out.out + out.err
    finally:
        await srv.stop()


async def test_webrtc_call_when_the_disk_fills_gets_storage_full(tmpfs, pool):
    from bridge.client.webrtc import WebRtcClient

    data = tmpfs(16 * MiB)
    srv = await start_server(data, pool, **{"limits.min_free_disk_mb": "1"})
    try:
        pcm = np.concatenate([sil(0.4), speech(EN[0]), sil(1.2), sil(30.0)])
        async with WebRtcClient(srv.url, api_key=API_KEY, audio=pcm) as c:
            events = []
            async for ev in c:
                events.append(ev)
                if ev["type"] == "final" and ev["text"]:
                    fill(data)  # the disk fills while the browser keeps talking
                if ev["type"] in ("completed", "error"):
                    break
        assert events[-1]["type"] == "error" and events[-1]["code"] == "STORAGE_FULL", events[-3:]
        job = await srv.service.store.get_job(c.job_id)
        assert job.status.value == "failed" and job.error["code"] == "STORAGE_FULL"
        assert [g.text for g in await srv.service.store.segments(job.id)] == [e["text"] for e in finals(events)]
        assert wav_matches_file(job.audio_path) >= job.duration_s > len(speech(EN[0])) / SR
    finally:
        await srv.stop()
