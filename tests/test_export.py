"""Exports parsed back: cue times/text match segments, line limits hold, edits show everywhere."""

from __future__ import annotations

import html
import itertools
import json
import re

import pytest

from bridge.events.types import Final, Word
from bridge.jobs import Job, new_job_id
from bridge.jobs.export import render, to_json, to_srt, to_txt, to_vtt
from bridge.stores.sqlite.jobs import SqliteJobStore

LONG = ("so what I was trying to say earlier is that the delivery arrived two days late and the box "
        "was damaged on one side which meant that several of the glasses inside were broken and I "
        "would like either a replacement or a refund whichever is quicker for you to arrange, thank you so much for all your help")
assert len(LONG) >= 300


def final(text, start, end, channel=0, speaker="caller", with_words=True):
    toks = text.split()
    step = (end - start) / max(len(toks), 1)
    words = tuple(Word(t, start + i * step, start + (i + 1) * step, 0.8) for i, t in enumerate(toks)) if with_words else ()
    return Final(text=text, words=words, channel=channel, speaker=speaker, start=start, end=end,
                 speech_final=True).to_dict()


@pytest.fixture
def store(tmp_path):
    s = SqliteJobStore(tmp_path / "jobs.db")
    yield s
    s.close()


@pytest.fixture
def job(store):
    j = store.create_job(Job(id=new_job_id(), owner="k", speakers=["caller", "agent"]))
    store.add_segment(j.id, final("Hello, thanks for calling.", 0.5, 1.7, 1, "agent"))
    store.add_segment(j.id, final("Hi there.", 1.2, 1.9, 0, "caller"))
    store.add_segment(j.id, final("", 2.0, 2.1, 0, "caller"))  # empty: skipped everywhere
    store.add_segment(j.id, final(LONG, 2.0, 20.0, 0, "caller"))
    store.add_segment(j.id, final(LONG.upper(), 21.0, 40.0, 1, "agent", with_words=False))
    return j


def _secs(ts: str) -> float:
    h, m, rest = ts.replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest)


def parse_srt(text: str) -> list[tuple[float, float, list[str]]]:
    cues = []
    for n, block in enumerate(b for b in text.strip().split("\n\n") if b.strip()):
        lines = block.split("\n")
        assert lines[0] == str(n + 1)
        m = re.fullmatch(r"(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})", lines[1])
        assert m, lines[1]
        cues.append((_secs(m[1]), _secs(m[2]), lines[2:]))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str, list[str]]]:
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    assert blocks[0] == "WEBVTT"
    cues = []
    for block in blocks[1:]:
        lines = block.split("\n")
        m = re.fullmatch(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})", lines[0])
        assert m, lines[0]
        v = re.match(r"<v ([^>]+)>", lines[1])
        assert v, lines[1]
        body = [lines[1][v.end():], *lines[2:]]
        cues.append((_secs(m[1]), _secs(m[2]), html.unescape(v[1]), [html.unescape(x) for x in body]))
    return cues


def _group(cues, segs, text_of):
    """Walk cues in order, consuming each segment's words; returns the cues per segment."""
    out, i = [], 0
    for seg in segs:
        want, got, mine = seg.text.split(), [], []
        while got != want:
            assert i < len(cues), (seg.text, got)
            words = " ".join(text_of(cues[i])).split()
            got += words
            mine.append(cues[i])
            i += 1
            assert want[:len(got)] == got, (want, got)
        out.append(mine)
    assert i == len(cues)
    return out


def _check_cues(per_seg, segs):
    for seg, cues in zip(segs, per_seg):
        assert cues[0][0] == pytest.approx(seg.start, abs=1e-3)
        assert cues[-1][1] == pytest.approx(seg.end, abs=1e-3)
        for a, b in itertools.pairwise(cues):
            assert a[0] <= a[1] <= b[0] + 1e-9 <= b[1] + 1e-9  # in order, contiguous span
        for c in cues:
            assert c[0] < c[1]


def test_srt_roundtrip(store, job):
    segs = [s for s in store.segments(job.id) if s.text]
    cues = parse_srt(to_srt(job, store.segments(job.id)))
    for _, _, lines in cues:
        assert 1 <= len(lines) <= 2 and all(len(x) <= 42 for x in lines), lines
        assert re.match(r"(caller|agent): ", lines[0])

    def text_of(c):
        return [c[2][0].split(": ", 1)[1], *c[2][1:]]

    per_seg = _group(cues, segs, text_of)
    _check_cues(per_seg, segs)
    for seg, cs in zip(segs, per_seg):
        assert all(c[2][0].startswith(seg.speaker + ": ") for c in cs)
    long_cues = per_seg[2]
    assert len(long_cues) >= 4  # 300 chars cannot fit in 84-char cues
    # word timestamps are used: each cue boundary is the start of a word of that segment
    word_starts = {round(w["start"], 3) for w in segs[2].words}
    assert all(round(c[0], 3) in word_starts for c in long_cues)
    assert len(per_seg[3]) >= 4  # no word timestamps: proportional split still tiles the span


def test_vtt_roundtrip(store, job):
    segs = [s for s in store.segments(job.id) if s.text]
    out = to_vtt(job, store.segments(job.id))
    assert out.startswith("WEBVTT\n")
    cues = parse_vtt(out)
    for _, _, _, lines in cues:
        assert 1 <= len(lines) <= 2 and all(len(x) <= 42 for x in lines), lines
    per_seg = _group(cues, segs, lambda c: c[3])
    _check_cues(per_seg, segs)
    for seg, cs in zip(segs, per_seg):
        assert all(c[2] == seg.speaker for c in cs)
    assert len(per_seg[2]) >= 4


def test_json_shape(store, job):
    segs = store.segments(job.id)
    doc = to_json(job, segs)
    assert set(doc) == {"job_id", "speakers", "segments"}
    assert doc["job_id"] == job.id and doc["speakers"] == ["caller", "agent"]
    assert len(doc["segments"]) == 4
    for d in doc["segments"]:
        assert set(d) == {"start", "end", "channel", "speaker", "text", "words"}
    assert doc["segments"][0] == {"start": 0.5, "end": 1.7, "channel": 1, "speaker": "agent",
                                  "text": "Hello, thanks for calling.", "words": segs[0].words}
    assert set(doc["segments"][0]["words"][0]) == {"word", "start", "end", "confidence"}
    body, ctype = render("json", job, segs)
    assert json.loads(body) == doc and ctype.startswith("application/json")


def test_txt(store, job):
    lines = to_txt(job, store.segments(job.id)).splitlines()
    assert lines[0] == "[00:00:00.50] agent: Hello, thanks for calling."
    assert lines[1] == "[00:00:01.20] caller: Hi there."
    assert len(lines) == 4


def test_render_formats(store, job):
    segs = store.segments(job.id)
    assert render("srt", job, segs)[1].startswith("application/x-subrip")
    assert render("vtt", job, segs)[1].startswith("text/vtt")
    assert render("txt", job, segs)[1].startswith("text/plain")
    with pytest.raises(ValueError):
        render("docx", job, segs)


def test_edit_shows_everywhere(store, job):
    seg = store.segments(job.id)[1]
    store.edit_segment(job.id, seg.id, text="Hi there, this is Zed & <co>.", speaker="Zed")
    segs = store.segments(job.id)
    assert any(s["text"] == "Hi there, this is Zed & <co>." and s["speaker"] == "Zed"
               for s in to_json(job, segs)["segments"])
    assert "[00:00:01.20] Zed: Hi there, this is Zed & <co>." in to_txt(job, segs)
    srt = to_srt(job, segs)
    assert "Zed: Hi there, this is Zed & <co>." in srt and "Hi there.\n" not in srt
    vcues = parse_vtt(to_vtt(job, segs))
    assert any(c[2] == "Zed" and " ".join(c[3]) == "Hi there, this is Zed & <co>." for c in vcues)


def test_long_single_segment_in_order():
    job = Job(id="job_x", owner="k", speakers=["caller"])
    from bridge.jobs.model import Segment
    text = " ".join([f"word{i:03d}" for i in range(40)]) + " " + "x" * 60  # 300+ chars, one unbreakable token
    assert len(text) >= 300
    seg = Segment(id=1, job_id="job_x", seq=0, channel=0, speaker="caller", start=10.0, end=25.0, text=text)
    cues = parse_srt(to_srt(job, [seg]))
    assert len(cues) >= 4
    assert cues[0][0] == 10.0 and cues[-1][1] == 25.0
    for a, b in itertools.pairwise(cues):
        assert a[1] == b[0]
    for c in cues:
        assert all(len(x) <= 42 for x in c[2])
    joined = "".join("".join([c[2][0][len("caller: "):], *c[2][1:]]) for c in cues)
    assert joined.replace(" ", "") == text.replace(" ", "")  # every character, in order (long token hard-split)
    assert [c[0] for c in cues] == sorted(c[0] for c in cues)
