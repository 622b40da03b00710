"""Input pipelines: one rank's training batches (and evaluation batches) built in DataLoader worker processes.

Training asks for batches, not items: the sampler (:class:`BatchRequests`) yields one request
``(epoch, position, indices)`` per batch, in the order of `EpochBatches` (global batches, this rank's slice),
epoch after epoch from a start position (a resumed run starts in the middle of an epoch). A worker turns a request
into a collated batch (:class:`BatchReader` -> :func:`read_batch`):

- it sets the dataset's epoch from the request (``set_epoch`` called in the training process would not reach
  workers that persist across epochs), so an item stays a function of (seed, epoch, index);
- an unreadable item is replaced by the next readable index, ``(i + k) % len(data)``, as the in-process path
  always did: the replacement depends only on the index, never on the worker that ran it;
- the skip records travel with the batch (``batch["skipped"]``); the training process counts them
  (:class:`SkipTracker`, merged over ranks by :func:`sync_skips`) and enforces ``max_skip_fraction``.

Whichever worker builds a batch, it is the same batch, and the batches arrive in request order: 0, 1 or N workers
give bitwise-equal training runs.

Workers (:func:`make_loader`): ``num_workers`` processes (0 = build batches in the training process),
``prefetch`` batches ahead per worker, pinned memory on CUDA (the trainer then copies with
``non_blocking=True``), and a start method safe with CUDA (:func:`start_method`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import SkipTracker, collate
from .shard_stream import is_shard_stream

__all__ = ["default_num_workers", "resolve_num_workers", "start_method", "read_batch", "BatchRequests",
           "BatchReader", "make_loader", "TrainInput", "sync_skips", "MAX_REPLACEMENTS"]

log = logging.getLogger("lfvila.data")

# consecutive unreadable indices tolerated while looking for a replacement item
MAX_REPLACEMENTS = 20


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(processes_per_node: Optional[int] = None) -> int:
    """``min(8, CPUs - 1)`` workers per training process, the CPUs being this node's share of one process
    (``LOCAL_WORLD_SIZE`` processes under torchrun); one CPU is left to the training process itself."""
    procs = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(0, min(8, _cpus() // max(procs, 1) - 1))


def resolve_num_workers(value: Any) -> int:
    """``data.num_workers``: None -> :func:`default_num_workers`; else an int >= 0 (0 = no worker process)."""
    if value is None:
        return default_num_workers()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"data.num_workers must be an int >= 0 or null (automatic), got {value!r}")
    return value


def start_method(device: Any = "cpu") -> str:
    """How DataLoader workers start.

    ``fork`` on the CPU: fastest to start, and workers share the dataset (and a preloaded frame cache) with the
    training process without pickling it. Forking a process that has initialised CUDA gives children a CUDA state
    they cannot use (and can deadlock them), so with a CUDA device, or CUDA already initialised, workers start
    from a clean ``forkserver`` (``spawn`` where there is none); the dataset is then pickled to them once.
    """
    methods = mp.get_all_start_methods()
    cuda = torch.device(device).type == "cuda" or torch.cuda.is_initialized()
    if not cuda and "fork" in methods:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def read_batch(data, indices: Sequence[int], epoch: Optional[int] = None,
               max_replacements: int = MAX_REPLACEMENTS) -> dict:
    """One collated batch of ``data`` (a map-style dataset of this package) for ``indices``.

    An unreadable item i is replaced by the first readable ``(i + k) % len(data)``, k = 1, 2, ...; every
    unreadable item met is listed in ``batch["skipped"]`` (``{"index", "path", "reason"}``). When no readable item
    is found within ``max_replacements`` tries, the batch holds only ``size`` 0, ``skipped`` and ``error`` (the
    message): the training process counts the skips first, then raises.
    """
    if epoch is not None and hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    n = len(data)
    items, skipped = [], []
    for i in indices:
        i = int(i)
        item = data[i]
        k = 0
        while item.get("skipped"):
            skipped.append({key: item[key] for key in ("index", "path", "reason")})
            k += 1
            if k > max_replacements:
                return {"size": 0, "skipped": skipped,
                        "error": f"no readable video near index {i} after {k} tries"}
            item = data[(i + k) % n]
        items.append(item)
    batch = collate(items)
    batch["skipped"] = skipped
    return batch


class BatchRequests(Sampler):
    """Requests ``(epoch, position, indices)`` for one rank's batches: positions ``0 .. per_epoch - 1`` of each
    epoch of ``batches`` (an `EpochBatches`), from the start set by :meth:`start_at`, epoch after epoch, without
    end (the trainer stops asking)."""

    def __init__(self, batches, per_epoch: Optional[int] = None):
        self.batches = batches
        self.per_epoch = len(batches) if per_epoch is None else int(per_epoch)
        if not 1 <= self.per_epoch <= len(batches):
            raise ValueError(f"per_epoch must be in [1, {len(batches)}], got {per_epoch!r}")
        self.epoch, self.position = 0, 0

    def start_at(self, epoch: int, position: int = 0) -> "BatchRequests":
        if position >= self.per_epoch:  # the previous epoch is done
            epoch, position = epoch + 1, 0
        self.epoch, self.position = int(epoch), int(position)
        return self

    def __iter__(self) -> Iterator[tuple]:
        epoch, pos = self.epoch, self.position
        while True:
            for k, idx in enumerate(self.batches.batches(epoch, pos), start=pos):
                if k >= self.per_epoch:
                    break
                yield (epoch, k, idx)
            epoch, pos = epoch + 1, 0


class BatchReader(Dataset):
    """Map-style view of ``data`` whose keys are batch requests: ``reader[(epoch, position, indices)]`` is
    :func:`read_batch` of those indices in that epoch (what a DataLoader worker runs)."""

    def __init__(self, data, max_replacements: int = MAX_REPLACEMENTS):
        self.data = data
        self.max_replacements = max_replacements

    def __getitem__(self, request) -> dict:
        epoch, _, indices = request
        return read_batch(self.data, indices, epoch, self.max_replacements)


def _as_is(batch):
    return batch


def make_loader(dataset, *, batch_size: Optional[int] = None, sampler=None, collate_fn: Optional[Callable] = None,
                num_workers: int = 0, prefetch: int = 2, device: Any = "cpu", seed: int = 0,
                persistent: bool = False) -> DataLoader:
    """A DataLoader with the project's worker settings.

    Args:
        dataset: items (with ``batch_size`` and ``collate_fn``, evaluation) or a :class:`BatchReader` (with a
            :class:`BatchRequests` ``sampler`` and ``batch_size=None``: each key is already a whole batch).
        num_workers: worker processes (0: in the calling process).
        prefetch: batches each worker prepares ahead (DataLoader's ``prefetch_factor``).
        device: where the batches go: pinned memory and a CUDA-safe start method for a CUDA device.
        seed: seeds the loader's own generator (worker seeds, shuffling), so building the loader never draws
            from the global torch RNG (which would change dropout masks and break exact resume).
        persistent: keep the workers between passes over the loader (they end with the loader).
    """
    num_workers = resolve_num_workers(num_workers)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
    cuda = torch.device(device).type == "cuda"
    kw: dict = {}
    if num_workers > 0:
        kw = dict(prefetch_factor=prefetch, persistent_workers=persistent,
                  multiprocessing_context=mp.get_context(start_method(device)))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn if collate_fn is not None else _as_is, pin_memory=cuda,
                      generator=torch.Generator().manual_seed(seed), **kw)


class TrainInput:
    """The trainer's batches, in `EpochBatches` order from a start position, on the device.

    Datasets with ``get_batch`` (in-memory sets: the demo's preloaded frames) are read in the training process;
    other datasets through :func:`make_loader` with ``num_workers`` workers (0: in the training process, the
    same :func:`read_batch`). ``task.take(batch, device)`` counts the skips and moves the batch to the device.

    A :class:`~lfvila_model.data.shard_stream.ShardStream` (``data.kind: shards``) is read as a stream instead:
    ``batches`` only gives its length, rank and world size; its lanes (one per worker, capped by the shard count:
    ``self.num_workers`` is the count used) produce the batches, and :meth:`stream_state` is the position of each
    lane for the checkpoint (:meth:`load_stream_state` puts it back before :meth:`start`).
    """

    def __init__(self, data, task, batches, per_epoch: int, device, num_workers: int = 0, prefetch: int = 2,
                 seed: int = 0):
        self.data, self.task, self.device = data, task, torch.device(device)
        self.requests = BatchRequests(batches, per_epoch)
        self.num_workers = resolve_num_workers(num_workers)
        self.prefetch, self.seed = prefetch, seed
        self.in_memory = hasattr(data, "get_batch")
        self.streaming = is_shard_stream(data)
        self.loader = None
        self._it = None
        if self.streaming:
            self.lanes = data.lanes_for(self.num_workers, batches.world)
            self.num_workers = self.lanes if self.num_workers > 0 else 0
            self.cursors: list = [None] * self.lanes  # per lane [epoch, consumed] of the last batch taken
            return
        if not self.in_memory and self.num_workers > 0:
            self.loader = make_loader(BatchReader(data, task.max_replacements), sampler=self.requests,
                                      num_workers=self.num_workers, prefetch=prefetch, device=self.device, seed=seed,
                                      persistent=True)

    def start(self, epoch: int, position: int = 0) -> Iterator[dict]:
        """Batches on the device from batch ``position`` of ``epoch`` on."""
        self.requests.start_at(epoch, position)
        if self.streaming:
            return self._start_stream()
        if self.in_memory:
            return (self.task.take(self.data.get_batch(idx), self.device) for _, _, idx in self.requests)
        if self.loader is None:
            return (self.task.take(read_batch(self.data, idx, e, self.task.max_replacements), self.device)
                    for e, _, idx in self.requests)
        self._it = iter(self.loader)
        return (self.task.take(b, self.device) for b in self._it)

    def _start_stream(self) -> Iterator[dict]:
        b = self.requests.batches
        per_epoch = self.requests.per_epoch
        start = self.requests.epoch * per_epoch + self.requests.position
        plan = self.data.batches(b.b, b.rank, b.world, self.lanes, per_epoch, start, self.cursors,
                                 self.task.max_replacements)
        if self.num_workers > 0:
            self.loader = make_loader(plan, num_workers=self.num_workers, prefetch=self.prefetch, device=self.device,
                                      seed=self.seed)
            self._it = iter(self.loader)
            source = self._it
        else:
            source = iter(plan)
        return (self._take_streamed(batch) for batch in source)

    def _take_streamed(self, batch: dict) -> dict:
        st = batch.pop("stream")
        self.cursors[int(st["lane"])] = [int(st["epoch"]), int(st["consumed"])]
        return self.task.take(batch, self.device)

    def stream_state(self) -> Optional[dict]:
        """This rank's stream position (None for map-style data): ``{"lanes", "cursors"}``, plain ints."""
        if not self.streaming:
            return None
        return {"lanes": self.lanes, "cursors": [list(c) if c is not None else [-1, 0] for c in self.cursors]}

    def load_stream_state(self, state: Optional[dict]) -> None:
        """Puts back a :meth:`stream_state`. Another lane count (worker count or world size changed) restarts
        the lanes at the saved batch position with the new layout: the run goes on, no longer bit-exact."""
        if not self.streaming or not state:
            return
        if state.get("lanes") != self.lanes:
            log.warning(
                "the checkpoint's shard stream had %s lanes, this run has %d (other worker count or world size): "
                "the stream restarts at the same batch with the new layout, not bit-exactly", state.get("lanes"),
                self.lanes)
            self.cursors = [None] * self.lanes
            return
        self.cursors = [list(c) if int(c[0]) >= 0 else None for c in state["cursors"]]

    def close(self) -> None:
        """Stops the worker processes (they would otherwise live as long as this object)."""
        if self._it is not None and hasattr(self._it, "_shutdown_workers"):
            self._it._shutdown_workers()
        self._it = None
        if self.loader is not None:
            self.loader._iterator = None  # the persistent iterator: a later start() makes new workers


def sync_skips(tracker: Optional[SkipTracker]) -> int:
    """Merges the skipped items of every rank into ``tracker`` (distinct indices: a bad file met by two ranks in
    different epochs counts once), re-checks ``max_skip_fraction`` on the global count (raising
    `TooManySkippedError` on every rank alike), and returns that count. One process: the local count."""
    import torch.distributed as dist

    local = dict(tracker.skipped) if tracker is not None else {}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, local)
        if tracker is None:
            return len({i for d in every for i in d})
        for d in every:
            for i, rec in d.items():
                tracker.skipped.setdefault(i, rec)
    if tracker is None:
        return 0
    tracker.update({})
    return tracker.count
