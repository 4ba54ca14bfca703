"""No file in the repo cites a path that exists only on the development machines (`shared` beside the checkout).

Sample data is found through ``$VID2VID_SAMPLE_DATA``; the only places that may name the development
machines' folder are the test fixture that falls back to it and the README's note on where sample
data lives (its Data section).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEV_PATH = re.compile(r"\.\./" + r"shared\b|parent\s*/\s*\"" + r"shared\"")  # split: this file must not match
ALLOWED = {"tests/conftest.py"}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode == 0:
        return out.stdout.split()
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*")  # a copy without .git: every file but outputs
            if p.is_file() and not {".venv", ".git", "runs", "__pycache__"} & set(p.relative_to(REPO).parts)]


def readme_data_section(text: str) -> set[int]:
    """Line numbers (1-based) of the README's Data section."""
    lines, inside, out = text.splitlines(), False, set()
    for i, line in enumerate(lines, start=1):
        if line.startswith("## "):
            inside = line.strip() == "## Data"
        if inside:
            out.add(i)
    return out


def test_no_file_cites_the_development_machines_folders():
    found = []
    for name in tracked_files():
        path = REPO / name
        if name in ALLOWED or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # images
        allowed_lines = readme_data_section(text) if name == "README.md" else set()
        found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), start=1)
                  if DEV_PATH.search(line) and i not in allowed_lines]
    assert not found, "paths outside the repo:\n" + "\n".join(found)
