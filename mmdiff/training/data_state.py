"""Where the trainer is in the data stream, and how to get back there after a restart.

The trainer never pickles an iterator.  It remembers one integer, the **data position**: the number
of micro-batches *each rank* has consumed (``optimizer steps × grad_accum_steps``; the same on
every rank).  A data source must be able to start again at any position::

    class DataSource(Protocol):
        def iterator(self, start_batch: int, rank: int, world_size: int) -> Iterator[Batch]: ...

and the stream it yields must be a deterministic function of ``(start_batch, rank, world_size)``:
``iterator(k, r, w)`` yields exactly what ``iterator(0, r, w)`` yields after its first ``k`` items.
Each yielded batch is this rank's micro-batch (``batch_size / (world_size · grad_accum_steps)``
samples).  Exact resume then follows: the resumed run sees the same batches, with the same RNG
state, as the uninterrupted one.

Two implementations:

* ``IndexedDataSource(batch_fn)`` — random access, ``batch_fn(index, rank, world_size)`` builds
  micro-batch ``index`` directly.  Resume costs **O(1)**.  Best for synthetic data and for
  map-style datasets with a seeded permutation.
* ``SkippingDataSource(factory)`` — the generic default for streams (webdataset shards, a
  ``DataLoader``): ``factory(rank, world_size, epoch)`` re-creates the epoch's iterable and the first
  ``start_batch`` batches are drawn and thrown away.  Resume costs **O(start_batch)** batch
  productions (decoding, tokenising) — fine for small runs, minutes for very long ones; a pipeline
  that can seek (shard index + offset) should implement ``iterator`` itself.  With ``repeat=True``
  the stream continues into epoch 1, 2, … (pass the epoch to a shuffle seed for a new order).

Optional: a data source may expose ``stats() -> {"samples": int, "bad": int, ...}`` (the data
pipeline's bad-sample accounting); the trainer logs it and enforces ``max_bad_fraction``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

__all__ = ["DataSource", "IndexedDataSource", "SkippingDataSource", "DataExhausted", "check_data_source"]

Batch = Any


class DataExhausted(RuntimeError):
    """The data source stopped before ``max_steps`` were done."""


@runtime_checkable
class DataSource(Protocol):
    def iterator(self, start_batch: int, rank: int, world_size: int) -> Iterator[Batch]: ...


def check_data_source(source: object) -> None:
    if not callable(getattr(source, "iterator", None)):
        raise TypeError(
            f"data_source {type(source).__name__} has no iterator(start_batch, rank, world_size) method; "
            "wrap a plain iterable factory in SkippingDataSource or a batch function in IndexedDataSource"
        )


class IndexedDataSource:
    """Random-access source: micro-batch ``i`` of rank ``r`` is ``batch_fn(i, r, world_size)``.

    ``num_batches`` (per rank) bounds the stream; ``None`` = infinite.
    """

    def __init__(self, batch_fn: Callable[[int, int, int], Batch], num_batches: int | None = None) -> None:
        self.batch_fn = batch_fn
        self.num_batches = num_batches

    def iterator(self, start_batch: int, rank: int, world_size: int) -> Iterator[Batch]:
        stop = self.num_batches
        index = start_batch
        while stop is None or index < stop:
            yield self.batch_fn(index, rank, world_size)
            index += 1


class SkippingDataSource:
    """Generic resumable source over a re-creatable iterable; resume = re-create and skip.

    ``factory(rank, world_size, epoch) -> Iterable[Batch]`` must be deterministic.  With
    ``repeat=True`` epochs follow each other forever (an empty epoch is an error, not a hang).
    Cost of ``iterator(k, ...)``: the first ``k`` batches are produced and discarded.
    """

    def __init__(self, factory: Callable[[int, int, int], Iterable[Batch]], repeat: bool = True) -> None:
        self.factory = factory
        self.repeat = repeat

    def _stream(self, rank: int, world_size: int) -> Iterator[Batch]:
        for epoch in itertools.count():
            produced = False
            for batch in self.factory(rank, world_size, epoch):
                produced = True
                yield batch
            if not self.repeat:
                return
            if not produced:
                raise DataExhausted(f"data factory produced no batch in epoch {epoch} (rank {rank})")

    def iterator(self, start_batch: int, rank: int, world_size: int) -> Iterator[Batch]:
        stream = self._stream(rank, world_size)
        for skipped in range(start_batch):
            try:
                next(stream)
            except StopIteration:
                raise DataExhausted(
                    f"cannot resume at batch {start_batch}: the data stream ended after {skipped} batches"
                ) from None
        return stream
