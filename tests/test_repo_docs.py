"""The repository stands alone: nothing points outside it, and the docs' relative links resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = "../" + "shared/"  # spelled in two parts so this file does not match itself
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    out = []
    for name in names.decode().split("\0"):
        p = ROOT / name
        if name and p.is_file() and p.suffix not in (".png", ".wav", ".bin"):
            out.append(p)
    return out


def test_nothing_points_at_the_shared_folder_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in tracked_text_files()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE in line]
    assert hits == []


def test_relative_links_in_readme_and_docs_resolve_inside_the_repository():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (page.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
