"""The one grain pipeline every task goes through: shard, shuffle, encode, batch.

Reads a random-access source (a `tfds.data_source` split or an in-memory list) with
`grain.MapDataset`, so the position of the iterator is a small JSON-serialisable dict
(`{"next_index": n}`) that the trainer checkpoints next to the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from sparseformer.data.base import BatchIterator, Example, Source

# Per-example work is light; a few threads keep the reads ahead of a CPU train step.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def per_process_batch(batch_size: int, process_count: int) -> int:
    """`batch_size // process_count`, refusing a global batch that does not split evenly."""
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"config.batch_size: {batch_size} must be a positive multiple of the process count {process_count}"
        )
    return batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")


def make_iterator(
    source: Source,
    encode: Callable[[Any], Example],
    padding: Example,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> BatchIterator:
    """Batches of this process's slice of `source`, as an iterator with `get_state`/`set_state`.

    train: the slice `source[process_index::process_count]`, shuffled with `seed` and reshuffled
    each epoch (grain derives each epoch's permutation from `seed + epoch`), repeated forever,
    incomplete batches dropped.
    eval: one pass over the slice `process_index::process_count`, topped up with `padding`
    (whose `example_mask` is False) so that every process yields the same number of full batches.
    """
    check_process(process_index, process_count)
    b = per_process_batch(batch_size, process_count)
    n = len(source)
    if n == 0:
        raise ValueError("the split is empty")

    def with_mask(example: Example, real: bool) -> Example:
        example = dict(example)
        example["example_mask"] = np.bool_(real)
        return example

    if train:
        shard = grain.MapDataset.source(source)[process_index::process_count]
        if len(shard) < b:
            raise ValueError(
                f"config.batch_size: {b} examples per process, but this process's train slice has only {len(shard)}"
            )
        seed = int(seed) % 2**32  # grain's shuffle takes a 32-bit seed
        ds = shard.shuffle(seed=seed).repeat().map(lambda ex: with_mask(encode(ex), True))
        ds = ds.batch(b, drop_remainder=True)
    else:
        num_batches = math.ceil(n / (b * process_count))
        padded = with_mask(padding, False)

        def read(i: int) -> Example:
            j = i * process_count + process_index
            return with_mask(encode(source[j]), True) if j < n else padded

        ds = grain.MapDataset.range(num_batches * b).map(read).batch(b, drop_remainder=True)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))
