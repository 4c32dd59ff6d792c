"""The MLflow UI as a person sees it after a training run: ``bench/ui.py`` in headless Chromium."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_the_mlflow_ui_shows_every_size_of_a_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_ui", ROOT / "bench" / "ui.py")
    ui = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ui
    spec.loader.exec_module(ui)
    assert ui.main(["--out", str(tmp_path)]) == 0
    assert {"experiment.png", "run.png", "run_metrics.png", "models_chart.png"} <= {p.name for p in tmp_path.iterdir()}
