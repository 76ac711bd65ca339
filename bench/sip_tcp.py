"""SIP over TCP under abusive connections: what the dispatcher holds and what it costs, with its
limits (config [sip] tcp_*) off and on.

Run: python -m bench.sip_tcp [--connections 200] [--sources 10]

The dispatcher runs alone in a child process (`--serve`, its one worker address unused) so its
resident memory (VmRSS) is measured apart from the clients. Each run opens `--connections` TCP
connections from `--sources` loopback addresses (127.0.0.2 ...) and, on every connection, sends:

- big: an INVITE whose Content-Length says 1 MiB, then all but one byte of that body;
- trickle: the first bytes of an INVITE, then one more byte every second;
- idle, one source: nothing at all, every connection from 127.0.0.1 (the per-source cap).

"no limits" is the behaviour before the limits existed: no connection caps, 1 MiB messages, a
message may take the whole 900 s idle timeout. "limits" are the shipped defaults. Figures:
connections the dispatcher holds open 2 s after the first was opened and 12 s after (past the
10 s message timeout), and its RSS added at its peak over its RSS before the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

from .report import emit_table

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
NO_LIMITS = {"max_connections": 10**6, "max_connections_per_source": 10**6, "max_message_bytes": MIB,
             "message_timeout_s": 900.0}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def serve(limits: dict) -> None:
    """The child: a dispatcher on a free loopback port until stdin closes."""
    from sip.dispatcher import Dispatcher, TcpLimits, Worker
    from sip.routing import Router

    d = Dispatcher("127.0.0.1", 0, [Worker(0, "127.0.0.1", 9, 4)], Router({}), tcp_limits=TcpLimits(**limits),
                   logger=_Quiet())
    await d.start()
    print(json.dumps({"port": d.port}), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):  # a line asks for the open count
        print(json.dumps({"open": d.stats()["tcp_connections"]}), flush=True)
    await d.stop()


class _Quiet:
    """Logger for the child: the runs are about memory, not log lines."""

    def bind(self, **_):
        return self

    def __getattr__(self, _name):
        return lambda *a, **k: None


def invite(port: int, length: int) -> bytes:
    return (f"INVITE sip:1000@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKb{port}\r\n"
            f"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:1000@127.0.0.1>\r\nCall-ID: bench-{port}\r\n"
            f"CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def client(port: int, source: str, shape: str, closed: list[int], i: int, stop: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        closed[i] = 1
        return
    local = writer.get_extra_info("sockname")[1]
    watch = asyncio.create_task(reader.read())
    try:
        if shape == "idle":
            pass
        elif shape == "trickle":
            head = invite(local, 0)
            writer.write(head[:20])
            for b in head[20:]:
                done, _ = await asyncio.wait([watch, asyncio.create_task(stop.wait())], timeout=1.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if watch in done or stop.is_set():
                    break
                writer.write(bytes([b]))
        else:
            writer.write(invite(local, MIB) + b"v" * (MIB - 1))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait([watch, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    except (ConnectionError, OSError):
        pass
    finally:
        if watch.done() and not stop.is_set():
            closed[i] = 1
        watch.cancel()
        writer.transport.abort()


async def open_count(proc: asyncio.subprocess.Process) -> int:
    """Connections the dispatcher holds open now (asked over the child's stdin)."""
    proc.stdin.write(b"?\n")
    return json.loads(await proc.stdout.readline())["open"]


async def run(limits: dict, shape: str, n: int, sources: int) -> tuple[int, int, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.sip_tcp", "--serve", json.dumps(limits), cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        port = json.loads(await proc.stdout.readline())["port"]  # its readiness line
        base = rss_mb(proc.pid)
        closed = [0] * n
        stop = asyncio.Event()
        srcs = ["127.0.0.1"] if shape == "idle" else [f"127.0.0.{2 + k}" for k in range(sources)]
        tasks = [asyncio.create_task(client(port, srcs[i % len(srcs)], shape, closed, i, stop)) for i in range(n)]
        peak = base
        t0 = time.monotonic()
        held_2 = None
        while time.monotonic() - t0 < 12.0:
            await asyncio.sleep(0.25)
            peak = max(peak, rss_mb(proc.pid))
            if held_2 is None and time.monotonic() - t0 >= 2.0:
                held_2 = await open_count(proc)
        held_12 = await open_count(proc)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return held_2 or 0, held_12, peak - base
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def bench(args: argparse.Namespace) -> None:
    from sip.dispatcher import TcpLimits

    defaults = TcpLimits()
    on = {"max_connections": defaults.max_connections, "max_connections_per_source": defaults.max_connections_per_source,
          "max_message_bytes": defaults.max_message_bytes, "message_timeout_s": defaults.message_timeout_s}
    rows = []
    for shape in ("big", "trickle", "idle"):
        for name, limits in (("no limits", NO_LIMITS), ("limits", on)):
            held_2, held_12, added = await run(limits, shape, args.connections, args.sources)
            rows.append([shape, name, str(args.connections), str(held_2), str(held_12), f"{added:.1f}"])
    emit_table("sip_tcp", f"SIP over TCP: {args.connections} connections against the dispatcher",
               ["connections send", "dispatcher", "opened", "open after 2 s", "open after 12 s", "RSS added (MB)"],
               rows, [f"limits: {on}", f"sources: {args.sources} loopback addresses (idle: all from 127.0.0.1)"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--sources", type=int, default=10)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(serve(json.loads(args.serve)))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
