"""What the commands print: ``--help`` at once, and a training console without third-party chatter.

Each check runs in a fresh interpreter: imports, logging and warning filters are per process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsys.compat import FLAT_OPTION_GROUPS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["lightning", "mlflow", "transformers", "sentence_transformers", "torch"]
COMMANDS = ["recsys.train", "recsys.data", "recsys.export", "serving.candidates"]


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)


HELP_PROBE = """
    import json, runpy, sys
    command = sys.argv[1]
    sys.argv = [command, "--help"]
    try:
        runpy.run_module(command, run_name="__main__", alter_sys=True)
        code = None
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(h for h in sys.argv[2:] if any(m == h or m.startswith(h + ".") for m in sys.modules))
    print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_before_torch_lightning_or_mlflow_is_imported(command):
    done = _python(HELP_PROBE, command, *HEAVY)
    assert done.returncode == 0, done.stderr[-3000:]
    *shown, last = done.stdout.splitlines()
    probe = json.loads(last)
    assert probe == {"code": 0, "heavy": []}, probe
    assert f"python -m {command}" in "\n".join(shown)


def test_train_help_names_real_options_and_help_all_lists_every_one(capsys):
    """The short help (the module's docstring) names only options the full parser has; --help-all
    is the full parser's help (Lightning's Trainer among them)."""
    import recsys.train

    with pytest.raises(SystemExit) as exit_:
        recsys.train.main(["--help-all"])
    assert exit_.value.code == 0
    full = capsys.readouterr().out
    assert "--trainer.max_epochs" in full and "--model.sizes" in full
    named = set(re.findall(r"--[a-z_]+(?:\.[a-z_]+)*\b", recsys.train.__doc__)) - {"--help-all", "--print_config"}
    flat = {f"--model.{option}" for option in FLAT_OPTION_GROUPS}  # the older spellings, rewritten before parsing
    assert named - flat and not [flag for flag in named - flat if flag not in full]


QUIET_PROBE = """
    import logging, warnings
    import lightning  # sets its loggers' level: the training imports it before it sets up the console
    from lightning.fabric.utilities.warnings import PossibleUserWarning
    from recsys.console import quiet_console
    quiet_console()
    logging.getLogger("recsys.data").info("ours: info")
    logging.getLogger("faiss.loader").info("theirs: info")
    logging.getLogger("faiss.loader").warning("theirs: warning")
    logging.info("root: info")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("lightning: tip")
    logging.getLogger("lightning.fabric.utilities.seed").info("lightning: seed")
    def lightning_warns(message):  # as Lightning's fit loop does
        warnings.warn_explicit(message, PossibleUserWarning, "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop")
    lightning_warns("The number of training batches (8) is smaller than the logging interval")
    lightning_warns("lightning: a warning about the settings")
    warnings.warn("anyone: a user warning", UserWarning)
"""


def test_quiet_console_keeps_our_lines_and_every_warning_but_the_named_notices():
    done = _python(QUIET_PROBE)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    for kept in ("ours: info", "theirs: warning", "lightning: a warning about the settings", "anyone: a user warning"):
        assert kept in shown, kept
    for dropped in ("theirs: info", "root: info", "lightning: tip", "lightning: seed", "smaller than the logging interval"):
        assert dropped not in shown, dropped


def test_a_training_console_shows_our_progress_and_table_and_no_third_party_notices(tmp_path):
    """`python -m recsys.train` as a user runs it (MLflow, logged models): the notices of issue 17
    (MLflow's type-hint warning per model, an artifact download bar per model, faiss's and
    fbgemm's loader lines, Lightning's tips and deprecations) are gone; our lines are there."""
    args = [
        "--model.sizes", "[8, 16]", "--data.synthetic.num_users", "120", "--data.synthetic.num_items", "100",
        "--data.synthetic_cache_dir", str(tmp_path / "synthetic"), "--data.max_len", "20", "--trainer.max_epochs", "1",
        "--mlflow.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--mlflow.artifact_location", str(tmp_path / "artifacts"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    ]
    done = subprocess.run([sys.executable, "-m", "recsys.train", *args], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out, err = done.stdout, done.stderr
    for notice in ("Add type hints", "Downloading artifacts", "faiss.loader", "Successfully loaded", "Tip:",
                   "LeafSpec", "GPU available", "Seed set", "mlflow.store.db", "Validating input example",
                   "smaller than the logging interval", "exported size"):
        assert notice not in out + err, notice
    assert "INFO recsys.data.pipeline: prepared" in err  # our progress
    assert "| size | parameters | NDCG@10 |" in out and re.search(r"^\| 16 \| [\d,]+ \| 0\.\d{4} \|", out, re.MULTILINE)
    assert re.search(r"^MLflow run 'lru d8-16 synthetic [\d: -]+' \(\w+\) in sqlite:///", out, re.MULTILINE)
    assert "?workflowType=machine_learning" in out


def test_printed_commands_name_this_environments_python(tmp_path, monkeypatch):
    """The hint printed after training runs as printed, outside an activated environment too."""
    import sys

    from recsys.console import command_of

    monkeypatch.chdir(tmp_path)
    assert command_of("recsys.export") == f"{sys.executable} -m recsys.export"
    monkeypatch.chdir(Path(sys.executable).parent)
    assert command_of("recsys.export") == f"./{Path(sys.executable).name} -m recsys.export"
