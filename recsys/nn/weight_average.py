"""An exponential moving average of a module's weights, and a context in which the module computes
with it: the steadier copy of a network that a distillation teacher can score with (the mean
teacher of semi-supervised learning), at the cost of one more set of weights and, per step, one
forward pass without a gradient.

The average is kept as buffers, so that it travels with the module's ``state_dict`` (a resumed run
goes on with it) and follows the module to its device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage(torch.nn.Module):
    """``average <- decay * average + (1 - decay) * weight`` for every parameter of ``module`` that
    requires a gradient, starting from the weights as they are."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.names = []
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.register_buffer(self._key(name), p.detach().clone())

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def _pairs(self, module: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.nn.Parameter]]:
        params = dict(module.named_parameters())
        for name in self.names:
            yield getattr(self, self._key(name)), params[name]

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One step of the average towards ``module``'s weights now."""
        for average, p in self._pairs(module):
            average.lerp_(p.detach().to(average.dtype), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """``module``'s parameters hold the average inside the block, their own weights again after
        it (the tensors are exchanged, not copied). Use it where no autograd graph of ``module``'s
        weights is pending: before the step's forward pass, or under ``torch.no_grad``."""
        pairs = list(self._pairs(module))
        for average, p in pairs:
            p.data, average.data = average.data, p.data
        try:
            yield
        finally:
            for average, p in pairs:
                p.data, average.data = average.data, p.data
