"""The same numbers on CPU and GPU: the network, the Matryoshka loss and the ranking metrics.

Skipped without CUDA. On a GPU machine without mamba_ssm this checks the PyTorch selective scan on
CUDA; with it, tests/test_mamba.py -k kernels compares the kernels. Also the searches: exact torch
search and a faiss flat index (GPU build of faiss only) give the CPU's top rows and scores.
"""

import numpy as np
import pytest
import torch

from recsys.metrics import target_ranks
from recsys.nn.encoders import build_encoder
from recsys.nn.item_tower import ItemTower
from recsys.nn.loss import matryoshka_cross_entropy
from recsys.nn.recommender import SequentialRecommender
from tests.test_item_tower import N, SIZES, _features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPTIONS = {"lru": {"r_min": 0.8, "r_max": 0.99}, "mamba": {"d_state": 4, "expand": 2}, "sasrec": {"n_heads": 2, "max_len": 12}}


@pytest.fixture(autouse=True)
def full_precision():
    # TF32 would make the GPU differ from the CPU by ~1e-3: compare at full float32 precision.
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _loss_and_grads(net, input_ids, targets, seen):
    net.zero_grad()
    items = net.item_matrix()
    states = net.sequence_states(input_ids, items)
    loss = matryoshka_cross_entropy(states.reshape(-1, states.shape[-1]), items, targets.reshape(-1), SIZES)
    loss.total.backward()
    with torch.no_grad():
        ranks = target_ranks(net.user_vectors(input_ids, items), items, targets[:, -1], SIZES, seen_ids=seen)
    grads = {name: p.grad.detach().cpu() for name, p in net.named_parameters() if p.grad is not None}
    return loss.per_size.detach().cpu(), states.detach().cpu(), ranks.cpu(), grads


@pytest.mark.parametrize("encoder", ["lru", "mamba", "sasrec"])
def test_network_loss_and_metrics_match_cpu(encoder):
    torch.manual_seed(0)
    net = SequentialRecommender(
        ItemTower(SIZES, _features(), use_id_embedding=True),
        build_encoder(encoder, SIZES, n_blocks=2, dropout=0.0, **OPTIONS[encoder]),
    ).eval()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, N + 1, (6, 12), generator=g)
    input_ids[:3, :5] = 0  # left padding
    targets = torch.randint(1, N + 1, (6, 12), generator=g)
    targets[input_ids == 0] = 0  # no loss at padded positions
    seen = input_ids.clone()

    on_cpu = _loss_and_grads(net, input_ids, targets, seen)
    on_gpu = _loss_and_grads(net.cuda(), input_ids.cuda(), targets.cuda(), seen.cuda())
    torch.testing.assert_close(on_gpu[0], on_cpu[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(on_gpu[1], on_cpu[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(on_gpu[2], on_cpu[2]), "ranks differ between CPU and GPU"
    assert on_gpu[3].keys() == on_cpu[3].keys()
    for name, grad in on_cpu[3].items():
        torch.testing.assert_close(on_gpu[3][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def _items_and_queries():
    g = torch.Generator().manual_seed(2)
    return torch.randn(20_000, 64, generator=g), torch.randn(64, 64, generator=g)


def test_exact_search_matches_cpu():
    from recsys.retrieval import ExactRetriever

    items, queries = _items_and_queries()
    exclude = [np.arange(b, 20_000, 997) for b in range(len(queries))]  # seen items, per user
    cpu_scores, cpu_rows = ExactRetriever(items).search(queries, 100, exclude=exclude)
    gpu_scores, gpu_rows = ExactRetriever(items.cuda()).search(queries.cuda(), 100, exclude=exclude)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gpu_rows, cpu_rows)


def test_faiss_flat_on_gpu_matches_cpu():
    from recsys.retrieval import FaissRetriever, IndexSpec, gpu_available
    from recsys.retrieval.faiss_index import is_gpu_index

    if not gpu_available():
        pytest.skip("this faiss is not the GPU build")
    items, queries = _items_and_queries()
    cpu = FaissRetriever.build(items.numpy(), IndexSpec("flat"))
    gpu = cpu.on_device("gpu")
    assert is_gpu_index(gpu.index)
    cpu_scores, cpu_rows = cpu.search(queries.numpy(), 100)
    gpu_scores, gpu_rows = gpu.search(queries.numpy(), 100)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(gpu_rows, cpu_rows)
