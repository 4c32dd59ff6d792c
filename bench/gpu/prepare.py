"""Prepare the GPU plan's calls here (docs/gpu.md): download the lock, verify it, split it over calls.

    python bench/gpu/prepare.py            # download into .whl/, verify, split, write .whl/calls.json, print the calls
    python bench/gpu/prepare.py --print    # only print the calls the lock gives (nothing downloaded or written)

Every file of ``bench/gpu/plan.py``'s lock is downloaded with pip into ``.whl/download/`` (wheels
for Python 3.12 on x86-64 Linux, the two kernel packages as sources) and checked against its size
and sha256. The files are then laid out over the device calls in lock order, each call filled up
to the device tool's 64 MiB less what the working tree itself sends (its tracked and untracked,
not ignored files) and a margin; a file that does not fit where it falls is cut into parts that
travel in consecutive calls and are joined there. The prepared data of ``plan.DATA_DIRS``
travel in the last call. Each call gets a folder ``.whl/call-<i>/`` with its files and a
``manifest.json`` (every file's package, offset, size and sha256); ``.whl/calls.json`` lists the
calls in order: what each carries, its command and its timeout.

Run it in the checkout the device tool sends (the one the session started in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.gpu import plan  # noqa: E402
from recsys.errors import UserError, exit_code_of  # noqa: E402

DOWNLOADS = "download"
CALLS_FILE = "calls.json"
MANIFEST = "manifest.json"


class PrepareError(UserError):
    """A file of the lock is missing or differs from the lock, or the plan does not fit the calls."""


@dataclass(frozen=True)
class Piece:
    """``size`` bytes of a lock file from ``offset``: the whole file or one of its ``parts``."""

    package: str  # the lock's file name
    offset: int
    size: int
    part: int
    parts: int

    @property
    def name(self) -> str:
        return self.package if self.parts == 1 else f"{self.package}.part{self.part}of{self.parts}"


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the working tree the device tool sends: tracked and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode()
    paths = [root / name for name in set(listed.split("\0")) if name]
    return sum(p.lstat().st_size for p in paths if p.is_symlink() or p.is_file())  # a deleted tracked file is not sent


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pack(sizes: list[tuple[str, int]], capacity: int, last_call_extra: int) -> list[list[Piece]]:
    """Lay the files (name, size), in order, over calls of ``capacity`` bytes each; a file that does
    not fit in what is left of a call is cut there and continues in the next. The last call also
    needs ``last_call_extra`` bytes (the data); if they do not fit, one more call carries only them."""
    if capacity <= 0:
        raise PrepareError(f"no room for files in a call: the working tree leaves {capacity} bytes of {plan.CALL_BYTES}")
    calls: list[list[tuple[str, int, int]]] = [[]]
    room = capacity
    for name, size in sizes:
        offset = 0
        while offset < size:
            if room == 0:
                calls.append([])
                room = capacity
            take = min(room, size - offset)
            calls[-1].append((name, offset, take))
            offset += take
            room -= take
    if room < last_call_extra:
        if last_call_extra > capacity:
            raise PrepareError(f"the data of the last call ({last_call_extra} bytes) exceed a call's room ({capacity} bytes)")
        calls.append([])
    counts = {name: sum(1 for call in calls for piece in call if piece[0] == name) for name, _ in sizes}
    seen: dict[str, int] = {}
    out = []
    for call in calls:
        pieces = []
        for name, offset, size in call:
            seen[name] = seen.get(name, 0) + 1
            pieces.append(Piece(name, offset, size, seen[name], counts[name]))
        out.append(pieces)
    return out


def call_capacity(tree: int) -> int:
    return plan.CALL_BYTES - plan.MARGIN_BYTES - tree


def device_calls(layout: list[list[Piece]]) -> list[dict]:
    """The calls in order: each carries its folder (the last also the data) and says what to run."""
    calls = []
    for i, pieces in enumerate(layout, start=1):
        last = i == len(layout)
        calls.append({
            "call": i,
            "of": len(layout),
            "carry": [f"{plan.WHEEL_DIR}/call-{i}", *(plan.DATA_DIRS if last else ())],
            "command": "PYTHONUNBUFFERED=1 python3 bench/gpu/run_on_device.py " + ("run" if last else f"receive {i}"),
            "timeout_s": plan.CALL_SECONDS if last else plan.RECEIVE_S,
            "files": [asdict(p) | {"name": p.name} for p in pieces],
        })
    return calls


def device_seconds(calls: list[dict]) -> int:
    """Device time the calls may take at most: a start, every call's box and overhead."""
    boxes = [plan.RECEIVE_S] * (len(calls) - 1) + [plan.stages_seconds()]
    return plan.START_UP_S + sum(box + plan.CALL_OVERHEAD_S for box in boxes)


def pip_download(package: plan.Package, dest: Path) -> None:
    """One file of the lock, with pip, into ``dest`` (sources with the project's torch, for their metadata)."""
    spec = f"{package.name}=={package.version}"
    if package.is_source:
        # their setup.py imports torch and would compile CUDA code: skipped, only the archive is wanted
        env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"}
        args = ["--no-binary=:all:", "--no-build-isolation"]
    else:
        env = dict(os.environ)
        args = ["--only-binary=:all:", "--python-version", plan.PYTHON_TAG, "--implementation", "cp",
                *(f"--platform={p}" for p in plan.PLATFORMS)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *args, "-d", str(dest), spec],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise PrepareError(f"pip download {spec} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")


def check_file(path: Path, package: plan.Package) -> None:
    if not path.is_file():
        raise PrepareError(f"{path}: missing (pip saved another file name for {package.name}=={package.version}?)")
    if path.stat().st_size != package.size:
        raise PrepareError(f"{path}: {path.stat().st_size} bytes, the lock says {package.size}")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != package.sha256:
        raise PrepareError(f"{path}: sha256 {digest}, the lock says {package.sha256}")


def write_piece(source: Path, piece: Piece, folder: Path) -> dict:
    """Copy ``piece`` of ``source`` into ``folder``; its manifest entry, with the piece's sha256."""
    digest = hashlib.sha256()
    target = folder / piece.name
    with open(source, "rb") as f, open(target, "wb") as out:
        f.seek(piece.offset)
        left = piece.size
        while left:
            block = f.read(min(left, 1 << 20))
            if not block:
                raise PrepareError(f"{source}: shorter than the lock says")
            out.write(block)
            digest.update(block)
            left -= len(block)
    return asdict(piece) | {"name": piece.name, "sha256": digest.hexdigest()}


def prepare(root: Path = ROOT) -> list[dict]:
    """Download and verify the lock, write the call folders and ``calls.json``; the calls."""
    wheels = root / plan.WHEEL_DIR
    downloads = wheels / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    for package in plan.PACKAGES:
        path = downloads / package.file
        if not path.is_file():
            print(f"downloading {package.name}=={package.version}", flush=True)
            pip_download(package, downloads)
        check_file(path, package)
    missing = [d for d in plan.DATA_DIRS if not (root / d).is_dir()]
    if missing:
        raise PrepareError(f"{missing[0]}: not prepared (make {missing[0]})")
    layout = pack([(p.file, p.size) for p in plan.PACKAGES], call_capacity(tree_bytes(root)),
                  sum(dir_bytes(root / d) for d in plan.DATA_DIRS))
    calls = device_calls(layout)
    for old in wheels.glob("call-*"):
        shutil.rmtree(old)
    for call, pieces in zip(calls, layout):
        folder = wheels / f"call-{call['call']}"
        folder.mkdir()
        call["files"] = [write_piece(downloads / p.package, p, folder) for p in pieces]
        (folder / MANIFEST).write_text(json.dumps(call, indent=2))
    (wheels / CALLS_FILE).write_text(json.dumps(calls, indent=2))
    return calls


def describe(calls: list[dict]) -> str:
    lines = [f"{len(calls)} device calls, one right after another (a machine stays warm {plan.WARM_S} s after a call); "
             f"at most {device_seconds(calls)} s of the {plan.DEVICE_BUDGET_S} s of device time, start-up included:"]
    for call in calls:
        size = sum(f["size"] for f in call["files"]) / plan.MiB
        lines.append(f"  {call['call']}. run(command={call['command']!r}, carry={call['carry']}, "
                     f"timeout_s={call['timeout_s']})   # {size:.1f} MiB: " + ", ".join(f["name"] for f in call["files"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="only print the calls the lock gives; download nothing")
    args = parser.parse_args(argv)
    if args.print:
        layout = pack([(p.file, p.size) for p in plan.PACKAGES], call_capacity(tree_bytes()),
                      sum(dir_bytes(ROOT / d) for d in plan.DATA_DIRS if (ROOT / d).is_dir()))
        print(describe(device_calls(layout)))
        return
    calls = prepare()
    print(describe(calls))
    print(f"wrote {plan.WHEEL_DIR}/{CALLS_FILE}")


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
