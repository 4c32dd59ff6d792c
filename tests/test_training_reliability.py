"""`python -m recsys.train` under kills, a full disk, a second training and SIGTERM / Ctrl-C.

Every signal here is a real one, sent at a named system call with ``strace -e inject`` (as in
``tests/test_atomic.py``); the full disk is a real write failure (a file-size limit: ``EFBIG``), or
an ``ENOSPC`` that strace makes the system return.

- checkpoints are written beside their final name and renamed in place: a SIGKILL armed at any write
  into ``last.ckpt`` itself never fires, even with the run directory on another file system than the
  temporary directory (before: a copy into ``last.ckpt``, which the kill left empty); a kill at the
  rename keeps the previous checkpoint, and the next save removes the leftover;
- a checkpoint that cannot be written is one ``error:`` line, and the previous checkpoints stay;
- a second training into a run directory in use is refused in one line naming it and the first's pid;
- SIGTERM saves ``last.ckpt`` and exits 143 with the line saying how to resume; Ctrl-C exits 130 with
  one line; resuming either way logs every step exactly once, as an uninterrupted run does.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from recsys.atomic import FileLock
from recsys.train import main
from recsys.training_runs import DirectoryBusy, lock_checkpoint_directory

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--data.synthetic.num_users", "60", "--data.synthetic.num_items", "40", "--data.max_len", "10",
        "--model.sizes", "[8, 16]", "--data.batch_size", "8", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1", "--tracking", "csv"]
# 6 steps an epoch, a validation every 2 steps, and each validation's checkpoint kept as step=N.ckpt
# beside last.ckpt (one monitored size: no best-d<size>.ckpt between them): renames 1 and 2 are config.yaml and
# run.json, then step=2.ckpt, last.ckpt, step=4.ckpt, ...
STOPPABLE = ["--trainer.max_epochs", "2", "--trainer.val_check_interval", "2", "--checkpoint.save_top_k", "-1",
             "--checkpoint.filename", "{step}", "--model.monitor_size", "16"]
RENAMES = "rename,renameat,renameat2"


def _strace_works() -> bool:
    if shutil.which("strace") is None or not sys.platform.startswith("linux"):
        return False
    return subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


needs_strace = pytest.mark.skipif(not _strace_works(), reason="needs strace (and ptrace permission)")


def _strace(calls: str, action: str, when: int = 1, path: Path | None = None) -> list[str]:
    """The strace prefix that does ``action`` (signal=..., error=...) on the ``when``-th of ``calls``
    (of those on ``path``, with ``path``: by its name or an open file of it)."""
    only = ["-P", str(path)] if path is not None else []
    return ["strace", "-f", "-qq", "-o", "/dev/null", *only, "-e", f"trace={calls}", "-e", f"inject={calls}:{action}:when={when}"]


def _env(**extra: str) -> dict[str, str]:
    """This environment, with this checkout first on the Python path."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _train(cwd: Path, *args: str, prefix: tuple[str, ...] | list[str] = (), env: dict | None = None,
           limit_file_size: int | None = None):
    """``python -m recsys.train ARGS`` in ``cwd`` (under ``prefix``: strace), its CompletedProcess."""
    env = _env(**(env or {}))

    def limit():
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    command = [*prefix, sys.executable, "-m", "recsys.train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _steps(run_dir: Path) -> dict[str, list[int]]:
    """The steps at which each metric of ``metrics.csv`` was logged, in the order of the file."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return {name: metrics.dropna(subset=[name])["step"].astype(int).tolist() for name in metrics.columns if name not in ("step", "epoch")}


def _losses(run_dir: Path) -> list[float]:
    return pd.read_csv(run_dir / "metrics.csv").dropna(subset=["train/loss"])["train/loss"].tolist()


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The synthetic log's prepared cache, shared by every run here."""
    return tmp_path_factory.mktemp("synthetic")


def _trained(run_dir: Path, cache: Path) -> Path:
    """``run_dir`` trained for one epoch (best.ckpt and last.ckpt), in this process. Where it is
    resumed: Lightning names the checkpoints of a copied run directory otherwise (last-v1.ckpt)."""
    assert main([*TINY, "--data.synthetic_cache_dir", str(cache), "--trainer.max_epochs", "1", "--run_dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> Path:
    """The run directory of a run of the STOPPABLE settings that nothing stops."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main([*TINY, *STOPPABLE, "--data.synthetic_cache_dir", str(cache), "--run_dir", str(run_dir)]) == 0
    return run_dir


#: where Linux systems mount a tmpfs for everyone to write in (POSIX shared memory)
SHARED_MEMORY = ("/dev/shm", "/run/shm")


@pytest.fixture
def other_file_system(tmp_path):
    """A directory on a tmpfs, another file system than ``tmp_path``'s."""
    for mount in SHARED_MEMORY:
        if os.path.isdir(mount) and os.access(mount, os.W_OK) and os.stat(mount).st_dev != os.stat(tmp_path).st_dev:
            directory = Path(tempfile.mkdtemp(dir=mount))
            yield directory
            shutil.rmtree(directory, ignore_errors=True)
            return
    pytest.skip("no shared-memory tmpfs apart from the temporary directory's file system")


# -- 1. checkpoints are written whole, on any file system ------------------------------------------------------


@needs_strace
def test_last_ckpt_is_never_written_in_place_even_on_another_file_system(cache, tmp_path, other_file_system):
    """The run directory on a tmpfs, the temporary directory elsewhere. A SIGKILL is armed at every
    system call that writes into ``last.ckpt`` itself (by its name or an open file of it). Before,
    Lightning wrote the checkpoint in the temporary directory and, its rename failing across file
    systems, copied it into ``last.ckpt``: the kill left ``last.ckpt`` empty and the good one gone.
    Now the checkpoint is written under a hidden name beside it and renamed: the kill never fires."""
    run_dir = _trained(other_file_system / "run", cache)
    last = run_dir / "checkpoints" / "last.ckpt"
    writes = "write,pwrite64,writev,pwritev,pwritev2,sendfile,copy_file_range,splice,ftruncate,fallocate"
    done = _train(tmp_path, *TINY, "--data.synthetic_cache_dir", str(cache), "--run_dir", str(run_dir),
                  "--trainer.max_epochs", "2", "--ckpt_path", str(last),
                  prefix=_strace(writes, "signal=SIGKILL", path=last.resolve()), env={"TMPDIR": str(tmp_path)})
    assert last.stat().st_size > 0, "last.ckpt was truncated in place"
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(last, weights_only=True)["epoch"] == 1  # the second epoch's, whole
    assert _hidden(run_dir / "checkpoints") == []


CHILD_SAVE = textwrap.dedent(
    """
    import sys, torch
    from recsys.atomic import NotWritable
    from recsys.train import AtomicCheckpointIO
    try:
        AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(50_000.0)}, sys.argv[1])
    except NotWritable as exc:
        print(f"error: {exc}")
    """
)


@needs_strace
def test_a_save_killed_at_its_rename_keeps_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    """SIGKILL on entering the rename that puts a checkpoint in place: the previous checkpoint is
    intact, the new one lies whole under a hidden name beside it, and the next save removes it."""
    path = tmp_path / "last.ckpt"
    torch.save({"weights": torch.zeros(3)}, path)
    before = path.read_bytes()
    env = _env()
    killed = subprocess.run([*_strace(RENAMES, "signal=SIGKILL"), sys.executable, "-c", CHILD_SAVE, str(path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr[-3000:]
    assert path.read_bytes() == before
    (leftover,) = _hidden(tmp_path)
    assert leftover.startswith(".last.ckpt.partial-")
    assert torch.equal(torch.load(tmp_path / leftover, weights_only=True)["weights"], torch.arange(50_000.0))
    saved = subprocess.run([sys.executable, "-c", CHILD_SAVE, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0 and saved.stdout == "", saved.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(50_000.0))


@needs_strace
def test_a_disk_that_fails_the_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """ENOSPC when the new checkpoint is made durable (as a full disk reports it): one line, the
    previous checkpoint intact, no temporary file left."""
    path = tmp_path / "last.ckpt"
    torch.save({"weights": torch.zeros(3)}, path)
    before = path.read_bytes()
    env = _env()
    done = subprocess.run([*_strace("fsync", "error=ENOSPC"), sys.executable, "-c", CHILD_SAVE, str(path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"error: checkpoint {path}: cannot write there: No space left on device"]
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_the_disk_cannot_take_stops_training_in_one_line_and_keeps_the_previous_ones(cache, tmp_path):
    """A resumed run whose next checkpoint is larger than the files it may write (``RLIMIT_FSIZE``:
    the write fails with EFBIG, as a full disk fails with ENOSPC). Before: a traceback (exit 1).
    Now: one line naming the checkpoint, exit 2, best.ckpt and last.ckpt as they were, nothing left beside them."""
    run_dir = _trained(tmp_path / "run", cache)
    checkpoints = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    limit = min(len(data) for data in before.values()) // 2
    done = _train(tmp_path, *TINY, "--data.synthetic_cache_dir", str(cache), "--run_dir", str(run_dir),
                  "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoints / "last.ckpt"), limit_file_size=limit)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (error,) = _errors(done.stderr)
    expected = rf"error: checkpoint {re.escape(str(checkpoints))}/(best(-d\d+)?|last)\.ckpt: cannot write there: File too large"
    assert re.fullmatch(expected, error), error
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before


# -- 2. one training per run directory -------------------------------------------------------------------------


def test_a_second_training_into_a_run_directory_in_use_is_refused_in_one_line(cache, tmp_path):
    """The first training is paused (SIGSTOP) once it has written config.yaml; a second one with
    the same --run_dir is refused, before writing anything, naming the directory and the first's
    pid. Before, both exited 0 and mixed their files. The lock goes with the first process."""
    run_dir = tmp_path / "run"
    args = [*TINY, "--data.synthetic_cache_dir", str(cache), "--run_dir", str(run_dir), "--trainer.max_epochs", "1"]
    first = subprocess.Popen([sys.executable, "-m", "recsys.train", *args], cwd=tmp_path, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "config.yaml").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first training ended before it wrote config.yaml"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        second = _train(tmp_path, *args)
        assert second.returncode == 2, second.stderr[-3000:]
        assert _errors(second.stderr) == [f"error: --run_dir {run_dir}: another training (pid {first.pid}) is writing there; "
                                          "wait for it to end or use another --run_dir"]
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    lock = FileLock(run_dir / ".training.lock")
    assert lock.acquire()  # released with the first process: a resume into the directory may start
    lock.release()


def test_a_checkpoint_directory_is_locked_beside_it(tmp_path):
    """The MLflow path: a run's checkpoint directory (checkpoints/RUN_ID, or --checkpoint.dirpath) is
    locked the same way, with the lock file beside it, so the directory holds checkpoints only."""
    directory = tmp_path / "ckpt"
    held = lock_checkpoint_directory(str(directory), "--checkpoint.dirpath", "--checkpoint.dirpath")
    try:
        expected = (rf"^--checkpoint\.dirpath {re.escape(str(directory))}: another training \(pid {os.getpid()}\) is writing there; "
                    r"wait for it to end or use another --checkpoint\.dirpath$")
        with pytest.raises(DirectoryBusy, match=expected):
            lock_checkpoint_directory(str(directory), "--checkpoint.dirpath", "--checkpoint.dirpath")
        assert not directory.exists() and (tmp_path / ".ckpt.lock").is_file()
    finally:
        held.release()
    lock_checkpoint_directory(str(directory), "--checkpoint.dirpath", "--checkpoint.dirpath").release()


# -- 3. SIGTERM and Ctrl-C -------------------------------------------------------------------------------------


@needs_strace
def test_sigterm_saves_last_ckpt_says_how_to_resume_and_the_resume_logs_each_step_once(cache, tmp_path, uninterrupted):
    """SIGTERM while the first validation's last.ckpt is being put in place (mid-epoch, step 2):
    Lightning finishes the step, last.ckpt is saved there, one line says how to resume, exit 143.
    Before: exit 0 and nothing said. Resumed, the run logs every step once, the losses of the
    uninterrupted run."""
    run_dir = tmp_path / "run"
    args = [*TINY, *STOPPABLE, "--data.synthetic_cache_dir", str(cache), "--run_dir", str(run_dir)]
    stopped = _train(tmp_path, *args, prefix=_strace(RENAMES, "signal=SIGTERM", when=4))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1] == (f"stopped by SIGTERM at epoch 0, step 2: saved {last}; "
                                               f"resume with the same options and --ckpt_path {last}")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert main([*args, "--ckpt_path", str(last)]) == 0
    assert _steps(run_dir) == _steps(uninterrupted)
    assert _losses(run_dir) == pytest.approx(_losses(uninterrupted))


@needs_strace
def test_ctrl_c_is_one_line_exit_130_and_the_resume_logs_each_step_once(cache, tmp_path, uninterrupted):
    """SIGINT while the second validation's checkpoint (step 4) is being put in place: the save is
    abandoned, last.ckpt stays the step-2 one, and metrics.csv holds steps 2 and 3 already. One line,
    exit 130 (before: exit 1, nothing said). The resume from step 2 drops those rows and logs them
    again: every step once, as the uninterrupted run (before: steps 2 and 3 twice)."""
    run_dir = tmp_path / "run"
    args = [*TINY, *STOPPABLE, "--data.synthetic_cache_dir", str(cache), "--run_dir", str(run_dir)]
    stopped = _train(tmp_path, *args, prefix=_strace(RENAMES, "signal=SIGINT:error=EINTR", when=5))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.splitlines()[-1] == (f"stopped by SIGINT (Ctrl-C) at epoch 0, step 4: resume from the last "
                                               f"checkpoint with the same options and --ckpt_path {last}")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert max(_steps(run_dir)["train/loss"]) == 3  # logged after the checkpoint, before the interruption
    assert main([*args, "--ckpt_path", str(last)]) == 0
    assert _steps(run_dir) == _steps(uninterrupted)
    assert _losses(run_dir) == pytest.approx(_losses(uninterrupted))


@pytest.mark.parametrize("failure", ["read-only", "not a database"])
def test_an_mlflow_store_that_cannot_be_used_is_one_line(tmp_path, monkeypatch, failure):
    """A store on a read-only disk (the lock file beside it cannot be made) or a file that is not a
    database: one user error naming the store, not an OSError or SQLAlchemy traceback."""
    import contextlib
    import errno

    import recsys.tracking as tracking
    from recsys.errors import UserError

    store = tmp_path / "store.db"
    if failure == "read-only":
        @contextlib.contextmanager
        def read_only(uri):
            raise OSError(errno.EROFS, "Read-only file system", str(store) + ".lock")
            yield

        monkeypatch.setattr(tracking, "_store_lock", read_only)
        expected = f"--mlflow.tracking_uri sqlite:///{store}: cannot write there: Read-only file system"
    else:
        store.write_text("my notes, not a database\n")
        expected = f"the MLflow store sqlite:///{store} cannot be used (file is not a database); fix it, or give another --mlflow.tracking_uri"
    with pytest.raises(UserError) as error:
        tracking.prepare_store(tracking.MLflowSettings(tracking_uri=f"sqlite:///{store}", experiment="x"))
    assert str(error.value) == expected
