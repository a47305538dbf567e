"""The resumable training stream and the one-pass eval stream.

Readers: every rank runs ``workers`` DataLoader workers, so ``world * workers`` readers in all.
Each epoch the shards are permuted with (seed, epoch), and reader r takes every R-th of them. A
reader reads one shard whole, permutes its samples with (seed, epoch, shard) - the shuffle buffer
is one shard - and yields micro-batches. Each batch carries the reader's position after it
(epoch, shard cursor, offset in the shard), so a checkpoint records where every reader stands;
resuming re-reads one shard per reader and skips to the offset, never replaying the epoch.

DataLoader takes batches from its workers in turn. After resuming, the worker that was next is
not worker 0, so worker w takes the place of reader (w + next_reader) % workers.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cli import plural
from ..errors import UserError
from .device_decode import JpegBatch
from .fork_server import start_worker, worker_context
from .shards import ShardSet, StorageUnreachable, read_shard
from .transforms import BadSample, HostBatch, eval_view, image_and_labels, labels_tensor


@dataclass
class ReaderState:
    epoch: int = 0
    cursor: int = 0  # index into this reader's shards of the epoch
    offset: int = 0  # samples of the current shard already used


@dataclass
class StreamState:
    """Where one rank's stream stands: a position per reader and which reader comes next."""

    workers: int
    world: int
    readers: dict[int, ReaderState]
    next_reader: int = 0

    def to_dict(self) -> dict:
        return {"workers": self.workers, "world": self.world, "next_reader": self.next_reader,
                "readers": {str(k): asdict(v) for k, v in self.readers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        readers = {int(k): ReaderState(**v) for k, v in d["readers"].items()}
        return cls(d["workers"], d["world"], readers, d["next_reader"])


class TrainStream(IterableDataset):
    def __init__(self, urls: list[str], image_size: int, micro_batch: int, seed: int, rank: int, world: int,
                 min_scale: float, resume: StreamState | None = None, decode: str = "host",
                 patience_s: float | None = None, counts: list[int] | None = None):
        super().__init__()
        self.urls, self.image_size, self.micro_batch, self.seed = urls, image_size, micro_batch, seed
        self.counts = counts  # samples in each shard (the manifest's): what a damaged shard lacks is bad_samples
        self.rank, self.world, self.min_scale, self.resume = rank, world, min_scale, resume
        self.patience_s = patience_s  # read_shard's outage_s
        self.views = JpegBatch if decode == "device" else HostBatch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        next_reader = self.resume.next_reader if self.resume else 0
        reader = (worker + next_reader) % workers
        saved = self.resume.readers.get(reader) if self.resume else None
        state = ReaderState(**asdict(saved)) if saved else ReaderState()
        yield from self._batches(reader, self.rank * workers + reader, self.world * workers, state)

    def check_readers(self, workers: int) -> None:
        """In the training process, before any worker starts: every reader needs a shard."""
        readers = self.world * max(workers, 1)
        if len(self.urls) < readers:
            fewer = ("lower data.workers, " if workers > 1 else "") + ("run fewer processes, " if self.world > 1 else "")
            raise UserError(f"{plural(len(self.urls), 'shard')} cannot feed {readers} readers ({self.world} "
                            f"process(es) x {max(workers, 1)}: data.workers, or 1 for 0); {fewer}or reshard into "
                            f"more shards (data_tools.shard --shard-samples)")

    def _batches(self, reader: int, index: int, readers: int, state: ReaderState) -> Iterator[dict]:
        views, labels, bad, damaged, unread = self.views(self.image_size, self.min_scale), [], 0, [], []
        while True:
            mine = np.random.default_rng([self.seed, state.epoch]).permutation(len(self.urls))[index::readers]
            whole_epoch, read, errors = state.cursor == state.offset == 0, 0, []
            while state.cursor < len(mine):
                shard = int(mine[state.cursor])
                try:
                    samples, error = read_shard(self.urls[shard], self.patience_s)
                except StorageUnreachable as e:
                    yield {"error": f"{e}; the run stops, and run again it resumes from its newest checkpoint"}
                    return
                if error:
                    damaged.append(error)
                    errors.append(error)
                    if state.offset == 0:  # resumed inside the shard: counted before the checkpoint
                        bad += max(self.counts[shard] - len(samples), 1) if self.counts else 1
                order = np.random.default_rng([self.seed, state.epoch, shard]).permutation(len(samples))
                while state.offset < len(order):
                    i = int(order[state.offset])
                    state.offset += 1
                    try:
                        labels.append(views.add(samples[i], [self.seed, state.epoch, shard, i]))
                    except BadSample as e:
                        bad += 1
                        unread.append((f"{self.urls[shard]}: sample {samples[i].get('__key__')}", str(e)))
                        continue
                    read += 1
                    if len(views) == self.micro_batch:
                        yield {**views.take(), "labels": labels_tensor(labels), "reader": reader,
                               "state": asdict(state), "bad_samples": bad, "damaged_shards": damaged,
                               "unread": unread}
                        labels, bad, damaged, unread = [], 0, [], []
                state.cursor, state.offset = state.cursor + 1, 0
            if whole_epoch and not read:  # it would read on forever and the training process wait for it
                cause = errors[0] if errors else f"{bad} samples, none a readable image with a label"
                yield {"error": f"none of the {len(mine)} shards data reader {index} reads holds a usable sample "
                                f"({cause}{f'; {len(errors)} shards alike' if len(errors) > 1 else ''}); "
                                f"check data.train with python -m data_tools.verify"}
                return
            state.epoch, state.cursor = state.epoch + 1, 0


NAMED_BAD_SAMPLES = 10  # by each rank; more are only counted


class StreamTracker:
    """Follows the batches a rank consumed, to save the stream's position in a checkpoint."""

    def __init__(self, workers: int, world: int, resume: StreamState | None):
        self.state = resume or StreamState(max(workers, 1), world, {})
        self.bad_samples = 0
        self.damaged_shards: dict[str, str] = {}  # url -> what is wrong with it, once however many epochs
        self.unread: set[str] = set()  # the bad samples named so far ("shard url: sample key")
        self.new_unread: list[tuple[str, bool]] = []  # (what is wrong, whether it is the last one named)

    def consumed(self, batch: dict) -> list[str]:
        """Take in a consumed batch; what is wrong with the damaged shards it is the first to meet. The bad samples
        it is the first to meet are in ``new_unread``, up to ``NAMED_BAD_SAMPLES`` in all, the last marked."""
        self.state.readers[batch["reader"]] = ReaderState(**batch["state"])
        self.state.next_reader = (batch["reader"] + 1) % self.state.workers
        self.bad_samples += batch["bad_samples"]
        new = [why for why in batch["damaged_shards"] if why.split(": ", 1)[0] not in self.damaged_shards]
        self.damaged_shards |= {why.split(": ", 1)[0]: why for why in new}
        new_unread = {where: why for where, why in batch.get("unread", []) if where not in self.unread}
        named = list(new_unread)[:max(NAMED_BAD_SAMPLES - len(self.unread), 0)]
        self.new_unread = [(f"{where} {new_unread[where]}", len(self.unread) + i + 1 == NAMED_BAD_SAMPLES)
                           for i, where in enumerate(named)]
        self.unread |= set(named)
        return new


def check_resumable(state: StreamState, workers: int, world: int, allow_resharding: bool) -> StreamState | None:
    """The saved state if it fits this run's readers; None to restart the stream (when allowed)."""
    if (state.workers, state.world) == (max(workers, 1), world):
        return state
    if not allow_resharding:
        raise UserError(f"the checkpoint's data stream ran on {state.world} ranks x {state.workers} workers, this run on "
                        f"{world} x {max(workers, 1)}; resume with the same, or set data.allow_resharding=true to "
                        f"restart the stream at the next epoch")
    epoch = max((r.epoch for r in state.readers.values()), default=0) + 1
    return StreamState(max(workers, 1), world, {r: ReaderState(epoch) for r in range(max(workers, 1))})


class EvalStream(IterableDataset):
    """Every sample of the shard set once (shards split over ranks and workers), in order.

    A damaged or missing shard is named in its batch's ``damaged_shards``, and the samples it lacks (by the
    manifest's count; one when there is no manifest) are counted in ``bad_samples``. The last batch may hold no
    image when only such counts are left to report. ``order`` places each sample in the shard set (shard index
    times 2**32 plus its position in the shard), whatever the worker that read it.
    """

    def __init__(self, shard_set: ShardSet, image_size: int, batch: int, rank: int, world: int,
                 patience_s: float | None = None):
        super().__init__()
        self.shard_set, self.image_size, self.batch, self.rank, self.world = shard_set, image_size, batch, rank, world
        self.patience_s = patience_s  # read_shard's outage_s

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        images, labels, order, bad, damaged = [], [], [], 0, []
        counts = self.shard_set.counts
        for i in range(self.rank * workers + worker, len(self.shard_set.urls), self.world * workers):
            try:
                samples, error = read_shard(self.shard_set.urls[i], self.patience_s)
            except StorageUnreachable as e:  # not a score of the samples that happened to be reachable
                yield {"error": f"{e}; the evaluation stops"}
                return
            if error:
                bad += max(counts[i] - len(samples), 1) if counts else 1
                damaged.append(error)
            for j, sample in enumerate(samples):
                try:
                    img, ids = image_and_labels(sample)
                except BadSample:
                    bad += 1
                    continue
                images.append(eval_view(img, self.image_size))
                labels.append(ids)
                order.append(i << 32 | j)
                if len(images) == self.batch:
                    yield self._batch(images, labels, order, bad, damaged)
                    images, labels, order, bad, damaged = [], [], [], 0, []
        if images or bad:
            yield self._batch(images, labels, order, bad, damaged)

    def _batch(self, images: list[torch.Tensor], labels: list[list[int]], order: list[int], bad: int,
               damaged: list[str]) -> dict:
        found = {"order": torch.tensor(order, dtype=torch.long), "bad_samples": bad, "damaged_shards": damaged}
        if not images:
            return {"image": torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8),
                    "labels": torch.empty(0, 1, dtype=torch.long), **found}
        return {"image": torch.stack(images), "labels": labels_tensor(labels), **found}


class Batches:
    """A DataLoader's batches; its workers are stopped on close() or at interpreter exit.

    The workers ignore SIGTERM, so multiprocessing's exit hook, which terminates and then joins its
    children, would wait on them forever; this stops them first (the finalizer runs before it).
    """

    def __init__(self, dataloader: DataLoader):
        self._batches = iter(dataloader)
        self.close = weakref.finalize(self, _stop_workers, self._batches)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._batches)
        except (RuntimeError, ConnectionError, EOFError):  # as the DataLoader meets a worker that died
            dead = [w for w in getattr(self._batches, "_workers", []) if w.exitcode is not None and w.exitcode != 0]
            if not dead:
                raise
            how = f"killed by signal {-dead[0].exitcode}" if dead[0].exitcode < 0 else f"exit status {dead[0].exitcode}"
            raise UserError(f"data worker {dead[0].pid} died ({how}; SIGKILL is what the out-of-memory killer sends: "
                            f"dmesg says); run the same command again to resume, with fewer data.workers if memory "
                            f"ran short") from None
        if "error" in batch:  # a reader's, in one sentence rather than a worker's traceback
            raise UserError(batch["error"])
        return batch


def _stop_workers(batches) -> None:
    workers = getattr(batches, "_workers", [])
    if workers:
        batches._shutdown_workers()  # the orderly way: a stop event, then join, then SIGTERM
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join()


def loader(dataset: IterableDataset, workers: int, pin: bool) -> Batches:
    if isinstance(dataset, TrainStream):
        dataset.check_readers(workers)
    # A generator of its own: otherwise each new DataLoader iterator draws its seed from torch's global one, so a
    # resumed run (which starts one after restoring the RNG states) would draw other dropout masks.
    return Batches(DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin,
                              prefetch_factor=4 if workers else None, generator=torch.Generator(),
                              worker_init_fn=functools.partial(start_worker, os.getpid()) if workers else None,
                              multiprocessing_context=worker_context() if workers else None))
