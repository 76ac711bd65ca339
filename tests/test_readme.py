"""The README's Python streaming example, run as a reader would: saved to a file, run with the
project's interpreter from the directory holding `data/api_key`, against the real service."""

from __future__ import annotations

import asyncio
import ast
import os
import shutil
import sys
from pathlib import Path

from bridge.models.store import CHECK_KEYWORDS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "http://127.0.0.1:8080"


def readme_stream_example() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Streaming audio in", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_example_needs_only_installed_dependencies():
    """The example once imported `websockets`, which only the dev extra installs."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = {d.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip().lower() for d in deps}
    imported = set()
    for node in ast.walk(ast.parse(readme_stream_example())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party and third_party <= installed, third_party - installed


async def test_example_streams_a_file_and_prints_its_finals(server, tmp_path):
    code = readme_stream_example()
    here = tmp_path / "user"  # tmp_path/data is the server's
    here.mkdir()
    assert code.count(DEFAULT_URL) == 1  # the only change: the test server's port
    (here / "stream_file.py").write_text(code.replace(DEFAULT_URL, server.url))
    (here / "data").mkdir()
    (here / "data" / "api_key").write_text(server.api_key + "\n")
    shutil.copy(ROOT / "bridge" / "models" / "data" / "check.wav", here / "call.wav")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "stream_file.py", "call.wav", cwd=here, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0 and not err, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("{'type': 'ready'")
    finals = " ".join(ln for ln in lines if ln.startswith("ch0 [")).lower()  # "speaker [start] text"
    assert all(k in finals for k in CHECK_KEYWORDS), lines
    assert lines[-1].startswith("{'type': 'completed'")
