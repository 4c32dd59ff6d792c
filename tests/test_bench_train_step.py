"""bench/train_step.py times the step the model trains with: its loss is the model's training loss."""

from __future__ import annotations


import pytest
import torch

from tests.test_train import TINY_BATCH, _tiny_model

from tests.bench_scripts import bench_script


@pytest.mark.parametrize("options", [
    {"nesting": "blocks"},
    {"nesting": None},  # the recipe: slices, prefix gradient 0, distillation
    {"nesting": "blocks", "separate_item_vectors": "all", "distill": 0.5},
    {"nesting": None, "distill_teacher": "average"},
    {"nesting": "blocks", "separate_item_vectors": "all", "distill": 0.5, "distill_teacher": "average"},
], ids=["blocks", "recipe", "own-vectors", "recipe-averaged-teacher", "own-vectors-averaged-teacher"])
def test_the_timed_step_computes_the_models_training_loss_and_moves_the_averaged_teacher(options):
    """A timed step updates the averaged teacher as training does after every batch, and the timed
    forward then equals ``training_loss`` (the averaged teacher's term included: after a step the
    average differs from the weights)."""
    model = _tiny_model(**options).train()
    step = bench_script("train_step").Step(model, torch.device("cpu"))
    average = model.teacher_average
    before = None if average is None else [t.clone() for t in average.state_dict().values()]
    assert set(step(TINY_BATCH)) == set(bench_script("train_step").PHASES)
    if average is not None:
        assert any(not torch.equal(a, b) for a, b in zip(before, average.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(step.loss(TINY_BATCH, []).total, model.training_loss(TINY_BATCH)[0])
