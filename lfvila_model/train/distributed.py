"""Distributed set-up for `torchrun` (DDP: NCCL on GPU, gloo on CPU) and the pieces that make a multi-process run
equal to one process on the global batch:

- `EpochBatches`: the index order of an epoch is a permutation drawn from (seed, epoch) for the *global* dataset
  and cut into global batches; rank r takes rows [r*b, (r+1)*b) of each global batch (b = per-rank batch). So
  the global batch of step s is the same set of samples, in the same order, for any world size, and a resumed
  run skips the batches already done without touching the data.
- MTC indices are drawn for the global batch from a generator seeded by (seed, step), identical on every rank
  (`mtc_generator`); the losses all-gather features with `gather_with_grad` (`lfvila_model.objectives`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "is_distributed", "barrier", "all_reduce_mean", "EpochBatches",
           "gather_objects", "mtc_generator", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: Optional[str] = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group from `torchrun`'s environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a plain single process gets rank 0 of 1 and no process group.

    Args:
        device: "cpu", "cuda" or None (cuda when available). NCCL is used with CUDA, gloo otherwise.
    """
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is unchanged)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


class EpochBatches:
    """Per-rank batches of dataset indices, world-size independent at the global-batch level.

    Args:
        n: dataset size.
        batch_size: per-rank batch b; the global batch is `b * world_size`.
        shuffle: permute per epoch with `torch.Generator().manual_seed(seed + epoch)` (else 0..n-1).
        drop_last: drop the last incomplete global batch (training); else the last one is cut evenly where it
            can be (eval, single process).
        groups: optional group id per item (equal-sized groups whose size divides the global batch): an epoch
            permutes whole groups, so the members of a group always share a global batch (the demo puts the two
            orders of an event set together: each is the other's hard negative).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, groups=None):
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.n, self.b, self.rank, self.world = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.groups = None
        if groups is not None:
            g = torch.as_tensor(groups, dtype=torch.long)
            if g.shape != (n,):
                raise ValueError(f"groups must hold one group id per item ({n}), got shape {tuple(g.shape)}")
            _, inverse, counts = torch.unique(g, return_inverse=True, return_counts=True)
            if not bool((counts == counts[0]).all()) or (batch_size * world_size) % int(counts[0]):
                raise ValueError(f"groups must all have the same size, dividing the global batch "
                                 f"{batch_size * world_size}; got sizes {sorted(set(counts.tolist()))}")
            self.groups = [torch.nonzero(inverse == k).flatten() for k in range(len(counts))]
        if drop_last and n < batch_size * world_size:
            raise ValueError(f"the dataset ({n}) is smaller than one global batch ({batch_size} x {world_size})")

    def __len__(self) -> int:
        g = self.b * self.world
        return self.n // g if self.drop_last else -(-self.n // g)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        perm = torch.randperm(len(self.groups) if self.groups is not None else self.n,
                              generator=torch.Generator().manual_seed(self.seed + epoch))
        if self.groups is None:
            return perm
        return torch.cat([self.groups[k] for k in perm.tolist()])  # whole groups, in random order

    def batches(self, epoch: int, start: int = 0) -> Iterator[list]:
        """Index lists of this rank, from global batch `start` on."""
        idx = self.order(epoch)
        g = self.b * self.world
        for k in range(start, len(self)):
            glob = idx[k * g:(k + 1) * g]
            per = -(-len(glob) // self.world)
            yield glob[self.rank * per:(self.rank + 1) * per].tolist()


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (small picklable objects); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mtc_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """The generator of step `step`'s MTC indices: the same on every rank, independent of resumption."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))
    return g
