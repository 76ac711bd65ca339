"""`callbridge stream FILE|-`: send a WAV file or raw stdin to a server at real-time pace and
print the transcript live, like the hosted SDKs' examples: on a terminal the partial rewrites one
line and each final is printed below it; `--json` prints every server frame as a JSON line.

Exit codes: 0 the whole input was transcribed (`completed` after our `end`), 1 the server ended
the session first (an `error`, or its shutdown: `completed` then close 1001, which is not a
success as the rest of the input was never transcribed), 2 bad input."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import wave
from pathlib import Path
from typing import IO, Iterator

from bridge.client.stream import StreamClient
from bridge.commands.printer import Printer
from bridge.commands.remote import DEFAULT_URL, resolve_api_key, resolve_url
from bridge.commands.usage import UsageError

CHUNK_S = 0.1


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"server base URL (default $CALLBRIDGE_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", help="API key (default $CALLBRIDGE_API_KEY, else <data_dir>/api_key, "
                                     "data_dir being $CALLBRIDGE_DATA_DIR or ./data)")


def add_stream_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stream", help="stream a WAV file or raw audio from stdin and print the transcript live")
    p.add_argument("source", metavar="FILE|-", help="a WAV file (PCM 16-bit), or - for raw audio on stdin")
    add_client_options(p)
    p.add_argument("--sample-rate", type=int, default=None, help="raw input: Hz (default 16000; WAV: from header)")
    p.add_argument("--channels", type=int, default=None, help="raw input: 1 or 2 (default 1; WAV: from header)")
    p.add_argument("--encoding", default=None, choices=("pcm_s16le", "pcm_mulaw", "pcm_alaw"),
                   help="raw input encoding (default pcm_s16le)")
    p.add_argument("--language", default=None, help='language code or "auto"')
    p.add_argument("--speakers", default=None, help="comma-separated label per channel, e.g. caller,agent")
    p.add_argument("--endpointing-ms", type=int, default=None)
    p.add_argument("--no-interim", action="store_true", help="finals only")
    p.add_argument("--speed", type=float, default=1.0, help="pace as a multiple of real time (default 1)")
    p.add_argument("--fast", action="store_true", help="send as fast as possible (no pacing)")
    p.add_argument("--json", action="store_true", help="print every server frame as one JSON line")
    p.set_defaults(command="stream")


def _open_source(args: argparse.Namespace) -> tuple[IO[bytes], dict]:
    if args.source == "-":
        fmt = {"sample_rate": args.sample_rate or 16000, "channels": args.channels or 1,
               "encoding": args.encoding or "pcm_s16le"}
        return sys.stdin.buffer, fmt
    path = Path(args.source)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        w = wave.open(str(path), "rb")
    except (wave.Error, EOFError) as e:
        raise UsageError(f"{path} is not a PCM WAV file ({e}); for raw audio use - with --sample-rate/--encoding")
    if w.getsampwidth() != 2:
        raise UsageError(f"{path}: {8 * w.getsampwidth()}-bit WAV; only 16-bit PCM WAV is read")
    fmt = {"sample_rate": w.getframerate(), "channels": w.getnchannels(), "encoding": "pcm_s16le"}
    return _WavReader(w), fmt


class _WavReader:
    def __init__(self, w: wave.Wave_read) -> None:
        self.w = w
        self.frame = w.getsampwidth() * w.getnchannels()

    def read(self, n: int) -> bytes:
        return self.w.readframes(n // self.frame)


def _chunks(src: IO[bytes], chunk_bytes: int) -> Iterator[bytes]:
    while True:
        b = src.read(chunk_bytes)
        if not b:
            return
        yield b


def cmd_stream(args: argparse.Namespace) -> int:
    if args.speed <= 0:
        raise UsageError("--speed must be > 0")
    url, key = resolve_url(args.url), resolve_api_key(args.api_key)
    src, fmt = _open_source(args)
    return asyncio.run(_stream(args, url, src, fmt, key))


async def _stream(args: argparse.Namespace, url: str, src: IO[bytes], fmt: dict, key: str) -> int:
    speakers = [s.strip() for s in args.speakers.split(",")] if args.speakers else None
    client = StreamClient(url, api_key=key, language=args.language, interim_results=not args.no_interim,
                          endpointing_ms=args.endpointing_ms,
                          metadata={"speakers": speakers} if speakers else None, **fmt)
    printer = Printer(args.json)
    bps = {"pcm_s16le": 2, "pcm_mulaw": 1, "pcm_alaw": 1}[fmt["encoding"]] * fmt["channels"]
    chunk = max(bps, int(fmt["sample_rate"] * CHUNK_S) * bps)
    async with client as s:
        if args.json:
            printer.event(s.ready or {})

        sent = 0.0

        async def send() -> None:
            nonlocal sent
            t0 = time.monotonic()
            loop = asyncio.get_running_loop()
            reader = iter(_chunks(src, chunk))
            while True:
                b = await loop.run_in_executor(None, next, reader, None)
                if b is None:
                    break
                await s.send_audio(b)
                sent += len(b) / bps / fmt["sample_rate"]
                if not args.fast:
                    await asyncio.sleep(max(0.0, t0 + sent / args.speed - time.monotonic()))
            await s.end()

        sender = asyncio.create_task(send())
        try:
            async for ev in s:
                printer.event(ev)
        finally:
            if not sender.done():
                sender.cancel()
            elif not sender.cancelled() and sender.exception() and not s.error and not s.cut_short:
                raise sender.exception()  # type: ignore[misc]
    printer.finish(s.completed, s.cut_short, sent)
    return 0 if s.completed and not s.cut_short else 1
