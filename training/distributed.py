"""DDP from torchrun's environment, in a few explicit lines, and the epoch's data shards."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime import devices


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes; a plain run is rank 0 of 1."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        """Rank 0 logs, writes checkpoints and sample grids."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shut_down(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(device_flag: str) -> Processes:
    """Rank, world size and device from torchrun's environment, and the process group (NCCL on GPUs, gloo on CPUs)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = devices.pick_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else device.index or 0)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, device)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def epoch_batches(num_images: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> torch.Tensor:
    """This rank's image indices for one epoch, [steps, batch_size].

    One permutation per (seed, epoch), the same on every rank, dealt out round-robin: the
    ranks' shards are disjoint, and the last images that cannot fill a step on every rank
    are dropped (a different set each epoch).
    """
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 1009 + epoch))
    steps = num_images // (batch_size * world_size)
    return order[rank::world_size][: steps * batch_size].view(steps, batch_size)


def ranks_in_sync(net: torch.nn.Module) -> bool:
    """Whether every rank holds bitwise the same weights, as DDP promises: one small all_gather
    of per-tensor float64 sums (call it once an epoch). True for a single process."""
    if not dist.is_initialized():
        return True
    fingerprint = torch.stack([p.detach().double().sum() for p in net.parameters()])
    gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(g, gathered[0]) for g in gathered)
