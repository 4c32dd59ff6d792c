"""An earlier commit's packages, unpacked for a benchmark's baseline arm (``--baseline REV``)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unpack_commit(rev: str, paths: list[str], into: Path) -> str:
    """Unpack ``paths`` (e.g. ``recsys``) of commit ``rev`` of this repository into ``into``, from
    ``git archive``; returns the commit's short hash. Exits with one line if ``rev`` is no commit."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    if found.returncode:
        sys.exit(f"--baseline {rev}: not a commit of this repository ({found.stderr.strip()})")
    short = found.stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), short, *paths], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return short
