"""Maximum-inner-product retrieval over an item matrix: faiss indexes and funnel search.

A size-``s`` model scores item ``r`` for a user vector ``u`` as ``u @ Z[r, :s]``, so serving needs the
``k`` rows of ``Z[:, :s]`` with the largest inner product: maximum inner product search (MIPS). This
module builds faiss indexes for it (exact flat, IVF-flat, HNSW, IVF-PQ), saves and loads them, moves
them to the GPU when the GPU build of faiss and a GPU are present, and adds two things faiss lacks:
exclusion of per-query row sets (the user's already-seen items) and funnel search (METHOD.md §6,
after AdANNS): shortlist with a small prefix of the Matryoshka vectors, re-rank with larger ones.

Row convention
--------------
Every function here indexes rows ``0..N-1`` of the array it is given, and returns those rows. It
knows nothing about item ids or padding: the model's item matrix has a padding row 0 that the
caller drops before building (``Z[1:, :s]``), so our row ``r`` is the caller's row ``r`` of what it
passed in, nothing more. Mapping rows to item ids, and excluded item ids to rows, is the caller's job.

Results
-------
Searches return ``(scores, rows)``: float32 ``(B, k)`` in descending score order and int64 ``(B, k)``.
When fewer than ``k`` rows can be returned (``k > N``, more rows excluded than ``N - k``, or an
approximate index whose probed lists hold fewer than ``k`` rows), the missing tail entries are
``rows == -1`` with ``scores == -inf``. Callers should drop ``-1`` rows, never map them to items.

Devices
-------
Indexes are always built and saved on the CPU. :func:`load_index` moves flat, IVF-flat and IVF-PQ
indexes to GPU 0 when :func:`gpu_available`; HNSW always stays on the CPU, because faiss has no GPU
version of its HNSW graph (its GPU graph index, CAGRA, is a different structure built on the GPU).
The GPU path is written to the faiss GPU API but has not been run on a GPU in this project yet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

__all__ = [
    "KINDS",
    "GPU_MAX_K",
    "IndexSpec",
    "FunnelSpec",
    "FunnelSearch",
    "gpu_available",
    "build_index",
    "save_index",
    "load_index",
    "index_kind",
    "is_gpu_index",
    "search",
    "torch_topk",
    "recall_at_k",
]

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf_flat", "hnsw", "ivf_pq")

# faiss GPU indexes select at most this many results per query (and probe at most this many lists).
GPU_MAX_K = 2048

# Which optional parameters belong to which index kind; a parameter given for another kind is an
# error, so a manifest never carries settings that silently do nothing.
_KIND_PARAMS = {
    "flat": (),
    "ivf_flat": ("nlist", "nprobe", "train_size"),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivf_pq": ("nlist", "nprobe", "train_size", "pq_m", "pq_nbits"),
}
_ALL_PARAMS = ("nlist", "nprobe", "train_size", "hnsw_m", "ef_construction", "ef_search", "pq_m", "pq_nbits")

# Rows added to an index per call; big enough for BLAS, small enough for a useful progress bar.
_ADD_CHUNK = 65_536
# Catalogues at least this large get a progress bar while being added.
_PROGRESS_FROM = 1_000_000


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Index specification
# ---------------------------------------------------------------------------------------------


def _check_spec_keys(cls: type, data: Any, what: str) -> None:
    """A spec read back from a manifest: a JSON object with no keys the dataclass does not know."""
    if not isinstance(data, dict):
        raise ValueError(f"the {what} spec must be a JSON object, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} spec keys {unknown}; known keys: {sorted(known)}")


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index to build, as plain JSON-able settings (stored in an export's manifest).

    ``kind`` is one of ``"flat"`` (exact), ``"ivf_flat"``, ``"hnsw"``, ``"ivf_pq"``. Parameters left
    ``None`` get defaults from the catalogue size in :meth:`resolve`; a parameter that does not
    belong to the kind is an error. Store ``spec.resolve(N, s).to_dict()`` so that the manifest
    records the values actually used.

    - ``nlist``: inverted lists (IVF kinds). Default: the power of two nearest ``4 * sqrt(N)`` (faiss'
      rule of thumb), capped at ``N // 39`` so k-means gets the 39 points per centroid it asks for.
    - ``nprobe``: lists visited per query. Default ``nlist // 8``: 8x fewer rows scanned than
      exact search. Inner-product IVF needs many probes: on the benchmark's synthetic Matryoshka
      items (k=100, sizes 32-256) ``nlist // 16`` found 0.62-0.76 of the exact top-100 at 10^5
      items, ``nlist // 8`` 0.78-0.85 (0.80-0.89 at 10^6), ``nlist // 4`` 0.91-0.94
      (``bench/retrieval.py`` sweeps it; raise it where recall matters more than latency).
    - ``train_size``: rows sampled (with ``seed``) to train k-means and PQ. Default ``64 * nlist``
      (and at least ``64 * 2**pq_nbits`` for PQ), at most ``N``: enough for k-means, and it keeps
      k-means on 10^6 items to minutes on 2 cores.
    - ``hnsw_m`` (links per node, default 32), ``ef_construction`` (default 64), ``ef_search``
      (default 256; faiss uses ``max(ef_search, k)``; on the same data at 10^5 items 128 found
      0.87-0.90 of the top-100, 256 0.93-0.94, 512 0.96-0.97).
    - ``pq_m`` (sub-quantizers, must divide the dimension; default the largest divisor of ``d`` up to
      ``d // 4``, i.e. one byte per 4 dimensions), ``pq_nbits`` (bits per code, default 8).
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    train_size: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    pq_m: int | None = None
    pq_nbits: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {list(KINDS)}, got {self.kind!r}")
        # numpy integers become plain ints so that to_dict() is always JSON-serialisable
        object.__setattr__(self, "seed", _check_int("seed", self.seed, minimum=0))
        for name in _ALL_PARAMS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in _KIND_PARAMS[self.kind]:
                raise ValueError(
                    f"parameter {name}={value!r} does not apply to index kind {self.kind!r} "
                    f"(its parameters: {list(_KIND_PARAMS[self.kind]) or 'none'})"
                )
            object.__setattr__(self, name, _check_int(name, value))
        if self.pq_nbits is not None and self.pq_nbits > 16:
            raise ValueError(f"pq_nbits must be at most 16, got {self.pq_nbits}")
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe={self.nprobe} exceeds nlist={self.nlist}")

    def resolve(self, num_items: int, dim: int) -> IndexSpec:
        """This spec with every default filled in for ``num_items`` rows of ``dim`` dimensions.

        Raises ``ValueError`` when the settings cannot work for that catalogue (more lists than
        items, a PQ split that does not divide ``dim``, too few items to train the codebooks, ...).
        """
        n = _check_int("num_items", num_items)
        d = _check_int("dim", dim)
        values: dict[str, int] = {}
        if self.kind in ("ivf_flat", "ivf_pq"):
            nlist = self.nlist if self.nlist is not None else _default_nlist(n)
            if nlist > n:
                raise ValueError(f"nlist={nlist} exceeds the number of items {n}")
            nprobe = self.nprobe if self.nprobe is not None else max(1, nlist // 8)
            if nprobe > nlist:
                raise ValueError(f"nprobe={nprobe} exceeds nlist={nlist}")
            values.update(nlist=nlist, nprobe=nprobe)
        if self.kind == "ivf_pq":
            pq_m = self.pq_m if self.pq_m is not None else _default_pq_m(d)
            if d % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the vector dimension {d}")
            nbits = self.pq_nbits if self.pq_nbits is not None else 8
            if n < 2**nbits:
                raise ValueError(
                    f"ivf_pq with pq_nbits={nbits} needs at least {2**nbits} items to train its "
                    f"codebooks, got {n}; lower pq_nbits or use another kind"
                )
            values.update(pq_m=pq_m, pq_nbits=nbits)
        if self.kind in ("ivf_flat", "ivf_pq"):
            floor = values["nlist"]
            if self.kind == "ivf_pq":
                floor = max(floor, 2 ** values["pq_nbits"])
            default_train = min(n, max(64 * values["nlist"], 64 * 2 ** values.get("pq_nbits", 0)))
            train_size = self.train_size if self.train_size is not None else default_train
            if train_size > n:
                raise ValueError(f"train_size={train_size} exceeds the number of items {n}")
            if train_size < floor:
                raise ValueError(f"train_size={train_size} is below the {floor} rows needed to train this index")
            values["train_size"] = train_size
        if self.kind == "hnsw":
            values.update(
                hnsw_m=self.hnsw_m if self.hnsw_m is not None else 32,
                ef_construction=self.ef_construction if self.ef_construction is not None else 64,
                ef_search=self.ef_search if self.ef_search is not None else 256,
            )
        return replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with only the parameters of this kind (and ``seed``)."""
        out = {"kind": self.kind}
        for name in _KIND_PARAMS[self.kind]:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["seed"] = self.seed
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a manifest from another version)."""
        _check_spec_keys(cls, data, "index")
        return cls(**data)


def _default_nlist(n: int) -> int:
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    return max(1, min(target, n // 39))


def _default_pq_m(d: int) -> int:
    limit = max(1, d // 4)
    return max(m for m in range(1, limit + 1) if d % m == 0)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when this faiss is the GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES = None


def _gpu_resources():
    # One StandardGpuResources per process: it owns the cuBLAS handle, streams and a scratch pool,
    # which are costly to create and must outlive every index that uses them.
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def is_gpu_index(index: faiss.Index) -> bool:
    """True for a faiss GPU index (``GpuIndexFlat``, ``GpuIndexIVFFlat``, ``GpuIndexIVFPQ``, ...)."""
    return type(index).__name__.startswith("Gpu")


def index_kind(index: faiss.Index) -> str:
    """Which of :data:`KINDS` a (CPU or GPU) faiss index is."""
    name = type(index).__name__.removeprefix("Gpu")
    if name in ("IndexFlat", "IndexFlatIP"):
        return "flat"
    if name == "IndexIVFFlat":
        return "ivf_flat"
    if name.startswith("IndexHNSW"):
        return "hnsw"
    if name == "IndexIVFPQ":
        return "ivf_pq"
    raise ValueError(f"unsupported faiss index type {type(index).__name__}")


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of a CPU index, or the index itself where faiss cannot put it on the GPU.

    Flat and IVF-flat keep float32 storage and arithmetic, so exact search gives the CPU's results
    (to float rounding). IVF-PQ uses float16 lookup tables: its scores are approximate anyway, and
    float32 tables for many sub-quantizers do not fit in the GPU's shared memory.
    Untested here: no GPU on the development machines.
    """
    kind = index_kind(index)
    if kind == "hnsw":
        logger.info("HNSW index stays on the CPU: faiss has no GPU HNSW")
        return index
    options = faiss.GpuClonerOptions()
    options.useFloat16 = kind == "ivf_pq"
    try:
        gpu_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index, options)
    except RuntimeError as err:  # e.g. a PQ code size or nprobe the GPU kernels do not support
        logger.warning("could not move the %s index to the GPU, keeping it on the CPU: %s", kind, err)
        return index
    # Keep the resources alive as long as the index (faiss' Python wrapper does not do it here).
    gpu_index.referenced_objects = [_GPU_RESOURCES]
    return gpu_index


def _max_k(index: faiss.Index) -> int:
    return GPU_MAX_K if is_gpu_index(index) else index.ntotal


# ---------------------------------------------------------------------------------------------
# Build, save, load
# ---------------------------------------------------------------------------------------------


def _as_matrix(name: str, array: Any, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 (rows, dim) copy-or-view of ``array``, checked."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(array).__name__}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns, got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} row {int(np.flatnonzero(bad)[0])} holds a NaN or infinite value")
    return array


def _factory_string(spec: IndexSpec) -> str:
    if spec.kind == "flat":
        return "Flat"
    if spec.kind == "ivf_flat":
        return f"IVF{spec.nlist},Flat"
    if spec.kind == "hnsw":
        return f"HNSW{spec.hnsw_m},Flat"
    return f"IVF{spec.nlist},PQ{spec.pq_m}x{spec.pq_nbits}"


def _apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.kind in ("ivf_flat", "ivf_pq"):
        index.nprobe = spec.nprobe
    elif spec.kind == "hnsw":
        index.hnsw.efSearch = spec.ef_search


def build_index(vectors: np.ndarray, spec: IndexSpec | None = None) -> faiss.Index:
    """A CPU faiss inner-product index over the rows of ``vectors`` (float32 ``(N, s)``).

    Row ``r`` of ``vectors`` is result row ``r`` (see the module docstring). IVF kinds train
    k-means (and PQ codebooks) on ``spec.train_size`` rows sampled with ``spec.seed``, so the same
    inputs give the same index. Catalogues of 10^6 rows or more show a progress bar while adding.
    """
    spec = spec or IndexSpec()
    x = _as_matrix("vectors", vectors)
    n, d = x.shape
    spec = spec.resolve(n, d)
    index = faiss.index_factory(d, _factory_string(spec), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = spec.ef_construction
    if spec.kind in ("ivf_flat", "ivf_pq"):
        index.cp.seed = spec.seed
        if spec.kind == "ivf_pq":
            index.pq.cp.seed = spec.seed
            # index_factory turns on polysemous training (a simulated-annealing reordering of the
            # codes for Hamming-distance filtering, which we never use); it dominated build time.
            index.do_polysemous_training = False
        rng = np.random.default_rng(spec.seed)
        sample = x if spec.train_size == n else x[np.sort(rng.choice(n, spec.train_size, replace=False))]
        _quiet_small_training(index, spec)
        logger.info("training %s on %d of %d rows (d=%d)", _factory_string(spec), len(sample), n, d)
        index.train(sample)
    _add_rows(index, x, f"adding to {spec.kind} index (d={d})")
    _apply_search_params(index, spec)
    logger.info("built %s index: %d rows, d=%d", spec.kind, index.ntotal, d)
    return index


def _quiet_small_training(index: faiss.Index, spec: IndexSpec) -> None:
    """Warn once (in our log) instead of faiss' stderr line per k-means run on a small sample.

    faiss asks for 39 training points per centroid and prints a warning for every PQ sub-quantizer
    it trains with fewer; small catalogues legitimately have fewer, so lower its threshold.
    """
    clusterings = [("nlist", spec.nlist, index.cp)]
    if spec.kind == "ivf_pq":
        clusterings.append(("PQ codebook", 2**spec.pq_nbits, index.pq.cp))
    for what, centroids, params in clusterings:
        if spec.train_size < params.min_points_per_centroid * centroids:
            logger.warning(
                "training %d %s centroids on only %d rows (faiss suggests %d or more)",
                centroids, what, spec.train_size, params.min_points_per_centroid * centroids,
            )
            params.min_points_per_centroid = 1


def _add_rows(index: faiss.Index, x: np.ndarray, description: str) -> None:
    from tqdm.auto import tqdm

    n = len(x)
    with tqdm(total=n, desc=description, unit="rows", disable=n < _PROGRESS_FROM) as bar:
        for start in range(0, n, _ADD_CHUNK):
            block = x[start : start + _ADD_CHUNK]
            index.add(block)
            bar.update(len(block))


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` (CPU form; a GPU index is copied back first) with ``faiss.write_index``.

    Writes to a temporary file in the same directory and renames it, so ``path`` is either the
    old file or the complete new one, never a half-written index.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist (saving index to {path})")
    cpu_index = faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(cpu_index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_index(
    path: str | os.PathLike,
    spec: IndexSpec,
    device: str = "auto",
    *,
    num_items: int | None = None,
    dim: int | None = None,
) -> faiss.Index:
    """Read an index written by :func:`save_index` and put it on ``device``.

    ``device``: ``"auto"`` (GPU when :func:`gpu_available`, else CPU), ``"cpu"`` or ``"gpu"``
    (an error when no GPU is usable). HNSW stays on the CPU whatever ``device`` says. The index must
    match ``spec`` (kind, and for IVF kinds ``nlist``; ``num_items``/``dim`` when given); its search
    settings (``nprobe``, ``ef_search``) are taken from ``spec``, so a manifest can change them
    without rebuilding.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file {path} does not exist")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path} is not a readable faiss index: {err}") from err
    kind = index_kind(index)
    if kind != spec.kind:
        raise ValueError(f"{path} holds a {kind!r} index but the spec says {spec.kind!r}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{path} is not an inner-product index (faiss metric {index.metric_type})")
    if num_items is not None and index.ntotal != num_items:
        raise ValueError(f"{path} indexes {index.ntotal} rows, expected {num_items}")
    if dim is not None and index.d != dim:
        raise ValueError(f"{path} indexes {index.d}-d vectors, expected {dim}")
    resolved = spec.resolve(index.ntotal, index.d)
    if kind in ("ivf_flat", "ivf_pq") and index.nlist != resolved.nlist:
        raise ValueError(f"{path} has nlist={index.nlist}, the spec says nlist={resolved.nlist}")
    _apply_search_params(index, resolved)
    if device == "gpu" and not gpu_available():
        raise RuntimeError("device='gpu' but the GPU build of faiss or a GPU is missing")
    if device != "cpu" and gpu_available():
        index = _to_gpu(index)
    return index


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def _check_k(k: Any) -> int:
    return _check_int("k", k)


def _check_exclude(exclude: Sequence[Any], num_queries: int, num_rows: int) -> list[np.ndarray]:
    if len(exclude) != num_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_queries} queries")
    out = []
    for q, rows in enumerate(exclude):
        rows = np.asarray(rows)
        if rows.size == 0:
            out.append(np.empty(0, dtype=np.int64))
            continue
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"exclude[{q}] must be a 1-D array of integer rows, got {rows.dtype} {rows.shape}")
        bad = (rows < 0) | (rows >= num_rows)
        if bad.any():
            raise ValueError(
                f"exclude[{q}] holds row {int(rows[bad][0])}, outside 0..{num_rows - 1} "
                "(rows are positions in the indexed matrix, not item ids)"
            )
        out.append(rows.astype(np.int64, copy=False))
    return out


def _pad(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen results to ``k`` columns with ``-inf`` / ``-1``."""
    missing = k - rows.shape[1]
    if missing <= 0:
        return scores, rows
    b = rows.shape[0]
    scores = np.concatenate([scores, np.full((b, missing), -np.inf, dtype=np.float32)], axis=1)
    rows = np.concatenate([rows, np.full((b, missing), -1, dtype=np.int64)], axis=1)
    return scores, rows


def _drop_excluded(
    scores: np.ndarray, rows: np.ndarray, exclude: list[np.ndarray], k: int, num_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove excluded rows (and ``-1`` holes) from each result list, keep the first ``k`` left.

    Vectorised: every (query, row) pair becomes one int64 key ``query * num_rows + row``, so one
    ``np.isin`` marks all excluded hits; a stable argsort of the drop mask then moves the kept
    entries to the front in their original (score) order.
    """
    b = rows.shape[0]
    query = np.arange(b, dtype=np.int64)[:, None]
    excluded_keys = np.concatenate(
        [q * num_rows + e for q, e in enumerate(exclude)] or [np.empty(0, np.int64)]
    )
    drop = (rows < 0) | np.isin(query * num_rows + rows, excluded_keys)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    dropped = np.take_along_axis(drop, order, axis=1)
    scores[dropped] = -np.inf
    rows[dropped] = -1
    return scores, rows


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows by inner product for each query, optionally excluding rows per query.

    ``queries``: float ``(B, d)``. ``exclude``: one array of rows per query (e.g. the user's seen
    items, already mapped to rows), or ``None``. Returns float32 ``(B, k)`` scores in descending
    order and int64 ``(B, k)`` rows; missing entries are ``-1`` / ``-inf`` (module docstring).

    Exclusion searches ``k + max_b |exclude[b]|`` results and filters them, which for an exact index
    gives exactly the top-``k`` of the non-excluded rows (those are among the top ``k + |E_b|``
    whatever ``E_b`` is). GPU indexes return at most :data:`GPU_MAX_K` results per search; when
    ``k`` plus the exclusions exceed that, lists may come back shorter than ``k`` (a warning says how
    many) though no excluded row is ever returned.
    """
    k = _check_k(k)
    q = _as_matrix("queries", queries, dim=index.d)
    n = index.ntotal
    if n == 0:
        raise ValueError("the index is empty")
    checked = _check_exclude(exclude, len(q), n) if exclude is not None else None
    extra = max((len(e) for e in checked), default=0) if checked else 0
    wanted = min(n, k + extra)
    fetch = min(wanted, _max_k(index))
    scores, rows = index.search(q, fetch)
    scores = scores.astype(np.float32, copy=False)
    rows = rows.astype(np.int64, copy=False)
    scores[rows < 0] = -np.inf
    if extra:
        scores, rows = _drop_excluded(scores, rows, checked, k, n)
        if fetch < wanted:
            short = int(((rows >= 0).sum(axis=1) < min(k, n)).sum())
            if short:
                logger.warning(
                    "%d of %d queries have fewer than k=%d results: k plus %d excluded rows exceeds "
                    "the GPU limit of %d results", short, len(q), k, extra, GPU_MAX_K,
                )
    elif fetch < k and fetch < n:
        logger.warning("k=%d exceeds the GPU limit of %d results; returning %d", k, GPU_MAX_K, fetch)
    return _pad(scores[:, :k], rows[:, :k], k)


def torch_topk(
    queries: np.ndarray | torch.Tensor,
    vectors: np.ndarray | torch.Tensor,
    k: int,
    block_rows: int = 262_144,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product with plain ``torch.topk(q @ Z.T)``: the reference.

    Works over blocks of ``block_rows`` item rows and merges the running top-``k``, so memory stays
    ``B * block_rows`` floats however large the catalogue. Runs on the device of ``queries`` when it
    is a tensor. Returns numpy float32 scores and int64 rows like :func:`search`, padded with
    ``-inf`` / ``-1`` when ``k > N``.
    """
    k = _check_k(k)
    q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(_as_matrix("queries", queries))
    z = vectors if isinstance(vectors, torch.Tensor) else torch.from_numpy(_as_matrix("vectors", vectors))
    if q.ndim != 2 or z.ndim != 2 or q.shape[1] != z.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and vectors {tuple(z.shape)} must be 2-D with equal widths")
    q = q.float()
    z = z.to(device=q.device, dtype=torch.float32)
    n = z.shape[0]
    best_scores = torch.empty(q.shape[0], 0, device=q.device)
    best_rows = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
    with torch.no_grad():
        for start in range(0, n, block_rows):
            block = q @ z[start : start + block_rows].T
            s, i = torch.topk(block, min(k, block.shape[1]), dim=1)
            cand_scores = torch.cat([best_scores, s], dim=1)
            cand_rows = torch.cat([best_rows, i + start], dim=1)
            best_scores, pos = torch.topk(cand_scores, min(k, cand_scores.shape[1]), dim=1)
            best_rows = torch.gather(cand_rows, 1, pos)
    return _pad(best_scores.cpu().numpy().astype(np.float32), best_rows.cpu().numpy(), k)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found_b ∩ truth_b| / |truth_b|`` (``-1`` entries ignored).

    ``found`` and ``truth`` are int64 ``(B, k1)`` and ``(B, k2)`` row arrays; recall@K of the exact
    top-K is ``recall_at_k(approx_rows[:, :K], exact_rows[:, :K])``.
    """
    found, truth = np.asarray(found), np.asarray(truth)
    if found.ndim != 2 or truth.ndim != 2 or len(found) != len(truth):
        raise ValueError(f"found {found.shape} and truth {truth.shape} must be 2-D with equal rows")
    b = len(truth)
    n = int(max(found.max(initial=0), truth.max(initial=0))) + 1
    query = np.arange(b, dtype=np.int64)[:, None]
    valid_truth = truth >= 0
    found_keys = (query * n + found)[found >= 0]
    hits = np.isin(query * n + truth, found_keys) & valid_truth
    per_query = hits.sum(axis=1) / np.maximum(valid_truth.sum(axis=1), 1)
    return float(per_query.mean())


# ---------------------------------------------------------------------------------------------
# Funnel search
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunnelSpec:
    """Settings of a funnel search (METHOD.md §6, after AdANNS), JSON-able for a manifest.

    Stage 0: an index of kind ``index`` over ``vectors[:, :prefix]`` returns ``shortlist`` rows.
    Then for each ``d`` in ``rerank_dims`` (increasing, each > ``prefix``) the surviving rows are
    scored exactly with ``vectors[:, :d]``; after stage ``i`` (all but the last) the best
    ``keep[i]`` survive (never fewer than ``k``); the last stage returns the top ``k``. Default
    ``keep`` halves the candidate list at each intermediate stage.

    With ``shortlist >= N``, an exact prefix index and ``keep`` entries ``>= N`` the result equals
    exact search at ``rerank_dims[-1]``; the point is to get close with a small shortlist.
    """

    prefix: int
    shortlist: int
    rerank_dims: tuple[int, ...]
    keep: tuple[int, ...] = ()
    index: IndexSpec = field(default_factory=IndexSpec)

    def __post_init__(self) -> None:
        prefix = _check_int("prefix", self.prefix)
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "shortlist", _check_int("shortlist", self.shortlist))
        dims = (self.rerank_dims,) if isinstance(self.rerank_dims, (int, np.integer)) else tuple(self.rerank_dims)
        if not dims:
            raise ValueError("rerank_dims must name at least one dimension")
        for d in dims:
            _check_int("rerank_dims entry", d)
        if dims[0] <= prefix or any(b <= a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"rerank_dims must increase and exceed prefix={prefix}, got {list(dims)}")
        keep = tuple(self.keep) if self.keep else tuple(self.shortlist // 2 ** (i + 1) for i in range(len(dims) - 1))
        if len(keep) != len(dims) - 1:
            raise ValueError(f"keep needs {len(dims) - 1} entries (one per intermediate stage), got {list(keep)}")
        previous = self.shortlist
        for size in keep:
            _check_int("keep entry", size)
            if size > previous:
                raise ValueError(f"keep must not grow: {list(keep)} after shortlist={self.shortlist}")
            previous = size
        if not isinstance(self.index, IndexSpec):
            raise TypeError(f"index must be an IndexSpec, got {type(self.index).__name__}")
        object.__setattr__(self, "rerank_dims", tuple(int(d) for d in dims))
        object.__setattr__(self, "keep", tuple(int(s) for s in keep))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "shortlist": self.shortlist,
            "rerank_dims": list(self.rerank_dims),
            "keep": list(self.keep),
            "index": self.index.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunnelSpec:
        _check_spec_keys(cls, data, "funnel")
        values = dict(data)
        if "index" in values:
            values["index"] = IndexSpec.from_dict(values["index"])
        if "keep" in values:
            values["keep"] = tuple(values["keep"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class FunnelSearch:
    """Funnel search over a Matryoshka item matrix: shortlist with a prefix, re-rank with more dims.

    ``vectors_full`` is float ``(N, D)`` with ``D >= rerank_dims[-1]``; queries have at least
    ``rerank_dims[-1]`` columns (their prefixes are used, as for the size-s models). The prefix
    index is built here, or passed in as ``prefix_index`` (e.g. loaded by :func:`load_index` from
    an export; it must index ``vectors_full[:, :prefix]``).

    The re-rank is exact: each candidate's row of ``vectors_full[:, :d]`` times the query prefix.
    """

    def __init__(
        self,
        vectors_full: np.ndarray,
        prefix: int | None = None,
        shortlist: int | None = None,
        rerank_dims: Sequence[int] | int | None = None,
        keep: Sequence[int] = (),
        index: IndexSpec | None = None,
        *,
        spec: FunnelSpec | None = None,
        prefix_index: faiss.Index | None = None,
    ) -> None:
        if spec is None:
            if prefix is None or shortlist is None or rerank_dims is None:
                raise ValueError("give prefix, shortlist and rerank_dims, or a FunnelSpec as spec=")
            spec = FunnelSpec(prefix, shortlist, rerank_dims, tuple(keep), index or IndexSpec())
        self.spec = spec
        self.vectors = _as_matrix("vectors_full", vectors_full)
        n, d = self.vectors.shape
        if spec.rerank_dims[-1] > d:
            raise ValueError(f"rerank_dims {list(spec.rerank_dims)} exceed the vectors' width {d}")
        if prefix_index is None:
            prefix_index = build_index(self.vectors[:, : spec.prefix], spec.index)
        elif prefix_index.d != spec.prefix or prefix_index.ntotal != n:
            raise ValueError(
                f"prefix_index covers {prefix_index.ntotal} rows of {prefix_index.d} dims, "
                f"expected {n} rows of {spec.prefix} dims"
            )
        self.index = prefix_index

    @classmethod
    def from_dict(cls, vectors_full: np.ndarray, data: dict[str, Any], **kwargs: Any) -> FunnelSearch:
        return cls(vectors_full, spec=FunnelSpec.from_dict(data), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query, as :func:`search` returns them (exclusion included)."""
        k = _check_k(k)
        spec = self.spec
        q = _as_matrix("queries", queries)
        if q.shape[1] < spec.rerank_dims[-1]:
            raise ValueError(f"queries have {q.shape[1]} columns, the funnel re-ranks at {spec.rerank_dims[-1]}")
        _, rows = search(self.index, q[:, : spec.prefix], max(spec.shortlist, k), exclude)
        width = self.vectors.shape[1]
        for dim, keep in zip(spec.rerank_dims, [*spec.keep, k]):
            # Zero the query past `dim`: a full-row inner product is then exactly the prefix one,
            # so one contiguous item matrix serves every stage (no per-prefix copies).
            q_dim = np.zeros((len(q), width), dtype=np.float32)
            q_dim[:, :dim] = q[:, :dim]
            scores = self._inner_products(q_dim, rows)
            rows, scores = _top_per_row(rows, scores, min(max(keep, k), rows.shape[1]))
        return _pad(scores, rows, k)

    def _inner_products(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``scores[b, j] = q[b] @ vectors[rows[b, j]]``; ``-inf`` where ``rows`` is ``-1``.

        faiss' ``fvec_inner_products_by_idx`` reads the candidate rows in place; gathering them
        into a (B, L, D) tensor first and multiplying was 7x slower on 2 cores.
        """
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        missing = rows < 0
        safe = np.where(missing, 0, rows)
        scores = np.empty(rows.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores), faiss.swig_ptr(q), faiss.swig_ptr(self.vectors), faiss.swig_ptr(safe),
            self.vectors.shape[1], rows.shape[0], rows.shape[1],
        )
        scores[missing] = -np.inf
        return scores


def _top_per_row(rows: np.ndarray, scores: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` best (row, score) pairs of every result list, best first; ``-inf`` ones become -1."""
    top_scores, pos = torch.topk(torch.from_numpy(scores), size, dim=1)
    top_scores = top_scores.numpy()
    top_rows = np.take_along_axis(rows, pos.numpy(), axis=1)
    top_rows[np.isneginf(top_scores)] = -1
    return top_rows, top_scores
