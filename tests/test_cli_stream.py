"""The command-line clients (`callbridge stream`, `callbridge webrtc`) when the real
service shuts down mid-session: not a success, and they say so."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import wave

import numpy as np

from tests.test_service_process import ROOT, Serve
from tests.test_stream_api import EN, SR, sil, speech


def long_call(path) -> float:
    pcm = np.concatenate([sil(0.3), speech(EN[0]), sil(0.5), speech(EN[1]), sil(0.5)] * 3)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())
    return len(pcm) / SR


async def test_stream_cut_short_by_server_shutdown_exits_1_and_says_so(tmp_path):
    """SIGTERM ends live sessions with `completed` and close 1001 (docs/stream.md, "Shutdown"): the
    CLI once printed "completed" and exited 0 although most of the file was never sent."""
    wav = tmp_path / "call.wav"
    seconds = long_call(wav)
    async with Serve(tmp_path / "data") as srv:
        key = (tmp_path / "data" / "api_key").read_text().strip()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "stream", str(wav), "--url", srv.url, "--api-key", key, "--json",
            cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert cli.stdout is not None
        first = json.loads(await asyncio.wait_for(cli.stdout.readline(), 60))
        assert first["type"] == "ready"  # the session is live: now the server shuts down
        srv.proc.send_signal(signal.SIGTERM)
        rest, err = await asyncio.wait_for(cli.communicate(), 60)
        assert await asyncio.wait_for(srv.proc.wait(), 60) == 0
    frames = [json.loads(x) for x in rest.decode().splitlines()]
    assert frames[-1]["type"] == "completed" and frames[-1]["server_shutdown"] is True  # saved what it got ...
    assert frames[-1]["streamed_seconds"] < seconds - 5  # ... which is not the whole file
    assert cli.returncode == 1, err.decode()
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith(f"callbridge: error: the server shut down before the stream ended: job {first['job_id']}")


async def test_webrtc_cli_cut_short_by_server_drain_exits_1_and_says_so(server, tmp_path):
    """A data channel has no close code: `completed.server_shutdown` tells the client."""
    wav = tmp_path / "call.wav"
    seconds = long_call(wav)
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "webrtc", str(wav), "--url", server.url, "--api-key", server.api_key,
        "--json", cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert cli.stdout is not None
    first = json.loads(await asyncio.wait_for(cli.stdout.readline(), 60))
    assert first["type"] == "ready"
    await server.service.drain()  # what SIGTERM does
    rest, err = await asyncio.wait_for(cli.communicate(), 60)
    frames = [json.loads(x) for x in rest.decode().splitlines()]
    assert frames[-1]["type"] == "completed" and frames[-1]["server_shutdown"] is True
    assert frames[-1]["streamed_seconds"] < seconds - 5
    assert cli.returncode == 1, err.decode()
    assert err.decode().strip().splitlines()[-1].startswith(
        f"callbridge: error: the server shut down before the stream ended: job {first['job_id']}")
