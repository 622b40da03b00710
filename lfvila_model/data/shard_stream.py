"""Streaming pre-training input from WebDataset tar shards (``data.kind: shards``).

The shard format (version 1, written by ``lfvila shard``): ``SHARDS_DIR/shard-000000.tar``, ... written with the
``webdataset`` library, plus ``SHARDS_DIR/index.json``::

    {"format": "lfvila-shards", "version": 1, "total": N,
     "shards": [{"name": "shard-000000.tar", "samples": n, "bytes": b}, ...]}

One sample per long-form sample, keyed ``s<global sample number:09d>`` (its 0-based line in the ``pretrain.jsonl``
the set was written from, so its item is ``PretrainDataset``'s for that line; numbers of samples the writer skipped
are absent), with members ``<key>.json``
(``{"video_id", "clips": [clip_id, ...], "texts": [sentence, ...]}``) and ``<key>.clip000.mp4``,
``<key>.clip001.mp4``, ... (each clip's mp4 bytes, in order). Shard names are relative to the index's folder.

How one rank reads (:class:`ShardStream`, :class:`ShardBatches`):

- **Epoch length** from the index, before reading anything: ``P = total // (batch_size * world_size)`` batches
  per rank (the trainer's `EpochBatches` of ``total`` items), the same on every rank, so every rank runs the same
  number of steps whatever the shards hold (uneven shard counts never hang DDP).
- **Lanes**: a rank reads through ``L`` lanes, one per DataLoader worker (1 without workers). Batch ``g`` of the
  run (``g = epoch * P + position``) comes from lane ``g % L``; the DataLoader hands out its workers' batches in
  turn, so the order is fixed.
- **Shards split across nodes, ranks and workers**: each epoch the shards are permuted by (seed, epoch) and dealt,
  largest-first balancing by sample count, to the ``world_size * L`` (rank, lane) slots; every rank computes the
  same deal from the index. A slot reads its shards in turn, over and over (a slot that runs short of its share
  of the epoch starts over its shards, one with more leaves the rest for a later epoch's deal), through a shuffle
  buffer of ``shuffle_buffer`` samples drawn from ``numpy.random.default_rng([seed, epoch, slot, ...])``.
  Hence ``world_size * L`` shards at least; :meth:`ShardStream.lanes_for` caps the worker count to that.
- **Items** are those of :class:`~lfvila_model.data.datasets.PretrainDataset` (same window, frame sampling,
  transforms, tokenizer, and the same skip records) for the sample numbered by its key: the clips are decoded from
  the tar's bytes in memory (``io.BytesIO``), never written to disk.
- **Unreadable samples** (bad json, missing or undecodable clip) are replaced by the slot's next sample and
  listed in ``batch["skipped"]`` with their sample number, so the trainer's `SkipTracker` counts them against
  ``data.max_skip_fraction`` of ``total`` as for file datasets. A tar that cannot be read past some point is
  logged and the slot goes on with its next shard.
- **Deterministic and resumable**: a batch depends on (seed, epoch, world size, lanes, its position). Each batch
  carries ``batch["stream"] = {"lane", "epoch", "consumed"}`` (samples its lane took from its slot this epoch,
  unreadable ones included); the training process keeps the last one of every lane and saves them in the
  checkpoint. On resume a lane rebuilds its slot's stream for that epoch and passes over the samples already
  consumed without decoding them (it reads their bytes again: the cost of a resume is reading, not decoding, the
  part of the epoch already done), so a resumed run equals the uninterrupted one bit for bit, with workers.
  Resuming with another world size or worker count restarts the stream at the same batch position with the new
  layout (not bit-exact; logged).

The tars are read with the ``webdataset`` library's tar iterator (``tarfile_samples``: members grouped into
samples by key); the split, the shuffle buffer and the epoch loop are this module's, not ``wds.WebDataset``'s
(``split_by_node``/``split_by_worker`` deal shards by position, which leaves ranks with unequal sample counts, and
its ``shuffle`` draws from a Python ``random`` whose position a checkpoint cannot name: exact resume needs the
stream to be a function of (seed, epoch, slot) that can be replayed to a sample count).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .datasets import PretrainDataset, check_pos_int, collate
from .shards import FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, JSON_MEMBER, clip_member
from .text import ParagraphTokenizer

__all__ = ["SHARD_FORMAT", "SHARD_VERSION", "DEFAULT_SHUFFLE_BUFFER", "ShardInfo", "ShardIndex", "read_shard_index",
           "deal_shards", "buffer_shuffle", "sample_number", "ShardStream", "ShardBatches", "is_shard_stream"]

log = logging.getLogger("lfvila.data")

# the format's names are the writer's (data/shards.py), so reader and writer cannot drift apart
SHARD_FORMAT, SHARD_VERSION = FORMAT_NAME, FORMAT_VERSION
# samples held by each lane's shuffle buffer: their mp4 bytes (4 clips of 3 fps video: ~0.2 MB at 360p, ~1-2 MB at
# 720p) stay in the worker's memory
DEFAULT_SHUFFLE_BUFFER = 100
# consecutive unreadable samples tolerated while filling one batch slot (as the map-style loader)
MAX_REPLACEMENTS = 20

_KEY = re.compile(r"^s(\d+)$")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name, relative to the index's folder
    samples: int
    bytes: int


@dataclass(frozen=True)
class ShardIndex:
    """A shard folder's ``index.json``: ``root`` (the folder), its ``shards`` and the ``total`` sample count."""

    root: str
    shards: tuple
    total: int

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.shards[i].name)

    @property
    def counts(self) -> list:
        return [s.samples for s in self.shards]


def read_shard_index(path: str | os.PathLike) -> ShardIndex:
    """Reads and checks a shard folder's index (``path``: the folder or its ``index.json``).

    Raises ``FileNotFoundError`` when there is no index and ``ValueError`` naming the field when it is not a
    version-1 ``lfvila-shards`` index (unknown format or version, counts that do not add up, shard names that are
    not plain file names of this folder, shards that are missing).
    """
    path = os.fspath(path)
    index_file = os.path.join(path, INDEX_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"no shard index at {index_file} (data.train must be a shard folder or its "
                                f"index.json, as `lfvila shard` writes them)")
    with open(index_file) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_file} is not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != SHARD_FORMAT:
        raise ValueError(f"{index_file}: format must be {SHARD_FORMAT!r}, got "
                         f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
    if d.get("version") != SHARD_VERSION:
        raise ValueError(f"{index_file}: version must be {SHARD_VERSION} (this reader's), got {d.get('version')!r}")
    shards = d.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{index_file}: shards must be a non-empty list, got {shards!r:.80}")
    root = os.path.dirname(os.path.abspath(index_file))
    out = []
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise ValueError(f"{index_file}: shards[{i}] must be an object, got {s!r:.80}")
        name, n, b = s.get("name"), s.get("samples"), s.get("bytes", 0)
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"{index_file}: shards[{i}].name must be a file name in the index's folder, got "
                             f"{name!r}")
        for field, v in (("samples", n), ("bytes", b)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{index_file}: shards[{i}].{field} must be an int >= 0, got {v!r}")
        if not os.path.isfile(os.path.join(root, name)):
            raise ValueError(f"{index_file}: shards[{i}] {name} is missing from {root}")
        out.append(ShardInfo(name, n, b))
    total = d.get("total")
    if isinstance(total, bool) or not isinstance(total, int) or total != sum(s.samples for s in out) or total < 1:
        raise ValueError(f"{index_file}: total must be the sum of the shards' samples "
                         f"({sum(s.samples for s in out)}, at least 1), got {total!r}")
    return ShardIndex(root, tuple(out), total)


def deal_shards(counts: Sequence[int], slots: int, seed: int, epoch: int) -> list:
    """Shard numbers of each of ``slots`` readers for one epoch: the shards in the order of a permutation drawn
    from (seed, epoch), each given to the slot with the fewest samples so far (the lowest slot on ties), so slots
    get near-equal sample counts. Every rank computes the same deal. Returns ``slots`` lists (some empty when
    there are fewer shards than slots)."""
    slots = check_pos_int("slots", slots)
    order = np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(len(counts))
    heap = [(0, k) for k in range(slots)]  # (samples held, slot): the smallest first, the lowest slot on ties
    out: list = [[] for _ in range(slots)]
    for i in order.tolist():
        held, s = heapq.heappop(heap)
        out[s].append(i)
        heapq.heappush(heap, (held + int(counts[i]), s))
    return out


def buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffles a (long or endless) stream through a buffer of ``size`` items, as WebDataset's ``shuffle``: once
    the buffer is full, each incoming item replaces a uniformly drawn buffered one, which is yielded. ``size`` 0
    or 1 keeps the order. The output order depends only on the input order and ``rng``, never on the items."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        buf[j], x = x, buf[j]
        yield x
    while buf:  # a finite stream: drain in random order
        yield buf.pop(int(rng.integers(len(buf))))


def sample_number(key: str) -> Optional[int]:
    """The global sample number of a shard key ``s000000123`` (None for another key)."""
    m = _KEY.match(key)
    return int(m.group(1)) if m else None


def _named_bytes(data: bytes, name: str) -> io.BytesIO:
    f = io.BytesIO(data)
    f.name = name  # names the clip in errors and skip records
    return f


def _tar_warning(exn: Exception) -> bool:
    log.warning("unreadable shard data, going on with the next readable part: %s", exn)
    return True


class ShardStream:
    """The pre-training samples of a shard folder, as items of :class:`PretrainDataset`.

    Args:
        index: a :class:`ShardIndex`, or the shard folder / its ``index.json``.
        tokenizer, num_clips, frames_per_clip, size, seed, antialias: as :class:`PretrainDataset` (training
            items: random window, train transform).
        shuffle_buffer: samples in each lane's shuffle buffer (0 or 1: shard order, no shuffling).

    ``len()`` is the index's total (the skip fraction's denominator); :meth:`batches` gives one rank's batches.
    """

    def __init__(self, index, tokenizer: ParagraphTokenizer | None, *, num_clips: int = 4, frames_per_clip: int = 8,
                 size: tuple = (192, 320), seed: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 antialias: bool = False):
        self.index = index if isinstance(index, ShardIndex) else read_shard_index(index)
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        self.shuffle_buffer = shuffle_buffer
        # the item maker: PretrainDataset's own code, so a shard sample gives exactly its item
        self.items = PretrainDataset([], ".", tokenizer, num_clips=num_clips, frames_per_clip=frames_per_clip,
                                     size=size, train=True, seed=seed, antialias=antialias)
        self.seed = self.items.seed
        self.num_clips = self.items.num_clips

    def __len__(self) -> int:
        return self.index.total

    def lanes_for(self, num_workers: int, world_size: int) -> int:
        """Lanes (= DataLoader workers, 1 without) one rank can use: ``num_workers`` capped so every (rank, lane)
        slot gets a shard. Raises ``ValueError`` when there are fewer shards than ranks."""
        n = len(self.index.shards)
        if n < world_size:
            raise ValueError(f"{n} shards cannot feed {world_size} ranks: every rank needs a shard of its own; "
                             f"write smaller shards (lfvila shard --samples-per-shard)")
        return max(1, min(int(num_workers), n // world_size))

    # -- samples -------------------------------------------------------------------------------------------------

    def raw_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        """Endless stream of slot ``slot``'s undecoded samples (webdataset dicts of bytes) in epoch ``epoch``:
        its shards of :func:`deal_shards`, over and over, through the shuffle buffer."""
        from webdataset.tariterators import tarfile_samples

        mine = deal_shards(self.index.counts, slots, self.seed, epoch)[slot]
        if not mine:
            raise ValueError(f"slot {slot} of {slots} got no shard ({len(self.index.shards)} shards)")
        paths = [self.index.path(i) for i in mine]

        def cycle():
            while True:
                got = 0
                for p in paths:
                    for s in tarfile_samples([{"url": p}], handler=_tar_warning):
                        got += 1
                        yield s
                if not got:
                    raise RuntimeError(f"the shards {paths} hold no readable sample")

        rng = np.random.default_rng([self.seed, int(epoch), int(slot), 0x5A0F])
        return buffer_shuffle(cycle(), self.shuffle_buffer, rng)

    def item(self, sample: dict) -> dict:
        """The :class:`PretrainDataset` item of one undecoded shard sample (a skip record when unreadable).
        Call ``self.items.set_epoch`` first: the random draws depend on (seed, epoch, sample number)."""
        key = str(sample.get("__key__"))
        where = f"{os.path.basename(str(sample.get('__url__', '?')))}/{key}"
        index = sample_number(key)
        if index is None:
            # a stable negative id of its own for a sample without a number (counted once however often it is met)
            bad_id = int.from_bytes(hashlib.blake2b(where.encode(), digest_size=4).digest(), "little")
            return {"skipped": True, "index": -1 - bad_id, "path": where,
                    "reason": "key is not s<sample number>"}
        try:
            meta = json.loads(sample[JSON_MEMBER])
            clip_ids, texts = meta["clips"], meta["texts"]
            if not (isinstance(clip_ids, list) and isinstance(texts, list) and len(clip_ids) == len(texts)):
                raise ValueError("clips and texts must be lists of the same length")
            if len(clip_ids) < self.num_clips:
                raise ValueError(f"{len(clip_ids)} clips, fewer than num_clips={self.num_clips}")
            missing = [k for k in range(len(clip_ids)) if clip_member(k) not in sample]
            if missing:
                raise ValueError(f"no {clip_member(missing[0])} member")
        except (KeyError, ValueError, TypeError) as e:
            log.warning("skipping sample %s: %s", where, e)
            return {"skipped": True, "index": index, "path": where, "reason": f"{type(e).__name__}: {e}"}
        return self.items.make_item(index, clip_ids, texts,
                                    lambda k: _named_bytes(sample[clip_member(k)], f"{where}.{clip_member(k)}"))

    def read_batch(self, samples: Iterator[dict], batch_size: int,
                   max_replacements: int = MAX_REPLACEMENTS) -> tuple[dict, int]:
        """One collated batch of ``batch_size`` readable items from ``samples``; returns ``(batch, samples
        taken)``. Unreadable samples are replaced by the next ones and listed in ``batch["skipped"]``; past
        ``max_replacements`` in a row the batch holds only ``size`` 0, ``skipped`` and ``error``."""
        items, skipped, taken = [], [], 0
        while len(items) < batch_size:
            k = 0
            while True:
                it = self.item(next(samples))
                taken += 1
                if not it.get("skipped"):
                    break
                skipped.append({key: it[key] for key in ("index", "path", "reason")})
                k += 1
                if k > max_replacements:
                    return ({"size": 0, "skipped": skipped,
                             "error": f"{k} unreadable shard samples in a row (last: {it['path']})"}, taken)
            items.append(it)
        batch = collate(items)
        batch["skipped"] = skipped
        return batch, taken

    # -- batches -------------------------------------------------------------------------------------------------

    def batches(self, batch_size: int, rank: int, world_size: int, lanes: int, per_epoch: int, start: int = 0,
                cursors: Optional[Sequence] = None, max_replacements: int = MAX_REPLACEMENTS) -> "ShardBatches":
        """One rank's batches from run batch ``start`` (``epoch * per_epoch + position``) on, as an
        ``IterableDataset`` for a DataLoader with ``lanes`` workers (or iterated in this process when
        ``lanes == 1``). ``cursors``: per lane ``[epoch, consumed]`` from :meth:`ShardBatches` batches'
        ``stream`` records (None or ``[-1, 0]`` where unknown: the lane starts its epoch afresh)."""
        return ShardBatches(self, batch_size, rank, world_size, lanes, per_epoch, start, cursors, max_replacements)

    def lane_batches(self, batch_size: int, rank: int, world_size: int, lanes: int, per_epoch: int, lane: int,
                     start: int, cursor: Optional[Sequence] = None,
                     max_replacements: int = MAX_REPLACEMENTS) -> Iterator[dict]:
        """Lane ``lane``'s batches: run batches ``g >= start`` with ``g % lanes == lane``, in order, endless."""
        g = start + (lane - start) % lanes
        slots = world_size * lanes
        slot = rank * lanes + lane
        while True:
            epoch = g // per_epoch
            self.items.set_epoch(epoch)
            samples = self.raw_samples(epoch, slot, slots)
            consumed = 0
            if cursor is not None and int(cursor[0]) == epoch:
                for _ in range(int(cursor[1])):  # resume: pass over what this lane already used, undecoded
                    next(samples)
                consumed = int(cursor[1])
            cursor = None
            while g < (epoch + 1) * per_epoch:
                batch, taken = self.read_batch(samples, batch_size, max_replacements)
                consumed += taken
                batch["stream"] = {"lane": lane, "epoch": epoch, "consumed": consumed}
                yield batch
                g += lanes


class ShardBatches(IterableDataset):
    """One rank's batches of a :class:`ShardStream` (see :meth:`ShardStream.batches`): worker ``w`` of a
    DataLoader with ``lanes`` workers reads lane ``(start + w) % lanes``, so the DataLoader, which takes its
    workers' batches in turn, yields run batches ``start, start + 1, ...`` in order. Endless."""

    def __init__(self, stream: ShardStream, batch_size: int, rank: int, world_size: int, lanes: int, per_epoch: int,
                 start: int = 0, cursors: Optional[Sequence] = None, max_replacements: int = MAX_REPLACEMENTS):
        self.stream = stream
        self.batch_size = check_pos_int("batch_size", batch_size)
        self.world_size = check_pos_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.rank = rank
        self.lanes = check_pos_int("lanes", lanes)
        self.per_epoch = check_pos_int("per_epoch", per_epoch)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        self.start = start
        cursors = list(cursors) if cursors is not None else [None] * self.lanes
        if len(cursors) != self.lanes:
            raise ValueError(f"cursors must hold one entry per lane ({self.lanes}), got {len(cursors)}")
        self.cursors = [None if c is None or int(c[0]) < 0 else (int(c[0]), int(c[1])) for c in cursors]
        self.max_replacements = max_replacements

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, w = (1, 0) if info is None else (info.num_workers, info.id)
        if workers != self.lanes:
            raise RuntimeError(f"ShardBatches of {self.lanes} lanes read by {workers} DataLoader workers: the "
                               f"worker count must equal the lane count")
        lane = (self.start + w) % self.lanes
        return self.stream.lane_batches(self.batch_size, self.rank, self.world_size, self.lanes, self.per_epoch,
                                        lane, self.start, self.cursors[lane], self.max_replacements)


def is_shard_stream(data: Any) -> bool:
    """True for the training data of ``data.kind: shards`` (the trainer's input reads it as a stream)."""
    return isinstance(data, ShardStream)
