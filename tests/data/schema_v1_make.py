"""Writes the schema-v1 fixtures (schema-v1-sqlite.sql, schema-v1-postgres.sql) with the PREVIOUS
release's code: the stores of commit 8497f87, not today's. Kept so the fixtures can be checked and
made again; tests/test_migrations.py only loads the committed dumps.

    git archive 8497f87 | tar -x -C /tmp/rel8497
    PYTHONPATH=/tmp/rel8497 python tests/data/schema_v1_make.py sqlite:///tmp/v1.db
    sqlite3 /tmp/v1.db .dump > tests/data/schema-v1-sqlite.sql
    PYTHONPATH=/tmp/rel8497 python tests/data/schema_v1_make.py postgresql://postgres@127.0.0.1:PORT/v1
    pg_dump --inserts --no-owner --no-privileges postgresql://postgres@127.0.0.1:PORT/v1 \
        > tests/data/schema-v1-postgres.sql

Every row goes in through the release's store methods (a live, a completed and a failed job with
segments, one of them edited; a config key, a metered key with an open reservation, a revoked
key, a temporary token; an endpoint with a delivered, a pending (retried once) and a dead delivery), with the
fixed ids, names and times below so the test can check each one after the upgrade.
"""

from __future__ import annotations

import asyncio
import sys

from bridge.jobs.model import Job, JobSource, JobStatus
from bridge.stores import open_stores
from bridge.webhooks.model import DeliveryStatus, Endpoint

CONFIG_KEY = "cb-fixture-config-key-0123456789"  # ensure_keys: a secret the test can verify
T0 = 1_790_000_000.0


def final(text: str, start: float, channel: int = 0, speaker: str = "caller") -> dict:
    return {"text": text, "words": [{"word": w, "start": start, "end": start + 0.4, "confidence": 0.9}
                                    for w in text.split()],
            "channel": channel, "speaker": speaker, "start": start, "end": start + 1.0, "speech_final": True,
            "language": "en", "confidence": 0.9}


async def main(url: str) -> None:
    s = await open_stores(url)
    try:
        await s.keys.ensure_keys([CONFIG_KEY])
        config_key = await s.keys.verify_key(CONFIG_KEY)
        metered, _ = await s.keys.create_key(name="metered", credits=1000)
        revoked, _ = await s.keys.create_key(name="revoked")
        await s.keys.revoke(revoked.id)
        await s.keys.mint_temp_token(config_key.id, 3600)

        done = await s.jobs.create_job(Job(id="job_v1_completed", owner=metered.id, source=JobSource.SIP,
                                           created_at=T0, config={"language": "en"}, speakers=["caller", "agent"],
                                           metadata={"fixture": "completed"}, audio_path="/data/rec/c.wav"))
        await s.jobs.add_segment(done.id, final("hello there", 0.0))
        seg = await s.jobs.add_segment(done.id, final("good mornin", 1.5, channel=1, speaker="agent"))
        await s.jobs.edit_segment(done.id, seg.id, text="good morning")
        await s.jobs.finish_job(done.id, JobStatus.COMPLETED, 12.5, ended_at=T0 + 12.5)
        failed = await s.jobs.create_job(Job(id="job_v1_failed", owner=config_key.id, created_at=T0 + 20))
        await s.jobs.add_segment(failed.id, final("cut off", 0.0))
        await s.jobs.finish_job(failed.id, JobStatus.FAILED, 3.0, error={"code": "INTERNAL", "message": "boom"},
                                ended_at=T0 + 23)
        live = await s.jobs.create_job(Job(id="job_v1_live", owner=metered.id, created_at=T0 + 30))
        await s.jobs.add_segment(live.id, final("still talking", 0.0))
        await s.keys.reserve(metered.id, live.id, 60)

        ep = await s.webhooks.create_endpoint(Endpoint(
            id="wh_v1", owner=metered.id, url="https://hooks.example/cb", secret="whsec_fixture",
            events=("call_started", "call_ended"), created_at=T0, updated_at=T0))
        await s.webhooks.enqueue([(ep.id, done.id, f"evt_{i}", i, kind, '{"fixture": %d}' % i, T0 + i)
                                  for i, kind in enumerate(("call_started", "call_ended"))])
        await s.webhooks.enqueue([(ep.id, failed.id, "evt_9", 0, "call_started", '{"fixture": 9}', T0 + 9)])
        rows = await s.webhooks.job_chain(done.id, ep.id)
        await s.webhooks.record_attempt(rows[0].id, status=DeliveryStatus.DELIVERED, http_status=200, error=None,
                                        next_attempt_at=T0 + 1, at=T0 + 1)
        await s.webhooks.record_attempt(rows[1].id, status=DeliveryStatus.PENDING, http_status=503,
                                        error="HTTP 503", next_attempt_at=T0 + 60, at=T0 + 2)
        (dead,) = await s.webhooks.job_chain(failed.id, ep.id)
        await s.webhooks.record_attempt(dead.id, status=DeliveryStatus.DEAD, http_status=500, error="HTTP 500",
                                        next_attempt_at=T0 + 99, at=T0 + 10)
    finally:
        await s.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
