"""Where a training process runs: alone, under torchrun, or as a Ray Train worker.

The training loop only sees a :class:`Runtime` (rank, world size, device, a
barrier, and how to publish a checkpoint), so the same loop runs on a bare GPU
machine without Ray and inside Ray Train's ``TorchTrainer``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    under_ray: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_equal(self, value: int) -> bool:
        """True when every rank passed the same integer (cheap consistency check)."""
        if not self.distributed:
            return True
        t = torch.tensor([value, -value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == value and int(t[1]) == -value

    def restored_checkpoint(self) -> str | None:
        """A checkpoint Ray Train hands back after restarting the workers, as a local dir."""
        if not self.under_ray:
            return None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # A local copy of this rank's own, which the loop hands to release_restored once
        # the weights and optimizer state are in memory. Not Ray's default directory:
        # that one is shared by every worker of a node, so one rank removing it could
        # pull it from under another still reading.
        return checkpoint.to_directory(tempfile.mkdtemp(prefix="duet-restore-"))

    def publish(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Ray Train: report metrics (and a checkpoint directory, rank 0) every time.

        The directory is a staging copy: ``report`` has uploaded it to the run's storage
        by the time it returns (synchronous upload), so it is removed then. Kept, every
        checkpoint of a run would stay on the worker's local disk until it filled.
        """
        if not self.under_ray:
            return
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint)
        finally:
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def release_restored(self, local_dir: str) -> None:
        """Remove the local copy :meth:`restored_checkpoint` made, once it has been read."""
        if self.under_ray:
            shutil.rmtree(local_dir, ignore_errors=True)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def local_runtime() -> Runtime:
    """One process, or one of a torchrun group (RANK/WORLD_SIZE set): gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = default_device()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank=rank, world_size=world, device=device)


def ray_runtime() -> Runtime:
    """Inside ``TorchTrainer``'s training function (Ray set up the process group)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return Runtime(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        under_ray=True,
    )
