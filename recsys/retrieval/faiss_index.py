"""Faiss indexes for maximum inner product search: specs, GPU placement, build/save/load, and
:class:`FaissRetriever`, the retriever over one.

Kinds: exact flat, IVF-flat, HNSW, IVF-PQ (:class:`IndexSpec`). faiss cannot exclude per-query row
sets, so :meth:`FaissRetriever.search` fetches more results and filters them
(:mod:`recsys.retrieval.exclusion`).

Devices
-------
Indexes are always built and saved on the CPU. :func:`load_index` (and, for an index just built,
:func:`place_index` / :meth:`FaissRetriever.on_device`) moves flat, IVF-flat and IVF-PQ indexes to
GPU 0 when :func:`gpu_available`; HNSW always stays on the CPU, because faiss has no GPU
version of its HNSW graph (its GPU graph index, CAGRA, is a different structure built on the GPU).
The GPU path is written to the faiss GPU API but has not been run on a GPU in this project yet.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.atomic import atomic_file
from recsys.retrieval.base import Retriever
from recsys.retrieval.checks import as_matrix, check_int, check_k, check_spec_keys
from recsys.retrieval.exclusion import check_exclude, drop_excluded, pad

__all__ = [
    "KINDS",
    "GPU_MAX_K",
    "INDEX_FILE",
    "IndexSpec",
    "FaissRetriever",
    "gpu_available",
    "build_index",
    "save_index",
    "load_index",
    "place_index",
    "index_kind",
    "is_gpu_index",
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


# ---------------------------------------------------------------------------------------------
# Index specification
# ---------------------------------------------------------------------------------------------


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
        object.__setattr__(self, "seed", check_int("seed", self.seed, minimum=0))
        for name in _ALL_PARAMS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in _KIND_PARAMS[self.kind]:
                raise ValueError(
                    f"parameter {name}={value!r} does not apply to index kind {self.kind!r} "
                    f"(its parameters: {list(_KIND_PARAMS[self.kind]) or 'none'})"
                )
            object.__setattr__(self, name, check_int(name, value))
        if self.pq_nbits is not None and self.pq_nbits > 16:
            raise ValueError(f"pq_nbits must be at most 16, got {self.pq_nbits}")
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe={self.nprobe} exceeds nlist={self.nlist}")

    def resolve(self, num_items: int, dim: int) -> IndexSpec:
        """This spec with every default filled in for ``num_items`` rows of ``dim`` dimensions.

        Raises ``ValueError`` when the settings cannot work for that catalogue (more lists than
        items, a PQ split that does not divide ``dim``, too few items to train the codebooks, ...).
        """
        n = check_int("num_items", num_items)
        d = check_int("dim", dim)
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
        check_spec_keys(cls, data, "index")
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

    Row ``r`` of ``vectors`` is result row ``r`` (the row convention of :mod:`recsys.retrieval`).
    IVF kinds train k-means (and PQ codebooks) on ``spec.train_size`` rows sampled with
    ``spec.seed``, so the same inputs give the same index. Catalogues of 10^6 rows or more show a progress bar while adding.
    """
    spec = spec or IndexSpec()
    x = as_matrix("vectors", vectors)
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
    with atomic_file(path) as tmp:
        faiss.write_index(cpu_index, str(tmp))


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
    return place_index(index, device)


def place_index(index: faiss.Index, device: str = "auto") -> faiss.Index:
    """``index`` on ``device``: ``"auto"`` (GPU 0 when :func:`gpu_available`, else the CPU), ``"cpu"``
    (as it is) or ``"gpu"`` (an error when no GPU is usable). HNSW stays on the CPU."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and not gpu_available():
        raise RuntimeError("device='gpu' but the GPU build of faiss or a GPU is missing")
    if device != "cpu" and gpu_available() and not is_gpu_index(index):
        index = _to_gpu(index)
    return index


# ---------------------------------------------------------------------------------------------
# The retriever
# ---------------------------------------------------------------------------------------------

#: the file a faiss retriever writes into an export directory
INDEX_FILE = "index.faiss"


class FaissRetriever(Retriever):
    """Search through one faiss inner-product index (CPU or GPU), with per-query exclusion.

    Manifest entry: ``{"kind": "faiss", "index": IndexSpec.to_dict()}`` (the resolved spec, so the
    values actually used); the index itself is ``index.faiss`` in the export directory.
    """

    kind = "faiss"

    def __init__(self, index: faiss.Index, spec: IndexSpec) -> None:
        """``index`` must have been built (or loaded) with ``spec``; see :meth:`build` and :meth:`load`."""
        if index_kind(index) != spec.kind:
            raise ValueError(f"the index is a {index_kind(index)!r} index but the spec says {spec.kind!r}")
        self.index = index
        self.spec = spec.resolve(index.ntotal, index.d)

    @property
    def num_rows(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    @classmethod
    def build(cls, vectors: Any, entry: dict[str, Any] | IndexSpec | None = None) -> FaissRetriever:
        """Build the index of ``entry`` (a manifest entry or an :class:`IndexSpec`) over ``vectors``."""
        spec = entry if isinstance(entry, IndexSpec) else _spec_of_entry(entry or {"kind": cls.kind})
        x = as_matrix("vectors", vectors)
        spec = spec.resolve(*x.shape)
        return cls(build_index(x, spec), spec)

    @classmethod
    def load(cls, directory: str | os.PathLike, entry: dict[str, Any], vectors: Any, device: str = "auto") -> FaissRetriever:
        """Read ``index.faiss`` of an export; it must index ``vectors.shape`` rows and columns.

        ``vectors`` is only used for its shape (the rows and width the index must have).
        """
        spec = _spec_of_entry(entry)
        num_items, dim = vectors.shape
        return cls(load_index(Path(directory) / INDEX_FILE, spec, device, num_items=num_items, dim=dim), spec)

    def on_device(self, device: str = "auto") -> FaissRetriever:
        """This retriever with its index placed by :func:`place_index` (itself when nothing moves)."""
        index = place_index(self.index, device)
        return self if index is self.index else FaissRetriever(index, self.spec)

    def with_search_settings(self, nprobe: int | None = None, ef_search: int | None = None) -> FaissRetriever:
        """A retriever over the same faiss index that searches with other search-time settings.

        ``nprobe`` applies to IVF kinds, ``ef_search`` to HNSW (a setting of another kind is an
        error, as in :class:`IndexSpec`). Both retrievers share the index, not copied: each applies
        its own settings before every search, so a sweep over ``nprobe`` builds the index once.
        """
        values = {name: value for name, value in (("nprobe", nprobe), ("ef_search", ef_search)) if value is not None}
        return FaissRetriever(self.index, replace(self.spec, **values))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.spec.to_dict()}

    def save(self, directory: str | os.PathLike) -> list[str]:
        save_index(self.index, Path(directory) / INDEX_FILE)
        return [INDEX_FILE]

    def search(
        self, queries: Any, k: int, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product for each query, optionally excluding rows per query.

        Exclusion searches ``k + max_b |exclude[b]|`` results and filters them, which for an exact
        index gives exactly the top-``k`` of the non-excluded rows (those are among the top
        ``k + |E_b|`` whatever ``E_b`` is). GPU indexes return at most :data:`GPU_MAX_K` results per
        search; when ``k`` plus the exclusions exceed that, lists may come back shorter than ``k``
        (a warning says how many) though no excluded row is ever returned.
        """
        index = self.index
        k = check_k(k)
        q = as_matrix("queries", queries, dim=index.d)
        n = index.ntotal
        if n == 0:
            raise ValueError("the index is empty")
        checked = check_exclude(exclude, len(q), n) if exclude is not None else None
        _apply_search_params(index, self.spec)  # the index may be shared (with_search_settings)
        extra = max((len(e) for e in checked), default=0) if checked else 0
        wanted = min(n, k + extra)
        fetch = min(wanted, _max_k(index))
        scores, rows = index.search(q, fetch)
        scores = scores.astype(np.float32, copy=False)
        rows = rows.astype(np.int64, copy=False)
        scores[rows < 0] = -np.inf
        if extra:
            scores, rows = drop_excluded(scores, rows, checked, k, n)
            if fetch < wanted:
                short = int(((rows >= 0).sum(axis=1) < min(k, n)).sum())
                if short:
                    logger.warning(
                        "%d of %d queries have fewer than k=%d results: k plus %d excluded rows exceeds "
                        "the GPU limit of %d results", short, len(q), k, extra, GPU_MAX_K,
                    )
        elif fetch < k and fetch < n:
            logger.warning("k=%d exceeds the GPU limit of %d results; returning %d", k, GPU_MAX_K, fetch)
        return pad(scores[:, :k], rows[:, :k], k)


def _spec_of_entry(entry: dict[str, Any]) -> IndexSpec:
    if not isinstance(entry, dict) or set(entry) - {"kind", "index"}:
        raise ValueError(f"a faiss retriever entry has the keys 'kind' and 'index', got {entry!r}")
    return IndexSpec.from_dict(entry.get("index", {"kind": "flat"}))
