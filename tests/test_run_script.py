"""`./run`: which Python it builds the venv with, and that file arguments mean what the user typed.

The interpreter checks run `./run interpreter`, the step `setup` starts with, against a PATH of
stub interpreters that print a version: nothing is installed. The path test runs the real CLI
(through a venv whose `bin/` hands over to this test's interpreter) against the real service.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.models.store import CHECK_KEYWORDS

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "run"


def stub(bin_dir: Path, name: str, version: str | None) -> Path:
    """An executable `name` that prints `version` (whatever it is asked), or fails like a pyenv
    shim of a version that is not selected (`version` None)."""
    p = bin_dir / name
    body = f"echo {version}\n" if version else f"echo 'pyenv: {name}: command not found' >&2\nexit 127\n"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


@pytest.fixture
def fake_path(tmp_path):
    """An empty PATH directory holding only `dirname` (the script needs it) and the stubs."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "dirname").symlink_to(shutil.which("dirname"))
    return d


def interpreter(path_dir: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": str(path_dir), "CALLBRIDGE_VENV": str(tmp_path / "no-venv-yet"), **env}
    return subprocess.run(["/bin/bash", str(RUN), "interpreter"], env=base, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)


def test_prefers_python3_11_over_a_newer_python3(fake_path, tmp_path):
    want = stub(fake_path, "python3.11", "3.11")
    stub(fake_path, "python3", "3.12")
    r = interpreter(fake_path, tmp_path)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, str(want), "")


def test_python3_when_it_is_3_11(fake_path, tmp_path):
    want = stub(fake_path, "python3", "3.11")
    r = interpreter(fake_path, tmp_path)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, str(want), "")


def test_newer_python_is_used_with_one_line_saying_sip_is_off(fake_path, tmp_path):
    stub(fake_path, "python3.11", None)  # a pyenv shim whose version is not selected
    want = stub(fake_path, "python3", "3.12")
    r = interpreter(fake_path, tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, str(want))
    assert r.stderr.count("\n") == 1 and "SIP off" in r.stderr and "python3.11" in r.stderr


def test_older_python_is_refused_in_one_line(fake_path, tmp_path):
    stub(fake_path, "python3", "3.10")
    r = interpreter(fake_path, tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.count("\n") == 1 and "needs Python 3.11" in r.stderr and "CALLBRIDGE_PYTHON" in r.stderr


def test_no_python_at_all_is_refused_in_one_line(fake_path, tmp_path):
    r = interpreter(fake_path, tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.count("\n") == 1 and "no python3" in r.stderr


def test_callbridge_python_overrides_the_search(fake_path, tmp_path):
    stub(fake_path, "python3.11", "3.11")
    other = tmp_path / "opt"
    other.mkdir()
    chosen = stub(other, "python-custom", "3.11")
    r = interpreter(fake_path, tmp_path, CALLBRIDGE_PYTHON=str(chosen))
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, str(chosen), "")
    old = stub(other, "python-old", "3.10")
    r = interpreter(fake_path, tmp_path, CALLBRIDGE_PYTHON=str(old))
    assert r.returncode == 2 and "needs Python 3.11" in r.stderr


def test_an_existing_venv_of_an_old_python_is_refused_not_reused(fake_path, tmp_path):
    stub(fake_path, "python3.11", "3.11")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub(venv / "bin", "python", "3.10")
    r = interpreter(fake_path, tmp_path, CALLBRIDGE_VENV=str(venv))
    assert r.returncode == 2 and "needs Python 3.11" in r.stderr and f"remove {venv}" in r.stderr


def handover_venv(where: Path) -> Path:
    """A venv `./run` takes as set up: its `bin/` runs this test's interpreter on this tree."""
    bin_dir = where / "bin"
    bin_dir.mkdir(parents=True)
    for name, argv in (("python", f'"{sys.executable}"'), ("callbridge", f'"{sys.executable}" -m bridge')):
        p = bin_dir / name
        p.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
        p.chmod(0o755)
    (where / ".installed").touch()  # newer than pyproject.toml: setup installs nothing
    return where


async def test_stream_from_another_directory_finds_the_file_the_user_named(tmp_path, server):
    """`./run callbridge stream call.wav` in a directory other than the repository once looked for
    call.wav in the repository (the script changed into it)."""
    venv = handover_venv(tmp_path / "venv")
    here = tmp_path / "calls"
    here.mkdir()
    shutil.copy(ROOT / "bridge" / "models" / "data" / "check.wav", here / "call.wav")
    env = {**os.environ, "CALLBRIDGE_VENV": str(venv), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        str(RUN), "callbridge", "stream", "call.wav", "--url", server.url, "--api-key", server.api_key, "--fast",
        cwd=here, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "completed: job" in err.decode()
    words = set(out.decode().lower().replace(",", " ").replace(".", " ").split())
    assert set(CHECK_KEYWORDS) <= words, out.decode()  # the file's own words came back as finals


def test_a_newer_venv_warns_where_it_serves_not_on_every_client_command(fake_path, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub(venv / "bin", "python", "3.12")
    stub(venv / "bin", "callbridge", "ran")
    (venv / ".installed").touch()
    r = interpreter(fake_path, tmp_path, CALLBRIDGE_VENV=str(venv))
    assert r.returncode == 0 and r.stdout.strip() == str(venv / "bin" / "python") and "SIP off" in r.stderr
    r = subprocess.run(["/bin/bash", str(RUN), "callbridge", "jobs", "list"], capture_output=True, text=True,
                       timeout=30, cwd=tmp_path, env={"PATH": str(fake_path), "CALLBRIDGE_VENV": str(venv)})
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "ran", "")
