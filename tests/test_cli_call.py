"""`callbridge call` against the real service: a real pjsua2 call (sip.peer in a child process)
into callbridge's SIP port, run as a user would from their own directory."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

from tests.test_sip_service import sip_server  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]
CHECK_WAV = ROOT / "bridge" / "models" / "data" / "check.wav"


async def cli(*args: str, cwd: Path, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def field_of(out: str, name: str) -> str:
    return next(ln.split(None, 1)[1] for ln in out.splitlines() if ln.strip().split(None, 1)[0] == name)


async def test_call_with_a_relative_wav_prints_the_job_id_of_its_call(sip_server, tmp_path):  # noqa: F811
    """The README's next command is `callbridge jobs show JOB_ID`: `call` must print that id. The
    WAV is named relative to where the user is (the peer process runs elsewhere)."""
    here = tmp_path / "calls"
    here.mkdir()
    shutil.copy(CHECK_WAV, here / "call.wav")
    uri = f"sip:test@127.0.0.1:{sip_server.service.sip.port}"
    rc, out, err = await cli("call", uri, "--play", "call.wav", "--url", sip_server.url,
                             "--api-key", sip_server.api_key, cwd=here)
    assert rc == 0, err
    job_id, call_id = field_of(out, "job"), field_of(out, "call-id")
    job = await sip_server.service.store.get_job(job_id)
    assert job is not None and job.source.value == "sip"
    assert job.metadata["sip"]["call_id"] == call_id
    # the id printed is the one `jobs show` takes
    rc, shown, err = await cli("jobs", "show", job_id, "--url", sip_server.url, "--api-key", sip_server.api_key,
                               cwd=here)
    assert rc == 0 and job_id in shown, err


async def test_call_says_why_there_is_no_job_id_and_keeps_the_calls_exit_code(sip_server, tmp_path):  # noqa: F811
    uri = f"sip:test@127.0.0.1:{sip_server.service.sip.port}"
    rc, out, err = await cli("call", uri, "--play", str(CHECK_WAV), "--url", sip_server.url,
                             "--api-key", "cbk_not_a_key_of_this_server_000", cwd=tmp_path)
    assert rc == 0, err
    assert field_of(out, "job").startswith("- (not looked up at ") and "not valid" in field_of(out, "job")
