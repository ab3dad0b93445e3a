"""Hooks into a training run, for a user's own loggers: one call per batch and one per epoch.

Pass objects with either method (both optional) to
:func:`~eqprop.training.trainer.train` as ``callbacks=[...]``::

    class PrintSteps(Callback):
        def on_epoch(self, epoch, record):
            print(epoch, record["test_error"], record.get("free_steps"))

``on_batch`` receives the batch's :class:`~eqprop.estimators.Estimate` (its free
state and how its phases were solved). Reading tensors from it to the host
costs a synchronisation per batch on a GPU: keep what is needed on the device,
read it in ``on_epoch``. :class:`TensorBoardLogger` writes every epoch's
numbers with ``torch.utils.tensorboard`` (``train.tensorboard: true``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..estimators import Estimate


class Callback:
    """Base of a run's hooks: override either method; both do nothing here."""

    def on_batch(self, epoch: int, batch: int, estimate: Estimate) -> None:
        """After batch ``batch`` (from 1) of ``epoch`` has updated the weights."""

    def on_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """After ``epoch`` is evaluated and checkpointed; ``record`` is its line of metrics.jsonl."""


class TensorBoardLogger(Callback):
    """Every number of each epoch's record as a TensorBoard scalar, in ``folder``.

    Needs the ``tensorboard`` package (``pip install 'eqprop[tensorboard]'``)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.tensorboard needs the tensorboard package: "
                              "pip install 'eqprop[tensorboard]'") from None
        self.writer = SummaryWriter(str(folder))

    def on_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(key, value, epoch)
            elif key == "lr":
                for group, rate in enumerate(value):
                    self.writer.add_scalar(f"lr/layer{group}", rate, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
