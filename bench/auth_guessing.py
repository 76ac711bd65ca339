"""Credential guessing against the real service, with and without the authentication backoff.

Run: python -m bench.auth_guessing [--seconds 10] [--concurrency 8]
One address (127.0.0.1) sends wrong API keys as fast as it can; meanwhile a second address
(127.0.0.2) sends the valid key once every 100 ms. Reported per setting: requests per second,
guesses the server actually checked per second (the 401s: each is a key the guesser learned is
wrong), the 429s, and whether the valid key from the other address was ever refused.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from .report import emit_table
from .service import BENCH_KEY, running_service


async def _guess(url: str, stop: float, counts: dict[int, int]) -> None:
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0))
    async with aiohttp.ClientSession(connector=conn) as s:
        i = 0
        while time.monotonic() < stop:
            i += 1
            async with s.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer cbk_guess_{i:032d}"}) as r:
                counts[r.status] = counts.get(r.status, 0) + 1


async def _valid(url: str, stop: float, counts: dict[int, int]) -> None:
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=conn) as s:
        while time.monotonic() < stop:
            async with s.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {BENCH_KEY}"}) as r:
                counts[r.status] = counts.get(r.status, 0) + 1
            await asyncio.sleep(0.1)


async def _run(label: str, overrides: dict[str, str], seconds: float, concurrency: int) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        async with running_service(Path(d), **overrides) as (_svc, url):
            guesses: dict[int, int] = {}
            valid: dict[int, int] = {}
            t0 = time.monotonic()
            stop = t0 + seconds
            await asyncio.gather(*(_guess(url, stop, guesses) for _ in range(concurrency)), _valid(url, stop, valid))
            took = time.monotonic() - t0
    total = sum(guesses.values())
    refused_valid = sum(n for status, n in valid.items() if status != 200)
    return [label, f"{total / took:.0f}", f"{guesses.get(401, 0) / took:.1f}", str(guesses.get(401, 0)),
            str(guesses.get(429, 0)), f"{valid.get(200, 0)} ok, {refused_valid} refused"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)
    rows = [asyncio.run(_run("backoff off (failures_before_backoff = 0)", {"auth.failures_before_backoff": "0"},
                             args.seconds, args.concurrency)),
            asyncio.run(_run("defaults (10 per 60 s, 2 s doubling to 300 s)", {}, args.seconds, args.concurrency))]
    emit_table("auth_guessing", f"Wrong API keys from one address for {args.seconds:g} s ({args.concurrency} "
               "connections), valid key from another address every 100 ms",
               ["setting", "requests/s", "keys checked/s", "401", "429", "valid key from 127.0.0.2"], rows,
               ["keys checked = 401 answers: guesses the server evaluated; a 429 evaluates nothing."])


if __name__ == "__main__":
    main()
