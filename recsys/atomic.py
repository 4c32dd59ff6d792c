"""Atomic writes: a file or a directory is either the old one or the complete new one, never partial.

Standard library only, and ``recsys.errors`` (``serving`` and ``bench`` import it without torch or polars).

- ``atomic_file(path)``: a context manager yielding a temporary path in the same directory; the
  caller writes it by any means (``write_parquet``, ``faiss.write_index``, ...). On success its
  contents are fsynced, it is renamed onto ``path`` (``os.replace``) and the directory is fsynced;
  on an error it is removed and ``path`` is untouched. ``write_bytes_atomically``,
  ``write_text_atomically`` and ``write_json_atomically`` are the usual one-liners on top of it
  (``recsys.train`` writes every checkpoint with the first). The temporary file lies beside
  ``path``, never in the system's temporary directory: a rename within one directory replaces
  ``path`` in one step on any file system, where a rename from another file system is a copy
  into ``path`` itself.
- ``check_writable(directory)``: before a long job, fail at once (one line, :class:`NotWritable`)
  unless ``directory`` is, or can be created as, a directory this process can write into.
- ``reported_write_failures(place)``: a context manager turning a failure of the system to write
  (disk full, quota, read-only, no permission: an ``OSError``, or a library's error naming one,
  such as polars' ``(os error 28)``) into one :class:`NotWritable` line naming ``place``.
- ``FileLock(path)``: an exclusive ``fcntl.flock`` on a file, held until released or until the
  process ends (even by SIGKILL), so that only one writer at a time works in a directory.
- ``give_default_mode(path)``: give a file the mode ``open()`` gives a new one (``0o666`` less the
  umask), for files that a library writes with a mode of its own (safetensors' ``save_file``
  writes ``0600``), so that every file of one output directory has the same mode.
- ``atomic_directory(final)``: a context manager yielding a fresh empty directory beside
  ``final``; on success it replaces ``final`` so that the old directory stays complete and
  loadable until the new one is in place (``AtomicDirectory`` is the same with explicit
  ``commit()`` / ``abort()``).

How a directory is replaced
---------------------------
On Linux the new directory and ``final`` are swapped in one step with ``renameat2(...,
RENAME_EXCHANGE)`` (through ctypes: libc's ``renameat2``, else the raw system call), so a reader
of ``final`` sees the complete old directory or the complete new one, at every instant. The old
one, now under the temporary name, is then deleted. Where the swap is unavailable (another OS,
a file system without it, a libc without the call), the fallback renames the old directory to a
backup name, renames the new one in and deletes the backup. Between those two renames -- a
window of two system calls -- ``final`` does not exist: a reader then finds nothing, and a run
killed exactly there leaves only the backup, which the next run into the same parent renames
back to ``final`` (the old, complete directory).

Concurrent writers
------------------
Two writers of the same ``final`` at once (two exports racing) both succeed, and ``final`` is
the complete directory of one of them, whichever committed last: a commit that finds ``final``
appearing or disappearing under it (another writer's rename) tries again.

Leftovers
---------
Temporary names are ``.NAME.partial-OWNER-RANDOM.tmp`` (new files and directories, and, after a
swap, the old directory being deleted) and ``.NAME.backup-OWNER-RANDOM.tmp`` (the fallback's old
directory), where ``OWNER`` is the writer's pid and, where ``/proc`` tells it, the time that process
started (``PID-START``). A run killed (SIGKILL, power loss) leaves them behind. Each
``atomic_file`` / ``atomic_directory`` first removes the leftovers of processes that are no longer
alive: those of the same name (``atomic_file``), or every leftover in the parent directory
(``atomic_directory``, unless ``siblings=False``); a backup whose ``final`` is missing is restored
rather than removed. Leftovers of a live process are never touched. A process is the same one
when a process of that pid runs and started at ``START``: so a pid used again (a container whose
job is always pid 1, restarted after a kill) does not keep a killed run's leftovers forever.
Without a start time (no ``/proc``), a pid that runs counts as alive (``os.kill(pid, 0)``). This
assumes every writer into a directory runs on this host (in this pid namespace): writers on other
machines sharing the directory over a network file system must write different names and pass
``siblings=False`` (their leftovers are then only cleaned by the next writer of that name).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: FileLock locks nothing
    fcntl = None

__all__ = [
    "AtomicDirectory",
    "FileLock",
    "NotWritable",
    "TargetExists",
    "atomic_directory",
    "atomic_file",
    "check_writable",
    "clean_leftovers",
    "give_default_mode",
    "reported_write_failures",
    "write_bytes_atomically",
    "write_json_atomically",
    "write_text_atomically",
]

_LEFTOVER = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>partial|backup)-(?P<pid>\d+)(-(?P<start>\d+))?-[0-9a-f]{8}(\.tmp)?"
)
#: how often a commit tries again when other writers keep renaming ``final`` under it
_ATTEMPTS = 100

# Test hook: called as ``_after_step(step, path)`` at the steps of a directory commit ("written":
# the new directory is complete and synced; "moved_aside": fallback only, the old one is under its
# backup name; "swapped": the new one is ``final``; "deleting": the old one is about to be removed).
_after_step: Callable[[str, Path], None] | None = None


class TargetExists(FileExistsError):
    """``atomic_directory(final, overwrite=False)`` found ``final`` already there at the commit."""


class NotWritable(UserError):
    """An output place that is a file, or a directory this process cannot write into."""


def check_writable(directory: str | os.PathLike, option: str = "--out") -> None:
    """Raise :class:`NotWritable` (its message starts with ``option`` and the path) unless
    ``directory`` is a directory this process can write into, or can be created as one: then
    its nearest existing ancestor must be such a directory. Writes nothing that stays."""
    directory = Path(directory)
    place = directory
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent
    if not place.is_dir():
        where = "" if place == directory else f": {place}"
        raise NotWritable(f"{option} {directory}{where} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=place):  # unnamed where the system allows (O_TMPFILE)
            pass
    except OSError as exc:
        raise NotWritable(f"{option} {directory}: cannot write in {place} ({exc.strerror or exc})") from None


#: the errors of a system that cannot write (as opposed to a wrong path, which is a defect)
_WRITE_FAILURES = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "EFBIG")
                   if hasattr(errno, name)}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (polars, safetensors) name one


def _write_failure(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it says the system could not write, else None."""
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        found = _OS_ERROR_IN_TEXT.search(str(exc))
        code = int(found[1]) if found else None
    return code if code in _WRITE_FAILURES else None


@contextmanager
def reported_write_failures(place: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """Inside the block, a failure of the system to write becomes :class:`NotWritable` naming
    ``option`` (may be empty) and ``place``."""
    try:
        yield
    except Exception as exc:
        code = _write_failure(exc)
        if code is None:
            raise
        raise NotWritable(f"{option} {place}".strip() + f": cannot write there: {os.strerror(code)}") from exc


def _step(step: str, path: Path) -> None:
    if _after_step is not None:
        _after_step(step, path)


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, from ``/proc``); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat.rsplit(b")", 1)[1].split()[19])  # field 22, counted after "(name)"
    except (OSError, IndexError, ValueError):
        return None


def _temporary(path: Path, kind: str = "partial") -> Path:
    pid = os.getpid()
    start = _start_time(pid)
    owner = f"{pid}" if start is None else f"{pid}-{start}"
    return path.with_name(f".{path.name}.{kind}-{owner}-{secrets.token_hex(4)}.tmp")


def _alive(pid: int, start: int | None) -> bool:
    """Whether the writer ``pid`` (started at ``start``, when known) still runs."""
    if os.name != "posix":
        return True  # no cheap liveness check: never remove
    running_since = None if start is None else _start_time(pid)
    if running_since is not None:
        return running_since == start  # another start time: the pid was used again
    if pid == os.getpid():
        return start is None  # this process, unless the name says it started at another time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_leftovers(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary and backup names left in ``parent`` by processes no longer alive.

    Only those of target ``name`` when given. A backup whose target is missing is renamed back
    to it (the fallback was killed between its two renames). Returns what was removed or restored.
    """
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if _alive(int(match["pid"]), None if match["start"] is None else int(match["start"])):
            continue
        path = parent / entry.name
        if match["kind"] == "backup":
            target = parent / match["name"]
            if not os.path.lexists(target):
                try:
                    os.rename(path, target)
                    _fsync_dir(parent)
                    found.append(path)
                    continue
                except OSError:  # another cleaner got there first, or the target appeared
                    if not os.path.lexists(path):
                        continue
        _remove(path)
        found.append(path)
    return found


# -- durability ---------------------------------------------------------------------------------------


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                _fsync_file(path)
        _fsync_dir(directory)


# -- renames in one step ----------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
_renameat2: Callable[..., int] | None | bool = False  # False: not looked up yet; None: unavailable


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the running program, libc included
    except OSError:
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
        return function
    number = _SYS_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long

    def via_syscall(olddirfd, oldpath, newdirfd, newpath, flags):
        return syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), ctypes.c_char_p(oldpath),
                       ctypes.c_int(newdirfd), ctypes.c_char_p(newpath), ctypes.c_uint(flags))

    return via_syscall


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """``renameat2(a, b, flags)``; False where the system or the file system cannot."""
    global _renameat2
    if _renameat2 is False:
        _renameat2 = _load_renameat2()
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # no such call, or a file system without this flag
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step; False where the system cannot."""
    return _rename2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(a: Path, b: Path) -> bool:
    """Rename ``a`` to ``b`` unless ``b`` exists; False when it does (another writer was first)."""
    try:
        if _rename2(a, b, _RENAME_NOREPLACE):
            return True
        if os.path.lexists(b):
            return False
        os.rename(a, b)  # without RENAME_NOREPLACE: fails on a non-empty directory b that appeared just now
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


# -- files --------------------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; renamed onto ``path`` on success, removed on error.

    The parent directory must exist. With ``durable`` the contents are fsynced before the rename
    and the directory after it.
    """
    path = Path(path)
    clean_leftovers(path.parent, path.name)
    tmp = _temporary(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_bytes_atomically(path: str | os.PathLike, data: bytes | memoryview, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` whole or not at all (creating the parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomically(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", durable: bool = True) -> Path:
    """Write ``text`` to ``path`` whole or not at all (creating the parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_text(text, encoding=encoding)
    return path


def write_json_atomically(path: str | os.PathLike, data: Any, *, durable: bool = True, **dumps: Any) -> Path:
    """``json.dumps(data, **dumps)`` plus a newline, written with ``write_text_atomically``."""
    return write_text_atomically(path, json.dumps(data, **dumps) + "\n", durable=durable)


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux's
    ``/proc/self/status``); elsewhere set and restored at once (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give the file ``path`` the mode a file created with ``open()`` gets: ``0o666`` less the umask
    (``0644`` under the usual ``022``). For files written by libraries that choose a mode of their
    own, such as safetensors' ``save_file`` (``0600``: it writes a temporary file and renames it)."""
    os.chmod(path, 0o666 & ~_umask())


# -- one writer at a time ------------------------------------------------------------------------------


class FileLock:
    """An exclusive lock on the file ``path`` (``fcntl.flock``), held from :meth:`acquire` until
    :meth:`release` or the end of the process: the system releases it then, even after SIGKILL, so a
    lock is never stale and no one has to delete a lock file. The holder writes its process id into
    the file, for the message of whoever finds the lock taken. The lock lasts as long as this object's
    open file: keep the object. Without ``fcntl`` (not POSIX) every ``acquire`` succeeds and nothing
    is locked."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = None

    def acquire(self) -> bool:
        """Take the lock (creating the file); False, at once, when another holder has it."""
        if fcntl is None:
            return True
        file = open(self.path, "a+")  # not "w": truncating is for the holder only
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        return True

    def holder(self) -> int | None:
        """The process id the holder wrote; None when it is not known (yet)."""
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Give the lock up (closing the file releases it); nothing when not held."""
        if self._file is not None:
            self._file.close()
            self._file = None


# -- directories --------------------------------------------------------------------------------------


class AtomicDirectory:
    """A fresh temporary directory ``.path`` beside ``final``; ``commit()`` puts it in place of
    ``final``, ``abort()`` removes it. ``atomic_directory`` is the context-manager form."""

    def __init__(self, final: str | os.PathLike, *, overwrite: bool = True, durable: bool = True, siblings: bool = True):
        self.final = Path(final)
        self.overwrite = overwrite
        self.durable = durable
        self.final.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.final.parent, None if siblings else self.final.name)
        self.path = _temporary(self.final)
        self.path.mkdir()
        self._backups: list[Path] = []  # the fallback's old directories, deleted with ``path``

    def commit(self) -> Path:
        """Put the directory in place of ``final``, then delete the old one (also on an error)."""
        try:
            if self.durable:
                _fsync_tree(self.path)
            _step("written", self.path)
            self._put_in_place()
            if self.durable:
                _fsync_dir(self.final.parent)
            # after a swap, path holds the old directory; after the fallback, the backup does
            _step("deleting", self._backups[-1] if self._backups else self.path)
        finally:
            self.abort()
        return self.final

    def _put_in_place(self) -> None:
        final, tmp = self.final, self.path
        try:
            for _ in range(_ATTEMPTS):
                if not os.path.lexists(final):
                    if _rename_noreplace(tmp, final):
                        _step("swapped", final)
                        return
                    continue  # another writer's directory went in meanwhile
                if not self.overwrite:
                    raise TargetExists(errno.EEXIST, "already exists", str(final))
                try:
                    if _exchange(tmp, final):
                        _step("swapped", final)
                        return
                    backup = _temporary(final, "backup")
                    os.rename(final, backup)
                except FileNotFoundError:
                    continue  # another writer moved final away meanwhile
                self._backups.append(backup)
                _step("moved_aside", backup)
            raise OSError(errno.EBUSY, f"other writers kept replacing it ({_ATTEMPTS} attempts)", str(final))
        except BaseException:
            if self._backups and not os.path.lexists(final):
                os.rename(self._backups.pop(), final)  # the old directory back in place
            raise

    def abort(self) -> None:
        """Remove the temporary directory (and old directories moved aside)."""
        for path in [self.path, *self._backups]:
            _remove(path)


@contextmanager
def atomic_directory(
    final: str | os.PathLike, *, overwrite: bool = True, durable: bool = True, siblings: bool = True
) -> Iterator[Path]:
    """Yield a fresh empty directory beside ``final``; on success it replaces ``final`` (the old
    directory stays whole until the new one is in place), on an error it is removed.

    ``overwrite=False`` raises ``TargetExists`` at the commit if ``final`` exists. With ``durable``
    every file of the new directory is fsynced before it goes in place and the parent after.
    ``siblings=False`` cleans only the leftovers of ``final``'s own name (see the module docstring).
    """
    directory = AtomicDirectory(final, overwrite=overwrite, durable=durable, siblings=siblings)
    try:
        yield directory.path
    except BaseException:
        directory.abort()
        raise
    directory.commit()
