"""The GPU plan of issue 16, as data in one place: what a session lent an H200 carries and runs.

A session is lent the device machine only by chance, for 15 minutes of device time in all, start-up
included (the device tool's README), so everything it does there is prepared and checked here:

- ``PACKAGES``: the lock, every file that travels to the device (name, version, file, sha256, size):
  wheels for what its image lacks (polars, jsonargparse and its signature extras, faiss-gpu and
  the CUDA 12 runtime that faiss-gpu links), and the source packages of ``mamba_ssm`` and
  ``causal_conv1d``, compiled there for sm_90 alone;
- ``STAGES``: the ordered steps of the last call, each a list of commands with a time box and the
  files it writes, steps of one stage running side by side;
- the device tool's limits, against which ``tests/test_gpu_plan.py`` checks the calls that
  ``bench/gpu/prepare.py`` writes.

Left out on purpose (docs/gpu.md says why): MLflow (the ML-1M runs record with ``--tracking csv``)
and torchrec, whose fbgemm-gpu 1.6.0 for torch 2.11 is a 465 MB wheel (the item tower falls back
to plain torch tables, as designed for machines without a matching fbgemm).

Commands are argument lists with placeholders that ``bench/gpu/run_on_device.py`` fills in:
``{python}`` the device's Python, ``{work}`` the work folder (``.gpu/work``), ``{out}`` ``$OUT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 2**20

# ---- the device tool's limits (its README) and what this plan assumes about a call --------------
CALL_BYTES = 64 * MiB  # the working tree that travels with one call, carried paths included
MARGIN_BYTES = 2 * MiB  # room left in every call for files that change between prepare and the call
COMMAND_CHARS = 2000  # one call's command
CALL_SECONDS = 600  # one call's timeout_s at most
DEVICE_BUDGET_S = 900  # a session's device time, all calls together
START_UP_S = 120  # a fresh machine's start ("minutes"; 1-2 min seen)
CALL_OVERHEAD_S = 20  # per call: sending the tree and the carried files, starting the command (assumed)
WARM_S = 30  # a machine stays warm this long after a call: the next call must come sooner
CARRY_PATHS = 8
OUT_FILES = 8  # at most 8 files come back from $OUT ...
OUT_FILE_BYTES = 16 * MiB  # ... each at most 16 MiB

# ---- the device -------------------------------------------------------------------------------------
PYTHON_TAG = "3.12"  # the device's python3 (its torch 2.11.0+cu130 is used as it is)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CUDA_ARCH = "90"  # H200: sm_90, the one architecture the kernels are compiled for

# ---- where things lie, relative to the repository root -------------------------------------------
WHEEL_DIR = ".whl"  # here: downloads and one folder per call (ignored by git)
DEVICE_DIR = ".gpu"  # there: stash of received files, installed packages, kernel build, work files
DATA_DIRS = ("data/ml-1m",)  # prepared data the steps read (make data/ml-1m), carried in the last call


@dataclass(frozen=True)
class Package:
    """One file of the lock."""

    name: str
    version: str
    file: str
    sha256: str
    size: int
    why: str

    @property
    def is_source(self) -> bool:
        return self.file.endswith(".tar.gz")


# Sources first: they travel in the first call, so that their build starts there while the rest travels.
PACKAGES = (
    Package("mamba-ssm", "2.3.2.post1", "mamba_ssm-2.3.2.post1.tar.gz",
            "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028", 216439,
            "fused selective-scan kernels; source only, compiled there"),
    Package("causal-conv1d", "1.7.0", "causal_conv1d-1.7.0.tar.gz",
            "3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b", 30328,
            "Mamba's fused causal convolution; source only, compiled there"),
    Package("polars", "2.1.0", "polars-2.1.0-py3-none-any.whl",
            "63c50ce3533f5a03d17c3a2a24f1d0e0c7eda98fbde4268a3cba900d34060e67", 911474,
            "the data pipeline"),
    Package("polars-runtime-32", "2.1.0", "polars_runtime_32-2.1.0-cp311-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            "0b838056cf365d7497971d9d9825c547766923338771c48c545b86ead2ebc572", 53863954,
            "polars' compiled engine"),
    Package("jsonargparse", "4.53.0", "jsonargparse-4.53.0-py3-none-any.whl",
            "3e78dfd4e02ef00c899e85a9b0593347d730c7d551411568438a294cf1d39959", 177603,
            "LightningCLI (python -m recsys.train)"),
    Package("docstring-parser", "0.18.0", "docstring_parser-0.18.0-py3-none-any.whl",
            "b3fcbed555c47d8479be0796ef7e19c2670d428d72e96da63f3a40122860374b", 22484,
            "jsonargparse[signatures]"),
    Package("typeshed-client", "2.15.0", "typeshed_client-2.15.0-py3-none-any.whl",
            "04982c298c9e133977f0a9ec3e66d4ec424a09ec7d4fad63f814eb69dfbbc7fc", 808045,
            "jsonargparse[signatures]"),
    Package("nvidia-cuda-runtime-cu12", "12.9.79", "nvidia_cuda_runtime_cu12-12.9.79-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            "25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3", 3493179,
            "libcudart.so.12 for faiss-gpu (the CUDA 13 driver runs CUDA 12 programs); not installed, only that file"),
    Package("faiss-gpu", "1.15.1", "faiss_gpu-1.15.1-cp310-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
            "c9833c9b1c46d925edf6ee457a36869bbc444275984cf83a7d736e7f4a2f3439", 135286937,
            "faiss GPU indexes; built for CUDA 12: its cuBLAS 12 calls go to the device's cuBLAS 13 through "
            "bench/gpu/cublas12_shim.c (the only CUDA 13 build on the registry, faiss-gpu-cu13-cuvs, needs "
            "libcuvs, which the registry does not have)"),
)

#: the wheel whose libcudart.so.12 is copied next to faiss' libraries instead of being installed
CUDART12 = "nvidia-cuda-runtime-cu12"
#: the cuBLAS 12 functions faiss-gpu 1.15.1's libfaiss.so calls, which the shim forwards
CUBLAS12_FUNCTIONS = (
    "cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasGetMathMode", "cublasSetMathMode",
    "cublasSgemmEx", "cublasGemmEx", "cublasGemmStridedBatchedEx",
)


@dataclass(frozen=True)
class Step:
    """Commands run one after another (the first failure ends the step) within ``timeout_s``.

    ``results``: files the commands write, relative to ``{work}``, by the name they get in ``$OUT``
    (several files for one name are merged into one JSON object keyed by their stems).
    ``rehearse``: for each command, option -> value for the CPU rehearsal (small sizes, CPU device):
    an option the command has gets the value, one it lacks is added, one mapped to None is dropped.
    """

    name: str
    commands: tuple[tuple[str, ...], ...]
    timeout_s: int
    results: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rehearse: tuple[dict[str, str | None], ...] = ()
    about: str = ""

    def rehearsal(self, i: int) -> dict[str, str | None]:
        """The rehearsal settings of command ``i`` (none for a step that needs none)."""
        return self.rehearse[i] if self.rehearse else {}


PRECISIONS = ("fp32", "tf32", "bf16")
ML1M = "ml-1m=data/ml-1m"


def _train_step(precision: str, *extra: str, out: str) -> tuple[str, ...]:
    return ("{python}", "bench/train_step.py", "--device", "cuda", "--precision", precision, "--data", ML1M,
            "--steps", "6", "--threads", "4", *extra, "--out", "{work}/" + out)


TRAIN_STEP_REHEARSE = {"--device": "cpu", "--steps": "1", "--threads": "2", "--max-len": "20"}

TESTS = Step(
    "tests",
    (("{python}", "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rs", "tests/test_gpu.py",
      "--junitxml={work}/tests.xml"),),
    timeout_s=120,
    about="CPU against GPU: network, loss, gradients, ranks; exact search and faiss flat",
)
ACCURACY = Step(
    "accuracy",
    (("{python}", "bench/accuracy.py", "--config", "configs/ml-1m.yaml", "--name", "gpu-ml-1m", "--parallel", "7",
      "--tracking", "csv", "--set", "trainer.max_time=00:00:02:20", "--out-dir", "{work}",
      "--label", "H200: 7 runs side by side on one GPU, each stopped after 140 s of training at the latest"),),
    timeout_s=200,
    results={"gpu-accuracy-ml-1m.json": ("accuracy_gpu-ml-1m.json",)},
    rehearse=({"--parallel": "2", "--epochs": "1", "--max-len": "20", "--sizes": "16,32", "--separate-sizes": "16",
               "--set": "trainer.max_time=00:00:01:00"},),
    about="MovieLens-1M through python -m recsys.train: the one Matryoshka run, each size alone, SASRec",
)
TRAIN_STEP = Step(
    "train_step",
    tuple(_train_step(p, out=f"train_step-{p}.json") for p in PRECISIONS),
    timeout_s=90,
    results={"gpu-train_step.json": tuple(f"train_step-{p}.json" for p in PRECISIONS)},
    rehearse=(TRAIN_STEP_REHEARSE,) * len(PRECISIONS),
    about="training step of LRU, Mamba (PyTorch scan) and SASRec on ML-1M batches: fp32, TF32, bf16 autocast",
)
RETRIEVAL = Step(
    "retrieval",
    (("{python}", "bench/retrieval.py", "--device", "gpu", "--catalogues", "1000000", "--sizes", "64,256",
      "--kinds", "flat,ivf_flat", "--funnel-prefixes", "32", "--funnel-shortlists", "400,1600",
      "--funnel-index-kinds", "flat", "--queries", "4096", "--repeats", "5", "--threads", "16",
      "--out", "{work}/retrieval.json"),),
    timeout_s=60,
    results={"gpu-retrieval.json": ("retrieval.json",)},
    rehearse=({"--device": "cpu", "--catalogues": "20000", "--queries": "64", "--repeats": "1", "--threads": "2"},),
    about="faiss GPU indexes against torch exact search on the GPU, 10^6 items",
)
CANDIDATES = Step(
    "candidates",
    (("{python}", "bench/candidates.py", "--device", "cuda", "--items", "1000000", "--sizes", "64",
      "--users-large", "200000", "--search-queries", "4096", "--repeats", "3", "--batch-size", "8192",
      "--users-per-part", "50000", "--out", "{work}/candidates.json"),),
    timeout_s=130,
    results={"gpu-candidates.json": ("candidates.json",)},
    rehearse=({"--device": "cpu", "--items": "5000", "--users-large": None, "--users": "300", "--search-queries": "64",
               "--repeats": "1", "--batch-size": "256", "--users-per-part": "100"},),
    about="batch candidates, 10^6 items at size 64, k=100, for a subsample of 200,000 users (seconds_per_million_users extrapolates)",
)
KERNELS = Step(
    "kernels",
    (("{python}", "bench/gpu/run_on_device.py", "install-kernels", "--wait", "30"),
     ("{python}", "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rs", "tests/test_mamba.py",
      "-k", "kernels", "--junitxml={work}/kernels.xml"),
     _train_step("fp32", "--encoders", "mamba", out="train_step-mamba-kernels.json")),
    timeout_s=45,
    results={"gpu-train_step.json": ("train_step-mamba-kernels.json",)},
    rehearse=({"--wait": "120"}, {}, TRAIN_STEP_REHEARSE),
    about="mamba_ssm and causal_conv1d built there (started in the first call): kernel test, Mamba step with kernels",
)

#: the last call's stages, in order; the steps of one stage run side by side (the accuracy runs
#: time nothing that the tests could disturb)
STAGES: tuple[tuple[Step, ...], ...] = ((ACCURACY, TESTS), (TRAIN_STEP,), (RETRIEVAL,), (CANDIDATES,), (KERNELS,))

INSTALL_S = 40  # the last call before its stages: join, verify, install, the cuBLAS shim, import checks
COLLECT_S = 15  # the last call after them: results and logs into $OUT
RECEIVE_S = 20  # every call before the last: verify and stash what it carried
KERNEL_BUILD_S = 620  # the background build of the kernels, from the first call until about the kernels stage
LOGS = "gpu-logs.tar.gz"  # every log, test report and side file, in one file of $OUT
SUMMARY = "gpu-run.json"  # device, versions, install, kernel build and every step's outcome


def steps() -> list[Step]:
    return [step for stage in STAGES for step in stage]


def stages_seconds() -> int:
    """The last call's time box: install, the stages (each as long as its longest step), collection."""
    return INSTALL_S + sum(max(step.timeout_s for step in stage) for stage in STAGES) + COLLECT_S


def out_files() -> list[str]:
    """The files the last call leaves in ``$OUT``."""
    names = {name for step in steps() for name in step.results}
    return sorted(names) + [SUMMARY, LOGS]
