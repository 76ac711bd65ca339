"""JobStore against real SQLite files: CRUD, isolation, pagination, crash durability, edits."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bridge.events.types import Final, Word
from bridge.jobs import Job, JobSource, JobStatus, new_job_id
from bridge.stores.sqlite.jobs import SqliteJobStore
from bridge.stores.sqlite.migrations import LATEST


def final(text: str, start: float, end: float, channel: int = 0, speaker: str = "caller") -> dict:
    toks = text.split()
    step = (end - start) / max(len(toks), 1)
    words = tuple(Word(t, start + i * step, start + (i + 1) * step, 0.9) for i, t in enumerate(toks))
    return Final(text=text, words=words, channel=channel, speaker=speaker, start=start, end=end,
                 speech_final=True, language="en", confidence=0.9).to_dict()


@pytest.fixture
def store(tmp_path):
    s = SqliteJobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def mk(owner="k1", **kw) -> Job:
    return Job(id=new_job_id(), owner=owner, **kw)


def test_ids_sortable_unique():
    ids = [new_job_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(i.startswith("job_") and len(i) == 30 for i in ids)


def test_crud_roundtrip(store):
    job = mk(source=JobSource.SIP, config={"model": "base"}, speakers=["caller", "agent"], metadata={"to": "100"})
    store.create_job(job)
    got = store.get_job(job.id)
    assert got == job
    assert got.status is JobStatus.LIVE and got.source is JobSource.SIP
    store.update_job(job.id, speakers=["a", "b"], metadata={"x": 1}, audio_path="/tmp/a.wav", duration_s=3.5)
    got = store.get_job(job.id)
    assert (got.speakers, got.metadata, got.audio_path, got.duration_s) == (["a", "b"], {"x": 1}, "/tmp/a.wav", 3.5)
    with pytest.raises(ValueError):
        store.update_job(job.id, status="completed")
    store.finish_job(job.id, JobStatus.COMPLETED, 12.25, ended_at=1000.0)
    got = store.get_job(job.id)
    assert (got.status, got.duration_s, got.ended_at, got.error) == (JobStatus.COMPLETED, 12.25, 1000.0, None)
    store.finish_job(job.id, "failed", 1.0, error={"code": "INTERNAL", "message": "x"})  # the first ending wins
    assert (store.get_job(job.id).status, store.get_job(job.id).error) == (JobStatus.COMPLETED, None)
    assert store.get_job("job_nope") is None
    with pytest.raises(KeyError):
        store.finish_job("job_nope", JobStatus.COMPLETED, 1.0)


def test_owner_isolation(store):
    a, b = store.create_job(mk("ka")), store.create_job(mk("kb"))
    assert store.get_job(a.id, owner="ka") is not None
    assert store.get_job(a.id, owner="kb") is None
    assert store.get_job(a.id) is not None  # admin
    assert [j.id for j in store.list_jobs(owner="kb")[0]] == [b.id]
    assert {j.id for j in store.list_jobs()[0]} == {a.id, b.id}


def _page_all(store, **kw):
    out, cursor, pages = [], None, 0
    while True:
        jobs, cursor = store.list_jobs(cursor=cursor, **kw)
        out += jobs
        pages += 1
        if cursor is None:
            return out, pages


def test_pagination_filters(store):
    jobs = []
    for i in range(120):
        # every 3 jobs share a created_at so the id tiebreak is exercised
        j = mk(owner=f"k{i % 2}", source=[JobSource.STREAM, JobSource.SIP, JobSource.WEBRTC][i % 3],
               status=JobStatus.COMPLETED if i % 4 else JobStatus.LIVE, created_at=1000.0 + i // 3)
        jobs.append(store.create_job(j))
    newest_first = sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)

    got, pages = _page_all(store, limit=7)
    assert [j.id for j in got] == [j.id for j in newest_first]
    assert pages == 18

    cases = [{"status": JobStatus.LIVE}, {"source": "sip"}, {"since": 1020.0},
             {"owner": "k1", "status": "completed", "source": JobSource.WEBRTC, "since": 1005.5}]
    for kw in cases:
        def keep(j, kw=kw):
            return ((kw.get("status") is None or j.status == JobStatus(kw["status"]))
                    and (kw.get("source") is None or j.source == JobSource(kw["source"]))
                    and (kw.get("since") is None or j.created_at >= kw["since"])
                    and (kw.get("owner") is None or j.owner == kw["owner"]))
        expect = [j.id for j in newest_first if keep(j)]
        assert expect, kw
        got, _ = _page_all(store, limit=5, **kw)
        assert [j.id for j in got] == expect, kw

    first, cur = store.list_jobs(limit=50)
    assert len(first) == 50 and cur
    with pytest.raises(ValueError):
        store.list_jobs(cursor="!!garbage")


def test_segments_persist_and_order(tmp_path):
    path = tmp_path / "j.db"
    s = SqliteJobStore(path)
    job = s.create_job(mk())
    a = s.add_segment(job.id, final("hello there", 2.0, 3.0, channel=1, speaker="agent"))
    b = s.add_segment(job.id, final("good morning", 1.0, 2.5))
    c = s.add_segment(job.id, final("same time other leg", 2.0, 2.8, channel=0))
    assert (a.seq, b.seq, c.seq) == (0, 1, 2)
    s.close()
    s = SqliteJobStore(path)  # reopen: schema already there, data kept
    segs = s.segments(job.id)
    assert [x.id for x in segs] == [b.id, c.id, a.id]
    assert segs[2].words[0] == {"word": "hello", "start": 2.0, "end": 2.5, "confidence": 0.9}
    assert segs[0].language == "en" and segs[0].speech_final is True and segs[0].confidence == 0.9
    s.close()


def test_kill_9_keeps_segments(tmp_path):
    path = tmp_path / "crash.db"
    code = textwrap.dedent(f"""
        import os
        from bridge.jobs import Job, new_job_id
        from bridge.stores.sqlite.jobs import SqliteJobStore
        s = SqliteJobStore({str(path)!r})
        job = s.create_job(Job(id=new_job_id(), owner="k"))
        for i in range(3):
            s.add_segment(job.id, {{"text": f"seg {{i}}", "words": [], "channel": 0, "speaker": "caller",
                                   "start": float(i), "end": i + 0.5, "speech_final": True}})
        print(job.id, flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    job_id = proc.stdout.strip()
    s = SqliteJobStore(path)
    try:
        assert s.get_job(job_id).status is JobStatus.LIVE
        assert [x.text for x in s.segments(job_id)] == ["seg 0", "seg 1", "seg 2"]
        done = s.create_job(mk(status=JobStatus.COMPLETED))
        assert s.fail_live_jobs("server restarted") == [job_id]
        job = s.get_job(job_id)
        assert job.status is JobStatus.FAILED
        assert job.error == {"code": "INTERNAL", "message": "server restarted"}
        assert job.ended_at is not None
        assert len(s.segments(job_id)) == 3
        assert s.get_job(done.id).status is JobStatus.COMPLETED
        assert s.fail_live_jobs("again") == []
    finally:
        s.close()


def test_edit_keeps_original(store):
    job = store.create_job(mk())
    seg = store.add_segment(job.id, final("helo wrld", 0.0, 1.0))
    e1 = store.edit_segment(job.id, seg.id, text="hello world")
    assert (e1.text, e1.original_text, e1.speaker, e1.original_speaker) == ("hello world", "helo wrld", "caller", "caller")
    assert e1.edited_at is not None
    e2 = store.edit_segment(job.id, seg.id, text="Hello, world.", speaker="agent")
    assert (e2.text, e2.original_text, e2.speaker, e2.original_speaker) == ("Hello, world.", "helo wrld", "agent", "caller")
    assert store.segments(job.id)[0] == e2
    with pytest.raises(KeyError):
        store.edit_segment(job.id, seg.id + 999, text="x")
    other = store.create_job(mk())
    with pytest.raises(KeyError):
        store.edit_segment(other.id, seg.id, text="x")  # segment of another job


def test_rename_speaker(store):
    job = store.create_job(mk(speakers=["caller", "agent"]))
    store.add_segment(job.id, final("a", 0, 1, 0, "caller"))
    store.add_segment(job.id, final("b", 1, 2, 1, "agent"))
    store.add_segment(job.id, final("c", 2, 3, 0, "caller"))
    assert store.rename_speaker(job.id, "caller", "Alice") == 2
    segs = store.segments(job.id)
    assert [x.speaker for x in segs] == ["Alice", "agent", "Alice"]
    assert segs[0].original_speaker == "caller" and segs[1].edited_at is None
    assert store.get_job(job.id).speakers == ["Alice", "agent"]


def test_delete(store):
    job = store.create_job(mk(audio_path="/data/x.wav"))
    keep = store.create_job(mk())
    store.add_segment(job.id, final("a b", 0, 1))
    store.add_segment(keep.id, final("c d", 0, 1))
    deleted = store.delete_job(job.id)
    assert deleted and deleted.id == job.id and deleted.audio_path == "/data/x.wav"
    assert store.get_job(job.id) is None and store.segments(job.id) == []
    assert not store.delete_job(job.id)
    assert len(store.segments(keep.id)) == 1


def test_pragmas_and_schema(store):
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    # the newest version comes first, as the release before migrations reads it (sqlite/migrations.py)
    assert db.execute("SELECT version FROM schema_version").fetchone()[0] == LATEST
