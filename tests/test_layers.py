"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml) over the
real import graph, function-local imports included; a broken contract fails with its report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "4 kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_architecture_doc_names_every_layer():
    """docs/architecture.md lists the layers the contract checks, in the same order."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    positions = []
    for layer in layers:
        first = layer.split(":")[0].strip()
        assert f"`{first}`" in doc, f"docs/architecture.md does not name the layer {first}"
        positions.append(doc.index(f"`{first}`"))
    assert positions == sorted(positions), "docs/architecture.md lists the layers in another order"
