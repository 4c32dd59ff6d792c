"""Reliability across the whole path: faults, safe loading, and what each command does with bad input.

Faults
- a training run killed mid-epoch resumes from its last checkpoint to exactly the weights and test
  metrics of an uninterrupted run with the same seed (deterministic mode, CPU);
- an export or a prepare killed midway (an exception raised inside a writer, or a real SIGKILL)
  leaves no directory that looks complete and nothing loadable; a re-export killed (SIGKILL) at any
  step of its commit leaves the old or the new export, whole, and the next run cleans the leftovers
  (the same for any directory: ``tests/test_atomic.py``);
- a candidate job killed midway resumes with every user exactly once: tested in
  ``tests/test_candidates.py::test_killed_job_resumes_with_every_user_exactly_once``.

Safe loading
- no pickle on the data or model path: an audit of the project's own source;
- a checkpoint holding a pickled object is refused (and its code never runs) by
  ``MatryoshkaRecommender.from_checkpoint``, ``recsys.export`` and ``recsys.train --ckpt_path``;
- an export whose files were changed after export is refused (``model.safetensors`` in
  ``tests/test_export.py``; ``items.parquet``, ``index.faiss`` and a deleted file here).

Bad input
- ``BAD_INPUTS`` lists bad inputs for every command, each with the message the user must see. The
  test runs each one (exit status 2 and one ``error:`` line, or the exception of ``serving.load``;
  nothing written) and checks that docs/usage.md's table, which ``tools/bad_input_table.py`` generates
  from the same cases, matches.
"""

from __future__ import annotations

import ast
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import tokenize
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import serving
from recsys.data import DataValidationError, ItemFeatures, SequenceDataModule, SyntheticConfig, load_prepared, prepare, write_synthetic
from recsys.checkpoint import CheckpointError
from recsys.model import MatryoshkaRecommender
from recsys.export import export_sizes
from recsys.export import main as export_main
from serving.sized_model import ExportError

ROOT = Path(__file__).resolve().parents[1]
TABLE_PAGE = ROOT / "docs" / "usage.md"  # where the bad-input table is
TABLE_START, TABLE_END = "<!-- bad-input:start -->", "<!-- bad-input:end -->"


# ==========================================================================================================
# Faults: training killed mid-epoch
# ==========================================================================================================

SIZES = [8, 16]


class SimulatedKill(Exception):
    """Raised by a callback at a chosen step: the process dies there, as far as training can tell."""


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedKill(f"killed before step {self.step}")


class RecordBatches(Callback):
    """(epoch, batch index, a fingerprint of the batch) of every batch trained."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, int((batch["input_ids"] * torch.arange(batch["input_ids"].shape[1])).sum())))


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory) -> Path:
    """A synthetic log of 120 users prepared once: 6 training batches of 16 windows per epoch."""
    directory = tmp_path_factory.mktemp("tiny")
    files = write_synthetic(SyntheticConfig(num_users=120, num_items=60, mean_history=12, vector_dim=8, seed=1), directory / "raw")
    return prepare(out=directory / "prepared", **files.prepare_kwargs(), cache_dir=None)


def _datamodule(data_dir: Path) -> SequenceDataModule:
    return SequenceDataModule(data_dir=str(data_dir), max_len=10, batch_size=16, seed=0)


def _model(dm: SequenceDataModule) -> MatryoshkaRecommender:
    L.seed_everything(0)  # dropout (0.1 in the encoder and on its inputs) draws from this RNG
    return MatryoshkaRecommender(item_features=dm.item_features, sizes=SIZES, max_len=dm.max_len, warmup_steps=2, lr=3e-3)


def _trainer(callbacks: list[Callback], checkpoints: Path | None = None, every: int = 4) -> L.Trainer:
    if checkpoints is not None:
        callbacks = callbacks + [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=every, save_top_k=-1, filename="{step}")]
    return L.Trainer(
        max_epochs=2, deterministic=True, accelerator="cpu", logger=False, callbacks=callbacks,
        enable_checkpointing=checkpoints is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )


def _fit(data_dir: Path, *callbacks: Callback, checkpoints: Path | None = None, every: int = 4, ckpt_path=None):
    dm = _datamodule(data_dir)
    model = _model(dm)
    trainer = _trainer(list(callbacks), checkpoints, every)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    return trainer, model, dm


def _last_checkpoint(directory: Path) -> Path:
    return max(directory.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))


def _test_metrics(model: MatryoshkaRecommender, dm: SequenceDataModule) -> dict[str, float]:
    _trainer([]).test(model, datamodule=dm, verbose=False)
    return model.last_test_metrics


@pytest.fixture(scope="module")
def uninterrupted(tiny_log):
    """The run that is never killed: the batches it trained, its final weights and test metrics."""
    batches = RecordBatches()
    trainer, model, dm = _fit(tiny_log, batches)
    assert len(dm.train_dataloader()) == 6 and trainer.global_step == 12
    return batches.seen, model.state_dict(), _test_metrics(model, dm)


@pytest.mark.parametrize("kill_at,every", [(9, 4), (8, 6)], ids=["mid-epoch", "checkpoint-at-epoch-end"])
def test_training_killed_mid_epoch_resumes_to_the_same_result(tiny_log, uninterrupted, tmp_path, kill_at, every):
    """Steps 0-5 are epoch 0, steps 6-11 epoch 1. Killed at step ``kill_at`` and resumed from the last
    checkpoint (step 8: two batches into epoch 1; or step 6: the end of epoch 0), the run trains the
    batches the uninterrupted run trained after that point, in the same order, with the same dropout,
    and ends with bit-identical weights and test metrics."""
    clean_batches, clean_weights, clean_metrics = uninterrupted
    with pytest.raises(SimulatedKill):
        _fit(tiny_log, KillAtStep(kill_at), checkpoints=tmp_path / "ckpt", every=every)
    last = _last_checkpoint(tmp_path / "ckpt")
    done = int(last.stem.split("=")[1])
    assert done == kill_at // every * every and done < kill_at  # the steps between are lost and redone

    resumed_batches = RecordBatches()
    trainer, resumed, dm = _fit(tiny_log, resumed_batches, ckpt_path=last)
    assert trainer.global_step == 12
    assert resumed_batches.seen == clean_batches[done:]  # neither replayed nor skipped
    for (name, a), (_, b) in zip(clean_weights.items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert _test_metrics(resumed, dm) == clean_metrics


def test_train_loader_resumes_after_the_batches_it_served(tiny_log):
    """The loader state alone: a fresh data module given the saved state serves exactly the rest of the
    interrupted epoch, restores the RNG, and starts the next epoch afresh when the saved one was finished."""
    dm = _datamodule(tiny_log)
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(3)
    full = [b["input_ids"] for b in loader]
    loader.batch_sampler.sampler.set_epoch(3)
    it = iter(loader)
    next(it), next(it)
    torch.manual_seed(5)
    state = dm.state_dict()
    after = torch.rand(3)
    assert state["train_loader"]["epoch"] == 3 and state["train_loader"]["batches"] == 2

    fresh = _datamodule(tiny_log)
    fresh.load_state_dict(state)
    torch.manual_seed(123)
    rest = [b["input_ids"] for b in fresh.train_dataloader()]
    assert torch.equal(torch.rand(3), after)  # dropout continues from the saved RNG state
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:]))
    assert len(fresh.train_dataloader()) == len(full)  # Lightning counts the skipped batches itself

    finished = {"train_loader": {**state["train_loader"], "batches": len(full)}}
    fresh = _datamodule(tiny_log)
    fresh.load_state_dict(finished)
    loader = fresh.train_dataloader()
    assert loader.batch_sampler.sampler.epoch == 4 and len(list(loader)) == len(full)


# ==========================================================================================================
# Faults: export and prepare killed midway
# ==========================================================================================================

N_ITEMS = 20


def write_checkpoint(path: Path, payload: object = None) -> Path:
    """A small model checkpoint in the layout recsys.train writes (string item ids); ``payload`` adds an
    extra entry (a pickled object, for the refusal tests)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    features = ItemFeatures(num_items=N_ITEMS, dense={"text": torch.randn(N_ITEMS + 1, 6, generator=g)})
    model = MatryoshkaRecommender(item_features=features, sizes=SIZES, max_len=10).eval()
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "catalogue": {"item_ids": [f"i{i:02d}" for i in range(1, N_ITEMS + 1)], "popularity": list(range(N_ITEMS, 0, -1))},
    }
    if payload is not None:
        checkpoint["payload"] = payload
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt")


class Killed(KeyboardInterrupt):
    """What Ctrl-C (or a kill handled as an exception) raises inside a writer."""


def _dies(*args, **kwargs):
    raise Killed("simulated kill")


def _dies_after(real: Callable) -> Callable:
    """The real writer, then the kill: the file is complete but the step never finishes."""

    def wrapper(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed("simulated kill")

    return wrapper


def _loadable(directory: Path) -> bool:
    try:
        serving.load(directory)
    except (ExportError, OSError):
        return False
    return True


@pytest.mark.parametrize("where", ["weights", "index", "manifest", "rename"])
def test_export_killed_midway_leaves_nothing_that_looks_complete(checkpoint, tmp_path, monkeypatch, where):
    import recsys.export as export
    import recsys.retrieval.faiss_index as index

    target = {"weights": (export, "save_file"), "index": (index, "save_index"),
              "manifest": (export, "read_manifest"), "rename": (os, "replace")}[where]
    monkeypatch.setattr(*target, _dies_after(getattr(*target)) if where in ("weights", "index") else _dies)
    out = tmp_path / "exports"
    with pytest.raises(Killed):
        export_sizes(checkpoint, [8], out, index="flat")
    assert not (out / "d8").exists() and not _loadable(out / "d8")
    assert list(out.iterdir()) == []  # no temporary directory either


def test_export_killed_during_the_second_size_keeps_the_first_whole(checkpoint, tmp_path, monkeypatch):
    import recsys.retrieval.faiss_index as index

    real, calls = index.save_index, []

    def dies_second_time(*args):
        calls.append(1)
        if len(calls) == 2:
            raise Killed("simulated kill")
        real(*args)

    monkeypatch.setattr(index, "save_index", dies_second_time)
    with pytest.raises(Killed):
        export_sizes(checkpoint, [8, 16], tmp_path, index="flat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d8"]
    assert serving.load(tmp_path / "d8").size == 8


def _kill_script(body: str) -> str:
    return textwrap.dedent(
        """
        import os, signal, sys
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    ) + textwrap.dedent(body)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_export_and_prepare_killed_with_sigkill_leave_nothing_loadable(checkpoint, synthetic_files, tmp_path):
    """A real SIGKILL (nothing can clean up): the output never appears; what is left is a hidden
    temporary directory that cannot be loaded. One process per command, killed while writing its
    index (export) or its features (prepare). (Killed after its manifest is verified but before the
    rename, an export leaves a hidden temporary directory that is complete: it verifies and loads.)"""
    script = _kill_script(
        """
        which, checkpoint, out, files = sys.argv[1:]
        if which == "export":
            import recsys.export as export
            import recsys.retrieval.faiss_index as index
            index.save_index = die
            export.export_sizes(checkpoint, [8], out, index="flat")
        else:
            import json
            from recsys.data import ItemFeatures, prepare
            ItemFeatures.save = die
            prepare(out=out, cache_dir=None, **json.loads(files))
        """
    )
    files = json.dumps(synthetic_files.prepare_kwargs(), default=str)
    processes = [  # both at once: most of their time is importing torch
        subprocess.Popen([sys.executable, "-c", script, which, str(checkpoint), str(tmp_path / out), files], stderr=subprocess.PIPE)
        for which, out in (("export", "exports"), ("prepare", "prepared"))
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    exports = list((tmp_path / "exports").iterdir())
    assert [p.name.startswith(".d8.") for p in exports] == [True]  # only the hidden temporary directory
    assert not (tmp_path / "exports" / "d8").exists() and not _loadable(exports[0])
    assert not (tmp_path / "prepared").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".prepared.partial")]
    assert len(leftovers) == 1
    with pytest.raises(DataValidationError, match="not a prepared dataset"):
        load_prepared(leftovers[0])
    # the next run into the same place removes what the killed one left (its pid is not alive)
    export_sizes(checkpoint, [8], tmp_path / "exports")
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["d8"] and _loadable(tmp_path / "exports" / "d8")
    prepare(out=tmp_path / "prepared", cache_dir=None, **synthetic_files.prepare_kwargs())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "prepared"]


# Where a re-export over an existing d16 is killed, and which export d16 then is. "deleting": killed
# while the old export (swapped out, under the temporary name) is being removed. "fallback-*": the
# same without RENAME_EXCHANGE (old export renamed to a backup, new one renamed in); killed between
# the two renames, d16 is missing until the next writer restores the backup.
REEXPORT_KILLS = {
    "before the swap": "old", "after the swap": "new", "deleting": "new",
    "fallback-moved aside": "restored", "fallback-after the swap": "new", "fallback-deleting": "new",
}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_reexport_killed_with_sigkill_at_the_commit_keeps_a_whole_export(checkpoint, tmp_path):
    """``d16`` exists; a re-export is killed (SIGKILL) at each step of putting the new ``d16`` in
    place. ``d16`` is always a whole, loadable export, the old or the new one (in the fallback
    killed between its two renames: the old one, once the next writer into the directory restores
    it), and the next export into the directory cleans what the killed one left."""
    from recsys.atomic import clean_leftovers

    script = _kill_script(
        """
        import recsys.atomic as atomic, recsys.export as export
        checkpoint, out, where = sys.argv[1:]
        step = {"before the swap": "written", "after the swap": "swapped", "moved aside": "moved_aside"}
        fallback = where.startswith("fallback-")
        where = where.removeprefix("fallback-")
        if fallback:
            atomic._exchange = lambda a, b: False
        unlink = os.unlink
        def die_in_the_middle(*args, **kwargs):  # rmtree of the old export: one file removed, then killed
            unlink(*args, **kwargs)
            die()
        def after_step(name, path):
            if name == step.get(where, where) and path.parent.name == "exports":
                if where == "deleting":
                    os.unlink = die_in_the_middle
                else:
                    die()
        atomic._after_step = after_step
        export.export_sizes(checkpoint, [16], out, source={"export": "new"})
        """
    )
    outs = {}
    for i, where in enumerate(REEXPORT_KILLS):
        outs[where] = tmp_path / str(i) / "exports"
        export_sizes(checkpoint, [16], outs[where], source={"export": "old"})
    processes = {  # all at once: most of their time is importing torch
        where: subprocess.Popen([sys.executable, "-c", script, str(checkpoint), str(out), where], stderr=subprocess.PIPE)
        for where, out in outs.items()
    }
    for where, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL, f"{where}: {stderr.decode()[-2000:]}"
    for where, expected in REEXPORT_KILLS.items():
        out = outs[where]
        assert len(list(out.iterdir())) == 2, where  # d16 (or its backup) and one leftover
        if where.endswith("deleting"):  # the old export, half removed, is under the temporary name only
            (leftover,) = (p for p in out.iterdir() if p.name != "d16")
            assert 0 < len(list(leftover.iterdir())) < len(list((out / "d16").iterdir())), where
        if expected == "restored":
            assert not (out / "d16").exists()
            clean_leftovers(out)  # what the next writer does first
            expected = "old"
        assert serving.load(out / "d16").manifest["source"] == {"export": expected}, where
        export_sizes(checkpoint, [16], out, source={"export": "again"})
        assert [p.name for p in out.iterdir()] == ["d16"], where
        assert serving.load(out / "d16").manifest["source"] == {"export": "again"}


def _good_log(directory: Path) -> Path:
    rows = "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(6) for k in range(5))
    path = directory / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + rows)
    return path


def _kill_prepare_at(step: str, monkeypatch) -> None:
    """Make prepare die at ``step``: before a pipeline stage runs, or right after a file is written."""
    import recsys.data.pipeline as pipeline

    stages = {"reading": "_read_log", "cleaning": "clean_log", "features": "build_item_features"}
    if step in stages:
        monkeypatch.setattr(pipeline, stages[step], _dies)
    elif step == "writing features":
        monkeypatch.setattr(ItemFeatures, "save", _dies_after(ItemFeatures.save))
    elif step == "writing stats":  # every file is complete; only the rename is left
        real_write = Path.write_text

        def write_text(self, *args, **kwargs):
            written = real_write(self, *args, **kwargs)
            if self.name == "stats.json":
                raise Killed("simulated kill")
            return written

        monkeypatch.setattr(Path, "write_text", write_text)
    else:  # "renaming": the temporary directory is complete and about to become the output
        import recsys.atomic as atomic

        def before_the_swap(step, path):
            if step == "written" and ".partial-" in path.name:
                raise Killed("simulated kill")

        monkeypatch.setattr(atomic, "_after_step", before_the_swap)


@pytest.mark.parametrize("step", ["reading", "cleaning", "features", "writing features", "writing stats", "renaming"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_prepare_killed_midway_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch, step, overwrite):
    """Killed at any step, prepare leaves neither its output nor a temporary directory; with
    ``--overwrite``, the previous output is still there, whole."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    log = _good_log(inputs)
    out = tmp_path / "out"
    options = dict(min_count=1, cache_dir=None)
    if overwrite:
        prepare(log, out, **options)
        before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _kill_prepare_at(step, monkeypatch)
    with pytest.raises(Killed):
        prepare(log, out, overwrite=overwrite, **options)
    monkeypatch.undo()
    if overwrite:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "out"]
        assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert load_prepared(out).num_users == 6
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


# ==========================================================================================================
# Safe loading
# ==========================================================================================================

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
PICKLE_CALLS = {"read_pickle", "to_pickle", "add_safe_globals", "safe_globals"}


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every way ``source`` could unpickle (or allow unpickling of) arbitrary objects: an import of a
    pickle module, a name from one, ``torch.load`` without ``weights_only=True``, ``np.load`` with
    ``allow_pickle=True``, pandas' ``read_pickle``, torch's safe-globals allowlist, MLflow's pickling
    model flavours. Comments and strings do not count."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Name) and node.id in PICKLE_MODULES:
            found.append(f"{where}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in PICKLE_CALLS | PICKLE_MODULES:
            found.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and ast.unparse(node) in ("mlflow.pytorch", "mlflow.sklearn"):
            found.append(f"{where}: {ast.unparse(node)} (pickles whole models)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: k.value for k in node.keywords}
            if owner == "torch":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif owner in ("np", "numpy"):
                value = keywords.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{where}: np.load with allow_pickle")
    return found


def test_the_pickle_audit_finds_what_it_looks_for():
    bad = """
        import pickle
        from cloudpickle import dumps
        import torch, numpy as np, pandas as pd
        torch.load(path)
        torch.load(path, weights_only=False)
        np.load(path, allow_pickle=True)
        pd.read_pickle(path)
        torch.serialization.add_safe_globals([Evil])
        mlflow.pytorch.log_model(model, "model")
    """
    flagged = [int(f.split(":")[1]) for f in pickle_uses(textwrap.dedent(bad))]
    assert flagged == [2, 3, 5, 6, 7, 8, 9, 10]  # every line but the harmless imports, once each
    good = """
        import torch, numpy as np
        torch.load(path, map_location="cpu", weights_only=True)
        np.load(path, allow_pickle=False)
        np.load(path)
        text = "pickle is never used"  # neither is pickle here
    """
    assert pickle_uses(textwrap.dedent(good)) == []


def test_no_pickle_on_the_data_or_model_path():
    files = sorted(p for package in ("recsys", "serving") for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 20
    found = []
    for path in files:
        with tokenize.open(path) as f:
            found += pickle_uses(f.read(), str(path.relative_to(ROOT)))
    assert found == [], "pickle on the data or model path:\n" + "\n".join(found)


class Payload:
    """Unpickling this creates ``marker``: if the file appears, code from a checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_a_pickled_object_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = write_checkpoint(tmp_path / "evil.ckpt", payload=Payload(marker))
    refused = "refused: the checkpoint holds a pickled Python object"
    with pytest.raises(CheckpointError, match=refused):
        MatryoshkaRecommender.from_checkpoint(evil)
    with pytest.raises(ExportError, match=refused):
        export_sizes(evil, [8], tmp_path / "exports")
    assert export_main(["--checkpoint", str(evil), "--out", str(tmp_path / "exports")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {evil}: {refused}")
    assert not marker.exists() and not (tmp_path / "exports").exists()
    # the same checkpoint without the object loads: the refusal is about the object, not the file
    assert list(MatryoshkaRecommender.from_checkpoint(write_checkpoint(tmp_path / "plain.ckpt")).sizes) == SIZES


@pytest.mark.parametrize("name,change", [("items.parquet", "flip"), ("index.faiss", "flip"), ("index.faiss", "delete")])
def test_a_changed_export_file_is_refused(checkpoint, tmp_path, name, change):
    (directory,) = export_sizes(checkpoint, [8], tmp_path, index="flat")  # with an index file
    file = directory / name
    if change == "delete":
        file.unlink()
        message = f"{name} is missing"
    else:
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
        message = f"{name}: checksum mismatch"
    with pytest.raises(ExportError, match=message):
        serving.load(directory)


# ==========================================================================================================
# Bad input, command by command (docs/usage.md's table is generated from these cases)
# ==========================================================================================================


@dataclass
class Resources:
    """Valid inputs built once and copied into each case's working directory."""

    checkpoint: Path
    export: Path


def build_resources(directory: Path) -> Resources:
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(directory / "model.ckpt")
    (export,) = export_sizes(checkpoint, [16], directory / "exports", index="flat")  # with an index file
    return Resources(checkpoint, export)


def _nothing(workdir: Path, resources: Resources) -> None:
    pass


def _text(name: str, content: str) -> Callable[[Path, Resources], None]:
    def write(workdir, resources):
        (workdir / name).write_text(content, encoding="utf-8")
    return write


def _all(*steps: Callable) -> Callable[[Path, Resources], None]:
    def run(workdir, resources):
        for step in steps:
            step(workdir, resources)
    return run


def _copy_checkpoint(workdir, resources):
    shutil.copy(resources.checkpoint, workdir / "model.ckpt")


def _copy_export(workdir, resources):
    shutil.copytree(resources.export, workdir / "export")


def _evil_checkpoint(workdir, resources):
    write_checkpoint(workdir / "model.ckpt", payload=Payload(workdir / "code-ran"))


def _corrupt_checkpoint(workdir, resources):
    (workdir / "model.ckpt").write_bytes(b"\x80\x04not a checkpoint at all" * 4)


def _foreign_checkpoint(workdir, resources):
    torch.save({"weights": torch.zeros(3)}, workdir / "model.ckpt")


def _flip_byte(name: str) -> Callable[[Path, Resources], None]:
    def change(workdir, resources):
        file = workdir / "export" / name
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    return change


def _delete(name: str) -> Callable[[Path, Resources], None]:
    def delete(workdir, resources):
        (workdir / "export" / name).unlink()
    return delete


def _edit_manifest(old: str, new: str) -> Callable[[Path, Resources], None]:
    def edit(workdir, resources):
        manifest = workdir / "export" / "manifest.json"
        manifest.write_text(manifest.read_text().replace(old, new, 1))
    return edit


def _link_out(name: str) -> Callable[[Path, Resources], None]:
    """The export's file replaced by a link to an identical copy outside the export."""
    def link(workdir, resources):
        shutil.move(workdir / "export" / name, workdir / name)
        (workdir / "export" / name).symlink_to(workdir / name)
    return link


def _nan_checkpoint(tensor: str) -> Callable[[Path, Resources], None]:
    """The checkpoint with one NaN in ``tensor`` (an item feature or a weight)."""
    def write(workdir, resources):
        checkpoint = torch.load(resources.checkpoint, weights_only=True)
        checkpoint["state_dict"][tensor].view(-1)[3] = float("nan")
        torch.save(checkpoint, workdir / "model.ckpt")
    return write


def _fewer_items(workdir, resources):
    """The item table cut to 5 rows, its checksum in the manifest updated to match."""
    from recsys.export_dir import sha256_of

    items = workdir / "export" / "items.parquet"
    old = sha256_of(items)
    pl.read_parquet(items).head(5).write_parquet(items)
    _edit_manifest(old, sha256_of(items))(workdir, resources)


_HELD_LOCKS = []  # open files holding a lock for as long as the tests run


def _running_job(workdir, resources):
    """A run of the job in progress: it holds the lock file of its shard in ``cands``."""
    import fcntl

    (workdir / "cands").mkdir()
    lock = open(workdir / "cands" / ".lock-00000-of-00001", "ab")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    _HELD_LOCKS.append(lock)


def _training_in(lock_file: str) -> Callable[[Path, Resources], None]:
    """A training in progress: it holds ``lock_file`` (a run directory's, or the one beside a
    checkpoint directory)."""
    def hold(workdir, resources):
        from recsys.atomic import FileLock

        (workdir / lock_file).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(workdir / lock_file)
        assert lock.acquire()
        _HELD_LOCKS.append(lock)
    return hold


def _parquet(name: str, data: dict) -> Callable[[Path, Resources], None]:
    def write(workdir, resources):
        pl.DataFrame(data).write_parquet(workdir / name)
    return write


def _mkdir(name: str, *files: str) -> Callable[[Path, Resources], None]:
    def make(workdir, resources):
        (workdir / name).mkdir()
        for f in files:
            (workdir / name / f).write_text("mine")
    return make


def _vectors(data: dict) -> Callable[[Path, Resources], None]:
    def write(workdir, resources):
        pl.DataFrame(data).write_parquet(workdir / "vectors.parquet")
    return write


LOG = "user_id,item_id,timestamp\n" + "".join(f"u{u},i{(u + k) % 6},{k}\n" for u in range(5) for k in range(4))
ITEMS = "item_id,title\n" + "".join(f"i{i},Title {i}\n" for i in range(6))
HISTORIES = "user_id,item_id,timestamp\n1,i01,5\n1,i02,6\n2,i03,1\n"


@dataclass(frozen=True)
class BadInput:
    """One bad input for one command, and the message the user must see.

    ``argv`` follows the command (files relative to the working directory, which ``setup`` fills);
    ``expect`` is a regex the one error line (without ``error: ``) or the exception message must match;
    ``may_create`` lists names a failed run may still create (caches, the MLflow store).
    """

    command: str
    case: str
    argv: tuple[str, ...]
    expect: str
    setup: Callable[[Path, Resources], None] = _nothing
    may_create: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.command}: {self.case}"


PREPARE = ("prepare", "--interactions", "log.csv", "--out", "out", "--min-count", "1", "--cache-dir", "null")
TRAIN = ("--data.synthetic.num_users", "60", "--data.synthetic.num_items", "40", "--data.synthetic_cache_dir", "syn",
         "--data.max_len", "10", "--model.sizes", "[8, 16]", "--mlflow.tracking_uri", "sqlite:///mlflow.db",
         "--trainer.enable_progress_bar", "false")
TRAIN_CREATES = ("syn", "mlflow.db")
EXPORT = ("--checkpoint", "model.ckpt", "--out", "exports")
CANDIDATES = ("--model", "export", "--input", "histories.csv", "--k", "5", "--out", "cands")
good_log, good_items = _text("log.csv", LOG), _text("items.csv", ITEMS)


# -- bad prepared data and refused resumes, for recsys.train -------------------------------------------------


def _prepared(resources: Resources) -> Path:
    """A small prepared dataset beside the other resources, prepared on first use."""
    directory = resources.checkpoint.parent / "prepared"
    if not directory.is_dir():
        files = write_synthetic(SyntheticConfig(num_users=120, num_items=60, mean_history=12, vector_dim=8, seed=1),
                                directory.parent / "prepared-raw")
        prepare(out=directory, **files.prepare_kwargs(), cache_dir=None)
    return directory


def _tampered(change: Callable[[Path], None]) -> Callable[[Path, Resources], None]:
    """A copy of the prepared dataset as ``prepared/`` in the working directory, changed by ``change``."""
    def setup(workdir, resources):
        shutil.copytree(_prepared(resources), workdir / "prepared")
        change(workdir / "prepared")
    return setup


def _feature_row_nan(d: Path) -> None:
    x = np.load(d / "features" / "dense_text.npy")
    x[5, 0] = np.nan
    np.save(d / "features" / "dense_text.npy", x)


def _feature_wider(d: Path) -> None:
    x = np.load(d / "features" / "dense_text.npy")
    np.save(d / "features" / "dense_text.npy", np.concatenate([x, x[:, :1]], axis=1))


def _interaction(column: str, row: int, value: int) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        events = pl.read_parquet(d / "interactions.parquet")
        values = events[column].to_numpy().copy()
        values[row] = value
        events.with_columns(pl.Series(column, values)).write_parquet(d / "interactions.parquet")
    return change


def _stats_says(**changes) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        (d / "stats.json").write_text(json.dumps({**json.loads((d / "stats.json").read_text()), **changes}))
    return change


def _truncated(name: str) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return change


def _checkpoint_of_other_data(workdir, resources):
    """A checkpoint whose recorded data differs from ``prepared/`` in interactions.parquet."""
    _tampered(lambda d: None)(workdir, resources)
    checkpoint = torch.load(write_checkpoint(workdir / "model.ckpt"), weights_only=True)
    files = {**load_prepared(workdir / "prepared").file_hashes, "interactions.parquet": "0" * 64}
    checkpoint["data_fingerprint"] = {"data_dir": "data/a", "files": files, "settings": {"batch_size": 128, "seed": 0, "length_batching": True}}
    torch.save(checkpoint, workdir / "model.ckpt")


TRAIN_ON = (*TRAIN, "--data.data_dir", "prepared")
histories = _all(_copy_export, _text("histories.csv", HISTORIES))

BAD_INPUTS = [
    # -- python -m recsys.data prepare -------------------------------------------------------------------
    BadInput("recsys.data prepare", "interaction log not found", PREPARE, r"^log\.csv: file not found$"),
    BadInput("recsys.data prepare", "unknown file extension", (*PREPARE[:2], "log.xlsx", *PREPARE[3:]),
             r"^log\.xlsx: unknown file extension '\.xlsx'", _text("log.xlsx", LOG)),
    BadInput("recsys.data prepare", "misnamed column (`--user-col user`)", (*PREPARE, "--user-col", "user"),
             r"^log\.csv: the interaction log has no column 'user' \(given by --user-col\); available columns: user_id, item_id, timestamp$",
             good_log),
    BadInput("recsys.data prepare", "column name with a trailing space", PREPARE,
             r"^log\.csv: .*no column 'user_id' .*available columns: 'user_id ', item_id", _text("log.csv", LOG.replace("user_id", "user_id ", 1))),
    BadInput("recsys.data prepare", "empty file", PREPARE, r"^log\.csv: the file is empty$", _text("log.csv", "")),
    BadInput("recsys.data prepare", "header only", PREPARE, r"^log\.csv: the interaction log has no rows$",
             _text("log.csv", "user_id,item_id,timestamp\n")),
    BadInput("recsys.data prepare", "empty user id", PREPARE, r"^log\.csv: user column 'user_id' is empty \(null id\) at row 2$",
             _text("log.csv", LOG.replace("\nu0,i1,1\n", "\n,i1,1\n"))),
    BadInput("recsys.data prepare", "unparsable time", PREPARE,
             r"^log\.csv: time column 'timestamp' has the value 'soon' at row 2, which is not a number$",
             _text("log.csv", LOG.replace("\nu0,i1,1\n", "\nu0,i1,soon\n"))),
    BadInput("recsys.data prepare", "header line repeated inside the file", PREPARE,
             r"^log\.csv: row 5 repeats the header line \(user_id, item_id, timestamp\)",
             _text("log.csv", LOG.replace("\nu1,i1,0\n", "\nuser_id,item_id,timestamp\nu1,i1,0\n"))),
    BadInput("recsys.data prepare", "not UTF-8 (latin-1 bytes)", PREPARE, r"^log\.csv: cannot read the file: invalid utf-8",
             lambda w, r: (w / "log.csv").write_bytes(LOG.replace("u0", "\xe9", 1).encode("latin-1"))),
    BadInput("recsys.data prepare", "repeated id in the item table", (*PREPARE, "--items", "items.csv"),
             r"^items\.csv: item id 'i2' occurs more than once in column 'item_id' \(rows 3, 7\)$",
             _all(good_log, _text("items.csv", ITEMS + "i2,Again\n"))),
    BadInput("recsys.data prepare", "vector with NaN", (*PREPARE, "--vectors", "img=vectors.parquet"),
             r"^vectors\.parquet: the vector of id 'i1' contains NaN or infinite values$",
             _all(good_log, _vectors({"item_id": ["i0", "i1"], "v": [[0.1, 0.2], [float("nan"), 0.3]]}))),
    BadInput("recsys.data prepare", "vectors of different lengths", (*PREPARE, "--vectors", "img=vectors.parquet"),
             r"^vectors\.parquet: id 'i1' \(row 2\) has a vector of length 3, the first one has 2$",
             _all(good_log, _vectors({"item_id": ["i0", "i1"], "v": [[0.1, 0.2], [0.1, 0.2, 0.3]]}))),
    BadInput("recsys.data prepare", "`--vectors` without NAME=", (*PREPARE, "--vectors", "vectors.parquet"),
             r"^--vectors: expected NAME=FILE, got 'vectors\.parquet'$", good_log),
    BadInput("recsys.data prepare", "nothing survives the k-core (`--min-count 50`)", (*PREPARE, "--min-count", "50"),
             r"^log\.csv: no events left after cleaning: no user has 50 events with items of 50\+ events$", good_log),
    BadInput("recsys.data prepare", "cold-start fraction of 1 (`--cold-start-fraction 1`)", (*PREPARE, "--cold-start-fraction", "1"),
             r"^--cold-start-fraction: must be a number in \[0, 1\), got 1\.0$", good_log),
    BadInput("recsys.data prepare", "output directory exists", PREPARE,
             r"^out: the output directory already exists; remove it or pass --overwrite$", _all(good_log, _mkdir("out", "keep.txt"))),
    BadInput("recsys.data prepare", "`--out` is the folder of the interaction log (`--out . --overwrite true`)",
             (*PREPARE[:4], ".", *PREPARE[5:], "--overwrite", "true"),
             r"^--out: \. holds the input file log\.csv \(given by --interactions\); writing the output there would delete it; choose another directory$",
             good_log),
    BadInput("recsys.data prepare", "`--out` is the item table (`--out items.csv --overwrite true`)",
             (*PREPARE[:4], "items.csv", *PREPARE[5:], "--items", "items.csv", "--overwrite", "true"),
             r"^--out: items\.csv is the input file given by --items; writing the output there would delete it; choose another directory$",
             _all(good_log, good_items)),
    BadInput("recsys.data prepare", "times that 64-bit floats cannot tell apart (10^25 + 2, 10^25 + 1)", PREPARE,
             r"^log\.csv: time column 'timestamp' has the values '10000000000000000000000002' \(row 2\) and '10000000000000000000000001' \(row 3\), "
             r"which differ but read as the same 64-bit float, so their order would be lost; give times with fewer digits$",
             _text("log.csv", LOG.replace("\nu0,i1,1\n", "\nu0,i1,10000000000000000000000002\n")
                               .replace("\nu0,i2,2\n", "\nu0,i2,10000000000000000000000001\n"))),
    BadInput("recsys.data prepare", "vector value beyond float32 (1e39)", (*PREPARE, "--vectors", "img=vectors.parquet"),
             r"^vectors\.parquet: the vector of id 'i1' \(row 2\) holds 1e\+39, beyond the float32 range \(±3\.403e\+38\) that training reads; it would become infinite$",
             _all(good_log, _vectors({"item_id": ["i0", "i1"], "v": [[0.1, 0.2], [1e39, 0.3]]}))),
    BadInput("recsys.data prepare", "npz vectors of width 0", (*PREPARE, "--vectors", "img=vectors.npz"),
             r"^vectors\.npz: 'vectors' has shape \(2, 0\): every vector is empty \(width 0\)$",
             _all(good_log, lambda w, r: np.savez(w / "vectors.npz", ids=np.array(["i0", "i1"]), vectors=np.zeros((2, 0))))),
    BadInput("recsys.data prepare", "complex npz vectors", (*PREPARE, "--vectors", "img=vectors.npz"),
             r"^vectors\.npz: 'vectors' has dtype complex128; expected real numbers \(the imaginary parts would be lost\)$",
             _all(good_log, lambda w, r: np.savez(w / "vectors.npz", ids=np.array(["i0", "i1"]), vectors=np.ones((2, 2)) * (1 + 2j)))),
    BadInput("recsys.data prepare", "negative weight (`--weight-col weight`)", (*PREPARE, "--weight-col", "weight"),
             r"^log\.csv: weight column 'weight' has the value '-5' at row 2; weights must be finite and 0 or more$",
             _text("log.csv", "".join(line + (",weight" if n == 0 else ",-5" if n == 2 else ",1") + "\n"
                                      for n, line in enumerate(LOG.splitlines())))),
    BadInput("recsys.data prepare", "a row with a field too many", PREPARE,
             r"^log\.csv: cannot read the file: 4 fields where the header has 3, at line 6 \(data row 5\)$",
             _text("log.csv", LOG.replace("\nu1,i1,0\n", "\nu1,i1,0,x\n"))),
    BadInput("recsys.data prepare", "a quote never closed", PREPARE,
             r"^log\.csv: cannot read the file: a quote character at line 6 \(data row 5\) opens a field that is never closed$",
             _text("log.csv", LOG.replace("\nu1,i1,0\n", '\nu1,"i1,0\n'))),
    # -- python -m recsys.train -----------------------------------------------------------------------------
    BadInput("recsys.train", "sizes not increasing (`--model.sizes [32, 16]`)", (*TRAIN, "--model.sizes", "[32, 16]"),
             r"^--model\.sizes: sizes must be strictly increasing"),
    BadInput("recsys.train", "unknown encoder (`--model.encoder gru`)", (*TRAIN, "--model.encoder", "gru"),
             r"^--model\.encoder: unknown encoder 'gru'; choose one of lru, mamba, sasrec$"),
    BadInput("recsys.train", "negative distillation weight (`--model.distill -1`)", (*TRAIN, "--model.distill", "-1"),
             r"^--model\.distill must be a finite non-negative number, got -1\.0$"),
    BadInput("recsys.train", "averaged teacher's decay out of range (`--model.teacher_decay 1`)",
             (*TRAIN, "--model.distill", "0.5", "--model.distill_teacher", "average", "--model.teacher_decay", "1"),
             r"^--model\.teacher_decay must be a number in \(0, 1\), got 1(\.0)?$"),
    BadInput("recsys.train", "averaged teacher with sharded tables (`--model.distill_teacher average --trainer.strategy sharded`)",
             (*TRAIN, "--model.distill", "0.5", "--model.distill_teacher", "average", "--trainer.strategy", "sharded"),
             r"^--model\.distill_teacher average is not supported with --trainer\.strategy sharded "
             r"\(the averaged copy of the sharded item tables is not built\)$"),
    BadInput("recsys.train", "sliced nesting with sharded tables (`--model.nesting slices --trainer.strategy sharded`)",
             (*TRAIN, "--model.nesting", "slices", "--trainer.strategy", "sharded"),
             r"^--model\.nesting slices is not supported with --trainer\.strategy sharded "
             r"\(the slices of sharded item tables are not built\); use --model\.nesting blocks$"),
    BadInput("recsys.train", "ID dropout without ID embeddings (`--model.id_dropout 0.5`)", (*TRAIN, "--model.id_dropout", "0.5"),
             r"^--model\.id_dropout 0\.5 drops item-ID vectors, but --model\.use_id_embedding is false$"),
    BadInput("recsys.train", "learned temperature with distillation (`--model.learned_temperature true --model.distill 0.5`)",
             (*TRAIN, "--model.learned_temperature", "true", "--model.distill", "0.5"),
             r"^--model\.learned_temperature and --model\.distill do not combine: the distillation's teacher is unscaled$"),
    BadInput("recsys.train", "prefix gradient with tied item vectors in blocks (`--model.nesting blocks --model.prefix_gradient 0`)",
             (*TRAIN, "--model.nesting", "blocks", "--model.prefix_gradient", "0"),
             r"^--model\.prefix_gradient below 1 needs --model\.separate_item_vectors true or 'all': with tied item vectors"),
    BadInput("recsys.train", "free output item norms with tied item vectors (`--model.output_item_norm false`)",
             (*TRAIN, "--model.output_item_norm", "false"),
             r"^--model\.output_item_norm false needs --model\.separate_item_vectors true or 'all': tied item vectors"),
    BadInput("recsys.train", "output biases with tied item vectors (`--model.output_bias true`)",
             (*TRAIN, "--model.output_bias", "true"),
             r"^--model\.output_bias true needs --model\.separate_item_vectors 'all': each size's bias is a column"),
    BadInput("recsys.train", "weight averaging over the buffers (`--trainer.callbacks+=EMAWeightAveraging`)",
             (*TRAIN, "--trainer.callbacks+=EMAWeightAveraging"),
             r"^--trainer\.callbacks EMAWeightAveraging: set --trainer\.callbacks\.use_buffers false; the model's buffers"),
    BadInput("recsys.train", "unknown LRU feed-forward layer (`--model.lru.ffn relu`)", (*TRAIN, "--model.lru.ffn", "relu"),
             r"^--model\.lru\.ffn: unknown feed-forward layer 'relu'; choose one of gated, gelu$"),
    BadInput("recsys.train", "sliced nesting with another encoder (`--model.nesting slices --model.encoder mamba`)",
             (*TRAIN, "--model.nesting", "slices", "--model.encoder", "mamba"),
             r"^--model\.nesting 'slices' is built for the lru encoder, not 'mamba'$"),
    BadInput("recsys.train", "no negatives for the sampled loss (`--model.negatives 0`)",
             (*TRAIN, "--model.loss", "sampled", "--model.negatives", "0"),
             r"^--model\.negatives must be a positive integer, got 0$"),
    BadInput("recsys.train", "negative learning rate (`--model.lr -0.001`)", (*TRAIN, "--model.lr", "-0.001"),
             r"^--model\.lr must be a finite positive number, got -0\.001$"),
    BadInput("recsys.train", "dropout above 1 (`--model.dropout 1.5`)", (*TRAIN, "--model.dropout", "1.5"),
             r"^--model\.dropout must be a probability in \[0, 1\), got 1\.5$"),
    BadInput("recsys.train", "no encoder blocks (`--model.n_blocks 0`)", (*TRAIN, "--model.n_blocks", "0"),
             r"^--model\.n_blocks must be a positive integer, got 0$"),
    BadInput("recsys.train", "`--run_dir` in use by another training", (*TRAIN, "--tracking", "csv", "--run_dir", "run"),
             r"^--run_dir run: another training \(pid \d+\) is writing there; wait for it to end or use another --run_dir$",
             _training_in("run/.training.lock"), TRAIN_CREATES),
    BadInput("recsys.train", "`--checkpoint.dirpath` in use by another training", (*TRAIN, "--checkpoint.dirpath", "ckpt"),
             r"^--checkpoint\.dirpath ckpt: another training \(pid \d+\) is writing there; wait for it to end or use another --checkpoint\.dirpath$",
             _training_in(".ckpt.lock"), TRAIN_CREATES),
    BadInput("recsys.train", "`--run_dir` inside a file", (*TRAIN, "--tracking", "csv", "--run_dir", "notes.txt/run"),
             r"^--run_dir notes\.txt/run: notes\.txt is a file, not a directory$", _text("notes.txt", "mine"), TRAIN_CREATES),
    BadInput("recsys.train", "no epochs to train (`--trainer.max_epochs 0`)", (*TRAIN, "--trainer.max_epochs", "0"),
             r"^--trainer\.max_epochs 0: trains nothing; give at least 1 \(or -1: until early stopping ends the run\)$"),
    BadInput("recsys.train", "wrong type (`--trainer.max_epochs ten`)", (*TRAIN, "--trainer.max_epochs", "ten"),
             r"^Parser key \"trainer\.max_epochs\": .*Expected a <class 'int'>.* Given value: ten$"),
    BadInput("recsys.train", "`--data.data_dir` missing", (*TRAIN, "--data.data_dir", "data/mine"),
             r"^--data\.data_dir data/mine: no such directory; prepare one with `python -m recsys\.data prepare"),
    BadInput("recsys.train", "`--data.data_dir` not a prepared dataset", (*TRAIN, "--data.data_dir", "raw"),
             r"^raw: not a prepared dataset: interactions\.parquet is missing$", _mkdir("raw", "events.csv")),
    BadInput("recsys.train", "`--ckpt_path` missing", (*TRAIN, "--ckpt_path", "last.ckpt"),
             r"^--ckpt_path last\.ckpt: no such checkpoint file$"),
    BadInput("recsys.train", "`--ckpt_path` holds a pickled object", (*TRAIN, "--ckpt_path", "model.ckpt"),
             r"^model\.ckpt: refused: the checkpoint holds a pickled Python object \(Unsupported global: GLOBAL .*\), and "
             r"unpickling it could run code", _evil_checkpoint, TRAIN_CREATES),
    BadInput("recsys.train", "`--ckpt_path` is not a checkpoint", (*TRAIN, "--ckpt_path", "model.ckpt"),
             r"^model\.ckpt: not a readable checkpoint", _corrupt_checkpoint, TRAIN_CREATES),
    BadInput("recsys.train", "MLflow server does not answer", (*TRAIN, "--mlflow.tracking_uri", "http://127.0.0.1:9"),
             r"^the MLflow tracking server http://127\.0\.0\.1:9 does not answer \(.*\); start it, fix --mlflow\.tracking_uri",
             _nothing, TRAIN_CREATES),
    BadInput("recsys.train", "MLflow store that is not a database", (*TRAIN, "--mlflow.tracking_uri", "sqlite:///store.db"),
             r"^the MLflow store sqlite:///store\.db cannot be used \(file is not a database\); fix it, or give another "
             r"--mlflow\.tracking_uri$", _text("store.db", "my notes, not a database\n"), (*TRAIN_CREATES, "store.db.lock")),
    # -- python -m recsys.train: bad prepared data, settings and resumes (issue 18) --------------------------
    BadInput("recsys.train", "`--data.max_len 0`", (*TRAIN, "--data.max_len", "0"), r"^--data\.max_len must be an integer of at least 1, got 0$"),
    BadInput("recsys.train", "`--data.synthetic.num_users 0`", (*TRAIN, "--data.synthetic.num_users", "0"),
             r"^SyntheticConfig\.num_users must be at least 1, got 0$"),
    BadInput("recsys.train", "NaN in a prepared feature file", TRAIN_ON,
             r"^prepared/features/dense_text\.npy: the row of item 5 \(id \d+\) holds NaN or infinite values \(1 of \d+ rows do\)$",
             _tampered(_feature_row_nan)),
    BadInput("recsys.train", "feature matrix of the wrong width", TRAIN_ON,
             r"^prepared/features/dense_text\.npy: has width 9, but stats\.json says the feature 'text' has dim 8$", _tampered(_feature_wider)),
    BadInput("recsys.train", "wrong user count in `stats.json`", TRAIN_ON,
             r"^prepared/stats\.json: says users = 999, but users\.parquet has \d+ rows; prepare the dataset again$",
             _tampered(_stats_says(users=999))),
    BadInput("recsys.train", "user index out of range", TRAIN_ON,
             r"^prepared/interactions\.parquet: user index 100000 at row 11 is outside 1\.\.\d+: users\.parquet has \d+ users",
             _tampered(_interaction("user", 10, 100_000))),
    BadInput("recsys.train", "item index 0 (padding) in the interactions", TRAIN_ON,
             r"^prepared/interactions\.parquet: item index 0 at row 4 is outside 1\.\.\d+ \(0 is the padding index\)",
             _tampered(_interaction("item", 3, 0))),
    BadInput("recsys.train", "truncated `interactions.parquet`", TRAIN_ON,
             r"^prepared/interactions\.parquet: cannot read the file \(.*\); it may be truncated: prepare the dataset again$",
             _tampered(_truncated("interactions.parquet"))),
    BadInput("recsys.train", "missing feature file", TRAIN_ON,
             r"^prepared/features/dense_text\.npy: is missing \(listed in features/features\.json\); prepare the dataset again$",
             _tampered(lambda d: (d / "features" / "dense_text.npy").unlink())),
    BadInput("recsys.train", "`--ckpt_path` trained on other data", (*TRAIN_ON, "--ckpt_path", "model.ckpt"),
             r"^--ckpt_path model\.ckpt: cannot resume from it: it was trained on data/a, and --data\.data_dir prepared differs "
             r"from it in interactions\.parquet\. Resume with the data and settings it was trained with, or start a new run",
             _checkpoint_of_other_data),
    BadInput("recsys.train", "`--ckpt_path` trained with other settings", (*TRAIN, "--ckpt_path", "model.ckpt", "--model.lr", "0.01"),
             r"^--ckpt_path model\.ckpt: cannot resume from it: --model\.lr was 0\.001, now 0\.01\. Resume with", _copy_checkpoint,
             TRAIN_CREATES),
    BadInput("recsys.train", "`--ckpt_path` of another catalogue (no data fingerprint)", (*TRAIN, "--ckpt_path", "model.ckpt"),
             r"^--ckpt_path model\.ckpt: cannot resume from it: its weight net\.items\.dense_mask_text has shape \(21,\), this model's \(41,\)",
             _copy_checkpoint, TRAIN_CREATES),
    BadInput("recsys.data synthetic", "`--num-users 0`", ("synthetic", "--out", "raw", "--num-users", "0"),
             r"^SyntheticConfig\.num_users must be at least 1, got 0$"),
    # -- python -m recsys.export ---------------------------------------------------------------------------
    BadInput("recsys.export", "no source given", ("--out", "exports"),
             r"^give exactly one of --checkpoint, --run-id or --model-uri$"),
    BadInput("recsys.export", "checkpoint not found", EXPORT, r"^model\.ckpt: no such checkpoint file$"),
    BadInput("recsys.export", "size the model does not have (`--dims 12`)", (*EXPORT, "--dims", "12"),
             r"^size\(s\) \[12\] are not sizes of this model; valid sizes: \[8, 16\]$", _copy_checkpoint),
    BadInput("recsys.export", "`--dims 8,x`", (*EXPORT, "--dims", "8,x"), r"^--dims must be comma-separated integers, got '8,x'$",
             _copy_checkpoint),
    BadInput("recsys.export", "unknown index (`--index annoy`)", (*EXPORT, "--index", "annoy"),
             r"^index kind must be one of \['flat', 'ivf_flat', 'hnsw', 'ivf_pq'\], got 'annoy'$", _copy_checkpoint),
    BadInput("recsys.export", "checkpoint holds a pickled object", EXPORT,
             r"^model\.ckpt: refused: the checkpoint holds a pickled Python object", _evil_checkpoint),
    BadInput("recsys.export", "file is not a checkpoint", EXPORT, r"^model\.ckpt: not a readable checkpoint", _corrupt_checkpoint),
    BadInput("recsys.export", "checkpoint of something else", EXPORT,
             r"^model\.ckpt: not a checkpoint of this project \(no state_dict and hyper_parameters\)$", _foreign_checkpoint),
    # -- serving.load(DIR) ----------------------------------------------------------------------------------
    BadInput("recsys.export", "checkpoint with a NaN item feature", EXPORT,
             r"^model\.ckpt: net\.items\.dense_text holds NaN or infinite values; an export of it could not be loaded, "
             r"so none was written$",
             _nan_checkpoint("net.items.dense_text")),
    BadInput("serving.load", "manifest edited: `sizes` [8, 16] to [16]", ("export",),
             r"^export/manifest\.json: 'sizes' is \[16\], but model\.safetensors was exported with \[8, 16\]; "
             r"the manifest was changed after export$",
             _all(_copy_export, _edit_manifest('"sizes": [\n    8,\n    16\n  ]', '"sizes": [16]'))),
    BadInput("serving.load", "manifest edited: `format_version` 1.0", ("export",),
             r"^export/manifest\.json: export format 1\.0, this code reads 1$",
             _all(_copy_export, _edit_manifest('"format_version": 1', '"format_version": 1.0'))),
    BadInput("serving.load", "manifest with 10^5 nested brackets", ("export",),
             r"^export/manifest\.json: the manifest nests brackets more than 32 deep$",
             _all(_copy_export, _edit_manifest('"data_stats": {}', '"data_stats": ' + "[" * 10**5 + "]" * 10**5))),
    BadInput("serving.load", "manifest with a 5000-digit integer", ("export",),
             r"^export/manifest\.json: the manifest holds an integer of 5000 digits; at most 20 are allowed$",
             _all(_copy_export, _edit_manifest('"data_stats": {}', '"data_stats": ' + "1" * 5000))),
    BadInput("serving.load", "manifest asks for 10^7 encoder blocks (`n_blocks`)", ("export",),
             r"^export/manifest\.json: 'encoder_options\.n_blocks' is 10000000; an export may ask for at most 1024$",
             _all(_copy_export, _edit_manifest('"n_blocks": 2', '"n_blocks": 10000000'))),
    BadInput("serving.load", "directory not found", ("export",), r"^export: no such export directory$"),
    BadInput("serving.load", "not an export directory", ("export",), r"^export: not an export directory \(no manifest\.json\)",
             _mkdir("export", "model.ckpt")),
    BadInput("serving.load", "weights changed after export", ("export",),
             r"^export/model\.safetensors: checksum mismatch: the file was changed or corrupted after export$",
             _all(_copy_export, _flip_byte("model.safetensors"))),
    BadInput("serving.load", "item table changed after export", ("export",), r"^export/items\.parquet: checksum mismatch",
             _all(_copy_export, _flip_byte("items.parquet"))),
    BadInput("serving.load", "index file deleted", ("export",), r"^export: index\.faiss is missing \(listed in the manifest\)$",
             _all(_copy_export, _delete("index.faiss"))),
    BadInput("serving.load", "manifest is not JSON", ("export",), r"^export/manifest\.json: manifest is not valid JSON",
             _all(_copy_export, _edit_manifest("{", "{{"))),
    BadInput("serving.load", "export of another format version", ("export",),
             r"^export/manifest\.json: export format 2, this code reads 1$",
             _all(_copy_export, _edit_manifest('"format_version": 1', '"format_version": 2'))),
    # -- python -m serving.candidates -------------------------------------------------------------------------
    BadInput("serving.candidates", "export directory not found", CANDIDATES, r"^export: no such export directory$",
             _text("histories.csv", HISTORIES)),
    BadInput("serving.candidates", "export changed after export", CANDIDATES, r"^export/items\.parquet: checksum mismatch",
             _all(histories, _flip_byte("items.parquet"))),
    BadInput("serving.candidates", "missing user column (`--user-col who`)", (*CANDIDATES, "--user-col", "who"),
             r"^histories\.csv: the interaction log has no column 'who' \(given by --user-col\); available columns: user_id, item_id, timestamp$", histories),
    BadInput("serving.candidates", "empty input file", CANDIDATES, r"^histories\.csv: the file is empty$",
             _all(_copy_export, _text("histories.csv", ""))),
    BadInput("serving.candidates", "empty user id", CANDIDATES, r"^histories\.csv: .*null id\) at row 2",
             _all(_copy_export, _text("histories.csv", HISTORIES.replace("\n1,i02", "\n,i02")))),
    BadInput("serving.candidates", "unparsable time", CANDIDATES, r"^histories\.csv: .*'yesterday' at row 3",
             _all(_copy_export, _text("histories.csv", HISTORIES.replace("2,i03,1", "2,i03,yesterday")))),
    BadInput("serving.candidates", "`--k` above the catalogue size", (*CANDIDATES[:4], "--k", "500", *CANDIDATES[6:]),
             r"k=500 exceeds the catalogue", histories),
    BadInput("serving.candidates", "bad `--shard 3/2`", (*CANDIDATES, "--shard", "3/2"),
             r"^--shard must be i/n with 0 <= i < n, e\.g\. 0/4; got '3/2'$", histories),
    BadInput("serving.candidates", "output directory holds other files", CANDIDATES, r"notes\.txt",
             _all(histories, _mkdir("cands", "notes.txt"))),
    # -- python -m recsys.register ----------------------------------------------------------------------------
    BadInput("recsys.register", "not a size (`--size big`)", ("--run-id", "0123abcd", "--size", "big", "--name", "shop"),
             r"^--size 'big': give a size such as 64 or d64"),
    BadInput("recsys.register", "store file missing (`--tracking-uri sqlite:///elsewhere.db`)",
             ("--run-id", "0123abcd", "--size", "64", "--name", "shop", "--tracking-uri", "sqlite:///elsewhere.db"),
             r"^the MLflow store sqlite:///elsewhere\.db: elsewhere\.db: no such file"),
    BadInput("recsys.register", "bad model name (`--name 'my recs'`)", ("--run-id", "0123abcd", "--size", "64", "--name", "my recs"),
             r"^--name 'my recs': a model name here holds letters, digits"),
    # -- python -m serving.ray_serve -------------------------------------------------------------------------
    BadInput("serving.ray_serve", "no replicas (`--replicas 0`)", ("--model", "export", "--replicas", "0"),
             r"^--replicas must be a positive integer, got '0'$"),
    BadInput("serving.ray_serve", "export directory not found", ("--model", "nothing"), r"^nothing: no such export directory$"),
    # -- export, loading and batch candidates: places that cannot be written, tampered exports, a second run --
    BadInput("recsys.export", "`--out` is a file", EXPORT, r"^--out exports is a file, not a directory$",
             _all(_copy_checkpoint, _text("exports", "x"))),
    BadInput("recsys.export", "`--out` inside a file", (*EXPORT[:3], "exports/new"),
             r"^--out exports/new: exports is a file, not a directory$", _all(_copy_checkpoint, _text("exports", "x"))),
    BadInput("recsys.export", "catalogue too small for the index (`--index ivf_pq`)", (*EXPORT, "--dims", "8", "--index", "ivf_pq"),
             r"^size 8: cannot build the retriever .*needs at least 256 items to train its codebooks, got 20", _copy_checkpoint),
    BadInput("serving.load", "weights changed and their checksum entry removed", ("export",),
             r"^export/manifest\.json: 'checksums' does not list model\.safetensors; every file the loader reads must be listed$",
             _all(_copy_export, _flip_byte("model.safetensors"), _edit_manifest('"model.safetensors": "', '"dropped": "'))),
    BadInput("serving.load", "checksum entry outside the export (`../`)", ("export",),
             r"^export/manifest\.json: the checksum entry '\.\./model\.ckpt' is not the name of a file inside the export$",
             _all(_copy_export, _edit_manifest('"checksums": {', '"checksums": {"../model.ckpt": "' + "0" * 64 + '", '))),
    BadInput("serving.load", "a file is a link out of the export", ("export",),
             r"^export: items\.parquet is a symbolic link; an export holds plain files only$", _all(_copy_export, _link_out("items.parquet"))),
    BadInput("serving.load", "a file the manifest does not list", ("export",),
             r"^export: notes\.txt is not listed in the manifest's checksums; an export holds only the files its manifest lists$",
             _all(_copy_export, _text("export/notes.txt", "mine"))),
    BadInput("serving.load", "manifest edited: size as text", ("export",),
             r"^export/manifest\.json: 'size' must be a positive integer, got '16'$",
             _all(_copy_export, _edit_manifest('"size": 16', '"size": "16"'))),
    BadInput("serving.load", "item table edited, its checksum too", ("export",),
             r"^export/items\.parquet: the item table has 5 rows, the manifest says num_items 20$", _all(_copy_export, _fewer_items)),
    BadInput("serving.candidates", "`--out` is a file", CANDIDATES, r"^--out cands is a file, not a directory$",
             _all(histories, _text("cands", "x"))),
    BadInput("serving.candidates", "another run is writing into `--out`", CANDIDATES,
             r"^--out cands: another run is writing there \(it holds \.lock-00000-of-00001\); wait for it to end or use another --out$",
             _all(histories, _running_job)),
    BadInput("serving.candidates", "unknown device (`--device tpu`)", (*CANDIDATES, "--device", "tpu"),
             r"^--device must be auto, cpu or cuda\[:N\], got 'tpu'$", histories),
    BadInput("serving.candidates", "history column of lists of lists",
             ("--model", "export", "--input", "histories.parquet", "--k", "5", "--out", "cands", "--history-col", "history"),
             r"^histories\.parquet: history column 'history' has type List\(List\(String\)\); it must be a list of item ids",
             _all(_copy_export, _parquet("histories.parquet", {"user_id": [1], "history": [[["i01"], ["i02"]]]}))),
]


@dataclass
class Outcome:
    status: int | str  # exit status of a command, or the exception type of serving.load
    message: str  # the error line without "error: ", or the exception's message
    stderr: str = ""
    error_lines: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)  # paths the run created, beyond ``may_create``
    removed: set[str] = field(default_factory=set)  # paths the run deleted


def command_label(command: str) -> str:
    """How the README names a command."""
    return "serving.load(DIR)" if command == "serving.load" else f"python -m {command}"


def _mains() -> dict[str, Callable[[list[str]], int]]:
    from recsys.data.__main__ import main as data_main
    from recsys.train import main as train_main
    from serving.candidates import main as candidates_main
    from recsys.export import main as export_main
    from recsys.register import main as register_main
    from serving.ray_serve import main as ray_serve_main

    return {"recsys.data prepare": data_main, "recsys.data synthetic": data_main, "recsys.train": train_main, "recsys.export": export_main,
            "serving.candidates": candidates_main, "recsys.register": register_main, "serving.ray_serve": ray_serve_main}


def _tree(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")}


def run_bad_input(case: BadInput, workdir: Path, resources: Resources) -> Outcome:
    """Run one case with ``workdir`` as the current directory (so messages name files as typed)."""
    root = logging.getLogger()
    previous, handlers, level = Path.cwd(), list(root.handlers), root.level
    os.chdir(workdir)
    stderr = io.StringIO()
    try:
        case.setup(workdir, resources)
        before = _tree(workdir)
        root.handlers = [logging.StreamHandler(stderr)]  # log lines go where a terminal would show them
        with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
            if case.command == "serving.load":
                try:
                    serving.load(*case.argv)
                    status, message = 0, ""
                except Exception as exc:  # the test checks which type
                    status, message = type(exc).__name__, str(exc)
            else:
                try:
                    status = _mains()[case.command](list(case.argv))
                except SystemExit as exc:  # the argument parser's own errors
                    status = exc.code
    finally:
        os.chdir(previous)
        root.handlers = handlers  # whatever the command configured (basicConfig(force=True)) wrote to our buffer
        root.setLevel(level)
    after = _tree(workdir)
    written = {p for p in after - before if p.split("/")[0] not in case.may_create}
    text = stderr.getvalue().splitlines()
    lines = [line for line in text if line.startswith("error: ")]
    if case.command != "serving.load" and lines:
        # the argument parser indents the details of its error on the lines that follow
        start = text.index(lines[0])
        details = [line.strip() for line in itertools.takewhile(lambda line: line[:1].isspace(), text[start + 1:])]
        message = " ".join([lines[0][len("error: "):], *details]).strip()
    elif case.command != "serving.load":
        message = ""
    return Outcome(status, message, stderr.getvalue(), lines, written, before - after)


@pytest.fixture(scope="module")
def resources(tmp_path_factory) -> Resources:
    return build_resources(tmp_path_factory.mktemp("resources"))


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_bad_input_gives_one_clear_error_and_writes_nothing(case, resources, tmp_path):
    outcome = run_bad_input(case, tmp_path, resources)
    if case.command == "serving.load":
        assert outcome.status == "ExportError", outcome.message
    else:
        assert outcome.status == 2, outcome.stderr[-3000:]
        assert len(outcome.error_lines) == 1, outcome.stderr[-3000:]
        assert "Traceback" not in outcome.stderr
    assert re.search(case.expect, outcome.message), f"{outcome.message!r} does not match {case.expect!r}"
    assert outcome.written == set() and outcome.removed == set(), f"wrote {sorted(outcome.written)}, removed {sorted(outcome.removed)}"
    assert not (tmp_path / "code-ran").exists()


def readme_table_rows() -> list[tuple[str, str, str]]:
    """(command, case, message) of each row between the README's markers."""
    text = TABLE_PAGE.read_text(encoding="utf-8")
    assert TABLE_START in text and TABLE_END in text, "docs/usage.md has no bad-input table markers"
    body = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    rows = []
    for line in body.strip().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3 and not set(cells[0]) <= set("-: "):
            command, case, message = cells
            if command != "Command":
                rows.append((command, case, message))
    return rows


def table_cell_text(cell: str) -> str:
    """The text inside a table cell's ``\u0060\u0060 code \u0060\u0060`` span, unescaped."""
    text = cell.strip()
    if text.startswith("``") and text.endswith("``"):
        text = text[2:-2].strip()
    return text.replace("\\|", "|")


def test_readme_table_is_generated_from_these_cases():
    """Regenerate with ``python tools/bad_input_table.py`` when a case or a message changes."""
    rows = readme_table_rows()
    stale = "the bad-input table of docs/usage.md is out of date: run python tools/bad_input_table.py"
    assert len(rows) == len(BAD_INPUTS), stale
    for case, (command, description, message) in zip(BAD_INPUTS, rows):
        assert (command, description) == (f"`{command_label(case.command)}`", case.case), stale
        prefix = "ExportError: " if case.command == "serving.load" else "error: "
        shown = table_cell_text(message)
        assert shown.startswith(prefix), stale
        assert re.search(case.expect, shown[len(prefix):]), f"README row {description!r}: {shown!r} does not match {case.expect!r}"
