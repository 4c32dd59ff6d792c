"""The GPU plan's dry run (issue 16, docs/gpu.md), on CPU and without network.

The lock is complete; the calls that bench/gpu/prepare.py lays out fit the device tool's limits
(64 MiB with this checkout's working tree, commands under 2,000 characters, time boxes within a
call's 600 s and the 15 minutes of device time less the start); every step's command names
options its script has; files cut into parts join back to the lock's bytes; the device script's
pieces (receive, the one-architecture patch, the cuBLAS shim) do what they say. Where the files
have been downloaded (``python bench/gpu/prepare.py``) they must match the lock; in CI they are
absent and those checks are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench.gpu import plan, prepare, run_on_device
from bench.gpu.prepare import Piece

ROOT = Path(__file__).resolve().parents[1]
DOWNLOADS = ROOT / plan.WHEEL_DIR / prepare.DOWNLOADS
ML1M_PREPARED_BYTES = 7 * plan.MiB  # data/ml-1m as `make data/ml-1m` writes it (6.9 MB), where it is absent


def _calls() -> list[dict]:
    data = sum(prepare.dir_bytes(ROOT / d) for d in plan.DATA_DIRS if (ROOT / d).is_dir()) or ML1M_PREPARED_BYTES
    layout = prepare.pack([(p.file, p.size) for p in plan.PACKAGES], prepare.call_capacity(prepare.tree_bytes()), data)
    return prepare.device_calls(layout)


def test_lock_names_every_file_once_with_its_hash_and_size():
    names = [p.name for p in plan.PACKAGES]
    assert len(names) == len(set(names)), "one version of each package"
    for p in plan.PACKAGES:
        assert re.fullmatch(r"[0-9a-f]{64}", p.sha256), p.name
        assert p.size > 0 and p.why, p.name
        assert p.file.startswith(f"{p.name.replace('-', '_')}-{p.version}"), (p.name, p.file)
        assert p.file.endswith((".whl", ".tar.gz")), p.file
    assert {p.name for p in plan.PACKAGES if p.is_source} == {"mamba-ssm", "causal-conv1d"}
    assert plan.CUDART12 in names
    first_wheel = next(i for i, p in enumerate(plan.PACKAGES) if not p.is_source)
    assert all(p.is_source for p in plan.PACKAGES[:first_wheel]), "sources first: they travel in call 1"


def test_calls_fit_the_device_tool():
    tree = prepare.tree_bytes()
    calls = _calls()
    data = sum(prepare.dir_bytes(ROOT / d) for d in plan.DATA_DIRS if (ROOT / d).is_dir()) or ML1M_PREPARED_BYTES
    for call in calls:
        sent = tree + sum(f["size"] for f in call["files"]) + (data if call is calls[-1] else 0)
        assert sent <= plan.CALL_BYTES - plan.MARGIN_BYTES, (call["call"], sent)
        assert len(call["command"]) < plan.COMMAND_CHARS
        assert len(call["carry"]) <= plan.CARRY_PATHS
        assert call["timeout_s"] <= plan.CALL_SECONDS
    assert calls[-1]["command"].endswith("run_on_device.py run")
    assert set(plan.DATA_DIRS) <= set(calls[-1]["carry"])
    assert all(c["command"].endswith(f"receive {c['call']}") for c in calls[:-1])
    sources = {p.file for p in plan.PACKAGES if p.is_source}
    assert sources <= {f["package"] for f in calls[0]["files"]}, "the kernel build starts in the first call"
    assert plan.stages_seconds() <= plan.CALL_SECONDS
    assert prepare.device_seconds(calls) <= plan.DEVICE_BUDGET_S


def test_parts_add_up_to_each_file_in_consecutive_calls():
    calls = _calls()
    for package in plan.PACKAGES:
        found = [(c["call"], f) for c in calls for f in c["files"] if f["package"] == package.file]
        assert [f["part"] for _, f in found] == list(range(1, len(found) + 1))
        assert all(f["parts"] == len(found) for _, f in found)
        assert [f["offset"] for _, f in found] == [sum(f["size"] for _, f in found[:i]) for i in range(len(found))]
        assert sum(f["size"] for _, f in found) == package.size
        numbers = [n for n, _ in found]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "parts travel in consecutive calls"


def test_pack_cuts_files_at_call_boundaries():
    layout = prepare.pack([("a", 5), ("b", 12)], capacity=8, last_call_extra=3)
    assert layout == [
        [Piece("a", 0, 5, 1, 1), Piece("b", 0, 3, 1, 3)],
        [Piece("b", 3, 8, 2, 3)],
        [Piece("b", 11, 1, 3, 3)],
    ]
    # the data of the last call do not fit beside the last piece: one more call carries them
    assert prepare.pack([("a", 7)], capacity=8, last_call_extra=3) == [[Piece("a", 0, 7, 1, 1)], []]
    with pytest.raises(prepare.PrepareError, match="no room"):
        prepare.pack([("a", 1)], capacity=0, last_call_extra=0)


def test_the_last_call_fits_out_and_its_stages_in_order():
    files = plan.out_files()
    assert len(files) <= plan.OUT_FILES
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert all(f.startswith("gpu-") for f in files)
    for step in plan.steps():
        assert step.timeout_s <= plan.CALL_SECONDS and step.about
        for command in step.commands:
            for arg in command:
                assert set(re.findall(r"{(\w+)}", arg)) <= {"python", "work", "out"}, arg
    names = [step.name for step in plan.steps()]
    assert len(names) == len(set(names))
    assert names[-1] == "kernels", "the kernels get every second of their background build"


def _help(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *argv, "--help"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_every_step_command_names_options_its_script_has():
    """Each script's --help (run here, on CPU) lists every option the step gives it, on the device and
    in the rehearsal; pytest commands name test files that exist and select tests."""
    options: dict[tuple[str, ...], set[str]] = {}  # script (and subcommand) -> the options given to it
    for step in plan.steps():
        assert not step.rehearse or len(step.rehearse) == len(step.commands), step.name
        for i, command in enumerate(step.commands):
            args = list(command[1:])
            for argv in (args, run_on_device.rehearsed(tuple(args), step.rehearsal(i))):
                if argv[:2] == ["-m", "pytest"]:
                    tests = [a for a in argv if a.startswith("tests/")]
                    assert tests and all((ROOT / t).is_file() for t in tests), argv
                    continue
                assert (ROOT / argv[0]).is_file(), argv[0]
                head = tuple(argv[:2] if argv[0].endswith("run_on_device.py") else argv[:1])
                options.setdefault(head, set()).update(a for a in argv if a.startswith("--"))
    helps = {head: _help(list(head)) for head in options}  # side by side: each imports torch
    for head, process in helps.items():
        text, _ = process.communicate(timeout=300)
        assert process.returncode == 0, (head, text[-2000:])
        for option in sorted(options[head]):
            assert re.search(rf"(^|[\s,\[]){re.escape(option)}([\s,=\]]|$)", text, re.M), (head, option)


def test_kernel_tests_are_selected():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                           "tests/test_mamba.py", "-k", "kernels"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "test_kernels_match_pytorch_scan" in done.stdout, done.stdout[-2000:]


def test_rehearsed_replaces_adds_and_drops_options():
    argv = run_on_device.rehearsed(("s.py", "--x", "1", "--y", "2"), {"--x": "3", "--y": None, "--z": "4", "--w": None})
    assert argv == ["s.py", "--x", "3", "--z", "4"]


def _piece_files(data: bytes, folder: Path, capacity: int) -> tuple[plan.Package, list[dict]]:
    """``data`` as a lock file, cut by pack() and written by write_piece() into ``folder``."""
    package = plan.Package("x", "1", "x-1-py3-none-any.whl", hashlib.sha256(data).hexdigest(), len(data), "test")
    source = folder / "whole"
    source.write_bytes(data)
    layout = prepare.pack([(package.file, package.size)], capacity, 0)
    return package, [prepare.write_piece(source, piece, folder) for call in layout for piece in call]


def test_split_and_join_round_trip(tmp_path):
    data = os.urandom(1000)
    package, entries = _piece_files(data, tmp_path, capacity=300)
    assert [e["size"] for e in entries] == [300, 300, 300, 100]
    joined = run_on_device.join(entries, package, tmp_path, tmp_path / "joined")
    assert joined.read_bytes() == data
    # a damaged part: the joined file's hash differs from the lock, and nothing is left behind
    part = tmp_path / entries[1]["name"]
    part.write_bytes(b"\0" + part.read_bytes()[1:])
    with pytest.raises(run_on_device.ReceiveError, match="sha256 differs"):
        run_on_device.join(entries, package, tmp_path, tmp_path / "again")
    assert not any((tmp_path / "again").iterdir())
    # a missing part is named
    with pytest.raises(run_on_device.ReceiveError, match="part 3 of 4 missing"):
        run_on_device.join(entries[:2] + entries[3:], package, tmp_path, tmp_path / "again")
    with pytest.raises(run_on_device.ReceiveError, match="no part received"):
        run_on_device.join([], package, tmp_path, tmp_path / "again")


def test_receive_checks_each_file_and_stashes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(run_on_device, "STASH", tmp_path / "stash")
    monkeypatch.setattr(run_on_device, "ROOT", tmp_path)
    folder = tmp_path / "call-1"
    folder.mkdir()
    package, entries = _piece_files(os.urandom(500), folder, capacity=200)
    (folder / "manifest.json").write_text(json.dumps({"call": 1, "of": 2, "files": entries}))
    run_on_device.receive(folder, keep=True)
    assert sorted(p.name for p in (tmp_path / "stash").iterdir()) == sorted([e["name"] for e in entries] + ["call-1.json"])
    assert run_on_device.stashed_pieces() == {package.file: entries}
    (folder / entries[0]["name"]).write_bytes(b"damaged")
    with pytest.raises(run_on_device.ReceiveError, match="damaged in transit"):
        run_on_device.receive(folder)
    with pytest.raises(run_on_device.ReceiveError, match="not here"):
        run_on_device.receive(tmp_path / "call-2")


SETUP_PY = """
    cc_flag = []
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI is set to be the same as
"""


def test_one_architecture_replaces_the_gencode_list(tmp_path):
    setup_py = tmp_path / "setup.py"
    setup_py.write_text(SETUP_PY)
    run_on_device.one_architecture(setup_py)
    namespace: dict = {}
    exec("if True:\n" + "".join(line + "\n" for line in setup_py.read_text().splitlines()[:-1]), namespace)
    assert namespace["cc_flag"] == ["-gencode", "arch=compute_90,code=sm_90"]
    setup_py.write_text("cc_flag = []\n")
    with pytest.raises(RuntimeError, match="not found once"):
        run_on_device.one_architecture(setup_py)


@pytest.mark.parametrize("package", [p for p in plan.PACKAGES if p.is_source], ids=lambda p: p.name)
def test_locked_kernel_sources_take_the_patch(package, tmp_path):
    archive = DOWNLOADS / package.file
    if not archive.is_file():
        pytest.skip(f"{package.file} not downloaded (python bench/gpu/prepare.py); CI has no downloads")
    with tarfile.open(archive) as tar:
        member = tar.getmember(package.file.removesuffix(".tar.gz") + "/setup.py")
        (tmp_path / "setup.py").write_bytes(tar.extractfile(member).read())
    run_on_device.one_architecture(tmp_path / "setup.py")
    assert "arch=compute_90,code=sm_90\"]  # one architecture" in (tmp_path / "setup.py").read_text()


def _compile_shim(tmp_path: Path) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    here = ROOT / "bench" / "gpu"
    shim = tmp_path / "libcublas.so.12"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(shim), str(here / "cublas12_shim.c"),
                    f"-Wl,--version-script={here / 'cublas12_shim.map'}", "-Wl,-soname,libcublas.so.12", "-ldl"], check=True)
    return shim


def _symbols(library: Path, which: str) -> set[str]:
    out = subprocess.run(["nm", "-D", which, str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_cublas_shim_exports_the_functions_under_cuda_12s_version(tmp_path):
    exported = _symbols(_compile_shim(tmp_path), "--defined-only")
    assert {s for s in exported if "@@" in s and s.startswith("cublas")} == {
        f"{name}@@libcublas.so.12" for name in plan.CUBLAS12_FUNCTIONS
    }


def test_cublas_shim_covers_what_the_locked_faiss_calls(tmp_path):
    package = next(p for p in plan.PACKAGES if p.name == "faiss-gpu")
    wheel = DOWNLOADS / package.file
    if not wheel.is_file():
        pytest.skip(f"{package.file} not downloaded (python bench/gpu/prepare.py); CI has no downloads")
    with zipfile.ZipFile(wheel) as z:
        z.extract("faiss/libfaiss.so", tmp_path)
    needed = {s.split("@")[0] for s in _symbols(tmp_path / "faiss" / "libfaiss.so", "--undefined-only")
              if s.endswith("@libcublas.so.12")}
    assert needed == set(plan.CUBLAS12_FUNCTIONS)


def test_downloaded_files_match_the_lock():
    present = [p for p in plan.PACKAGES if (DOWNLOADS / p.file).is_file()]
    if not present:
        pytest.skip("no files downloaded (python bench/gpu/prepare.py); CI has none")
    for package in present:
        prepare.check_file(DOWNLOADS / package.file, package)
    calls_file = ROOT / plan.WHEEL_DIR / prepare.CALLS_FILE
    if calls_file.is_file():
        for call in json.loads(calls_file.read_text()):
            folder = ROOT / plan.WHEEL_DIR / f"call-{call['call']}"
            for entry in call["files"]:
                assert (folder / entry["name"]).stat().st_size == entry["size"], entry["name"]


@pytest.mark.slow
def test_rehearsal_runs_every_step_on_cpu(tmp_path):
    """``run_on_device.py run --rehearse`` (make gpu-rehearse): every call received, the lock installed,
    every step run with its CPU settings, $OUT filled; without CUDA the kernels are not built, so
    their step stops at install-kernels and Mamba keeps the PyTorch scan."""
    if not list((ROOT / plan.WHEEL_DIR).glob("call-*/manifest.json")):
        pytest.skip("no prepared calls (python bench/gpu/prepare.py)")
    done = subprocess.run([sys.executable, "bench/gpu/run_on_device.py", "run", "--rehearse"], cwd=ROOT,
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=7200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == plan.out_files()
    summary = json.loads((tmp_path / plan.SUMMARY).read_text())
    assert summary["environment"]["imports"]["faiss"] == "1.15.1"  # the locked faiss-gpu, through the shim
    for name, outcome in summary["steps"].items():
        if name == "kernels":
            assert outcome["rc"] == 1 and "the PyTorch scan is used" in outcome["log_tail"], outcome["log_tail"]
        else:
            assert outcome["rc"] == 0, (name, outcome["log_tail"])
    train_step = json.loads((tmp_path / "gpu-train_step.json").read_text())
    assert sorted(train_step) == [f"train_step-{p}" for p in sorted(plan.PRECISIONS)]
