"""The command line of the small synthetic training run that the multi-process tests share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SIZES = [8, 16]


def small_run_args(cache: Path, *extra: str) -> list[str]:
    """``python -m recsys.train`` on 101 synthetic users (odd: two ranks or nodes get different
    numbers of users) and 80 items at sizes ``SIZES``, one epoch on CPU; ``extra`` follows."""
    return [
        sys.executable, "-m", "recsys.train",
        "--model.sizes", json.dumps(SIZES),
        "--data.synthetic.num_users", "101",
        "--data.synthetic.num_items", "80",
        "--data.synthetic_cache_dir", str(cache),
        "--data.max_len", "16",
        "--data.eval_batch_size", "16",
        "--trainer.max_epochs", "1",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]
