"""What a run does when it collapses after having learned (``train.on_collapse``).

A run *collapses* in an epoch whose training produced NaN or inf, or whose test error is back at
chance level (within :data:`CHANCE_MARGIN` of it) after an earlier epoch had reached at most half
of chance. Continual VF does the latter at the paper's settings: as its backward weights grow, the
fixed free phase stops short of the steady state, its updates stop descending the loss, and the
network saturates without any NaN (README, *Reproduction*). The collapsed epoch is never written
over the last checkpoint.

- ``stop`` (the default): the run ends with one line; ``checkpoint.pt`` keeps the epoch before
  the collapse and ``best.pt`` the best one.
- ``rollback``: the run goes back to its best epoch, the state in ``best.pt`` (weights,
  optimizer, schedule, random generators: the same batches come again), multiplies every
  learning rate by ``train.rollback_lr_factor`` for the rest of the run, and trains on from
  there; ``metrics.jsonl`` and ``checkpoint.pt`` are rewound with it (the undone epochs' records
  move to ``rolled_back.jsonl``, with the collapse), and the first epoch after the rollback
  records it (``rollback``: why, from which epoch, the rate scale). The best epoch,
  not the last one: a collapse builds up over several epochs (C-VF-1h's did over about eight,
  its training error rising and the W–B^T pair growing), so the epoch just before it is already
  on the way. After ``train.max_rollbacks`` rollbacks, or with no ``best.pt`` yet, a collapse
  stops the run. A run that never collapses trains exactly as its settings say.
- ``continue``: train on (a warning each epoch; ``train.stop_at_chance`` still ends a run that
  stays at chance).

Warm-start states (``solver.warm_start``) are starting points only and are not rolled back.
"""
from __future__ import annotations

from typing import Any

import torch

#: a run whose error is within this of chance level is not learning
CHANCE_MARGIN = 0.03


def collapse_reason(epoch: int, records: list[dict[str, Any]], test_error: float, chance: float) -> str | None:
    """Why ``epoch``, which gave ``test_error``, is a collapse (None: it is not), given the records
    of the epochs before it and the chance-level error."""
    if not records or test_error < chance - CHANCE_MARGIN:
        return None
    best = min(records, key=lambda r: r["test_error"])
    if best["test_error"] > chance / 2:
        return None  # it never learned: that is train.stop_at_chance's case
    return (f"epoch {epoch}: the test error {100 * test_error:.2f}% is back at chance level after reaching "
            f"{100 * best['test_error']:.2f}% (epoch {best['epoch']}): the network collapsed")


class CollapseGuard:
    """Counts a run's rollbacks and scales its learning rates at each (``train.on_collapse``).

    ``rollbacks`` and ``lr_scale`` (the product of the factors applied so far) are kept in every
    checkpoint, so a resumed run goes on counting and a restored checkpoint's rates can be scaled
    to the run's current scale whatever scale they were saved at.
    """

    def __init__(self, policy: str, lr_factor: float, max_rollbacks: int, rollbacks: int = 0,
                 lr_scale: float = 1.0) -> None:
        self.policy, self.lr_factor, self.max_rollbacks = policy, lr_factor, max_rollbacks
        self.rollbacks, self.lr_scale = rollbacks, lr_scale

    def can_roll_back(self) -> bool:
        return self.policy == "rollback" and self.rollbacks < self.max_rollbacks

    def rescale(self, optimizer: torch.optim.Optimizer, scheduler: Any, saved_scale: float) -> None:
        """Count a rollback and bring the rates just restored (saved at ``saved_scale``) to the run's
        scale times ``lr_factor``: every param group's rate and the schedule's base rates."""
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        ratio = self.lr_scale / saved_scale
        for group in optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
