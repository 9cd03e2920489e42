"""Associative recall over a long sequence: find the value of the queried key, far away.

An example is `max_len` tokens: filler tokens (`num_fillers` distinct ids), with `num_pairs`
key-value pairs planted at random positions in the first `pair_region` fraction of the sequence,
and the query (`QUERY key`) in the last two positions. Keys are distinct, drawn from `num_keys`,
so the queried key appears exactly once; the other pairs are decoys. The class is the value
paired with the queried key, so the answer is at least `(1 - pair_region) * max_len` tokens from
the query. Local windows, fixed global tokens and random blocks do not reach it; selection by
content does. A pooled block summary averages a pair with the rest of its block (fillers, and
other pairs that share the block), so the queried pair reaches the query only diluted or mixed.

`pair_format` writes a pair as two adjacent tokens (`adjacent`: `key value`, two hops for a
model: the value must learn which key precedes it) or as one token that names both (`fused`:
one hop, content-based lookup). The small scale is learned within 200 steps on a CPU: a
fused pair over few keys (4 keys x 10 values: 40 pair ids, each seen often) and a single filler
id (a blank the model soon learns to skip, so the query's attention is not spread over a hundred
distinct distractors). With 16 keys and 32 filler ids (the former small scale) no model learned
it in 200 steps; with 4 keys and 32 filler ids, or 8 keys and one filler id, dense was at 15-55%.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sparseformer.data.base import NUM_SPECIAL, Example, check_choice, data_config, pad_to, register_task
from sparseformer.data.text_codec import WordCodec
from sparseformer.data.builtin import BuiltinBuilder, BuiltinTask, default_builder_configs, int_sequence, split_sizes

NUM_KEYS = 16  # the most keys (config.data.num_keys)
NUM_VALUES = 10  # the classes
NUM_FILLERS = 32  # the most filler ids (config.data.num_fillers)
PAIR_FORMATS = ("adjacent", "fused")
# Token layout after the shared specials.
QUERY_ID = NUM_SPECIAL
FILLER0 = QUERY_ID + 1
KEY0 = FILLER0 + NUM_FILLERS
VALUE0 = KEY0 + NUM_KEYS
FUSED0 = VALUE0 + NUM_VALUES  # fused pair token of (key k, value v): FUSED0 + k * NUM_VALUES + v
VOCAB_SIZE = FUSED0 + NUM_KEYS * NUM_VALUES
# The text form: `?` the query, `_` (and `_1` ... `_31`) the fillers, `k3` a key, `v5` a value, `k3:v5` a fused pair.
CODEC = WordCodec(
    ["?", "_"] + [f"_{i}" for i in range(1, NUM_FILLERS)] + [f"k{i}" for i in range(NUM_KEYS)]
    + [f"v{i}" for i in range(NUM_VALUES)] + [f"k{k}:v{v}" for k in range(NUM_KEYS) for v in range(NUM_VALUES)],
    offset=QUERY_ID, name="retrieval",
)


def generate(
    num_examples: int,
    seed: int | Sequence[int],
    length: int,
    num_pairs: int,
    pair_format: str = "adjacent",
    pair_region: float = 0.5,
    num_keys: int = NUM_KEYS,
    num_fillers: int = NUM_FILLERS,
) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs [n, length] int32, labels [n] int32)`: a pure function of its arguments."""
    check_choice("config.data.pair_format", pair_format, PAIR_FORMATS)
    if not 1 <= num_keys <= NUM_KEYS:
        raise ValueError(f"config.data.num_keys: {num_keys} must be in [1, {NUM_KEYS}]")
    if not 1 <= num_pairs <= num_keys:
        raise ValueError(f"config.data.num_pairs: {num_pairs} must be in [1, num_keys={num_keys}]")
    if not 1 <= num_fillers <= NUM_FILLERS:
        raise ValueError(f"config.data.num_fillers: {num_fillers} must be in [1, {NUM_FILLERS}]")
    width = 2 if pair_format == "adjacent" else 1
    region = int(length * pair_region)
    if not 0 < pair_region < 1 or region < num_pairs * width or length - region < 2:
        raise ValueError(
            f"config.data.pair_region: {pair_region} leaves no room for {num_pairs} pairs in {length} tokens"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    n = num_examples
    inputs = FILLER0 + rng.integers(0, num_fillers, size=(n, length), dtype=np.int32)
    keys = np.argsort(rng.random((n, num_keys)), axis=1)[:, :num_pairs].astype(np.int32)  # distinct per row
    values = rng.integers(0, NUM_VALUES, size=(n, num_pairs), dtype=np.int32)
    # Non-overlapping slots: choose num_pairs of the region's (region // width) slots.
    slots = np.sort(np.argsort(rng.random((n, region // width)), axis=1)[:, :num_pairs], axis=1) * width
    which = rng.integers(0, num_pairs, size=n)
    rows = np.arange(n)[:, None]
    if pair_format == "adjacent":
        inputs[rows, slots] = KEY0 + keys
        inputs[rows, slots + 1] = VALUE0 + values
    else:
        inputs[rows, slots] = FUSED0 + keys * NUM_VALUES + values
    inputs[:, -2] = QUERY_ID
    inputs[:, -1] = KEY0 + keys[np.arange(n), which]
    return inputs, values[np.arange(n), which].astype(np.int32)


class SparseformerRetrieval(BuiltinBuilder):
    """TFDS builder of the built-in retrieval task."""

    TASK = "retrieval"


@register_task
class Retrieval(BuiltinTask):
    name = "retrieval"
    kind = "classifier"
    vocab_size = VOCAB_SIZE
    num_classes = NUM_VALUES
    metrics = ("accuracy",)
    description = "associative recall: the value of the key queried at the end, planted far away"
    builder_class = SparseformerRetrieval
    generation_keys = (
        "data_seed", "num_train", "num_validation", "num_test", "max_len", "num_pairs", "pair_format", "pair_region",
        "num_keys", "num_fillers",
    )  # fmt: skip

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        n_train, n_eval, max_len, num_pairs, fmt, num_keys, num_fillers = {
            "tiny": (1000, 200, 256, 2, "fused", 4, 1),
            "small": (10000, 1000, 128, 4, "fused", 4, 1),  # dense: 87-97% test after 200 steps (measured)
            "paper": (50000, 2000, 4096, 8, "adjacent", NUM_KEYS, NUM_FILLERS),
        }[scale]
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            data_seed=0,  # seed of the generated data (the training seed only sets the shuffle order)
            num_train=n_train,  # training examples
            num_validation=n_eval,  # validation examples
            num_test=n_eval,  # test examples
            max_len=max_len,  # sequence length (every example has exactly this length; a multiple of 64)
            num_pairs=num_pairs,  # key-value pairs planted per example (one is queried; the rest are decoys)
            pair_format=fmt,  # 'adjacent' (key, value: two tokens) or 'fused' (one token naming both)
            pair_region=0.5,  # pairs lie in this leading fraction of the sequence, far from the query
            num_keys=num_keys,  # keys are distinct, drawn from this many (at most 16; fewer: fused ids learn faster)
            num_fillers=num_fillers,  # distinct filler ids (at most 32; 1: a blank the model learns to skip)
        )

    def features(self) -> dict[str, Any]:
        return {"inputs": int_sequence(), "label": tfds.features.ClassLabel(num_classes=NUM_VALUES)}

    def generate(self, params: dict[str, Any]) -> dict[str, list[Example]]:
        out = {}
        for i, (split, size) in enumerate(split_sizes(params).items()):
            # Each split has its own stream, so changing one split's size leaves the others alone.
            inputs, labels = generate(
                size,
                seed=(params["data_seed"], i),
                length=params["max_len"],
                num_pairs=params["num_pairs"],
                pair_format=params["pair_format"],
                pair_region=params["pair_region"],
                num_keys=params["num_keys"],
                num_fillers=params["num_fillers"],
            )
            out[split] = [{"inputs": x, "label": int(y)} for x, y in zip(inputs, labels)]
        return out

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        inputs, mask = pad_to(example["inputs"], int(data.max_len))
        return {"inputs": inputs, "inputs_mask": mask, "labels": np.int32(example["label"])}

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return CODEC.decode(ids)

    def codec(self, config: ml_collections.ConfigDict) -> WordCodec:
        return CODEC


SparseformerRetrieval.BUILDER_CONFIGS = default_builder_configs(Retrieval)
