"""Exponential moving average of weights, kept by the trainer (``pipelines.train.loop``).

After optimizer step ``step`` (0-based) every average moves toward its parameter::

    decay_k = min(decay, (1 + k) / (10 + k))
    avg <- decay_k * avg + (1 - decay_k) * param

The warm-up (TensorFlow's ``num_updates`` rule) makes early averages forget the
initial weights fast: the first update keeps only a tenth of the start value.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """The decay used after optimizer step ``step`` (0-based), warm-up included."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(
    averages: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float, step: int
) -> None:
    """Move each average toward its parameter, in place (pairs in order)."""
    weight = 1.0 - ema_decay_at(step, decay)
    averages, params = list(averages), [p.detach() for p in params]
    # One multi-tensor lerp (it checks the lists pair up); distributed (DTensor)
    # shards keep the per-tensor loop.
    if all(type(t) is torch.Tensor for t in (*averages, *params)):
        torch._foreach_lerp_(averages, params, weight)
        return
    for avg, p in zip(averages, params, strict=True):
        avg.lerp_(p, weight)
