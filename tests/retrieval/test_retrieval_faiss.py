"""Tests of recsys.retrieval.faiss_index: faiss exact search against torch.topk, recall of the
approximate kinds, exclusion, save/load, GPU placement, and clear errors for bad specs and inputs."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from retrieval_data import brute_force, min_gap
from recsys.retrieval.exact import torch_topk
from recsys.retrieval.faiss_index import (
    KINDS,
    FaissRetriever,
    IndexSpec,
    build_index,
    gpu_available,
    index_kind,
    is_gpu_index,
    load_index,
    save_index,
)
from recsys.retrieval.funnel import FunnelSpec
from recsys.retrieval.recall import recall_at_k


# ---------------------------------------------------------------------------------------------
# Exact search
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_queries", [40, 5])  # faiss takes its BLAS path from 20 queries up
def test_flat_equals_torch_topk(data, num_queries):
    items, queries = data
    queries = queries[:num_queries]
    ref_scores, ref_rows = torch_topk(queries, items, 50)
    assert min_gap(ref_scores) > 1e-4  # no near-ties: the ranking is unambiguous
    scores, rows = FaissRetriever.build(items, IndexSpec("flat")).search(queries, 50)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rows, brute_force(queries, items, 50))


def test_k_larger_than_catalogue_pads(data):
    items, queries = data
    small = items[:7]
    scores, rows = FaissRetriever.build(small).search(queries, 10)
    assert rows.shape == (len(queries), 10)
    np.testing.assert_array_equal(rows[:, :7], brute_force(queries, small, 7))
    assert (rows[:, 7:] == -1).all() and np.isneginf(scores[:, 7:]).all()
    t_scores, t_rows = torch_topk(queries, small, 10)
    np.testing.assert_array_equal(t_rows, rows)
    assert np.isneginf(t_scores[:, 7:]).all()


# ---------------------------------------------------------------------------------------------
# Approximate kinds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, min_recall",
    [
        (IndexSpec("ivf_flat"), 0.9),
        (IndexSpec("hnsw"), 0.9),
        (IndexSpec("ivf_pq", pq_m=16, pq_nbits=4), 0.3),  # 0.43 here; random rows: 0.003
    ],
    ids=["ivf_flat", "hnsw", "ivf_pq"],
)
def test_approximate_kinds_recall(clustered_data, spec, min_recall):
    items, queries = clustered_data
    k = 20
    _, truth = torch_topk(queries, items, k)
    retriever = FaissRetriever.build(items, spec)
    index = retriever.index
    assert index_kind(index) == spec.kind and index.ntotal == len(items)
    scores, rows = retriever.search(queries, k)
    assert rows.shape == (len(queries), k)
    assert ((rows >= 0) & (rows < len(items))).all()
    assert all(len(set(r)) == k for r in rows.tolist())  # no duplicates
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # descending
    assert recall_at_k(rows, truth) >= min_recall
    if spec.kind != "ivf_pq":  # these store the vectors: their scores are the true inner products
        true = np.einsum("bd,bkd->bk", queries, items[rows])
        np.testing.assert_allclose(scores, true, rtol=1e-4, atol=1e-4)


def test_ivf_build_is_deterministic(clustered_data):
    items, queries = clustered_data
    spec = IndexSpec("ivf_flat", nlist=32, nprobe=2, seed=3)
    first = FaissRetriever.build(items, spec).search(queries, 10)
    second = FaissRetriever.build(items, spec).search(queries, 10)
    np.testing.assert_array_equal(first[1], second[1])


def test_nprobe_all_lists_is_exact(clustered_data):
    items, queries = clustered_data
    _, rows = FaissRetriever.build(items, IndexSpec("ivf_flat", nlist=16, nprobe=16)).search(queries, 20)
    np.testing.assert_array_equal(rows, brute_force(queries, items, 20))


# ---------------------------------------------------------------------------------------------
# Exclusion
# ---------------------------------------------------------------------------------------------


def test_exclusion_removes_exactly_the_given_rows(data):
    items, queries = data
    rng = np.random.default_rng(5)
    _, top = torch_topk(queries, items, 30)
    exclude = []
    for b in range(len(queries)):
        # some of each query's own top rows (so exclusion matters), random rows, a duplicate
        rows = np.concatenate([top[b, rng.choice(30, size=b % 12, replace=False)], rng.integers(0, 2000, 3)])
        exclude.append(np.concatenate([rows, rows[:1]]) if len(rows) else rows)
    exclude[0] = np.array([], dtype=np.int64)
    scores, rows = FaissRetriever.build(items).search(queries, 20, exclude=exclude)
    for b in range(len(queries)):
        assert not set(rows[b].tolist()) & set(exclude[b].tolist())
    np.testing.assert_array_equal(rows, brute_force(queries, items, 20, exclude))
    assert np.isfinite(scores).all()
    # without exclusion the same call finds the excluded top rows again
    _, plain = FaissRetriever.build(items).search(queries, 20)
    assert any(set(plain[b].tolist()) & set(exclude[b].tolist()) for b in range(len(queries)))


def test_exclusion_of_almost_everything_pads(data):
    items, queries = data
    small = items[:12]
    exclude = [np.arange(10)] * 2
    scores, rows = FaissRetriever.build(small).search(queries[:2], 5, exclude=exclude)
    assert set(rows[0, :2].tolist()) == {10, 11} and (rows[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all() and np.isfinite(scores[:, :2]).all()


def test_exclusion_errors_name_the_value(data):
    items, queries = data
    index = FaissRetriever.build(items[:100])
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        index.search(queries[:2], 5, exclude=[np.array([1])])
    with pytest.raises(ValueError, match="exclude\\[1\\] holds row 100"):
        index.search(queries[:2], 5, exclude=[np.array([1]), np.array([3, 100])])
    with pytest.raises(ValueError, match="exclude\\[0\\] holds row -1"):
        index.search(queries[:2], 5, exclude=[[-1], []])
    with pytest.raises(ValueError, match="integer rows"):
        index.search(queries[:2], 5, exclude=[np.array([1.5]), []])


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(clustered_data, tmp_path, kind):
    items, queries = clustered_data
    spec = IndexSpec(kind, pq_m=8, pq_nbits=4) if kind == "ivf_pq" else IndexSpec(kind)
    spec = spec.resolve(*items.shape)
    index = build_index(items, spec)
    path = tmp_path / f"{kind}.faiss"
    save_index(index, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    loaded = load_index(path, IndexSpec.from_dict(json.loads(json.dumps(spec.to_dict()))), num_items=6000, dim=32)
    assert index_kind(loaded) == kind and not is_gpu_index(loaded)
    before, after = FaissRetriever(index, spec).search(queries, 15), FaissRetriever(loaded, spec).search(queries, 15)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_load_applies_search_settings_from_spec(clustered_data, tmp_path):
    items, queries = clustered_data
    path = tmp_path / "ivf.faiss"
    save_index(build_index(items, IndexSpec("ivf_flat", nlist=16, nprobe=1)), path)
    spec = IndexSpec("ivf_flat", nlist=16, nprobe=16)
    loaded = load_index(path, spec)
    assert loaded.nprobe == 16
    np.testing.assert_array_equal(FaissRetriever(loaded, spec).search(queries, 10)[1], brute_force(queries, items, 10))


def test_load_refuses_mismatches(data, tmp_path):
    items, _ = data
    path = tmp_path / "flat.faiss"
    save_index(build_index(items), path)
    with pytest.raises(ValueError, match="holds a 'flat' index but the spec says 'hnsw'"):
        load_index(path, IndexSpec("hnsw"))
    with pytest.raises(ValueError, match="indexes 2000 rows, expected 1999"):
        load_index(path, IndexSpec("flat"), num_items=1999)
    with pytest.raises(ValueError, match="indexes 48-d vectors, expected 64"):
        load_index(path, IndexSpec("flat"), dim=64)
    with pytest.raises(FileNotFoundError, match="missing.faiss"):
        load_index(tmp_path / "missing.faiss", IndexSpec("flat"))
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"not an index")
    with pytest.raises(ValueError, match="garbage.faiss is not a readable faiss index"):
        load_index(garbage, IndexSpec("flat"))
    with pytest.raises(ValueError, match="device must be"):
        load_index(path, IndexSpec("flat"), device="tpu")
    ivf_path = tmp_path / "ivf.faiss"
    save_index(build_index(items, IndexSpec("ivf_flat", nlist=8)), ivf_path)
    with pytest.raises(ValueError, match="has nlist=8, the spec says nlist=16"):
        load_index(ivf_path, IndexSpec("ivf_flat", nlist=16))


def test_device_choice_without_gpu(data, tmp_path):
    if gpu_available():
        pytest.skip("this machine has a GPU")
    assert not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
    path = tmp_path / "flat.faiss"
    save_index(build_index(data[0]), path)
    assert not is_gpu_index(load_index(path, IndexSpec("flat"), device="auto"))
    with pytest.raises(RuntimeError, match="device='gpu'"):
        load_index(path, IndexSpec("flat"), device="gpu")


def test_on_device_without_gpu(data):
    if gpu_available():
        pytest.skip("this machine has a GPU")
    retriever = FaissRetriever.build(data[0], IndexSpec("flat"))
    assert retriever.on_device("auto") is retriever and retriever.on_device("cpu") is retriever
    with pytest.raises(RuntimeError, match="device='gpu' but the GPU build of faiss or a GPU is missing"):
        retriever.on_device("gpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'gpu', got 'tpu'"):
        retriever.on_device("tpu")


def test_save_into_missing_directory(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_index(build_index(data[0][:10]), tmp_path / "nope" / "x.faiss")


# ---------------------------------------------------------------------------------------------
# Specs and inputs
# ---------------------------------------------------------------------------------------------


def test_spec_defaults_follow_catalogue_size():
    small = IndexSpec("ivf_flat").resolve(10_000, 64)
    large = IndexSpec("ivf_flat").resolve(1_000_000, 64)
    assert small.nlist == 256 and small.nprobe == 32 and small.train_size == 10_000
    assert large.nlist == 4096 and large.nprobe == 512 and large.train_size == 64 * 4096
    assert IndexSpec("ivf_flat").resolve(20, 8).nlist == 1
    pq = IndexSpec("ivf_pq").resolve(100_000, 48)
    assert pq.pq_m == 12 and pq.pq_nbits == 8 and 48 % pq.pq_m == 0
    hnsw = IndexSpec("hnsw").resolve(1000, 32)
    assert (hnsw.hnsw_m, hnsw.ef_construction, hnsw.ef_search) == (32, 64, 256)
    assert IndexSpec().resolve(5, 3) == IndexSpec("flat")


def test_spec_json_round_trip():
    spec = IndexSpec("ivf_pq", nlist=64, pq_m=8).resolve(10_000, 32)
    data = json.loads(json.dumps(spec.to_dict()))
    assert set(data) == {"kind", "nlist", "nprobe", "train_size", "pq_m", "pq_nbits", "seed"}
    assert IndexSpec.from_dict(data) == spec
    # numpy integers (e.g. computed sizes) still give JSON-serialisable settings
    json.dumps(IndexSpec("ivf_flat", nlist=np.int64(8)).to_dict())
    json.dumps(FunnelSpec(np.int64(16), np.int64(100), np.array([32, 64]), keep=[np.int64(50)]).to_dict())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: IndexSpec("annoy"), "index kind must be one of .* got 'annoy'"),
        (lambda: IndexSpec("flat", nlist=16), "nlist=16 does not apply to index kind 'flat'"),
        (lambda: IndexSpec("hnsw", nprobe=4), "nprobe=4 does not apply to index kind 'hnsw'"),
        (lambda: IndexSpec("ivf_flat", nlist=0), "nlist must be an integer >= 1, got 0"),
        (lambda: IndexSpec("ivf_flat", nlist=True), "nlist must be an integer >= 1, got True"),
        (lambda: IndexSpec("ivf_flat", nlist=8.0), "nlist must be an integer >= 1, got 8.0"),
        (lambda: IndexSpec("ivf_flat", nlist=8, nprobe=9), "nprobe=9 exceeds nlist=8"),
        (lambda: IndexSpec("ivf_pq", pq_nbits=20), "pq_nbits must be at most 16, got 20"),
        (lambda: IndexSpec("ivf_flat", nlist=200).resolve(100, 8), "nlist=200 exceeds the number of items 100"),
        (lambda: IndexSpec("ivf_flat", nprobe=64).resolve(1000, 8), "nprobe=64 exceeds nlist=25"),
        (lambda: IndexSpec("ivf_pq", pq_m=5).resolve(1000, 32), "pq_m=5 must divide the vector dimension 32"),
        (lambda: IndexSpec("ivf_pq").resolve(200, 32), "needs at least 256 items"),
        (lambda: IndexSpec("ivf_flat", train_size=5000).resolve(1000, 8), "train_size=5000 exceeds"),
        (lambda: IndexSpec("ivf_flat", nlist=64, train_size=10).resolve(1000, 8), "train_size=10 is below"),
        (lambda: IndexSpec.from_dict({"kind": "flat", "nlists": 3}), "unknown index spec keys \\['nlists'\\]"),
    ],
)
def test_bad_specs_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_vectors_and_queries(data):
    items, queries = data
    with pytest.raises(ValueError, match="nlist=4000 exceeds the number of items 2000"):
        build_index(items, IndexSpec("ivf_flat", nlist=4000))
    broken = items[:50].copy()
    broken[17, 3] = np.nan
    with pytest.raises(ValueError, match="vectors row 17 holds a NaN"):
        build_index(broken)
    with pytest.raises(ValueError, match="must be 2-D"):
        build_index(items[0])
    with pytest.raises(ValueError, match="must hold floats"):
        build_index(np.ones((4, 4), dtype=np.int64))
    index = FaissRetriever.build(items)
    with pytest.raises(ValueError, match="queries must have 48 columns, got shape \\(2, 32\\)"):
        index.search(queries[:2, :32], 5)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        index.search(queries, 0)


# ---------------------------------------------------------------------------------------------
# GPU (runs only with the GPU build of faiss and a GPU; none on the development machines)
# ---------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a GPU")


@needs_gpu
def test_gpu_exact_search_equals_cpu(data, tmp_path):
    items, queries = data
    path = tmp_path / "flat.faiss"
    cpu_index = build_index(items)
    save_index(cpu_index, path)
    gpu_index = load_index(path, IndexSpec("flat"), device="gpu")
    assert is_gpu_index(gpu_index)
    flat = IndexSpec("flat")
    cpu_scores, cpu_rows = FaissRetriever(cpu_index, flat).search(queries, 50)
    gpu_scores, gpu_rows = FaissRetriever(gpu_index, flat).search(queries, 50)
    np.testing.assert_array_equal(gpu_rows, cpu_rows)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-5, atol=1e-5)
    exclude = [cpu_rows[b, : b % 7] for b in range(len(queries))]
    np.testing.assert_array_equal(FaissRetriever(gpu_index, flat).search(queries, 20, exclude)[1], brute_force(queries, items, 20, exclude))
    # saving a GPU index writes its CPU form
    save_index(gpu_index, tmp_path / "again.faiss")
    assert not is_gpu_index(load_index(tmp_path / "again.faiss", IndexSpec("flat"), device="cpu"))


@needs_gpu
def test_on_device_moves_a_built_ivf_index_and_keeps_its_nprobe(clustered_data):
    items, queries = clustered_data
    cpu = FaissRetriever.build(items, IndexSpec("ivf_flat", nlist=32, nprobe=32))
    gpu = cpu.on_device("gpu")
    assert is_gpu_index(gpu.index) and gpu.spec == cpu.spec
    # float rounding may swap near-ties between the devices, nothing more
    assert recall_at_k(gpu.search(queries, 10)[1], cpu.search(queries, 10)[1]) >= 0.99  # every list probed: exact
    assert gpu.on_device("auto") is gpu
    fewer = gpu.with_search_settings(nprobe=4)
    assert fewer.index is gpu.index
    assert recall_at_k(fewer.search(queries, 10)[1], cpu.with_search_settings(nprobe=4).search(queries, 10)[1]) >= 0.99


@needs_gpu
def test_gpu_ivf_and_hnsw_placement(clustered_data, tmp_path):
    items, queries = clustered_data
    ivf_path, hnsw_path = tmp_path / "ivf.faiss", tmp_path / "hnsw.faiss"
    save_index(build_index(items, IndexSpec("ivf_flat", nlist=16, nprobe=16)), ivf_path)
    save_index(build_index(items, IndexSpec("hnsw")), hnsw_path)
    ivf_spec = IndexSpec("ivf_flat", nlist=16, nprobe=16)
    ivf = load_index(ivf_path, ivf_spec, device="gpu")
    assert is_gpu_index(ivf)
    np.testing.assert_array_equal(FaissRetriever(ivf, ivf_spec).search(queries, 20)[1], brute_force(queries, items, 20))
    assert not is_gpu_index(load_index(hnsw_path, IndexSpec("hnsw"), device="gpu"))  # no GPU HNSW
