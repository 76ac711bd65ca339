"""The jobs REST API, its Python client and `callbridge jobs`, over a real socket.

Jobs are written into the running service's real SQLite store and recordings folder (the
streaming ingest that creates them end to end is tested elsewhere); everything else goes over
HTTP exactly as a user's would.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from bridge.audio.wav import WavRecorder, read_wav
from bridge.client.errors import ApiError
from bridge.client.rest import JobsClient
from bridge.commands import jobs as jobs_cmd
from bridge.events.types import Final, Word
from bridge.jobs import Job, JobSource, JobStatus, new_job_id
from tests.serving import API_KEY, OTHER_KEY
from tests.test_export import _group, parse_srt, parse_vtt

LONG = ("thanks for calling about the order you placed last week, I can see the delivery was scheduled "
        "for Tuesday but the courier marked it as delayed because of the weather, so I have requested a "
        "new slot for tomorrow morning and you will receive a text message with the exact time window")


def final(text: str, start: float, end: float, channel: int, speaker: str) -> dict[str, Any]:
    toks = text.split()
    step = (end - start) / max(len(toks), 1)
    words = tuple(Word(t, start + i * step, start + (i + 1) * step, 0.9) for i, t in enumerate(toks))
    return Final(text=text, words=words, channel=channel, speaker=speaker, start=start, end=end,
                 speech_final=True, language="en", confidence=0.9).to_dict()


CONVERSATION = [
    final("Hello, thanks for calling.", 0.5, 1.7, 1, "agent"),
    final("Hi, I have a question about my order.", 1.9, 4.0, 0, "caller"),
    final(LONG, 4.5, 22.0, 1, "agent"),
    final("Great, thank you.", 22.5, 23.4, 0, "caller"),
]


async def owner_of(server: Any, key: str = API_KEY) -> str:
    """The owner id the service gives a key (its key id), as the jobs it creates would carry."""
    return (await server.service.keys.verify_key(key)).id


async def make_job(server: Any, owner: str, *, created_at: float | None = None,
                   status: JobStatus = JobStatus.COMPLETED, source: JobSource = JobSource.STREAM,
                   finals: list[dict[str, Any]] | None = None, audio: bool = True) -> Job:
    """A finished job in the real store, with a real two-channel WAV in the recordings folder."""
    created = created_at if created_at is not None else time.time()
    job = Job(id=new_job_id(), owner=owner, status=status, source=source, created_at=created,
              ended_at=created + 24.0, duration_s=24.0, speakers=["caller", "agent"],
              config={"language": "en"})
    if audio:
        path = server.service.recordings_dir / f"{job.id}.wav"
        t = np.arange(16000) / 16000
        with WavRecorder(path, channels=2) as rec:
            rec.write_frames([(3000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16),
                              (3000 * np.sin(2 * np.pi * 330 * t)).astype(np.int16)])
        job.audio_path = str(path)
    await server.service.store.create_job(job)
    for f in CONVERSATION if finals is None else finals:
        await server.service.store.add_segment(job.id, f)
    return job


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(base_url=server.url) as s:
        yield s


async def error_of(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    """Assert a JSON error body of the API's shape; returns its message."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]["message"]


# --------------------------------------------------------------------------- list


async def test_list_paginates_newest_first(server, http):
    me = await owner_of(server)
    base = time.time() - 1000
    made = [await make_job(server, me, created_at=base + i, audio=False) for i in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        async with http.get("/v1/jobs", params=params, headers=auth()) as r:
            assert r.status == 200
            page = await r.json()
        assert len(page["jobs"]) <= 2
        seen += page["jobs"]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 3
    assert [j["id"] for j in seen] == [j.id for j in reversed(made)]  # newest first, no duplicates
    first = seen[0]
    assert set(first) >= {"id", "status", "source", "created_at", "ended_at", "duration_s", "speakers"}
    assert (first["status"], first["source"], first["speakers"]) == ("completed", "stream", ["caller", "agent"])
    async with http.get("/v1/jobs", headers=auth()) as r:  # default limit covers all 5
        assert len((await r.json())["jobs"]) == 5


async def test_list_filters(server, http):
    me = await owner_of(server)
    now = time.time()
    old = await make_job(server, me, created_at=now - 7200, source=JobSource.SIP, audio=False)
    failed = await make_job(server, me, created_at=now - 60, status=JobStatus.FAILED, source=JobSource.WEBRTC, audio=False)
    recent = await make_job(server, me, created_at=now - 30, audio=False)

    async def ids(**params: str) -> list[str]:
        async with http.get("/v1/jobs", params=params, headers=auth()) as r:
            assert r.status == 200, await r.text()
            return [j["id"] for j in (await r.json())["jobs"]]

    assert await ids(status="failed") == [failed.id]
    assert await ids(status="completed") == [recent.id, old.id]
    assert await ids(source="sip") == [old.id]
    assert await ids(source="webrtc", status="failed") == [failed.id]
    assert await ids(source="webrtc", status="completed") == []
    assert await ids(since=str(now - 3600)) == [recent.id, failed.id]
    iso = datetime.fromtimestamp(now - 45, tz=UTC).isoformat().replace("+00:00", "Z")
    assert await ids(since=iso) == [recent.id]


@pytest.mark.parametrize("params", [
    {"status": "done"}, {"source": "phone"}, {"limit": "0"}, {"limit": "101"}, {"limit": "ten"},
    {"since": "last tuesday"}, {"since": "nan"}, {"cursor": "not-a-cursor"},
])
async def test_list_rejects_bad_query(server, http, params):
    async with http.get("/v1/jobs", params=params, headers=auth()) as r:
        message = await error_of(r, 400, "INVALID_REQUEST")
    assert next(iter(params)) in message  # says which parameter is wrong


# --------------------------------------------------------------------------- auth and isolation


async def test_auth_required_and_query_key(server, http):
    await make_job(server, await owner_of(server), audio=False)
    for headers in ({}, auth("cbk_wrong_key_000000000000000000"), {"Authorization": "Basic eDp5"}):
        async with http.get("/v1/jobs", headers=headers) as r:
            assert r.status == 401 and r.content_type == "application/json"
            err = (await r.json())["error"]
            assert err["code"] and err["message"]
    async with http.get("/v1/jobs", params={"api_key": API_KEY}) as r:
        assert r.status == 200 and len((await r.json())["jobs"]) == 1


async def test_other_owner_sees_nothing(server, http):
    job = await make_job(server, await owner_of(server))
    async with http.get("/v1/jobs", headers=auth(OTHER_KEY)) as r:
        assert (await r.json()) == {"jobs": [], "next": None}
    calls = [("GET", f"/v1/jobs/{job.id}", None), ("PATCH", f"/v1/jobs/{job.id}", {"speakers": {"caller": "x"}}),
             ("DELETE", f"/v1/jobs/{job.id}", None), ("GET", f"/v1/jobs/{job.id}/transcript", None),
             ("GET", f"/v1/jobs/{job.id}/audio", None)]
    for method, path, body in calls:
        async with http.request(method, path, json=body, headers=auth(OTHER_KEY)) as r:
            foreign = await error_of(r, 404, "NOT_FOUND")
        missing_path = path.replace(job.id, "job_00000000000000000000000000")
        async with http.request(method, missing_path, json=body, headers=auth(OTHER_KEY)) as r:
            missing = await error_of(r, 404, "NOT_FOUND")
        assert foreign.replace(job.id, "ID") == missing.replace("job_00000000000000000000000000", "ID")
    assert (await server.service.store.get_job(job.id)).speakers == ["caller", "agent"]  # nothing changed
    assert Path(job.audio_path).is_file()


# --------------------------------------------------------------------------- get


async def test_get_job(server, http):
    job = await make_job(server, await owner_of(server), source=JobSource.SIP)
    async with http.get(f"/v1/jobs/{job.id}", headers=auth()) as r:
        assert r.status == 200
        text = await r.text()
    body = json.loads(text)
    assert (body["id"], body["status"], body["source"]) == (job.id, "completed", "sip")
    assert body["created_at"] == job.created_at and body["ended_at"] == job.ended_at
    assert body["duration_s"] == 24.0 and body["speakers"] == ["caller", "agent"]
    assert body["transcript_path"] == f"/v1/jobs/{job.id}/transcript"
    assert body["audio_path"] == f"/v1/jobs/{job.id}/audio"
    assert str(server.service.data_dir) not in text  # no local filesystem paths leak
    assert [(s["start"], s["speaker"], s["text"]) for s in body["segments"]] == [
        (f["start"], f["speaker"], f["text"]) for f in CONVERSATION]
    assert all(isinstance(s["id"], int) and s["words"] for s in body["segments"])

    bare = await make_job(server, await owner_of(server), audio=False, finals=[])
    async with http.get(f"/v1/jobs/{bare.id}", headers=auth()) as r:
        body = await r.json()
    assert body["audio_path"] is None and body["segments"] == []


# --------------------------------------------------------------------------- patch and exports


async def _exports(http: aiohttp.ClientSession, job_id: str) -> dict[str, str]:
    out = {}
    for fmt in ("json", "txt", "srt", "vtt"):
        async with http.get(f"/v1/jobs/{job_id}/transcript", params={"format": fmt}, headers=auth()) as r:
            assert r.status == 200, await r.text()
            out[fmt] = await r.text()
    return out


def _check_exports_match(ex: dict[str, str], job: dict[str, Any]) -> None:
    """Every export parses back and says exactly what the job's segments say."""
    segs = [s for s in job["segments"] if s["text"].strip()]
    doc = json.loads(ex["json"])
    assert doc["job_id"] == job["id"] and doc["speakers"] == job["speakers"]
    assert doc["segments"] == [{k: s[k] for k in ("start", "end", "channel", "speaker", "text", "words")}
                               for s in segs]

    assert ex["txt"].splitlines() == [
        f"[{int(s['start'] // 3600):02d}:{int(s['start'] // 60 % 60):02d}:{s['start'] % 60:05.2f}] "
        f"{s['speaker']}: {s['text']}" for s in segs]

    class S:  # _group reads .text
        def __init__(self, d: dict[str, Any]) -> None:
            self.text = d["text"]

    srt = parse_srt(ex["srt"])
    per_seg = _group(srt, [S(s) for s in segs], lambda c: [c[2][0].split(": ", 1)[1], *c[2][1:]])
    for seg, cues in zip(segs, per_seg):
        assert all(c[2][0].startswith(seg["speaker"] + ": ") for c in cues)
        assert all(len(c[2]) <= 2 and all(len(x) <= 42 for x in c[2]) for c in cues)
        assert cues[0][0] == pytest.approx(seg["start"], abs=1e-3)
        assert cues[-1][1] == pytest.approx(seg["end"], abs=1e-3)

    vtt = parse_vtt(ex["vtt"])
    per_seg = _group(vtt, [S(s) for s in segs], lambda c: c[3])
    for seg, cues in zip(segs, per_seg):
        assert all(c[2] == seg["speaker"] for c in cues)
        assert all(len(c[3]) <= 2 and all(len(x) <= 42 for x in c[3]) for c in cues)
        assert cues[0][0] == pytest.approx(seg["start"], abs=1e-3)
        assert cues[-1][1] == pytest.approx(seg["end"], abs=1e-3)


async def test_patch_shows_in_every_export(server, http):
    job = await make_job(server, await owner_of(server))
    async with http.get(f"/v1/jobs/{job.id}", headers=auth()) as r:
        before = await r.json()
    _check_exports_match(await _exports(http, job.id), before)
    greet, question = before["segments"][0], before["segments"][1]
    new_text = "Hello, thanks for calling Zed & <Co>, this is Dana speaking."
    patch = {"segments": [{"id": greet["id"], "text": new_text}, {"id": question["id"], "speaker": "Bob"}],
             "speakers": {"caller": "Alice"}}
    t0 = time.time()
    async with http.patch(f"/v1/jobs/{job.id}", json=patch, headers=auth()) as r:
        assert r.status == 200, await r.text()
        after = await r.json()
    async with http.get(f"/v1/jobs/{job.id}", headers=auth()) as r:
        assert await r.json() == after  # the PATCH answer is the stored job

    segs = after["segments"]
    assert after["speakers"] == ["Alice", "agent"]
    assert segs[0]["text"] == new_text and segs[0]["original_text"] == greet["text"]
    assert segs[0]["speaker"] == "agent" and segs[0]["edited_at"] >= t0 - 1
    assert segs[1]["speaker"] == "Bob" and segs[1]["original_speaker"] == "caller"  # segment edit beats rename
    assert segs[1]["text"] == question["text"]
    assert segs[3]["speaker"] == "Alice" and segs[3]["original_speaker"] == "caller"
    assert "edited_at" not in segs[2]  # untouched segments carry no edit record

    ex = await _exports(http, job.id)
    _check_exports_match(ex, after)
    assert new_text in json.loads(ex["json"])["segments"][0]["text"]
    assert f"agent: {new_text}" in ex["txt"] and "Bob: Hi, I have" in ex["txt"]
    assert "Alice: Great, thank you." in ex["srt"] and "caller" not in ex["srt"]
    assert "Zed &amp; &lt;Co&gt;" in ex["vtt"] and "<v Alice>Great, thank you." in ex["vtt"]


async def test_patch_swaps_speaker_labels(server, http):
    job = await make_job(server, await owner_of(server))
    async with http.patch(f"/v1/jobs/{job.id}", json={"speakers": {"caller": "agent", "agent": "caller"}},
                          headers=auth()) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["speakers"] == ["agent", "caller"]
    assert [s["speaker"] for s in body["segments"]] == ["caller", "agent", "caller", "agent"]
    assert [s["original_speaker"] for s in body["segments"]] == [f["speaker"] for f in CONVERSATION]


@pytest.mark.parametrize("body", [
    {"segments": [{"id": "SEG", "text": "ok"}, {"id": 999999, "text": "no such segment"}]},
    {"segments": [{"id": "SEG", "text": "ok"}, {"id": "1", "text": "string id"}]},
    {"segments": [{"id": "SEG", "text": 5}]},
    {"segments": [{"id": "SEG", "speaker": ""}]},
    {"segments": [{"id": "SEG", "speaker": "two\nlines"}]},
    {"segments": [{"id": "SEG"}]},
    {"segments": [{"id": "SEG", "text": "a"}, {"id": "SEG", "text": "b"}]},
    {"segments": [{"id": "SEG", "text": "ok", "start": 3}]},
    {"segments": {"id": 1}},
    {"segments": [{"id": "SEG", "text": "ok"}], "speakers": {"nobody": "x"}},
    {"speakers": {"caller": 3}},
    {"speakers": ["caller"]},
    {"title": "x"},
    {},
    [],
])
async def test_patch_rejects_bad_bodies_without_changing_anything(server, http, body):
    job = await make_job(server, await owner_of(server))
    seg_id = (await server.service.store.segments(job.id))[0].id
    body = json.loads(json.dumps(body).replace('"SEG"', str(seg_id)))
    async with http.patch(f"/v1/jobs/{job.id}", json=body, headers=auth()) as r:
        await error_of(r, 400, "INVALID_REQUEST")
    segs = await server.service.store.segments(job.id)
    assert [s.text for s in segs] == [f["text"] for f in CONVERSATION]
    assert all(s.edited_at is None for s in segs)
    assert (await server.service.store.get_job(job.id)).speakers == ["caller", "agent"]


async def test_patch_rejects_non_json(server, http):
    job = await make_job(server, await owner_of(server), audio=False)
    async with http.patch(f"/v1/jobs/{job.id}", data=b"{not json", headers=auth()) as r:
        await error_of(r, 400, "INVALID_REQUEST")


# --------------------------------------------------------------------------- transcript and audio


async def test_transcript_content_types_and_errors(server, http):
    job = await make_job(server, await owner_of(server), audio=False)
    expected = {"json": "application/json", "txt": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}
    for fmt, ctype in expected.items():
        async with http.get(f"/v1/jobs/{job.id}/transcript", params={"format": fmt}, headers=auth()) as r:
            assert r.status == 200 and r.content_type == ctype
            assert "Content-Disposition" not in r.headers
    async with http.get(f"/v1/jobs/{job.id}/transcript", headers=auth()) as r:
        assert r.content_type == "application/json"  # json is the default
        assert (await r.json())["job_id"] == job.id
    async with http.get(f"/v1/jobs/{job.id}/transcript", params={"format": "srt", "download": "1"},
                        headers=auth()) as r:
        assert r.headers["Content-Disposition"] == f'attachment; filename="{job.id}.srt"'
    async with http.get(f"/v1/jobs/{job.id}/transcript", params={"format": "docx"}, headers=auth()) as r:
        assert "docx" in await error_of(r, 400, "INVALID_REQUEST")


async def test_audio_download(server, http):
    job = await make_job(server, await owner_of(server))
    wav = Path(job.audio_path).read_bytes()
    async with http.get(f"/v1/jobs/{job.id}/audio", headers=auth()) as r:
        assert r.status == 200 and r.content_type == "audio/wav"
        assert await r.read() == wav
    async with http.get(f"/v1/jobs/{job.id}/audio", headers={**auth(), "Range": "bytes=0-43"}) as r:
        assert r.status == 206 and await r.read() == wav[:44]  # players can seek

    bare = await make_job(server, await owner_of(server), audio=False)
    async with http.get(f"/v1/jobs/{bare.id}/audio", headers=auth()) as r:
        assert "no recorded audio" in await error_of(r, 404, "NOT_FOUND")


# --------------------------------------------------------------------------- delete


async def test_delete_removes_rows_and_audio(server, http):
    job = await make_job(server, await owner_of(server))
    keep = await make_job(server, await owner_of(server))
    wav = Path(job.audio_path)
    assert wav.is_file()
    async with http.delete(f"/v1/jobs/{job.id}", headers=auth()) as r:
        assert r.status == 204
    assert not wav.exists()
    assert await server.service.store.get_job(job.id) is None and await server.service.store.segments(job.id) == []
    for path in (f"/v1/jobs/{job.id}", f"/v1/jobs/{job.id}/transcript", f"/v1/jobs/{job.id}/audio"):
        async with http.get(path, headers=auth()) as r:
            await error_of(r, 404, "NOT_FOUND")
    async with http.delete(f"/v1/jobs/{job.id}", headers=auth()) as r:
        await error_of(r, 404, "NOT_FOUND")
    async with http.get("/v1/jobs", headers=auth()) as r:
        assert [j["id"] for j in (await r.json())["jobs"]] == [keep.id]
    assert Path(keep.audio_path).is_file()


# --------------------------------------------------------------------------- a live job


async def test_live_job_is_readable_but_not_editable(server, http):
    """A real ingest session: mid-stream the job reads as live with its finals so far; edits and
    deletes wait for it to end."""
    from bench import corpus
    from bench.calls import speech_bounds
    from bridge.client.stream import StreamClient

    sentence = "I would like to check the status of my order, please."
    voice = corpus.synthesize(sentence, rate=160)
    a, b = speech_bounds(voice)
    pcm = np.concatenate([np.zeros(4800, np.int16), voice[a:b]]).tobytes()
    async with StreamClient(server.url, api_key=API_KEY, interim_results=False) as s:
        for i in range(0, len(pcm), 3200):
            await s.send_audio(pcm[i:i + 3200])
            await asyncio.sleep(0.01)
        await s.force_endpoint()
        ev = await asyncio.wait_for(s._next(), 30)
        while ev["type"] != "final":
            ev = await asyncio.wait_for(s._next(), 30)
        assert corpus.wer(sentence, ev["text"]) < 0.3, ev["text"]

        async with http.get(f"/v1/jobs/{s.job_id}", headers=auth()) as r:
            live = await r.json()
        assert live["status"] == "live" and live["ended_at"] is None
        assert live["duration_s"] == pytest.approx(len(pcm) / 2 / 16000, abs=0.01)
        assert [seg["text"] for seg in live["segments"]] == [ev["text"]]
        async with http.get("/v1/jobs", params={"status": "live"}, headers=auth()) as r:
            assert [j["id"] for j in (await r.json())["jobs"]] == [s.job_id]
        seg_id = live["segments"][0]["id"]
        async with http.patch(f"/v1/jobs/{s.job_id}", json={"segments": [{"id": seg_id, "text": "x"}]},
                              headers=auth()) as r:
            assert "live" in await error_of(r, 409, "JOB_LIVE")
        async with http.delete(f"/v1/jobs/{s.job_id}", headers=auth()) as r:
            await error_of(r, 409, "JOB_LIVE")
        async with http.get(f"/v1/jobs/{s.job_id}/audio", headers=auth()) as r:
            assert r.status == 200
            wav = await r.read()
        assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"  # a valid file while still being written
        await s.end()
        [e async for e in s]

    async with http.get(f"/v1/jobs/{s.job_id}", headers=auth()) as r:
        done = await r.json()
    assert done["status"] == "completed" and done["segments"][0]["text"] == ev["text"]
    async with http.patch(f"/v1/jobs/{s.job_id}", json={"segments": [{"id": seg_id, "text": "Checked."}]},
                          headers=auth()) as r:
        assert r.status == 200 and (await r.json())["segments"][0]["text"] == "Checked."


# --------------------------------------------------------------------------- Python client


async def test_client_end_to_end(server, tmp_path):
    me = await owner_of(server)
    base = time.time() - 100
    made = [await make_job(server, me, created_at=base + i) for i in range(5)]
    async with JobsClient(server.url, API_KEY) as c:
        assert [j["id"] async for j in c.iter_jobs(page_size=2)] == [j.id for j in reversed(made)]
        page = await c.list_jobs(limit=2, since=datetime.fromtimestamp(base + 2.5, tz=UTC))
        assert [j["id"] for j in page["jobs"]] == [made[4].id, made[3].id] and page["next"] is None

        job = await c.get_job(made[0].id)
        seg = job["segments"][1]
        edited = await c.edit_job(made[0].id, segments=[{"id": seg["id"], "text": "Corrected."}],
                                  speakers={"agent": "Dana"})
        assert edited["segments"][1]["text"] == "Corrected." and edited["speakers"] == ["caller", "Dana"]
        doc = await c.transcript(made[0].id)
        assert isinstance(doc, dict) and "Corrected." in [s["text"] for s in doc["segments"]]
        vtt = await c.transcript(made[0].id, "vtt")
        assert isinstance(vtt, str) and "<v Dana>" in vtt

        out = await c.download_audio(made[0].id, tmp_path / "call.wav")
        assert out.read_bytes() == Path(made[0].audio_path).read_bytes()
        samples, rate, channels = read_wav(out)
        assert (rate, channels, len(samples)) == (16000, 2, 32000)

        await c.delete_job(made[0].id)
        with pytest.raises(ApiError) as ei:
            await c.get_job(made[0].id)
        assert (ei.value.status, ei.value.code) == (404, "NOT_FOUND")
        with pytest.raises(ApiError) as ei:
            await c.download_audio(made[0].id, tmp_path / "gone.wav")
        assert ei.value.status == 404 and not (tmp_path / "gone.wav").exists()
        assert not list(tmp_path.glob("*.part"))  # no leftovers from the failed download
        with pytest.raises(ApiError) as ei:
            await c.list_jobs(status="bogus")
        assert ei.value.code == "INVALID_REQUEST"
    async with JobsClient(server.url, OTHER_KEY) as c:
        with pytest.raises(ApiError) as ei:
            await c.edit_job(made[1].id, speakers={"caller": "x"})
        assert ei.value.status == 404


# --------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    """Parse and dispatch like `callbridge jobs ...` (the group as bridge/cli.py registers it)."""
    from bridge.cli import _Parser

    parser = _Parser(prog="callbridge")
    sub = parser.add_subparsers(dest="group", parser_class=_Parser)
    jobs_cmd.add_jobs_parser(sub)
    args = parser.parse_args(argv)
    return jobs_cmd.DISPATCH[args.command](args)


async def run_cli(*argv: str) -> int:
    """The handlers call asyncio.run, so they run in a worker thread while this loop serves them."""
    return await asyncio.to_thread(cli, list(argv))


async def test_cli_list_show_export_audio_delete(server, tmp_path, capsys):
    me = await owner_of(server)
    jobs = [await make_job(server, me, created_at=time.time() - 10 + i) for i in range(3)]
    conn = ["--url", server.url, "--api-key", API_KEY]

    assert await run_cli("jobs", "list", *conn) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["ID", "STATUS", "SOURCE"]
    assert [line.split()[0] for line in out[1:]] == [j.id for j in reversed(jobs)]

    assert await run_cli("jobs", "list", "--limit", "2", "--json", *conn) == 0
    captured = capsys.readouterr()
    page = json.loads(captured.out)
    assert [j["id"] for j in page["jobs"]] == [jobs[2].id, jobs[1].id] and page["next"]
    assert await run_cli("jobs", "list", "--limit", "2", "--cursor", page["next"], "--json", *conn) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)["jobs"]] == [jobs[0].id]
    assert await run_cli("jobs", "list", "--limit", "1", "--all", "--json", *conn) == 0
    assert len(json.loads(capsys.readouterr().out)["jobs"]) == 3

    assert await run_cli("jobs", "show", jobs[0].id, *conn) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{jobs[0].id}  completed  stream"
    assert "[00:00] agent: Hello, thanks for calling." in out
    assert "[00:01] caller: Hi, I have a question about my order." in out
    assert "[00:22] caller: Great, thank you." in out

    seg_id = (await server.service.store.segments(jobs[0].id))[3].id
    assert await run_cli("jobs", "edit", jobs[0].id, "--segment", str(seg_id), "--text", "Perfect, thanks.",
                         "--rename", "agent=Dana", *conn) == 0
    assert "[00:22] caller: Perfect, thanks." in capsys.readouterr().out

    srt_file = tmp_path / "t.srt"
    assert await run_cli("jobs", "export", jobs[0].id, "--format", "srt", "-o", str(srt_file), *conn) == 0
    cues = parse_srt(srt_file.read_text())
    assert cues[0][2][0] == "Dana: Hello, thanks for calling." and cues[-1][2] == ["caller: Perfect, thanks."]
    capsys.readouterr()
    assert await run_cli("jobs", "export", jobs[0].id, "-f", "json", *conn) == 0
    assert json.loads(capsys.readouterr().out)["speakers"] == ["caller", "Dana"]

    wav = tmp_path / "a.wav"
    assert await run_cli("jobs", "audio", jobs[0].id, "-o", str(wav), *conn) == 0
    assert wav.read_bytes() == Path(jobs[0].audio_path).read_bytes()

    assert await run_cli("jobs", "delete", jobs[0].id, *conn) == 0
    assert capsys.readouterr().out.strip().endswith(f"deleted {jobs[0].id}")
    assert not Path(jobs[0].audio_path).exists()


async def test_cli_errors_are_one_line(server, capsys):
    conn = ["--url", server.url, "--api-key", API_KEY]
    assert await run_cli("jobs", "show", "job_00000000000000000000000000", *conn) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "404 NOT_FOUND" in err and err.startswith("callbridge: error:")
    assert await run_cli("jobs", "list", "--url", server.url, "--api-key", "cbk_wrong_key_00000000000000") == 2
    assert capsys.readouterr().err.count("\n") == 1
    job = await make_job(server, await owner_of(server), audio=False)
    assert await run_cli("jobs", "audio", job.id, "-o", "unused.wav", *conn) == 2
    assert "no recorded audio" in capsys.readouterr().err


async def test_cli_key_from_data_dir(server, tmp_path, monkeypatch, capsys):
    await make_job(server, await owner_of(server), audio=False)
    data = tmp_path / "clidata"
    data.mkdir()
    (data / "api_key").write_text(f"# generated by callbridge serve\n{API_KEY}\n")
    monkeypatch.delenv("CALLBRIDGE_API_KEY", raising=False)
    monkeypatch.setenv("CALLBRIDGE_DATA_DIR", str(data))
    monkeypatch.setenv("CALLBRIDGE_URL", server.url)
    assert await run_cli("jobs", "list", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["jobs"]) == 1


def test_cli_without_key_is_a_usage_error(tmp_path, monkeypatch):
    from bridge.cli import UsageError

    monkeypatch.delenv("CALLBRIDGE_API_KEY", raising=False)
    monkeypatch.setenv("CALLBRIDGE_DATA_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="no API key"):
        cli(["jobs", "list", "--url", "http://127.0.0.1:9"])


def test_cli_unreachable_server(capsys):
    assert cli(["jobs", "list", "--url", "http://127.0.0.1:9", "--api-key", "k", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach callbridge at http://127.0.0.1:9" in err


def test_cli_edit_needs_something_to_change():
    from bridge.cli import UsageError

    with pytest.raises(UsageError, match="--segment"):
        cli(["jobs", "edit", "job_x", "--text", "hi", "--api-key", "k"])
    with pytest.raises(UsageError, match="nothing to edit"):
        cli(["jobs", "edit", "job_x", "--api-key", "k"])
    with pytest.raises(UsageError, match="OLD=NEW"):
        cli(["jobs", "edit", "job_x", "--rename", "caller", "--api-key", "k"])


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as ei:
        cli(["jobs", "list", "--limit", "500"])
    assert ei.value.code == 2 and "between 1 and 100" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli(["jobs", "export", "job_x", "--format", "docx"])
    assert ei.value.code == 2


def test_since_parsing():
    from bridge.api.jobs import parse_since

    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("1700000000.5") == 1700000000.5
    assert parse_since("2023-11-14T22:13:20Z") == 1700000000.0
    assert parse_since("2023-11-14T23:13:20+01:00") == 1700000000.0
    assert parse_since("2023-11-14 22:13:20") == 1700000000.0  # naive is UTC
    for bad in ("yesterday", "inf", ""):
        with pytest.raises(ValueError):
            parse_since(bad)
