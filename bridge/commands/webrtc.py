"""`callbridge webrtc FILE.wav`: place a call as a browser would (Opus over WebRTC, events on a
data channel) and print the transcript live, as `callbridge stream` does for the socket.

Exit codes: 0 the whole file was transcribed, 1 the server refused or ended the call first (or
the connection did not come up), 2 bad input."""

from __future__ import annotations

import argparse
import asyncio
import sys
import wave
from pathlib import Path
from typing import Any

from bridge.client.errors import ApiError
from bridge.client.webrtc import WebRtcClient, WebRtcError
from bridge.commands.printer import Printer
from bridge.commands.remote import resolve_api_key, resolve_url
from bridge.commands.stream import add_client_options
from bridge.commands.usage import PROG, UsageError

__all__ = ["DISPATCH", "add_webrtc_parser"]


def add_webrtc_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webrtc", help="play a WAV file into the server over WebRTC, as a browser microphone "
                                      "would, and print the transcript live")
    p.add_argument("wav", metavar="FILE", help="16-bit PCM WAV, any rate, mono or stereo")
    add_client_options(p)
    p.add_argument("--language", default=None)
    p.add_argument("--endpointing-ms", type=int, default=None)
    p.add_argument("--no-interim", action="store_true", help="finals only")
    p.add_argument("--tail", type=float, default=0.5, help="seconds of silence sent after the file, before bye")
    p.add_argument("--json", action="store_true", help="print every server message as one JSON line")
    p.set_defaults(command="webrtc")


def cmd_webrtc(args: argparse.Namespace) -> int:
    if not Path(args.wav).is_file():
        raise UsageError(f"no such file: {args.wav}")
    url, key = resolve_url(args.url), resolve_api_key(args.api_key)
    try:
        return asyncio.run(_call(args, url, key))
    except (ValueError, wave.Error) as e:  # a WAV that is not 16-bit PCM
        raise UsageError(str(e)) from None


async def _call(args: argparse.Namespace, url: str, key: str) -> int:
    config: dict[str, Any] = {}
    if args.language:
        config["language"] = args.language
    if args.endpointing_ms is not None:
        config["endpointing_ms"] = args.endpointing_ms
    if args.no_interim:
        config["interim_results"] = False
    printer = Printer(args.json)
    try:
        async with WebRtcClient(url, api_key=key, wav=args.wav, config=config) as c:
            if args.json:
                printer.event(c.ready or {})
            ender = asyncio.create_task(_bye_after_playing(c, args.tail))
            try:
                async for ev in c:
                    printer.event(ev)
            finally:
                ender.cancel()
        printer.finish(c.completed, c.cut_short, c.track.sent_seconds)
    except ApiError as e:
        print(f"{PROG}: error: refused: {e}", file=sys.stderr)
        return 1
    except WebRtcError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"{PROG}: error: no connection: the server's answer or the events channel did not come up in time",
              file=sys.stderr)
        return 1
    return 0 if c.completed and not c.cut_short else 1


async def _bye_after_playing(c: WebRtcClient, tail_s: float) -> None:
    await c.wait_played()
    await asyncio.sleep(tail_s)
    await c.bye()


DISPATCH = {"webrtc": cmd_webrtc}
