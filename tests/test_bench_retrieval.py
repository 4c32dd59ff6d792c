"""bench/retrieval.py's sweep of a search-time setting measures each value, not the index's default."""


import numpy as np

from recsys.retrieval import FaissRetriever, IndexSpec, torch_topk

from tests.bench_scripts import bench_script


def test_sweep_searches_with_each_nprobe():
    retrieval = bench_script("retrieval")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2000, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    retriever = FaissRetriever.build(z, IndexSpec("ivf_flat", nlist=32, nprobe=1))
    _, truth = torch_topk(queries, z, 10)
    rows = retrieval.sweep(retriever, queries, 10, 1, truth, truth, len(z))
    recall = {row["value"]: row["recall_same_size"] for row in rows}
    assert sorted(recall) == [1, 2, 4, 8]
    assert recall[8] > recall[1]  # more lists probed find more of the exact top 10
    assert retriever.spec.nprobe == 1  # the swept retriever keeps its own setting
