"""The GPU plan's device side (docs/gpu.md): receive the files, install them, run the stages, collect.

    python3 bench/gpu/run_on_device.py receive I        # calls before the last: verify and stash call I's files
    python3 bench/gpu/run_on_device.py run              # the last call: join, install, run every stage, fill $OUT
    python bench/gpu/run_on_device.py run --rehearse    # here, on CPU: every call at once, small sizes
    python3 bench/gpu/run_on_device.py install-kernels --wait S     # (a step) the built kernels into the install

``receive`` checks each file a call carried (``.whl/call-I/``) against the sha256 that
``bench/gpu/prepare.py`` wrote and moves it to ``.gpu/stash/``, which stays on the machine while it
is warm. The call that brings the kernel sources also starts their build in the background, in a
session of its own so that it outlives the call: ``mamba_ssm`` and ``causal_conv1d``, their
``setup.py`` cut down to sm_90, ``pip wheel`` with every core at the lowest priority, within
``plan.KERNEL_BUILD_S``; ``.gpu/build/status.json`` says how it ended.

``run`` receives the last call's files, joins the parts of every file of the lock and checks each
against the lock, installs the wheels into ``.gpu/site`` (``pip --target``), puts the CUDA 12 runtime
and the cuBLAS 12 shim (``cublas12_shim.c``, compiled there) beside faiss' libraries, and runs
``plan.STAGES`` in order, each step under its time box (shortened so that the call ends within
``plan.stages_seconds()``), a failed or timed-out step leaving the rest to run. ``$OUT`` gets the
results (``plan.out_files()``): each step's JSON files, ``gpu-run.json`` (device, versions, install,
kernel build, every step's outcome and the end of its log) and ``gpu-logs.tar.gz`` (every log).

``--rehearse`` runs the same on this machine: every call folder found is received, the steps' options
are replaced by their ``rehearse`` settings (CPU, small sizes), boxes are ten times longer, and
``$OUT`` defaults to ``.gpu/out``. Only the standard library is used here: this runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.gpu import plan  # noqa: E402

DEVICE = ROOT / plan.DEVICE_DIR
STASH, SITE, WHEELS, BUILD, WORK = (DEVICE / d for d in ("stash", "site", "wheels", "build", "work"))
BUILD_STATUS = BUILD / "status.json"
LOG_BYTES = 2 * plan.MiB  # each log in the tarball keeps its last 2 MiB
TAIL_CHARS = 1500  # each step's log tail in the summary
REHEARSAL_BOX_SCALE = 10  # two shared CPU cores are slower than the device for everything


class ReceiveError(Exception):
    """A call's files are missing or damaged (said in one line)."""


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: Path, data: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


# ---- receive, join ----------------------------------------------------------------------------------


def receive(folder: Path, keep: bool = False) -> dict:
    """Check the files of one call folder against its manifest and move them into the stash
    (``keep``: copy them, so that a rehearsal leaves the prepared calls as they were)."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ReceiveError(f"{folder.relative_to(ROOT)}: not here (name it in the call's carry)")
    manifest = json.loads(manifest_path.read_text())
    STASH.mkdir(parents=True, exist_ok=True)
    for entry in manifest["files"]:
        path = folder / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
            raise ReceiveError(f"{path.relative_to(ROOT)}: missing or damaged in transit (sha256 differs from the manifest)")
        (shutil.copy2 if keep else os.replace)(path, STASH / entry["name"])
    write_json(STASH / f"call-{manifest['call']}.json", manifest)
    print(f"call {manifest['call']} of {manifest['of']}: received " + ", ".join(e["name"] for e in manifest["files"]), flush=True)
    if any(e["package"] == p.file for e in manifest["files"] for p in plan.PACKAGES if p.is_source):
        start_kernel_build()
    return manifest


def stashed_pieces() -> dict[str, list[dict]]:
    """Every piece the stash holds, by the lock file it belongs to, in order."""
    pieces: dict[str, list[dict]] = {}
    for path in sorted(STASH.glob("call-*.json")):
        for entry in json.loads(path.read_text())["files"]:
            pieces.setdefault(entry["package"], []).append(entry)
    return {name: sorted(entries, key=lambda e: e["offset"]) for name, entries in pieces.items()}


def join(pieces: list[dict], package: plan.Package, source: Path, target: Path) -> Path:
    """Concatenate the pieces of ``package`` (files under ``source``) into ``target/package.file`` and
    check the whole against the lock. Missing, overlapping or short pieces are named."""
    if not pieces:
        raise ReceiveError(f"{package.file}: no part received (were the calls made one right after another, "
                           f"at most {plan.WARM_S} s apart? start again from call 1)")
    expected = pieces[0]["parts"]
    offset = 0
    for part, entry in enumerate(pieces, start=1):
        if entry["part"] != part or entry["offset"] != offset or not (source / entry["name"]).is_file():
            raise ReceiveError(f"{package.file}: part {part} of {expected} missing (a call was skipped, or the "
                               f"machine went back between calls: start again from call 1)")
        offset += entry["size"]
    if len(pieces) != expected or offset != package.size:
        raise ReceiveError(f"{package.file}: {len(pieces)} of {expected} parts, {offset} of {package.size} bytes")
    target.mkdir(parents=True, exist_ok=True)
    whole = target / package.file
    temporary = whole.with_name(whole.name + ".tmp")
    with open(temporary, "wb") as out:
        for entry in pieces:
            with open(source / entry["name"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if sha256_of(temporary) != package.sha256:
        temporary.unlink()
        raise ReceiveError(f"{package.file}: joined, its sha256 differs from the lock")
    os.replace(temporary, whole)
    return whole


# ---- kernels -------------------------------------------------------------------------------------------

KERNEL_FLAGS_MARKER = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"


def one_architecture(setup_py: Path, arch: str = plan.CUDA_ARCH) -> None:
    """Cut the ``-gencode`` list that the kernels' setup.py builds (eight architectures with CUDA 13)
    down to ``sm_<arch>``: the list is replaced right before the line that follows it."""
    text = setup_py.read_text()
    if text.count(KERNEL_FLAGS_MARKER) != 1:
        raise RuntimeError(f"{setup_py}: the line after its -gencode list was not found once; not built")
    line = f'    cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]  # one architecture (bench/gpu)\n'
    setup_py.write_text(text.replace(KERNEL_FLAGS_MARKER, line + KERNEL_FLAGS_MARKER))


def start_kernel_build() -> None:
    """``build-kernels`` in a session of its own, so that it outlives this call."""
    BUILD.mkdir(parents=True, exist_ok=True)
    BUILD_STATUS.unlink(missing_ok=True)
    with open(BUILD / "build.log", "w") as log:
        subprocess.Popen(["nice", "-n", "19", sys.executable, str(Path(__file__)), "build-kernels"], cwd=ROOT,
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"kernel build started in the background (at most {plan.KERNEL_BUILD_S} s; {plan.DEVICE_DIR}/build/build.log)", flush=True)


def build_kernels() -> None:
    """Build a wheel of every source package side by side; write ``status.json`` when all ended."""
    started = time.monotonic()
    dist = BUILD / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 1), "MAMBA_FORCE_BUILD": "TRUE",
           "CAUSAL_CONV1D_FORCE_BUILD": "TRUE", "TORCH_CUDA_ARCH_LIST": f"{plan.CUDA_ARCH[0]}.{plan.CUDA_ARCH[1:]}"}
    running, status = {}, {}
    for package in (p for p in plan.PACKAGES if p.is_source):
        archive = STASH / package.file
        try:
            if not archive.is_file() or sha256_of(archive) != package.sha256:
                raise RuntimeError(f"{package.file}: not in the stash or not the lock's file")
            with tarfile.open(archive) as tar:
                tar.extractall(BUILD / "src", filter="data")
            source = BUILD / "src" / package.file.removesuffix(".tar.gz")
            one_architecture(source / "setup.py")
        except (RuntimeError, OSError, tarfile.TarError) as err:
            status[package.name] = {"ok": False, "seconds": 0.0, "error": str(err)}
            continue
        log = open(BUILD / f"{package.name}.log", "w")
        running[package.name] = (subprocess.Popen(
            [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-v",
             "-w", str(dist), str(source)], cwd=BUILD, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = started + plan.KERNEL_BUILD_S
    for name, (process, log) in running.items():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
            error = None if process.returncode == 0 else f"pip wheel exited with {process.returncode}"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            error = f"not built within {plan.KERNEL_BUILD_S} s"
        log.close()
        status[name] = {"ok": error is None, "seconds": time.monotonic() - started, "error": error}
    for package in (p for p in plan.PACKAGES if p.is_source):
        found = sorted(dist.glob(package.name.replace("-", "_") + "-*.whl"))
        status[package.name]["wheel"] = found[-1].name if found else None
    write_json(BUILD_STATUS, {"seconds": time.monotonic() - started, "cpu_count": os.cpu_count(),
                              "arch": f"sm_{plan.CUDA_ARCH}", "packages": status})


def install_kernels(wait_s: float) -> int:
    """Wait up to ``wait_s`` for the build, then install what was built; 0 when mamba_ssm was."""
    deadline = time.monotonic() + wait_s
    while not BUILD_STATUS.is_file() and time.monotonic() < deadline:
        time.sleep(1)
    if not BUILD_STATUS.is_file():
        print("kernel build: not finished (or never started); the PyTorch scan is used", flush=True)
        return 1
    status = json.loads(BUILD_STATUS.read_text())["packages"]
    wheels = [BUILD / "dist" / s["wheel"] for s in status.values() if s["ok"] and s.get("wheel")]
    for name, s in status.items():
        print(f"kernel build: {name}: {'built' if s['ok'] else s['error']} ({s['seconds']:.0f} s)", flush=True)
    if wheels:
        pip_install(wheels)
    if not status.get("mamba-ssm", {}).get("ok"):
        print("kernel build: mamba_ssm not built; the PyTorch scan is used", flush=True)
        return 1
    return 0


# ---- install --------------------------------------------------------------------------------------------


def pip_install(wheels: list[Path]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)


def find_cublas13() -> str:
    """cuBLAS 13 of the device's torch (its nvidia packages) or else of the CUDA toolkit ('' if none)."""
    import site

    patterns = [os.path.join(root, "nvidia", "**", "libcublas.so.13") for root in site.getsitepackages()]
    patterns += ["/usr/local/cuda/lib64/libcublas.so.13", "/usr/local/cuda/targets/*/lib/libcublas.so.13"]
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found[0]
    return ""


def install(wheels: dict[str, Path]) -> dict:
    """Install the joined wheels into ``SITE`` and make faiss-gpu load; what was done."""
    SITE.mkdir(parents=True, exist_ok=True)
    pip_install([path for name, path in wheels.items() if name != plan.CUDART12])
    libs = SITE / "faiss_gpu.libs"  # on faiss' RPATH
    # faiss' __init__ would look for the CUDA 12 wheels as Python packages; the libraries it needs
    # are put on its RPATH instead, so its loader is told this is not a GPU build (the marker's only use)
    (SITE / "faiss" / "_gpu_build.py").unlink(missing_ok=True)
    with zipfile.ZipFile(wheels[plan.CUDART12]) as z:
        (libs / "libcudart.so.12").write_bytes(z.read("nvidia/cuda_runtime/lib/libcudart.so.12"))
    cublas13 = find_cublas13()
    here = Path(__file__).parent
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(libs / "libcublas.so.12"), str(here / "cublas12_shim.c"),
                    f"-Wl,--version-script={here / 'cublas12_shim.map'}", "-Wl,-soname,libcublas.so.12", "-ldl",
                    f'-DCUBLAS13="{cublas13 or "libcublas.so.13"}"'], check=True)
    # libfaiss.so needs a file of this name, though it calls nothing in it
    subprocess.run(["cc", "-shared", "-x", "c", "/dev/null", "-o", str(libs / "libcublasLt.so.12"),
                    "-Wl,-soname,libcublasLt.so.12"], check=True)
    return {"site": str(SITE.relative_to(ROOT)), "cublas13": cublas13 or None,
            "wheels": sorted(p.name for p in wheels.values())}


ENVIRONMENT = r"""
import json, platform, numpy, torch, polars, jsonargparse, faiss
cuda = torch.cuda.is_available()

def faiss_gpu_search():
    # a flat index on GPU 0 finds each of a few rows as its own best match (cuBLAS through the shim)
    if faiss.get_num_gpus() == 0:
        return None
    try:
        x = numpy.random.default_rng(0).standard_normal((1000, 32)).astype("float32")
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 32)
        index.add(x)
        return bool((index.search(x[:10], 1)[1][:, 0] == numpy.arange(10)).all())
    except Exception as err:
        return f"{type(err).__name__}: {err}"

print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "cuda_available": cuda, "device_name": torch.cuda.get_device_name(0) if cuda else None,
    "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
    "polars": polars.__version__, "jsonargparse": jsonargparse.__version__, "faiss": faiss.__version__,
    "faiss_gpus": faiss.get_num_gpus(), "faiss_gpu_classes": hasattr(faiss, "StandardGpuResources"),
    "faiss_gpu_search": faiss_gpu_search(),
}))
"""


def environment(env: dict) -> dict:
    """What the installed environment imports and sees, and the machine's GPU and compiler."""
    info: dict = {"cpu_count": os.cpu_count()}
    done = subprocess.run([sys.executable, "-c", ENVIRONMENT], env=env, cwd=ROOT, capture_output=True, text=True)
    info["imports"] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-TAIL_CHARS:]}
    for key, command in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
                         ("nvcc", ["nvcc", "--version"])):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=20)
            info[key] = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info[key] = None
    return info


# ---- steps ---------------------------------------------------------------------------------------------


def rehearsed(command: tuple[str, ...], settings: dict[str, str | None]) -> list[str]:
    """``command`` with each option of ``settings`` given its value (an option it lacks is added,
    one set to None is dropped with its value)."""
    argv = list(command)
    for option, value in settings.items():
        if option in argv:
            i = argv.index(option)
            if value is None:
                del argv[i:i + 2]
            else:
                argv[i + 1] = value
        elif value is not None:
            argv += [option, value]
    return argv


def filled(argv: list[str], out: Path) -> list[str]:
    return [a.format(python=sys.executable, work=WORK, out=out) for a in argv]


def run_step(step: plan.Step, box: float, env: dict, out: Path, rehearse: bool) -> dict:
    """The step's commands one after another within ``box`` seconds; its outcome."""
    log_path = WORK / f"{step.name}.log"
    started = time.monotonic()
    outcome = {"about": step.about, "box_s": round(box), "commands": [], "rc": 0, "timed_out": False}
    with open(log_path, "w") as log:
        for i, command in enumerate(step.commands):
            argv = filled(rehearsed(command, step.rehearsal(i)) if rehearse else list(command), out)
            outcome["commands"].append(" ".join(argv).replace(str(ROOT) + "/", ""))
            log.write(f"$ {outcome['commands'][-1]}\n")
            log.flush()
            # a process group of its own (not a session: the device tool still ends it with the call)
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, process_group=0)
            try:
                outcome["rc"] = process.wait(timeout=max(1.0, started + box - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the command and every process it started
                process.wait()
                outcome.update(rc=None, timed_out=True)
            if outcome["rc"] != 0:
                break
    outcome["seconds"] = round(time.monotonic() - started, 1)
    outcome["log_tail"] = log_path.read_text(errors="replace")[-TAIL_CHARS:]
    if (WORK / f"{step.name}.xml").is_file():
        outcome["pytest"] = junit_counts(WORK / f"{step.name}.xml")
    return outcome


def junit_counts(path: Path) -> dict:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def run_stages(env: dict, out: Path, deadline: float, rehearse: bool) -> dict:
    """Every stage in order, the steps of a stage side by side, each box cut to what is left."""
    outcomes: dict = {}
    for stage in plan.STAGES:
        left = deadline - time.monotonic()
        threads = []
        for step in stage:
            box = step.timeout_s * (REHEARSAL_BOX_SCALE if rehearse else 1)
            box = min(box, left) if not rehearse else box
            if box < 5:
                outcomes[step.name] = {"about": step.about, "skipped": "no time left in the call"}
                continue

            def target(step=step, box=box):
                outcomes[step.name] = run_step(step, box, env, out, rehearse)

            threads.append(threading.Thread(target=target))
            threads[-1].start()
        for thread in threads:
            thread.join()
        for step in stage:
            o = outcomes[step.name]
            print(f"{step.name:>11}: " + (o.get("skipped") or f"rc {o['rc']}{' (timed out)' if o['timed_out'] else ''} "
                                          f"in {o['seconds']:.0f} s of {o['box_s']} s"), flush=True)
    return outcomes


# ---- collect --------------------------------------------------------------------------------------------


def collect(out: Path, summary: dict) -> None:
    """Results (one JSON per name of ``plan.out_files()``), the summary and every log into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary["results"] = {}
    for step in plan.steps():
        for name, files in step.results.items():
            for f in files:
                path = WORK / f
                if path.is_file():
                    summary["results"].setdefault(name, {})[Path(f).stem] = json.loads(path.read_text())
    for name, parts in summary["results"].items():
        one = next(iter(parts.values())) if len(parts) == 1 else parts
        (out / name).write_text(json.dumps(one, indent=2))
    summary["results"] = {name: sorted(parts) for name, parts in summary["results"].items()}
    with tarfile.open(out / plan.LOGS, "w:gz") as tar:
        for path in sorted([*WORK.glob("*"), *BUILD.glob("*.log"), *BUILD.glob("status.json")]):
            if path.is_file() and path.suffix != ".tmp":
                data = path.read_bytes()[-LOG_BYTES:]
                info = tarfile.TarInfo(f"{path.parent.name}/{path.name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_json(out / plan.SUMMARY, summary)


def run(rehearse: bool) -> int:
    started = time.monotonic()
    deadline = started + plan.stages_seconds() - plan.COLLECT_S
    out = Path(os.environ.get("OUT") or (DEVICE / "out" if rehearse else "")).resolve()
    if not os.environ.get("OUT") and not rehearse:
        print("error: $OUT is not set (the device tool sets it)", file=sys.stderr)
        return 2
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    summary: dict = {"plan": "bench/gpu/plan.py", "rehearsal": rehearse, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if rehearse:
        shutil.rmtree(STASH, ignore_errors=True)
    try:
        for folder in sorted((ROOT / plan.WHEEL_DIR).glob("call-*")):
            if not (STASH / f"{folder.name}.json").is_file():  # earlier calls were received by their own call
                receive(folder, keep=rehearse)
        pieces = stashed_pieces()
        wheels = {p.name: join(pieces.get(p.file, []), p, STASH, WHEELS) for p in plan.PACKAGES if not p.is_source}
        summary["install"] = install(wheels)
    except (ReceiveError, subprocess.CalledProcessError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        summary["install"] = {"error": str(err)}
        collect(out, summary)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    summary["environment"] = environment(env)
    print(f"installed in {time.monotonic() - started:.0f} s: {json.dumps(summary['environment'])}", flush=True)
    summary["steps"] = run_stages(env, out, deadline, rehearse)
    summary["kernel_build"] = json.loads(BUILD_STATUS.read_text()) if BUILD_STATUS.is_file() else "not finished"
    summary["seconds"] = round(time.monotonic() - started, 1)
    collect(out, summary)
    print(f"done in {summary['seconds']:.0f} s; $OUT: " + ", ".join(sorted(p.name for p in out.iterdir())), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("receive", help="verify and stash one call's files").add_argument("call", type=int)
    run_parser = commands.add_parser("run", help="the last call: join, install, run the stages, collect")
    run_parser.add_argument("--rehearse", action="store_true", help="here on CPU: every call at once, small sizes")
    commands.add_parser("build-kernels", help="(started by receive) build the kernel wheels")
    kernels = commands.add_parser("install-kernels", help="install the built kernels when the build has ended")
    kernels.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the build to end")
    args = parser.parse_args(argv)
    if args.command == "receive":
        try:
            receive(ROOT / plan.WHEEL_DIR / f"call-{args.call}")
        except ReceiveError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "build-kernels":
        build_kernels()
        return 0
    if args.command == "install-kernels":
        return install_kernels(args.wait)
    return run(args.rehearse)


if __name__ == "__main__":
    sys.exit(main())
