"""Fixtures of the retrieval tests: one faiss thread, and the shared item and query matrices."""

from __future__ import annotations

import faiss
import pytest

from retrieval_data import clustered_data as make_clustered, standard_data


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Behaviour tests need no parallelism, and on a busy 2-core machine faiss' OpenMP threads
    spin against other processes: these tests took 10x longer with 2 threads than with 1."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return standard_data()


@pytest.fixture(scope="module")
def clustered_data():
    return make_clustered()
