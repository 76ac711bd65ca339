"""The jobs REST API: list, get, edit, delete, transcript exports and the recorded audio.

Every route is scoped to the caller's owner: another key's job answers 404 exactly like an
unknown id, so ids cannot be probed. Bodies never contain local filesystem paths; the audio and
transcript are named by their REST paths. A job that is still live can be read (its finals so
far, saved before they were sent) but not edited or deleted (409).
"""

from __future__ import annotations

import asyncio
import math
import os
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from bridge.api.http import bad_request, http_error, json_error, limit_param, read_json, require_principal, service_of
from bridge.jobs import export
from bridge.jobs.model import MAX_LABEL_CHARS, InvalidText, Job, JobSource, JobStatus, Segment, check_label, check_text
from bridge.logs import get_logger
from bridge.stores import JobStore

__all__ = ["DEFAULT_LIMIT", "MAX_LABEL_CHARS", "MAX_LIMIT", "add_routes", "parse_since"]

log = get_logger("bridge.api.jobs")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_EXTENSIONS = {"json": "json", "txt": "txt", "srt": "srt", "vtt": "vtt"}




def _not_found(job_id: str) -> web.HTTPException:
    return http_error(web.HTTPNotFound, "NOT_FOUND", f"job {job_id!r} not found")


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in {"1", "true", "yes"}


# -- query parsing ------------------------------------------------------------------------------


def parse_since(value: str) -> float:
    """Unix seconds, or ISO 8601 (`2024-05-01`, `2024-05-01T12:00:00Z`, with offset); naive = UTC.

    Both forms because scripts have epoch numbers and people type dates.
    """
    text = value.strip()
    try:
        ts = float(text)
    except ValueError:
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"since={value!r} is neither unix seconds nor an ISO 8601 time") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    if not math.isfinite(ts):
        raise ValueError(f"since={value!r} is not a finite number")
    return ts


def _enum_param(query: Any, name: str, enum: type[JobStatus | JobSource]) -> str | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    allowed = [e.value for e in enum]
    if raw not in allowed:
        raise bad_request(f"{name}={raw!r} is not one of {allowed}")
    return raw


def _limit_param(query: Any) -> int:
    return limit_param(query, DEFAULT_LIMIT, MAX_LIMIT)


# -- job lookups and views ----------------------------------------------------------------------


def _is_live(svc: Any, job: Job) -> bool:
    """Live while its call runs; the row says `live` too from the moment the call opens."""
    return job.status is JobStatus.LIVE or job.id in svc.calls.calls


def _with_live_timing(svc: Any, job: Job) -> Job:
    """A live job's stored duration is 0 until it ends; report the audio received so far."""
    call = svc.calls.calls.get(job.id)
    if call is not None:
        job.duration_s = round(call.streamed_seconds, 3)
    return job


async def _load(request: web.Request) -> tuple[Any, Job]:
    """(service, the caller's job) or 404: a foreign job is indistinguishable from a missing one."""
    svc = service_of(request)
    principal = await require_principal(request)
    job_id = request.match_info["job_id"]
    job = await svc.store.get_job(job_id, principal.owner)
    if job is None:
        raise _not_found(job_id)
    job.audio_path = await asyncio.to_thread(svc.recordings.locate, job.id, job.audio_path)
    return svc, _with_live_timing(svc, job)


def _has_audio(job: Job) -> bool:
    return bool(job.audio_path) and os.path.isfile(job.audio_path)  # type: ignore[arg-type]


def _summary(job: Job) -> dict[str, Any]:
    return {"id": job.id, "status": job.status.value, "source": job.source.value,
            "created_at": job.created_at, "ended_at": job.ended_at, "duration_s": job.duration_s,
            "speakers": list(job.speakers), "error": job.error}


def _job_view(job: Job, segs: list[Segment], has_audio: bool) -> dict[str, Any]:
    d = job.to_dict()
    d["segments"] = [s.to_dict() for s in segs]
    d["transcript_path"] = f"/v1/jobs/{job.id}/transcript"
    d["audio_path"] = f"/v1/jobs/{job.id}/audio" if has_audio else None
    return d


async def _full_view(svc: Any, job: Job) -> dict[str, Any]:
    segs = await svc.store.segments(job.id)
    has_audio = await asyncio.to_thread(_has_audio, job)
    return _job_view(job, segs, has_audio)


def _refuse_live(svc: Any, job: Job, action: str) -> None:
    if _is_live(svc, job):
        raise http_error(web.HTTPConflict, "JOB_LIVE",
                         f"job {job.id} is live; it can be {action} once it has ended")


# -- handlers -----------------------------------------------------------------------------------


async def list_jobs(request: web.Request) -> web.Response:
    """GET /v1/jobs: the caller's jobs, newest first, keyset-paginated by `cursor`."""
    svc = service_of(request)
    principal = await require_principal(request)
    q = request.query
    status = _enum_param(q, "status", JobStatus)
    source = _enum_param(q, "source", JobSource)
    limit = _limit_param(q)
    since = None
    if q.get("since"):
        try:
            since = parse_since(q["since"])
        except ValueError as e:
            raise bad_request(str(e)) from None
    cursor = q.get("cursor") or None
    try:
        jobs, nxt = await svc.store.list_jobs(principal.owner, status, source, since, limit, cursor)
    except ValueError:
        raise bad_request(f"cursor={cursor!r} is not a cursor this API returned") from None
    return web.json_response({"jobs": [_summary(_with_live_timing(svc, j)) for j in jobs], "next": nxt})


async def get_job(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}: the job with every segment (a live job: the finals so far)."""
    svc, job = await _load(request)
    return web.json_response(await _full_view(svc, job))


def _validate_patch(body: Any, job: Job, segs: list[Segment]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Check the whole edit before anything changes, so a bad request leaves the job untouched."""
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object with `segments` and/or `speakers`")
    unknown = set(body) - {"segments", "speakers"}
    if unknown:
        raise bad_request(f"unknown fields {_names(unknown)}; expected `segments` and/or `speakers`")
    edits = body.get("segments") or []
    renames = body.get("speakers") or {}
    if not isinstance(edits, list):
        raise bad_request("`segments` must be a list of {\"id\", \"text\"?, \"speaker\"?}")
    if not isinstance(renames, dict):
        raise bad_request("`speakers` must be an object mapping old label to new label")
    if not edits and not renames:
        raise bad_request("nothing to change: give `segments` and/or `speakers`")

    by_id = {s.id: s for s in segs}
    seen: set[int] = set()
    for i, e in enumerate(edits):
        where = f"segments[{i}]"
        if not isinstance(e, dict):
            raise bad_request(f"{where} must be an object")
        extra = set(e) - {"id", "text", "speaker"}
        if extra:
            raise bad_request(f"{where} has unknown fields {_names(extra)}")
        sid = e.get("id")
        if not isinstance(sid, int) or isinstance(sid, bool):
            raise bad_request(f"{where}.id must be an integer segment id")
        if sid not in by_id:
            raise bad_request(f"{where}.id {sid} is not a segment of job {job.id}")
        if sid in seen:
            raise bad_request(f"{where}.id {sid} appears twice")
        seen.add(sid)
        if "text" not in e and "speaker" not in e:
            raise bad_request(f"{where} changes nothing: give `text` and/or `speaker`")
        if "text" in e:
            _checked(check_text, e["text"], f"{where}.text")
        if "speaker" in e:
            _checked(check_label, e["speaker"], f"{where}.speaker")

    labels = set(job.speakers) | {s.speaker for s in segs}
    for old, new in renames.items():
        if old not in labels:
            raise bad_request(f"speakers: {old[:40]!r} is not a speaker label of job {job.id} (labels: {sorted(labels)})")
        _checked(check_label, new, f"speakers[{old[:40]!r}]")
    return edits, renames


def _names(keys: set[str]) -> list[str]:
    """Client-chosen field names for an error message, cut short: a refusal stays one short line."""
    return sorted(k[:40] for k in keys)[:10]


def _checked(check: Any, value: Any, where: str) -> None:
    """Run a bridge.jobs.model text check; its refusal becomes a 400 naming the field."""
    try:
        check(value, where)
    except InvalidText as e:
        raise bad_request(str(e)) from None


async def _apply_patch(store: JobStore, job_id: str, edits: list[dict[str, Any]], renames: dict[str, str]) -> None:
    """Renames first (they relabel the whole job), then per-segment edits, so the more specific wins.

    Renames go through unique temporary labels when one rename's target is another's source, so
    a swap ({"caller": "agent", "agent": "caller"}) works instead of merging both into one label.
    """
    renames = {old: new for old, new in renames.items() if old != new}
    if set(renames.values()) & set(renames):
        temp = {old: f"\x00rename-{i}" for i, old in enumerate(renames)}
        for old, tmp in temp.items():
            await store.rename_speaker(job_id, old, tmp)
        for old, tmp in temp.items():
            await store.rename_speaker(job_id, tmp, renames[old])
    else:
        for old, new in renames.items():
            await store.rename_speaker(job_id, old, new)
    for e in edits:
        await store.edit_segment(job_id, e["id"], text=e.get("text"), speaker=e.get("speaker"))


async def patch_job(request: web.Request) -> web.Response:
    """PATCH /v1/jobs/{id}: correct segment text/speaker and relabel speakers; originals are kept."""
    svc, job = await _load(request)
    _refuse_live(svc, job, "edited")
    body = await read_json(request)
    segs = await svc.store.segments(job.id)
    edits, renames = _validate_patch(body, job, segs)
    await _apply_patch(svc.store, job.id, edits, renames)
    log.info("job_edited", job_id=job.id, segments=len(edits), renames=len(renames))
    updated = await svc.store.get_job(job.id)
    if updated is None:  # deleted concurrently
        raise _not_found(job.id)
    return web.json_response(await _full_view(svc, updated))


async def _delete(store: JobStore, job: Job) -> None:
    """Audio first, rows second: if anything fails the job is still listed, and DELETE can be retried
    (the other order could leave an orphaned recording nobody can reach any more)."""
    if job.audio_path:
        try:
            await asyncio.to_thread(os.remove, job.audio_path)
        except FileNotFoundError:
            pass
    await store.delete_job(job.id)


async def delete_job(request: web.Request) -> web.Response:
    """DELETE /v1/jobs/{id}: the job, its segments and its recording; 204."""
    svc, job = await _load(request)
    _refuse_live(svc, job, "deleted")
    await _delete(svc.store, job)
    log.info("job_deleted", job_id=job.id)
    return web.Response(status=204)


async def transcript(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}/transcript?format=json|txt|srt|vtt[&download=1]."""
    svc, job = await _load(request)
    fmt = (request.query.get("format") or "json").lower()
    if fmt not in _EXTENSIONS:
        raise bad_request(f"format={fmt!r} is not one of {sorted(_EXTENSIONS)}")
    segs = await svc.store.segments(job.id)
    body, ctype = export.render(fmt, job, segs)
    headers = {"Content-Type": ctype, "Cache-Control": "no-store"}
    if _truthy(request.query.get("download")):
        headers["Content-Disposition"] = f'attachment; filename="{job.id}.{_EXTENSIONS[fmt]}"'
    return web.Response(body=body.encode("utf-8") if isinstance(body, str) else body, headers=headers)


# Set on a request one node forwards to another, so a forwarded request is never forwarded again.
FORWARDED_HEADER = "X-Callbridge-Forwarded-By"
NODE_HEADER = "X-Callbridge-Node"  # on audio answers: the node that read the file
_PASSED_REQUEST = ("Authorization", "Range", "If-Range")
_PASSED_RESPONSE = (NODE_HEADER, "Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "Content-Disposition",
                    "Cache-Control", "Last-Modified", "ETag")


async def audio(request: web.Request) -> web.StreamResponse:
    """GET /v1/jobs/{id}/audio: the WAV (one channel per leg); Range requests work for players.
    A live job's recording is on the disk of the node that runs the call (bridge/recordings.py):
    another node forwards the request there (its `cluster.advertise_url`)."""
    svc, job = await _load(request)
    if job.status is JobStatus.LIVE and job.node_id and job.node_id != svc.node_id \
            and FORWARDED_HEADER not in request.headers:
        forwarded = await _audio_from_owner(request, svc, job)
        if forwarded is not None:
            return forwarded
    if not await asyncio.to_thread(_has_audio, job):
        return json_error(404, "NOT_FOUND", f"job {job.id} has no recorded audio")
    disposition = "attachment" if _truthy(request.query.get("download")) else "inline"
    return web.FileResponse(job.audio_path, headers={  # type: ignore[arg-type]
        "Content-Type": "audio/wav", "Cache-Control": "no-store", NODE_HEADER: svc.node_id,
        "Content-Disposition": f'{disposition}; filename="{job.id}.wav"'})


async def _audio_from_owner(request: web.Request, svc: Any, job: Job) -> web.StreamResponse | None:
    """Stream a live job's recording from the node that records it (only it knows what it has
    flushed), with the caller's own credentials (every node reads the same keys) and Range,
    answering what that node answers. None when that node is gone (its row expired): the caller
    reads the file if it can (a recovered recording), else says there is none."""
    node = next((n for n in await svc.stores.nodes.list_nodes() if n.id == job.node_id), None)
    if node is None or not node.url:
        return None
    headers = {h: request.headers[h] for h in _PASSED_REQUEST if h in request.headers}
    headers[FORWARDED_HEADER] = svc.node_id
    url = f"{node.url.rstrip('/')}/v1/jobs/{job.id}/audio"
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=30)
    resp: web.StreamResponse | None = None
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(url, params=request.query, headers=headers, allow_redirects=False) as upstream:
                resp = web.StreamResponse(status=upstream.status, headers={
                    h: upstream.headers[h] for h in _PASSED_RESPONSE if h in upstream.headers})
                await resp.prepare(request)
                async for chunk in upstream.content.iter_chunked(64 * 1024):
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        log.warning("audio_forward_failed", job_id=job.id, node_id=job.node_id, url=url, error=repr(e))
        if resp is not None and resp.prepared:
            return resp  # cut short mid-body: the client sees a short read, as from a failed node
        return json_error(502, "UPSTREAM_ERROR", f"job {job.id} is live on node {job.node_id}, which did not "
                                                 f"answer: {type(e).__name__}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_patch("/v1/jobs/{job_id}", patch_job)
    app.router.add_delete("/v1/jobs/{job_id}", delete_job)
    app.router.add_get("/v1/jobs/{job_id}/transcript", transcript)
    app.router.add_get("/v1/jobs/{job_id}/audio", audio)
