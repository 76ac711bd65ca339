"""`callbridge call SIP_URI --play FILE.wav`: place one real SIP call and play a WAV file into it,
e.g. into callbridge's own SIP port to try the SIP gateway end to end.

The call is made by `python -m sip.peer call` in a child process: pjsua2 allows one Endpoint per
process and writes its logs to stdout, so keeping it out of this process keeps the CLI clean. The
peer follows 302 redirects. Exit codes: 0 the call was answered and ended, 1 it failed (the SIP
status is printed), 2 bad input (no such file, not a 16-bit mono WAV, pjsua2 not installed).

After the call, the job callbridge made of it is looked up over REST (the SIP jobs since the call
began, matched on the Call-ID the job keeps in `metadata.sip.call_id`) and its id printed, as the
next thing a user does is `callbridge jobs show JOB_ID`. A call to another SIP server has no job:
the line then says so, and the exit code stays the call's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bridge.client.errors import ApiError
from bridge.client.rest import JobsClient
from bridge.commands.remote import resolve_api_key, resolve_url
from bridge.commands.stream import add_client_options
from bridge.commands.usage import UsageError
from sip import PJSUA2_HINT, pjsua2_missing

__all__ = ["DISPATCH", "add_call_parser", "cmd_call"]

PROG = "callbridge"


def add_call_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("call", help="place a SIP call that plays a WAV file (pjsua2), e.g. into callbridge's SIP port")
    p.add_argument("uri", metavar="SIP_URI", help="who to call, e.g. sip:support@127.0.0.1:5060")
    p.add_argument("--play", required=True, metavar="FILE.wav", help="16-bit PCM mono WAV (8 or 16 kHz) to send")
    p.add_argument("--record", metavar="OUT.wav", help="record what the other side sends")
    p.add_argument("--header", action="append", default=[], metavar='"X-Name: value"',
                   help="extra INVITE header (repeatable), e.g. X-Customer: 42")
    p.add_argument("--dtmf", help="RFC 2833 digits to send during the call, e.g. 12#")
    p.add_argument("--dtmf-at", type=float, default=1.0, help="seconds after the audio starts to send --dtmf")
    p.add_argument("--hold-s", type=float, default=0.5, help="stay on the line this long after the file ends")
    p.add_argument("--timeout", type=float, default=15.0, help="give up if not answered within S seconds")
    p.add_argument("--port", type=int, default=0, help="local SIP port (default: any free port)")
    p.add_argument("--codec", action="append", default=[], help="codec to offer, e.g. PCMU/8000 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the peer's JSON result line (plus job_id) as well")
    add_client_options(p)  # where to look up the call's job
    p.set_defaults(command="call")


def _peer_argv(args: argparse.Namespace) -> list[str]:
    # absolute: the peer runs in the repository, and a relative path means where the user is
    argv = [sys.executable, "-m", "sip.peer", "call", args.uri, "--play", str(Path(args.play).resolve()),
            "--hold-s", str(args.hold_s), "--timeout", str(args.timeout), "--port", str(args.port)]
    if args.record:
        argv += ["--record", str(Path(args.record).resolve())]
    for h in args.header:
        argv += ["--header", h]
    if args.dtmf:
        argv += ["--dtmf", args.dtmf, "--dtmf-at", str(args.dtmf_at)]
    for c in args.codec:
        argv += ["--codec", c]
    return argv


def summarize(uri: str, play: str, file_s: float, r: dict[str, Any], job: str = "-") -> str:
    """The human lines for a finished call; `job` is the job id or why there is none."""
    lines = [f"called {uri}: {r.get('sip_code')} {r.get('reason') or ''}".rstrip()]
    lines.append(f"  job       {job}")
    lines.append(f"  sent      {r.get('sent_seconds', 0.0):.1f} s of {file_s:.1f} s from {play}")
    lines.append(f"  codec     {r.get('codec') or '-'}")
    lines.append(f"  call-id   {r.get('call_id') or '-'}")
    if r.get("hangup_by"):
        lines.append(f"  hung up   by {'us' if r['hangup_by'] == 'us' else 'the other side'}")
    if r.get("recorded"):
        lines.append(f"  recorded  {r['recorded']}")
    return "\n".join(lines)


async def find_job(url: str, key: str, call_id: str, since: float) -> str | None:
    """The id of the SIP job created since `since` whose call has this Call-ID, or None."""
    async with JobsClient(url, key, timeout_s=10.0) as jobs:
        async for summary in jobs.iter_jobs(source="sip", since=since):
            job = await jobs.get_job(summary["id"])
            if ((job.get("metadata") or {}).get("sip") or {}).get("call_id") == call_id:
                return job["id"]
    return None


def lookup_job(args: argparse.Namespace, call_id: str | None, since: float) -> tuple[str | None, str]:
    """(job id or None, what to print on the job line)."""
    if not call_id:
        return None, "- (the call has no Call-ID)"
    try:
        url, key = resolve_url(args.url), resolve_api_key(args.api_key)
    except UsageError as e:
        return None, f"- (not looked up: {e})"
    try:
        job_id = asyncio.run(find_job(url, key, call_id, since))
    except ApiError as e:
        return None, f"- (not looked up at {url}: {e.message})"
    except (TimeoutError, aiohttp.ClientError) as e:
        return None, f"- (cannot reach callbridge at {url}: {str(e) or type(e).__name__})"
    return job_id, job_id or f"- (no job at {url} for this call: another SIP server, or another key's job)"


def cmd_call(args: argparse.Namespace) -> int:
    from sip.peer import wav_seconds

    missing = pjsua2_missing()
    if missing:
        raise UsageError(f"{missing}; {PJSUA2_HINT}")
    if not args.uri.lower().startswith(("sip:", "sips:")):
        raise UsageError(f"{args.uri!r} is not a sip: URI")
    if not Path(args.play).is_file():
        raise UsageError(f"no such file: {args.play}")
    try:
        file_s = wav_seconds(args.play)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for h in args.header:
        if ":" not in h or not h.split(":", 1)[0].strip():
            raise UsageError(f"--header {h!r} must look like 'Name: value'")
    if args.timeout <= 0 or args.hold_s < 0:
        raise UsageError("--timeout must be > 0 and --hold-s >= 0")

    limit = args.timeout + file_s + args.hold_s + 30.0
    since = time.time() - 60.0  # the job is created after this; the margin covers a server's clock skew
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(_peer_argv(args), cwd=str(root), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupted = False
    try:
        out, err = proc.communicate(timeout=limit)
    except KeyboardInterrupt:
        interrupted = True
        proc.send_signal(signal.SIGINT)  # the peer hangs up (BYE/CANCEL) and reports
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return 130
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        print(f"{PROG}: error: the call did not finish within {limit:.0f} s", file=sys.stderr)
        return 1
    lines = [ln for ln in out.splitlines() if ln.strip()]
    try:
        result: dict[str, Any] | None = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if proc.returncode == 2 or result is None:
        msg = [ln for ln in err.splitlines() if ln.startswith("sip.peer:")]
        print(f"{PROG}: error: {(msg[-1] if msg else err.strip()[-500:] or 'sip.peer failed').removeprefix('sip.peer: ')}",
              file=sys.stderr)
        return 2 if proc.returncode == 2 else 1
    if proc.returncode == 0:
        job_id, job_line = lookup_job(args, result.get("call_id"), since)
        if args.json:
            print(json.dumps({**result, "job_id": job_id}))
        print(summarize(args.uri, str(args.play), file_s, result, job_line))
        return 130 if interrupted else 0
    if args.json:
        print(json.dumps(result))
    print(f"{PROG}: error: call to {args.uri} failed: {result.get('sip_code') or 'no answer'} "
          f"{result.get('reason') or ''}".rstrip(), file=sys.stderr)
    return 1


DISPATCH = {"call": cmd_call}
