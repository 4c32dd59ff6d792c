"""recsys.atomic: a file or a directory is the old one or the complete new one, even under SIGKILL.

The kill tests run a small child process that replaces a directory and kills itself
(``SIGKILL``: nothing can clean up) at a chosen step of the commit, with the swap
(``renameat2(RENAME_EXCHANGE)``) and with the fallback (backup name, two renames). After each kill
the target is the whole old or the whole new directory; the next writer into the directory removes
the leftovers, but never those of a process still running. The same through ``recsys.export``:
``tests/test_reliability.py::test_reexport_killed_with_sigkill_at_the_commit_keeps_a_whole_export``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import recsys.atomic as atomic
from recsys.atomic import (
    FileLock,
    TargetExists,
    atomic_directory,
    atomic_file,
    clean_leftovers,
    write_bytes_atomically,
    write_json_atomically,
    write_text_atomically,
)

needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

OLD = {"a.txt": "old a", "b.txt": "old b", "sub/c.txt": "old c"}
NEW = {"a.txt": "new a", "b.txt": "new b", "sub/c.txt": "new c", "sub/d.txt": "new d"}


def _fill(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def _contents(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in directory.rglob("*") if p.is_file()}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_module_needs_only_the_standard_library():
    code = "import sys, recsys.atomic; print(sorted(m for m in ('torch', 'polars', 'lightning', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_atomic_file_is_the_old_file_or_the_whole_new_one(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".result.json.partial-")
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with atomic_file(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_text_and_json_helpers(tmp_path):
    path = write_json_atomically(tmp_path / "deep" / "r.json", {"b": 1, "a": [1, 2]}, indent=2, sort_keys=True)
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert write_text_atomically(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "t.txt"]


def test_bytes_are_written_beside_and_renamed_in_place(tmp_path):
    path = tmp_path / "deep" / "last.ckpt"
    assert write_bytes_atomically(path, memoryview(b"new bytes")).read_bytes() == b"new bytes"
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@needs_sigkill
@pytest.mark.skipif(atomic.fcntl is None, reason="needs fcntl.flock")
def test_a_file_lock_is_held_by_one_process_and_released_when_it_is_killed(tmp_path):
    """A child takes the lock and waits; here it is taken (and its pid known) until the child is
    killed with SIGKILL: then the system has released it, and nobody has to delete the file."""
    code = textwrap.dedent(
        """
        import sys, time
        from recsys.atomic import FileLock
        lock = FileLock(sys.argv[1])
        assert lock.acquire()
        print("held", flush=True)
        time.sleep(600)
        """
    )
    path = tmp_path / ".training.lock"
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        lock = FileLock(path)
        assert not lock.acquire() and lock.holder() == child.pid
    finally:
        child.kill()
        child.wait()
    assert lock.acquire() and lock.holder() == os.getpid()
    assert not FileLock(path).acquire()  # exclusive within one process too
    lock.release()
    assert FileLock(path).acquire()


def test_atomic_directory_creates_replaces_and_refuses(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent == tmp_path
        _fill(tmp, OLD)
    assert _contents(final) == OLD
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            _fill(tmp, NEW)
            raise RuntimeError("writer failed")
    assert _contents(final) == OLD
    with pytest.raises(TargetExists):
        with atomic_directory(final, overwrite=False) as tmp:
            _fill(tmp, NEW)
    assert _contents(final) == OLD and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_directory(final) as tmp:
        _fill(tmp, NEW)
    assert _contents(final) == NEW and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_fallback_replaces_too(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    _fill(final, OLD)
    with atomic_directory(final) as tmp:
        _fill(tmp, NEW)
    assert _contents(final) == NEW and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux only")
def test_the_swap_is_one_renameat2_exchange(tmp_path):
    _fill(tmp_path / "x", OLD)
    _fill(tmp_path / "y", NEW)
    if not atomic._exchange(tmp_path / "x", tmp_path / "y"):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    assert _contents(tmp_path / "x") == NEW and _contents(tmp_path / "y") == OLD


# -- SIGKILL at each step of a replace ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import recsys.atomic as atomic

    final, kill_at, fallback, files = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4])
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    if fallback:
        atomic._exchange = lambda a, b: False
    unlink = os.unlink
    def die_in_the_middle(*args, **kwargs):  # the old directory's removal: one file gone, then killed
        unlink(*args, **kwargs)
        die()
    def after_step(step, path):
        if step == kill_at:
            if step == "deleting":
                os.unlink = die_in_the_middle
            else:
                die()
    atomic._after_step = after_step
    with atomic.atomic_directory(final) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
            if kill_at == "writing":
                die()
    """
)

# (kill at, fallback) -> what ``final`` is right after the kill
KILLS = {
    ("writing", False): "old", ("written", False): "old", ("swapped", False): "new", ("deleting", False): "new",
    ("writing", True): "old", ("written", True): "old", ("moved_aside", True): "missing", ("swapped", True): "new",
    ("deleting", True): "new",
}


@needs_sigkill
@pytest.mark.parametrize(("kill_at", "fallback"), list(KILLS), ids=[f"{'fallback' if f else 'swap'}-{k}" for k, f in KILLS])
def test_a_replace_killed_at_any_step_leaves_the_old_or_the_new_directory(tmp_path, kill_at, fallback):
    final = tmp_path / "out"
    _fill(final, OLD)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(final), kill_at, "1" if fallback else "0", json.dumps(NEW)], capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    expected = KILLS[kill_at, fallback]
    leftovers = sorted(p for p in tmp_path.iterdir() if p.name != "out")
    assert all(p.name.startswith(".out.") for p in leftovers)
    if expected == "missing":  # the fallback's window: the old directory, whole, under its backup name
        backup, partial = leftovers
        assert not final.exists() and ".out.backup-" in backup.name and _contents(backup) == OLD
        assert ".out.partial-" in partial.name and _contents(partial) == NEW
        expected = "old"
    else:
        assert len(leftovers) == 1
        assert _contents(final) == {"old": OLD, "new": NEW}[expected]
    if kill_at == "deleting":  # the old directory, half removed, under a temporary name only
        assert 0 < len(_contents(leftovers[0])) < len(OLD)
    # the next writer into the directory (here of another name) cleans up, restoring a lone backup
    with atomic_directory(tmp_path / "other") as tmp:
        _fill(tmp, {"x": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    assert _contents(final) == {"old": OLD, "new": NEW}[expected]


@pytest.mark.parametrize(("kill_at", "fallback"), [k for k in KILLS if k[0] != "writing"],
                         ids=[f"{'fallback' if f else 'swap'}-{k}" for k, f in KILLS if k != "writing"])
def test_an_exception_at_any_step_leaves_no_leftover(tmp_path, monkeypatch, kill_at, fallback):
    """Ctrl-C (an exception) at a step: the same old-or-new directory, and nothing else left."""

    def after_step(step, path):
        if step == kill_at:
            raise KeyboardInterrupt

    if fallback:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(atomic, "_after_step", after_step)
    final = tmp_path / "out"
    _fill(final, OLD)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            _fill(tmp, NEW)
    assert _contents(final) == (NEW if KILLS[kill_at, fallback] == "new" else OLD)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@needs_sigkill
def test_a_file_write_killed_before_the_rename_keeps_the_old_file(tmp_path):
    path = tmp_path / "part.parquet"
    path.write_text("old")
    code = textwrap.dedent(
        """
        import os, signal, sys
        from recsys.atomic import atomic_file
        with atomic_file(sys.argv[1]) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert subprocess.run([sys.executable, "-c", code, str(path)]).returncode == -signal.SIGKILL
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 2
    write_text_atomically(path, "new")  # the next write of that name removes the leftover
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["part.parquet"]


# -- leftovers: whose are removed -----------------------------------------------------------------------


def test_leftovers_of_dead_processes_are_removed_and_of_live_ones_kept(tmp_path):
    """A child holds a temporary directory and a temporary file open (it is still writing) while
    this process cleans the same directory: the child's are kept, a dead process's are removed
    (also the names ``prepare`` used before this module), other files are never touched."""
    code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from recsys.atomic import atomic_directory, atomic_file
        parent = Path(sys.argv[1])
        with atomic_directory(parent / "live") as tmp, atomic_file(parent / "live.json") as tmp_file:
            (tmp / "a").write_text("a")
            tmp_file.write_text("{}")
            (parent / "ready").write_text("")
            while not (parent / "go").exists():
                time.sleep(0.01)
        """
    )
    dead = _dead_pid()
    dead_ones = [f".d16.partial-{dead}-0123abcd.tmp", f".x.json.partial-{dead}-89abcdef.tmp", f".prepared.partial-{dead}-00ff00ff"]
    for name in dead_ones[::2]:
        _fill(tmp_path / name, {"f": "left by a killed run"})
    (tmp_path / dead_ones[1]).write_text("half")
    kept = [".d16.partial-x-0123abcd.tmp", ".hidden", f".d16.partial-{dead}-nothex00.tmp", "d16"]
    for name in kept:
        (tmp_path / name).mkdir()
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        live = sorted(p.name for p in tmp_path.iterdir() if f"-{child.pid}-" in p.name)
        assert len(live) == 2
        with atomic_directory(tmp_path / "mine") as tmp:  # cleans the parent first
            (tmp / "b").write_text("b")
        assert not [name for name in dead_ones if (tmp_path / name).exists()]
        assert sorted(p.name for p in tmp_path.iterdir() if f"-{child.pid}-" in p.name) == live
        assert all((tmp_path / name).exists() for name in kept)
        (tmp_path / "go").write_text("")
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert _contents(tmp_path / "live") == {"a": "a"} and (tmp_path / "live.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if f"-{child.pid}-" in p.name]


def test_siblings_false_and_atomic_file_clean_only_their_own_name(tmp_path):
    dead = _dead_pid()
    mine, other = f".a.partial-{dead}-0123abcd.tmp", f".b.partial-{dead}-0123abcd.tmp"
    for name in (mine, other):
        (tmp_path / name).mkdir()
    with atomic_directory(tmp_path / "a", siblings=False) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other, "a"]
    (tmp_path / mine).write_text("")
    write_text_atomically(tmp_path / "c", "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine, other, "a", "c"]
    assert clean_leftovers(tmp_path, "b") == [tmp_path / other]


# -- SIGKILL at the real system calls (strace -e inject) ----------------------------------------------

STRACE_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import recsys.atomic as atomic
    final, fallback, files = Path(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
    if fallback:
        atomic._exchange = lambda a, b: False
    with atomic.atomic_directory(final) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    """
)


def _strace_works() -> bool:
    if shutil.which("strace") is None or not sys.platform.startswith("linux"):
        return False
    return subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


needs_strace = pytest.mark.skipif(not _strace_works(), reason="needs strace (and ptrace permission)")

# (system calls, which call, fallback) -> what ``final`` is right after the kill. The process dies
# on entering the call, before it runs. Swap: the exchange, then the old directory's removal
# (unlinkat per entry, rmdir of its top). Fallback: rename to the backup name, renameat2
# RENAME_NOREPLACE of the new one into place, then the backup's removal.
SYSCALL_KILLS = {
    ("renameat2", 1, False): "old", ("unlinkat", 1, False): "new", ("unlinkat", 2, False): "new",
    ("rmdir", 1, False): "new",
    ("rename,renameat", 1, True): "old", ("renameat2", 1, True): "missing", ("unlinkat", 2, True): "new",
    ("rmdir", 1, True): "new",
}


@needs_strace
@pytest.mark.parametrize(("calls", "when", "fallback"), list(SYSCALL_KILLS),
                         ids=[f"{'fallback' if f else 'swap'}-{c.split(',')[0]}#{w}" for c, w, f in SYSCALL_KILLS])
def test_a_replace_killed_at_a_system_call_leaves_the_old_or_the_new_directory(tmp_path, calls, when, fallback):
    final = tmp_path / "out"
    _fill(final, OLD)
    command = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}", "-e", f"inject={calls}:signal=SIGKILL:when={when}",
               sys.executable, "-c", STRACE_CHILD, str(final), "1" if fallback else "0", json.dumps(NEW)]
    child = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert child.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), child.stderr
    expected = SYSCALL_KILLS[calls, when, fallback]
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers and all(p.name.startswith(".out.") for p in leftovers)
    if expected == "missing":
        assert not final.exists()
        expected = "old"  # the backup, whole, until the next writer restores it
    else:
        assert _contents(final) == {"old": OLD, "new": NEW}[expected]
    with atomic_directory(tmp_path / "other") as tmp:  # the next writer into the directory cleans up
        _fill(tmp, {"x": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    assert _contents(final) == {"old": OLD, "new": NEW}[expected]


# -- writers racing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback", [False, True], ids=["swap", "fallback"])
@pytest.mark.parametrize("meanwhile", ["another writer creates final", "another writer moves final away"])
def test_a_commit_survives_another_writer_renaming_final_under_it(tmp_path, monkeypatch, fallback, meanwhile):
    """Two exports racing: right after this commit has looked whether ``final`` exists, another
    writer puts its own directory there (or moves the old one aside, as the fallback does). The
    commit still succeeds, and ``final`` is the directory of whoever committed last, whole."""
    if fallback:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    if meanwhile.endswith("moves final away"):
        _fill(final, OLD)
    lexists, armed, done = os.path.lexists, [], []

    def other_writer():
        if meanwhile.endswith("creates final"):
            with atomic_directory(final) as tmp:
                _fill(tmp, OLD)
        else:
            final.rename(tmp_path / "moved-away")

    def looked(path):  # the answer is given, then the other writer acts
        answer = lexists(path)
        if armed and not done and Path(path) == final:
            done.append(True)
            other_writer()
        return answer

    monkeypatch.setattr(os.path, "lexists", looked)
    monkeypatch.setattr(atomic, "_after_step", lambda step, path: step == "written" and armed.append(True))
    with atomic_directory(final) as tmp:
        _fill(tmp, NEW)
    assert done and _contents(final) == NEW
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_commit_that_keeps_losing_the_race_gives_up_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_rename_noreplace", lambda a, b: False)  # someone is always first
    with pytest.raises(OSError, match="other writers kept replacing it"):
        with atomic_directory(tmp_path / "out") as tmp:
            _fill(tmp, NEW)
    assert list(tmp_path.iterdir()) == []


# -- a pid used again ---------------------------------------------------------------------------------


@pytest.mark.skipif(atomic._start_time(os.getpid()) is None, reason="needs /proc to tell when a process started")
def test_leftovers_of_an_earlier_process_with_this_pid_are_removed(tmp_path):
    """A job that is always pid 1 in its container, killed and started again: the killed run's
    leftovers carry this pid but another start time, so they are removed; this process's own are kept."""
    pid, start = os.getpid(), atomic._start_time(os.getpid())
    earlier = [f".d16.partial-{pid}-{start - 1}-0123abcd.tmp", f".x.json.partial-{pid}-{start - 1}-89abcdef.tmp"]
    mine = f".d16.partial-{pid}-{start}-00ff00ff.tmp"
    for name in [*earlier, mine]:
        _fill(tmp_path / name, {"f": "x"})
    with atomic_directory(tmp_path / "d16") as tmp:
        _fill(tmp, NEW)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine, "d16"])
    assert atomic._temporary(tmp_path / "d16").name.startswith(f".d16.partial-{pid}-{start}-")
