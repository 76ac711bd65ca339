"""A real pjsua2 SIP peer: places or answers one call, plays a WAV into it and records what it hears.

Used by the tests, the benchmarks and `callbridge call`, so that the SIP gateway is always exercised
by a full SIP/RTP stack rather than by hand-made packets.

    python -m sip.peer call SIP_URI --play FILE.wav [--record OUT.wav] [--header "X-Foo: bar"]...
                       [--dtmf "12#" --dtmf-at 1.0] [--hold-s S] [--timeout S] [--port 0] [--codec PCMU/8000]
                       [--proxy sip:HOST:PORT]
    python -m sip.peer answer --port P --play FILE.wav [--record OUT.wav] [--timeout S]
                       [--ring-s S] [--reject CODE] [--hangup-after S]

`call` follows 302 redirects and hangs up --hold-s after the file ends; `answer` takes one call
(rings --ring-s first, or refuses it with --reject), plays and records until the call ends.

When done it prints one JSON line on stdout: {"sent_seconds", "codec", "sip_code", "call_id",
"hangup_by": "us"|"remote"|null, "recorded": path|null, "reason"}. pjsua2 writes its logs to the
process's stdout, so the real stdout is kept aside for that line and fd 1 points at stderr.
Exit codes: 0 the call was answered and ended, 1 it failed (SIP code and reason on stderr), 2 bad input.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sip import pjsua

__all__ = ["main", "wav_seconds"]

POLL_MS = 10
DEFAULT_CODECS = ("PCMU/8000", "PCMA/8000", "G722/16000")


def wav_seconds(path: str | Path) -> float:
    """Duration of a 16-bit PCM mono WAV, checking it is one pjsua2's player can read."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise ValueError(f"{path}: needs 16-bit PCM mono WAV (got {8 * w.getsampwidth()}-bit, "
                                 f"{w.getnchannels()} channels)")
            if w.getframerate() not in (8000, 16000, 32000, 48000):
                raise ValueError(f"{path}: sample rate {w.getframerate()} Hz; use 8000 or 16000")
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a PCM WAV file ({e})") from None


@dataclass
class _State:
    """What the call did, filled in by pjsua2 callbacks on the main thread (and onEof2 on the media thread)."""

    sip_code: int | None = None
    reason: str = ""
    call_id: str | None = None
    codec: str | None = None
    confirmed_at: float | None = None
    media_at: float | None = None
    eof_at: float | None = None
    ended_at: float | None = None
    hangup_by: str | None = None
    we_hung_up: bool = False
    dtmf_sent: bool = False
    gave_up: str = ""
    incoming: list[Any] = field(default_factory=list)


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Make or take the call; (result for the JSON line, exit code)."""
    pj = pjsua.load()
    play_s = wav_seconds(args.play)
    st = _State()
    ep, keep = pjsua.create_endpoint(log_level=args.log_level, max_calls=4, user_agent="callbridge-peer")
    objs: dict[str, Any] = {}

    class Player(pj.AudioMediaPlayer):
        def onEof2(self) -> None:  # media thread: only record the time
            if st.eof_at is None:
                st.eof_at = time.monotonic()

    class PeerCall(pj.Call):
        def onCallState(self, prm: Any) -> None:
            if self is not objs.get("call"):
                return  # an extra incoming call we turned away
            ci = self.getInfo()
            st.call_id = ci.callIdString or st.call_id
            if ci.lastStatusCode and (st.sip_code is None or ci.state != pj.PJSIP_INV_STATE_CONFIRMED):
                st.sip_code, st.reason = int(ci.lastStatusCode), ci.lastReason
            if ci.state == pj.PJSIP_INV_STATE_CONFIRMED and st.confirmed_at is None:
                st.confirmed_at = time.monotonic()
                st.sip_code, st.reason = 200, ci.lastReason or "OK"
            elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED and st.ended_at is None:
                st.ended_at = time.monotonic()
                if st.confirmed_at is not None:
                    st.hangup_by = "us" if st.we_hung_up else "remote"

        def onCallMediaState(self, prm: Any) -> None:
            if self is not objs.get("call"):
                return
            ci = self.getInfo()
            for i, m in enumerate(ci.media):
                if m.type != pj.PJMEDIA_TYPE_AUDIO or m.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                    continue
                am = self.getAudioMedia(i)
                if "player" not in objs:
                    player = Player()
                    player.createPlayer(str(args.play), pj.PJMEDIA_FILE_NO_LOOP)
                    objs["player"] = player
                    st.media_at = time.monotonic()
                objs["player"].startTransmit(am)
                if args.record and "recorder" not in objs:
                    rec = pj.AudioMediaRecorder()
                    rec.createRecorder(str(args.record))
                    objs["recorder"] = rec
                if "recorder" in objs:
                    am.startTransmit(objs["recorder"])
                st.codec = pjsua.stream_codec(self, i) or st.codec

        def onCallRedirected(self, prm: Any) -> int:
            return pj.PJSIP_REDIRECT_ACCEPT  # follow 302s (the dispatcher may redirect to a worker)

    class PeerAccount(pj.Account):
        def onIncomingCall(self, prm: Any) -> None:
            call = PeerCall(self, prm.callId)
            op = pj.CallOpParam()
            if "call" in objs:  # one call per answering peer
                op.statusCode = 486
                call.answer(op)
                st.incoming.append(call)
                return
            objs["call"] = call
            if args.reject:
                op.statusCode = args.reject
                call.answer(op)
                return
            op.statusCode = 180
            call.answer(op)
            if args.ring_s <= 0:
                op.statusCode = 200
                call.answer(op)
            else:
                objs["answer_at"] = time.monotonic() + args.ring_s

    try:
        pjsua.set_codecs(ep, args.codec or list(DEFAULT_CODECS))
        local = pjsua.add_transport(ep, "udp", args.host, args.port)
        if args.mode == "answer" or "transport=tcp" in args.uri.lower():
            pjsua.add_transport(ep, "tcp", args.host, int(local.rsplit(":", 1)[1]))  # TCP on the same port number
        ep.libStart()
        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:peer@{local}"
        pjsua.media_transport(acfg, args.host)
        if args.proxy:  # loose routing (;lr): the request-URI stays the callee's (tel: needs a proxy)
            acfg.sipConfig.proxies.append(args.proxy if ";lr" in args.proxy.lower() else args.proxy + ";lr")
        objs["acc"] = PeerAccount()  # pjsua2 objects live only in objs: all dropped before libDestroy
        objs["acc"].create(acfg)
        print(f"sip.peer: {args.mode} on {local}", file=sys.stderr, flush=True)

        start = time.monotonic()
        if args.mode == "call":
            objs["call"] = PeerCall(objs["acc"])
            op = pj.CallOpParam(True)
            for h in args.header or []:
                name, sep, value = h.partition(":")
                if not sep or not name.strip():
                    raise ValueError(f"--header {h!r} must look like 'Name: value'")
                sh = pj.SipHeader()
                sh.hName, sh.hValue = name.strip(), value.strip()
                op.txOption.headers.append(sh)
            objs["call"].makeCall(args.uri, op)
            limit = start + args.timeout + play_s + max(args.hold_s, 0.5) + 10.0
        else:
            limit = start + args.timeout

        def hang_up(code: int = 0) -> None:
            c = objs.get("call")
            if c is not None and st.ended_at is None and not st.we_hung_up:
                st.we_hung_up = True
                op = pj.CallOpParam()
                op.statusCode = code
                try:
                    c.hangup(op)
                except pj.Error as e:
                    print(f"sip.peer: hangup failed: {e.info()}", file=sys.stderr)

        stop: list[float] = []  # SIGINT/SIGTERM: hang up properly (BYE/CANCEL), then report
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.append(time.monotonic()))
        while st.ended_at is None:
            ep.libHandleEvents(POLL_MS)
            now = time.monotonic()
            if stop:
                hang_up(487 if args.mode == "answer" and st.confirmed_at is None else 0)
                if now - stop[0] > 2.0:
                    break
            if objs.get("answer_at") and now >= objs["answer_at"]:
                objs.pop("answer_at")
                op = pj.CallOpParam()
                op.statusCode = 200
                objs["call"].answer(op)
            if args.mode == "call" and st.confirmed_at is None and now - start > args.timeout and not st.we_hung_up:
                hang_up()  # CANCEL (or drop) an unanswered call
                st.gave_up = f"not answered within {args.timeout:g} s"
            if (args.dtmf and not st.dtmf_sent and st.media_at is not None
                    and now - st.media_at >= args.dtmf_at and st.confirmed_at is not None):
                st.dtmf_sent = True
                objs["call"].dialDtmf(args.dtmf)
            if args.mode == "call" and st.confirmed_at is not None and st.media_at is not None:
                done = st.eof_at if st.eof_at is not None else (st.media_at + play_s + 1.0)
                if now >= done + args.hold_s:
                    hang_up()
            if (args.mode == "answer" and args.hangup_after > 0 and st.media_at is not None
                    and now - st.media_at >= args.hangup_after):
                hang_up()
            if now > limit:
                print(f"sip.peer: gave up after {now - start:.1f} s", file=sys.stderr)
                if "call" in objs and st.ended_at is None:
                    hang_up(408)
                    for _ in range(50):  # let the CANCEL/BYE go out
                        ep.libHandleEvents(POLL_MS)
                break
        for _ in range(20):  # let the last transactions (ACK, 200 to BYE) finish
            ep.libHandleEvents(POLL_MS)
        sent = 0.0
        if st.media_at is not None:
            end = min(x for x in (st.eof_at, st.ended_at, time.monotonic()) if x is not None)
            sent = round(min(play_s, max(0.0, end - st.media_at)), 3)
        result = {"sent_seconds": sent, "codec": st.codec, "sip_code": st.sip_code, "call_id": st.call_id,
                  "hangup_by": st.hangup_by, "recorded": str(args.record) if args.record and "recorder" in objs else None,
                  "reason": f"{st.gave_up} ({st.sip_code} {st.reason})" if st.gave_up else st.reason}
        ok = st.confirmed_at is not None and st.ended_at is not None
        if not ok:
            print(f"sip.peer: call failed: {st.sip_code} {st.reason}".rstrip(), file=sys.stderr)
        return result, 0 if ok else 1
    finally:
        for k in ("player", "recorder"):  # the recorder finalizes its WAV header when destroyed
            objs.pop(k, None)
        objs.clear()
        st.incoming.clear()
        gc.collect()
        pjsua.destroy_endpoint(ep, keep)


def _codec_list(s: str) -> list[str]:
    return [c.strip() for c in s.split(",") if c.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sip.peer", description="place or answer one real SIP call")
    sub = p.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--play", required=True, help="16-bit PCM mono WAV (8 or 16 kHz) to send")
    common.add_argument("--record", help="write what the other side sends to this WAV")
    common.add_argument("--host", default="127.0.0.1", help="local address to bind (default 127.0.0.1)")
    common.add_argument("--codec", action="append", type=_codec_list,
                        help="codec(s) to offer/accept, e.g. PCMU/8000 (repeat or comma-separate; "
                             "default PCMU, PCMA, G722)")
    common.add_argument("--log-level", type=int, default=1, help="pjsua2 log level on stderr (default 1)")
    c = sub.add_parser("call", parents=[common], help="call SIP_URI and play a file")
    c.add_argument("uri", metavar="SIP_URI")
    c.add_argument("--header", action="append", help='extra INVITE header, e.g. "X-Customer: 42" (repeatable)')
    c.add_argument("--dtmf", help="RFC 2833 digits to send, e.g. 12#")
    c.add_argument("--dtmf-at", type=float, default=1.0, help="seconds after media starts to send --dtmf")
    c.add_argument("--hold-s", type=float, default=0.5, help="stay this long after the file ends (default 0.5)")
    c.add_argument("--timeout", type=float, default=15.0, help="give up (CANCEL) if not answered in S seconds")
    c.add_argument("--port", type=int, default=0, help="local SIP port (default 0: any free port)")
    c.add_argument("--proxy", help="send the INVITE through this SIP URI (outbound proxy), e.g. "
                                   "sip:127.0.0.1:5060 to call a tel: URI through the dispatcher")
    c.set_defaults(ring_s=0.0, reject=0, hangup_after=0.0)
    a = sub.add_parser("answer", parents=[common], help="answer one call on --port, play a file, record")
    a.add_argument("--port", type=int, required=True, help="SIP port to listen on")
    a.add_argument("--timeout", type=float, default=60.0, help="give up after S seconds in all")
    a.add_argument("--ring-s", type=float, default=0.0, help="ring (180) this long before answering")
    a.add_argument("--reject", type=int, default=0, help="answer with this final status (e.g. 486) instead")
    a.add_argument("--hangup-after", type=float, default=0.0,
                   help="hang up (BYE) this many seconds after media starts (default: wait for the caller)")
    a.set_defaults(uri="", header=None, dtmf=None, dtmf_at=0.0, hold_s=0.0, proxy=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.codec = [c for group in (args.codec or []) for c in group]
    if not Path(args.play).is_file():
        print(f"sip.peer: no such file: {args.play}", file=sys.stderr)
        return 2
    try:
        wav_seconds(args.play)
    except ValueError as e:
        print(f"sip.peer: {e}", file=sys.stderr)
        return 2
    try:
        import pjsua2 as pj
    except ImportError:
        print("sip.peer: pjsua2 is not installed (pip install pjsua2-python)", file=sys.stderr)
        return 2
    # pjsua2 prints to fd 1: keep the real stdout for the JSON line, send the rest to stderr.
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        result, rc = _run(args)
    except ValueError as e:
        print(f"sip.peer: {e}", file=sys.stderr)
        return 2
    except (pj.Error, OSError) as e:  # pjsua2.Error has no useful str()
        info = e.info() if isinstance(e, pj.Error) else str(e)
        print(f"sip.peer: error: {info}", file=sys.stderr)
        return 1
    out.write(json.dumps(result) + "\n")
    out.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
