"""`callbridge jobs ...`: browse, export, edit and delete jobs on a running server over its REST API.

It talks HTTP (not the database) so it works against a remote server and sees exactly what API
users see, owner scoping included. The server and key come from `--url`/`--api-key`, else
CALLBRIDGE_URL / CALLBRIDGE_API_KEY, else the key `serve` generated in `<data_dir>/api_key`.

Exit codes follow bridge/cli.py: 0 ok, 1 the operation failed (server error, unreachable, job
live), 2 bad input (bad option, unknown job, refused key); errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from bridge.client.rest import TRANSCRIPT_FORMATS, JobsClient
from bridge.commands.output import json_text
from bridge.commands.remote import (DEFAULT_URL, KEY_FILE, PROG, _usage_error, remote_flags, resolve_api_key,
                                    resolve_url, run_remote)
from bridge.jobs.model import JobSource

__all__ = ["DEFAULT_URL", "DISPATCH", "KEY_FILE", "add_jobs_parser", "resolve_api_key", "resolve_url"]

# --------------------------------------------------------------------------- running a request


def _run(args: argparse.Namespace, work: Callable[[JobsClient], Awaitable[int]]) -> int:
    return run_remote(args, JobsClient, work)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts is not None else "-"


def _clock(t: float) -> str:
    """[mm:ss], or [h:mm:ss] past an hour: compact for call-length transcripts."""
    s = int(max(0.0, t))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _write_out(text: str, out: str | None) -> None:
    if out is None or out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(out).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- handlers


def cmd_jobs_list(args: argparse.Namespace) -> int:
    async def work(c: JobsClient) -> int:
        filters = {"status": args.status, "source": args.source, "since": args.since}
        if args.all:
            jobs = [j async for j in c.iter_jobs(page_size=args.limit or 100, **filters)]
            page: dict[str, Any] = {"jobs": jobs, "next": None}
        else:
            page = await c.list_jobs(limit=args.limit, cursor=args.cursor, **filters)
        if args.json:
            print(json_text(page))
            return 0
        if not page["jobs"]:
            print("no jobs")
        else:
            print(f"{'ID':<30}  {'STATUS':<9}  {'SOURCE':<6}  {'CREATED':<19}  {'DURATION':>9}  SPEAKERS")
            for j in page["jobs"]:
                print(f"{j['id']:<30}  {j['status']:<9}  {j['source']:<6}  {_when(j.get('created_at')):<19}  "
                      f"{j.get('duration_s', 0.0):>8.1f}s  {', '.join(j.get('speakers') or [])}")
        if page.get("next"):
            print(f"more: {PROG} jobs list --cursor {page['next']}", file=sys.stderr)
        return 0

    return _run(args, work)


def format_job(job: dict[str, Any]) -> str:
    """The human view of `jobs show`: a summary, then "[mm:ss] speaker: text" per segment."""
    lines = [f"{job['id']}  {job['status']}  {job['source']}",
             f"created   {_when(job.get('created_at'))}",
             f"ended     {_when(job.get('ended_at'))}",
             f"duration  {job.get('duration_s', 0.0):.1f} s",
             f"speakers  {', '.join(job.get('speakers') or []) or '-'}"]
    if job.get("audio_path"):
        lines.append(f"audio     {job['audio_path']}")
    if job.get("error"):
        lines.append(f"error     {job['error'].get('code')}: {job['error'].get('message')}")
    segs = [s for s in job.get("segments") or [] if (s.get("text") or "").strip()]
    edited = sum(1 for s in job.get("segments") or [] if s.get("edited_at") is not None)
    if edited:
        lines.append(f"edited    {edited} segment{'s' if edited != 1 else ''}")
    lines.append("")
    lines += [f"[{_clock(s['start'])}] {s['speaker']}: {' '.join(s['text'].split())}" for s in segs]
    if not segs:
        lines.append("(no speech transcribed)")
    return "\n".join(lines) + "\n"


def cmd_jobs_show(args: argparse.Namespace) -> int:
    async def work(c: JobsClient) -> int:
        job = await c.get_job(args.job_id)
        sys.stdout.write(json_text(job) + "\n" if args.json else format_job(job))
        return 0

    return _run(args, work)


def cmd_jobs_export(args: argparse.Namespace) -> int:
    async def work(c: JobsClient) -> int:
        body = await c.transcript(args.job_id, args.format)
        text = json_text(body) + "\n" if args.format == "json" else str(body)
        _write_out(text, args.output)
        if args.output and args.output != "-":
            print(args.output)
        return 0

    return _run(args, work)


def cmd_jobs_audio(args: argparse.Namespace) -> int:
    async def work(c: JobsClient) -> int:
        path = await c.download_audio(args.job_id, args.output)
        print(path)
        return 0

    return _run(args, work)


def _parse_renames(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        old, sep, new = p.partition("=")
        if not sep or not old or not new:
            raise _usage_error(f"--rename wants OLD=NEW, got {p!r}")
        out[old] = new
    return out


def cmd_jobs_edit(args: argparse.Namespace) -> int:
    renames = _parse_renames(args.rename or [])
    segments: list[dict[str, Any]] = []
    if args.segment is not None:
        if args.text is None and args.speaker is None:
            raise _usage_error("--segment needs --text and/or --speaker")
        seg: dict[str, Any] = {"id": args.segment}
        if args.text is not None:
            seg["text"] = args.text
        if args.speaker is not None:
            seg["speaker"] = args.speaker
        segments.append(seg)
    elif args.text is not None or args.speaker is not None:
        raise _usage_error("--text/--speaker edit one segment: give its --segment ID (see `jobs show --json`)")
    if not segments and not renames:
        raise _usage_error("nothing to edit: give --segment ID with --text/--speaker, and/or --rename OLD=NEW")

    async def work(c: JobsClient) -> int:
        job = await c.edit_job(args.job_id, segments=segments or None, speakers=renames or None)
        sys.stdout.write(json_text(job) + "\n" if args.json else format_job(job))
        return 0

    return _run(args, work)


def cmd_jobs_delete(args: argparse.Namespace) -> int:
    async def work(c: JobsClient) -> int:
        await c.delete_job(args.job_id)
        print(f"deleted {args.job_id}")
        return 0

    return _run(args, work)


# --------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= n <= 100:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100, got {n}")
    return n


def add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, show, export, edit and delete jobs on a running server")
    # type(p): nested parsers get the CLI's one-line-error parser class without importing bridge.cli.
    jsub = p.add_subparsers(dest="jobs_command", metavar="{list,show,export,audio,edit,delete}",
                            parser_class=type(p))
    jsub.required = True

    common = remote_flags()

    def job_cmd(name: str, help: str, command: str) -> argparse.ArgumentParser:
        q = jsub.add_parser(name, help=help, parents=[common])
        q.add_argument("job_id", metavar="JOB_ID")
        q.set_defaults(command=command)
        return q

    q = jsub.add_parser("list", help="jobs, newest first", parents=[common])
    q.add_argument("--status", choices=["live", "completed", "failed"])
    q.add_argument("--source", choices=[s.value for s in JobSource])
    q.add_argument("--since", help="only jobs created at or after: ISO 8601 (2024-05-01T12:00:00Z) or unix seconds")
    q.add_argument("--limit", type=_positive_int, help="jobs per page, 1-100 (server default 20)")
    q.add_argument("--cursor", help="continue from the `next` cursor of a previous page")
    q.add_argument("--all", action="store_true", help="follow cursors through every page")
    q.add_argument("--json", action="store_true", help="print the API's JSON")
    q.set_defaults(command="jobs.list")

    q = job_cmd("show", "a job's summary and transcript", "jobs.show")
    q.add_argument("--json", action="store_true", help="print the API's JSON (with segment ids for `edit`)")

    q = job_cmd("export", "the transcript as json, txt, srt or vtt", "jobs.export")
    q.add_argument("--format", "-f", choices=TRANSCRIPT_FORMATS, default="json")
    q.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default stdout)")

    q = job_cmd("audio", "download the recorded audio (WAV, one channel per leg)", "jobs.audio")
    q.add_argument("-o", "--output", metavar="FILE", required=True)

    q = job_cmd("edit", "correct a segment's text or speaker, or relabel speakers", "jobs.edit")
    q.add_argument("--segment", type=int, metavar="ID", help="segment id (from `jobs show --json`)")
    q.add_argument("--text", help="new text of that segment")
    q.add_argument("--speaker", help="new speaker of that segment")
    q.add_argument("--rename", action="append", metavar="OLD=NEW", help="relabel a speaker everywhere (repeatable)")
    q.add_argument("--json", action="store_true", help="print the updated job as JSON")

    job_cmd("delete", "delete a job, its transcript and its audio", "jobs.delete")


DISPATCH: dict[str, Callable[[argparse.Namespace], int]] = {
    "jobs.list": cmd_jobs_list,
    "jobs.show": cmd_jobs_show,
    "jobs.export": cmd_jobs_export,
    "jobs.audio": cmd_jobs_audio,
    "jobs.edit": cmd_jobs_edit,
    "jobs.delete": cmd_jobs_delete,
}
