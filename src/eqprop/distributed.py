"""Data-parallel training with ``torch.distributed``: ``torchrun --nproc-per-node N -m eqprop train ...``.

EP computes its estimate outside autograd's backward, so DistributedDataParallel's
gradient hooks never fire: here the estimates are averaged explicitly. Each rank
takes its share of every global batch (``train.batch_size`` is the global
batch), computes its estimate (a mean over its share), and before the optimizer
step the estimates are summed across ranks, each weighted by its share of the
batch, in one all-reduce over one flat buffer: the global batch's mean, as one
process computes it, to float rounding. Every rank draws the epoch's order and
augmentation for the whole dataset from the same generator and cuts its share
out of each global batch, so the data do not depend on the world size.

NCCL on GPUs, gloo on CPUs; ``train.dist_timeout`` bounds every wait (the
rendezvous, a collective): a missing or dead peer ends the run with one line.
Only rank 0 writes the run folder.

One process without torchrun is the same code with a world of one, where every
collective is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A rank could not reach its peers, or lost them; one line."""


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- collectives (no-ops in a world of one) ---------------------------------------
    def weighted_sum_(self, tensors: list[torch.Tensor], weight: float) -> None:
        """In place: every tensor becomes the sum over ranks of ``weight`` times its value there,
        in one all-reduce of one flat buffer (tensors of one dtype and device)."""
        if not self.distributed:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors]).mul_(weight)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object; from trusted code only)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, count: int) -> slice:
        """This rank's share of ``count`` consecutive samples: consecutive slices, as even as they
        can be (the first ``count % size`` ranks take one more; a share may be empty)."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


WORLD = World()


def world_from_environment() -> World:
    """The world torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``); a world of one without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))


def initialize(world: World, device_type: str, timeout_s: float) -> None:
    """Join the process group (NCCL for CUDA, gloo for the CPU), waiting at most ``timeout_s``
    for the peers; a DistributedError in one line otherwise."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer ends NCCL's waits too
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                                timeout=timedelta(seconds=timeout_s))
        dist.barrier()
    except Exception as error:  # the store's timeout, a refused connection...
        raise DistributedError(f"rank {world.rank} of {world.size} could not reach its peers within "
                               f"{timeout_s:g} s (train.dist_timeout) at "
                               f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}: "
                               f"{first_line(error)}") from None


def finish(world: World) -> None:
    """Wait until every rank is done (rank 0 may still be writing the run folder): a rank that
    leaves the process group while a peer still uses it can abort gloo's threads in that rank."""
    if world.distributed and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (when one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
