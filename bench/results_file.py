"""Writing a benchmark's results: whole or not at all (``recsys.atomic``: temporary name, then rename)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # bench scripts run with bench/ on sys.path, not always the repository root
    sys.path.insert(1, _ROOT)  # after the script directory, before site-packages

from recsys.atomic import write_json_atomically, write_text_atomically  # noqa: E402


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_text_atomically(path, text)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_json_atomically(path, data, indent=2)
