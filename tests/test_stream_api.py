"""The ingest WebSocket end to end: real server on loopback, real model, real SQLite, WAV on disk."""

from __future__ import annotations

import asyncio
import json
import re
import wave

import aiohttp
import numpy as np
import pytest

from bench import corpus
from bench.calls import speech_bounds
from bridge.client.stream import StreamClient, StreamError
from tests.serving import API_KEY, start_server

SR = 16000
EN = [
    "I would like to check the status of my order, please.",
    "My card was charged twice for the same purchase last week.",
]
# sentences tiny.en hears reliably at 8 kHz mu-law (tests/test_recognizer.py PHONE)
CALLER = "Let me transfer you to the billing department, one moment please."
AGENT = "I need to cancel my subscription before the next billing cycle."


def sil(s: float, rate: int = SR) -> np.ndarray:
    return np.zeros(int(s * rate), np.int16)


def speech(text: str, rate: int = 160) -> np.ndarray:
    s = corpus.synthesize(text, rate=rate)
    a, b = speech_bounds(s)
    return s[a:b]


async def send_paced(s: StreamClient, data: bytes, bytes_per_s: int, chunk_s: float = 0.1,
                     speed: float | None = 8.0) -> None:
    step = max(1, int(bytes_per_s * chunk_s))
    for i in range(0, len(data), step):
        await s.send_audio(data[i : i + step])
        await asyncio.sleep(chunk_s / speed if speed else 0)


async def collect(s: StreamClient) -> list[dict]:
    return [ev async for ev in s]


def finals(events: list[dict], channel: int | None = None) -> list[dict]:
    return [e for e in events if e["type"] == "final" and (channel is None or e["channel"] == channel)]


def text_of(evs: list[dict]) -> str:
    return " ".join(e["text"] for e in evs if e["text"])


# --------------------------------------------------------------------------- happy paths


async def test_mono_16k_stream_round_trip(server):
    pcm = np.concatenate([sil(0.4), speech(EN[0]), sil(1.0), speech(EN[1]), sil(1.2)])
    async with StreamClient(server.url, api_key=API_KEY, sample_rate=16000) as s:
        assert s.ready["type"] == "ready" and s.ready["job_id"].startswith("job_")
        assert s.ready["config"]["speakers"] == ["ch0"] and s.ready["max_duration_seconds"] == 10800
        await send_paced(s, pcm.tobytes(), SR * 2)
        await s.end()
        events = await collect(s)
    assert s.close_code == 1000
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "completed" and "usage" in kinds
    fin = finals(events)
    assert corpus.wer(" ".join(EN), text_of(fin)) < 0.15, text_of(fin)
    assert all(e["speaker"] == "ch0" and e["channel"] == 0 for e in fin)
    assert all(e["words"] and 0 <= e["start"] < e["end"] <= len(pcm) / SR + 0.01 for e in fin if e["text"])
    assert any(e["type"] == "partial" for e in events)
    done = s.completed
    assert done["job_id"] == s.job_id and abs(done["streamed_seconds"] - len(pcm) / SR) < 0.01
    assert done["credits_used"] == pytest.approx(220 * len(pcm) / SR / 60, abs=0.01)
    last_usage = [e for e in events if e["type"] == "usage"][-1]
    assert last_usage["streamed_seconds"] == done["streamed_seconds"]
    # the saved job: finals with words, the recording, status
    svc = server.service
    job = await svc.store.get_job(s.job_id)
    segs = await svc.store.segments(s.job_id)
    assert job.status.value == "completed" and job.speakers == ["ch0"]
    assert [g.text for g in segs] == [e["text"] for e in fin]
    assert segs[0].words and segs[0].words[0]["word"]
    with wave.open(job.audio_path) as w:
        assert (w.getnchannels(), w.getframerate()) == (1, SR)
        assert abs(w.getnframes() - len(pcm)) <= 16


async def test_two_channel_mulaw_8k_labels(server):
    """caller on the left, agent on the right, different text: each comes back under its label."""
    c = speech(CALLER, rate=140)
    a = speech(AGENT, rate=140)
    n = len(c) + len(a) + int(2.5 * SR)
    left, right = np.zeros(n, np.int16), np.zeros(n, np.int16)
    left[int(0.3 * SR): int(0.3 * SR) + len(c)] = c
    off = int(0.3 * SR) + len(c) + int(1.0 * SR)
    right[off: off + len(a)] = a
    ml, mr = corpus.to_mulaw_8k(left), corpus.to_mulaw_8k(right)
    inter = np.empty(2 * len(ml), np.uint8)
    inter[0::2] = np.frombuffer(ml, np.uint8)
    inter[1::2] = np.frombuffer(mr, np.uint8)
    async with StreamClient(server.url, api_key=API_KEY, sample_rate=8000, channels=2, encoding="pcm_mulaw",
                            metadata={"speakers": ["caller", "agent"]}) as s:
        assert s.ready["config"]["speakers"] == ["caller", "agent"]
        await send_paced(s, inter.tobytes(), 8000 * 2)
        await s.end()
        events = await collect(s)
    f0, f1 = finals(events, 0), finals(events, 1)
    assert f0 and f1
    assert all(e["speaker"] == "caller" for e in f0) and all(e["speaker"] == "agent" for e in f1)
    assert corpus.wer(CALLER, text_of(f0)) < 0.2, text_of(f0)
    assert corpus.wer(AGENT, text_of(f1)) < 0.2, text_of(f1)
    # each channel's final sits where that channel spoke
    assert f1[0]["start"] > f0[0]["end"] - 0.5
    assert s.completed["credits_used"] == pytest.approx(2 * 220 * (n / SR) / 60, abs=0.05)
    job = await server.service.store.get_job(s.job_id)
    with wave.open(job.audio_path) as w:
        assert w.getnchannels() == 2
        stereo = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)
    # the recording keeps the legs apart: the agent channel is silent while the caller talks
    mid_caller = int(0.3 * SR) + len(c) // 2
    assert np.abs(stereo[mid_caller - 800: mid_caller + 800, 0]).mean() > 20 * (
        np.abs(stereo[mid_caller - 800: mid_caller + 800, 1]).mean() + 1)


async def test_default_labels_without_metadata(server):
    async with StreamClient(server.url, api_key=API_KEY, channels=2) as s:
        assert s.ready["config"]["speakers"] == ["ch0", "ch1"]
        await s.send_audio(np.zeros(3200, np.int16))
    assert s.completed is not None


async def test_force_endpoint_and_configure(server):
    """force_endpoint gives the final without silence; interim_results=false sends no partials."""
    async with StreamClient(server.url, api_key=API_KEY, endpointing_ms=5000, interim_results=False) as s:
        await send_paced(s, np.concatenate([sil(0.3), speech(EN[0])]).tobytes(), SR * 2)
        await s.configure(300)
        await s.force_endpoint()
        first = await asyncio.wait_for(s._next(), 15)
        while first["type"] == "usage":
            first = await asyncio.wait_for(s._next(), 15)
        assert first["type"] == "final" and corpus.wer(EN[0], first["text"]) < 0.2
        await s.end()
        events = await collect(s)
    assert not any(e["type"] == "partial" for e in events)
    assert (await server.service.store.get_job(s.job_id)).config["endpointing_ms"] == 5000


async def test_usage_ticks_and_keep_alive_resets_idle(tmp_path, pool):
    srv = await start_server(tmp_path, pool, **{"credits.usage_interval_s": 0.5, "limits.idle_timeout_s": 1.0})
    try:
        async with StreamClient(srv.url, api_key=API_KEY) as s:
            await s.send_audio(sil(0.5))
            for _ in range(4):  # 2 s with no audio, kept alive
                await asyncio.sleep(0.5)
                await s.keep_alive()
            await s.end()
            events = await collect(s)
        usage = [e for e in events if e["type"] == "usage"]
        assert len(usage) >= 3, events
        assert s.completed and usage[-1]["streamed_seconds"] == pytest.approx(0.5)
    finally:
        await srv.stop()


# --------------------------------------------------------------------------- errors


async def raw_session(server, first: str | bytes | None, *, params: str = ""):
    """Open the socket, send `first`, return (frames as dicts, close code)."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.ws_url}?api_key={API_KEY}{params}") as ws:
            if isinstance(first, bytes):
                await ws.send_bytes(first)
            elif first is not None:
                await ws.send_str(first)
            frames = []
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    frames.append(json.loads(msg.data))
            return frames, ws.close_code


@pytest.mark.parametrize("first, needle", [
    ('{"type":"start","encoding":"opus"}', "encoding"),
    ('{"type":"start","sample_rate":4000}', "sample_rate"),
    ('{"type":"start","sample_rate":96000}', "sample_rate"),
    ('{"type":"start","channels":3}', "channels"),
    ('{"type":"start","sample_rate":"16000"}', "sample_rate"),
    ('{"type":"start","endpointing_ms":-5}', "endpointing_ms"),
    ('{"type":"start","language":"de"}', "language"),
    ('{"type":"start","channels":2,"metadata":{"speakers":["a"]}}', "speakers"),
    ('{"type":"start",', "JSON"),
    ('{"type":"keep_alive"}', "start"),
    (b"\x00\x00" * 160, "audio before start"),
])
async def test_invalid_config_refuses_without_a_job(server, first, needle):
    frames, code = await raw_session(server, first)
    assert frames[0]["type"] == "error" and frames[0]["code"] == "INVALID_CONFIG", frames
    assert needle.lower() in frames[0]["message"].lower()
    assert code == 4400 and len(frames) == 1
    assert (await server.service.store.list_jobs())[0] == []


async def test_invalid_audio_keeps_what_was_received(server):
    """An odd-length pcm_s16le frame ends the session; the audio and finals before it are saved."""
    pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)])
    async with StreamClient(server.url, api_key=API_KEY) as s:
        await send_paced(s, pcm.tobytes(), SR * 2)
        await s.send_audio(b"\x01\x02\x03")
        events = await collect(s)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "INVALID_AUDIO"
    assert "whole number of samples" in events[-1]["message"]
    assert s.close_code == 4415
    fin = finals(events)
    assert corpus.wer(EN[0], text_of(fin)) < 0.2
    job = await server.service.store.get_job(s.job_id)
    assert job.status.value == "failed" and job.error["code"] == "INVALID_AUDIO"
    assert [g.text for g in await server.service.store.segments(s.job_id)] == [e["text"] for e in fin]
    with wave.open(job.audio_path) as w:
        assert abs(w.getnframes() - len(pcm)) <= 16


async def test_oversized_frame_is_invalid_audio(server):
    async with StreamClient(server.url, api_key=API_KEY) as s:
        await s.send_audio(b"\x00" * ((1 << 20) + 2))
        events = await collect(s)
    assert events[-1]["code"] == "INVALID_AUDIO" and "1048576" in events[-1]["message"]


async def test_max_duration_finalizes_then_errors(tmp_path, pool):
    srv = await start_server(tmp_path, pool, **{"limits.max_duration_s": 4})
    try:
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(6.0)])
        async with StreamClient(srv.url, api_key=API_KEY) as s:
            assert s.ready["max_duration_seconds"] == 4
            await send_paced(s, pcm.tobytes(), SR * 2)
            events = await collect(s)
        err = events[-1]
        assert err["type"] == "error" and err["code"] == "MAX_DURATION_REACHED" and s.close_code == 4413
        assert corpus.wer(EN[0], text_of(finals(events))) < 0.2
        usage = [e for e in events if e["type"] == "usage"][-1]
        assert usage["streamed_seconds"] == pytest.approx(4.0)
        job = await srv.service.store.get_job(s.job_id)
        assert job.status.value == "completed" and job.error["code"] == "MAX_DURATION_REACHED"
        assert job.duration_s == pytest.approx(4.0)
        assert await srv.service.store.segments(s.job_id)
    finally:
        await srv.stop()


async def test_idle_and_first_audio_timeouts(tmp_path, pool):
    srv = await start_server(tmp_path, pool, **{"limits.idle_timeout_s": 0.8, "limits.first_audio_timeout_s": 0.6})
    try:
        async with StreamClient(srv.url, api_key=API_KEY) as s:  # never sends audio
            events = await asyncio.wait_for(collect(s), 10)
        assert events[-1]["code"] == "IDLE_TIMEOUT" and "no audio within" in events[-1]["message"]
        assert s.close_code == 4408
        async with StreamClient(srv.url, api_key=API_KEY) as s:  # sends, then goes quiet
            await s.send_audio(sil(0.2))
            events = await asyncio.wait_for(collect(s), 10)
        assert events[-1]["code"] == "IDLE_TIMEOUT" and "keep_alive" in events[-1]["message"]
        job = await srv.service.store.get_job(s.job_id)
        assert job.status.value == "completed" and job.duration_s == pytest.approx(0.2)
    finally:
        await srv.stop()


async def test_rate_limited_per_key_while_others_stream(tmp_path, pool):
    """The second concurrent session of a key is refused; the first and another key's carry on."""
    from tests.serving import OTHER_KEY

    srv = await start_server(tmp_path, pool, **{"limits.max_sessions_per_key": 1})
    try:
        pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.2)])
        async with StreamClient(srv.url, api_key=API_KEY) as first:
            with pytest.raises(StreamError) as e:
                async with StreamClient(srv.url, api_key=API_KEY):
                    pass
            assert e.value.code == "RATE_LIMITED"
            async with StreamClient(srv.url, api_key=OTHER_KEY) as other:
                await asyncio.gather(send_paced(first, pcm.tobytes(), SR * 2),
                                     send_paced(other, pcm.tobytes(), SR * 2))
                await other.end()
                ev_other = await collect(other)
            await first.end()
            ev_first = await collect(first)
        for evs in (ev_first, ev_other):
            assert evs[-1]["type"] == "completed"
            assert corpus.wer(EN[0], text_of(finals(evs))) < 0.2
        # the slot is free again once the session ended
        async with StreamClient(srv.url, api_key=API_KEY) as again:
            assert again.ready
    finally:
        await srv.stop()


async def test_errors_do_not_disturb_a_live_session(server):
    """While one client streams, others hit every refusal; the stream's transcript is intact."""
    pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(1.0), speech(EN[1]), sil(1.2)])
    async with StreamClient(server.url, api_key=API_KEY) as good:
        sender = asyncio.create_task(send_paced(good, pcm.tobytes(), SR * 2, speed=2.0))
        bad = await asyncio.gather(
            raw_session(server, '{"type":"start","encoding":"flac"}'),
            raw_session(server, b"\x00\x00"),
            raw_session(server, "not json"),
        )
        async with StreamClient(server.url, api_key=API_KEY) as s2:
            await s2.send_audio(b"\x00")
            ev2 = await collect(s2)
        await sender
        await good.end()
        events = await collect(good)
    assert [f[0][0]["code"] for f in bad] == ["INVALID_CONFIG"] * 3
    assert ev2[-1]["code"] == "INVALID_AUDIO"
    assert events[-1]["type"] == "completed"
    assert corpus.wer(" ".join(EN), text_of(finals(events))) < 0.15


async def test_healthz_and_metrics(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with StreamClient(server.url, api_key=API_KEY) as s:
            await s.send_audio(b"\x01")
            await collect(s)
        async with http.get(server.url + "/metrics") as r:
            text = await r.text()
    assert r.status == 200
    assert 'callbridge_sessions_total{source="stream"} 1.0' in text
    assert 'callbridge_errors_total{code="INVALID_AUDIO"} 1.0' in text
    assert "callbridge_decode_seconds_bucket" in text and "callbridge_queue_depth" in text


async def test_disconnect_without_end_still_saves_everything(server):
    pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(0.2)])
    s = StreamClient(server.url, api_key=API_KEY)
    await s.__aenter__()
    await send_paced(s, pcm.tobytes(), SR * 2)
    await s.aclose()  # gone, no `end`
    store = server.service.store
    for _ in range(200):
        job = await store.get_job(s.job_id)
        if job.status.value != "live":
            break
        await asyncio.sleep(0.05)
    assert job.status.value == "completed" and job.duration_s == pytest.approx(len(pcm) / SR, abs=0.01)
    assert corpus.wer(EN[0], " ".join(g.text for g in await store.segments(s.job_id))) < 0.2


async def test_cli_stream_prints_finals(server, tmp_path):
    """`callbridge stream FILE` against the live server, as a user runs it."""
    import sys

    wav = tmp_path / "two.wav"
    corpus.write_wav(wav, np.concatenate([sil(0.3), speech(EN[0]), sil(1.0)]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "stream", str(wav), "--url", server.url, "--api-key", API_KEY,
        "--speed", "8", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines and lines[0].startswith("[00:00.") and "ch0:" in lines[0]
    assert corpus.wer(EN[0], lines[0].split(":", 2)[2]) < 0.2
    assert "completed: job job_" in err.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "stream", str(wav), "--url", server.url, "--api-key", "wrong",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "401" in err.decode(), err.decode()


async def test_unknown_routes_and_plain_get_answer_json(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/v1/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
        async with http.delete(server.url + "/healthz") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
        async with http.get(server.ws_url, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status == 426 and (await r.json())["error"]["code"] == "UPGRADE_REQUIRED"


def readme_stream_example() -> str:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split("## Streaming audio in", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_raw_websocket_example_imports_only_installed_packages():
    """It once imported `websockets`, which only the dev extra installs."""
    import ast
    import sys
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    installed = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower() for d in pyproject["project"]["dependencies"]}
    imported = set()
    for node in ast.walk(ast.parse(readme_stream_example())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party and third_party <= installed, third_party - installed


async def test_readme_raw_websocket_example_runs(server, tmp_path):
    """The README's raw-WebSocket example, run as written: saved as a file and run with a WAV
    argument from the directory holding data/api_key (only the port pointed at this server)."""
    import sys

    code = readme_stream_example()
    assert code.count("127.0.0.1:8080") == 1
    cwd = tmp_path / "user"
    (cwd / "data").mkdir(parents=True)
    (cwd / "data" / "api_key").write_text(API_KEY + "\n")
    (cwd / "stream_file.py").write_text(code.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}"))
    corpus.write_wav(cwd / "call.wav", np.concatenate([sil(0.3), speech(EN[0]), sil(1.0)]))
    proc = await asyncio.create_subprocess_exec(sys.executable, "stream_file.py", "call.wav", cwd=str(cwd),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and not err, err.decode()
    lines = out.decode().splitlines()
    assert "'type': 'ready'" in lines[0]
    assert lines[1].startswith("ch0 [0.") and corpus.wer(EN[0], lines[1].split("] ", 1)[1]) < 0.2
    assert lines[-1].startswith("{'type': 'completed'")


async def test_cli_stream_raw_mulaw_from_stdin(server):
    """`sox ... | callbridge stream - --sample-rate 8000 --encoding pcm_mulaw`: raw audio on stdin."""
    import sys

    raw = corpus.to_mulaw_8k(np.concatenate([sil(0.3), speech(CALLER, rate=140), sil(1.0)]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "stream", "-", "--sample-rate", "8000", "--encoding", "pcm_mulaw",
        "--url", server.url, "--api-key", API_KEY, "--fast", "--json",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(raw), 60)
    assert proc.returncode == 0, err.decode()
    events = [json.loads(x) for x in out.decode().splitlines()]
    assert events[0]["type"] == "ready" and events[0]["config"]["encoding"] == "pcm_mulaw"
    assert events[-1]["type"] == "completed"
    assert events[-1]["streamed_seconds"] == pytest.approx(len(raw) / 8000, abs=0.01)
    assert corpus.wer(CALLER, text_of(finals(events))) < 0.2
