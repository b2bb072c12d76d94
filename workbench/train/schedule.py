"""Learning-rate schedule: linear warm-up from 0, constant, then linear decay to 0 over the final
fraction of the run."""
from __future__ import annotations

import functools

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Multiplier on the peak lr for the 0-based optimiser step ``step``.

    Warm-up is (step + 1) / warmup, so the first step already moves the weights and the last warm-up
    step runs at the peak. Decay covers the last round(decay_fraction * total_steps) steps as
    (total_steps - step) / decay_steps: it starts at the peak and would reach 0 at ``total_steps``,
    one step after the last one, so no step is wasted at lr 0. The warm-up is cut short where it
    would run into the decay, so a run shorter than ``warmup_steps`` still reaches the peak.
    """
    if step >= total_steps:
        return 0.0  # the run is over (the scheduler asks once more after the final step)
    decay_steps = round(decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    warmup = min(warmup_steps, decay_start)
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    return (total_steps - step) / decay_steps


def make_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int,
                   decay_fraction: float) -> LambdaLR:
    """A LambdaLR applying :func:`lr_factor` to the optimiser's lr; call ``.step()`` after each
    optimiser step. A partial (not a lambda) so the scheduler's state_dict stays plain data."""
    factor = functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps,
                               decay_fraction=decay_fraction)
    return LambdaLR(optimizer, factor)
