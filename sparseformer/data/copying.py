"""`copy`: sequence-to-sequence copy of a random token string (task `copy`).

The source is `n` symbols drawn uniformly (`n` uniform in `[min_len, max_len - 1]`); the target is
the same string followed by EOS. Metrics: BLEU on the detokenized strings, and exact match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from sparseformer.data.base import EOS_ID, NUM_SPECIAL, Example, data_config, pad_to, register_task
from sparseformer.data.text_codec import WordCodec
from sparseformer.data.builtin import BuiltinBuilder, BuiltinTask, default_builder_configs, int_sequence, split_sizes

NUM_SYMBOLS = 32
VOCAB_SIZE = NUM_SPECIAL + NUM_SYMBOLS
CODEC = WordCodec([f"s{i}" for i in range(NUM_SYMBOLS)], offset=NUM_SPECIAL, name="copy")  # symbol i is `s<i>`


def generate(num_examples: int, seed: int | Sequence[int], min_len: int, max_len: int) -> list[np.ndarray]:
    """`num_examples` random strings of symbol ids, lengths in `[min_len, max_len]`."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"copy: need 1 <= min_len ({min_len}) <= max_len ({max_len})")
    rng = np.random.Generator(np.random.PCG64(seed))
    lengths = rng.integers(min_len, max_len + 1, size=num_examples)
    symbols = rng.integers(NUM_SPECIAL, VOCAB_SIZE, size=(num_examples, max_len), dtype=np.int32)
    return [row[:n] for row, n in zip(symbols, lengths)]


def encode_pair(source: np.ndarray, target: np.ndarray, data: ml_collections.ConfigDict) -> Example:
    """Seq2seq arrays: `inputs` padded to `max_len`; `targets` + EOS padded to `max_target_len`."""
    inputs, inputs_mask = pad_to(source, int(data.max_len))
    targets, targets_mask = pad_to(
        np.append(np.asarray(target, np.int32), EOS_ID), int(data.max_target_len), key="max_target_len"
    )
    return {"inputs": inputs, "inputs_mask": inputs_mask, "targets": targets, "targets_mask": targets_mask}


class SparseformerCopy(BuiltinBuilder):
    """TFDS builder of the built-in copy task."""

    TASK = "copy"


@register_task
class Copy(BuiltinTask):
    name = "copy"
    kind = "seq2seq"
    vocab_size = VOCAB_SIZE
    metrics = ("bleu", "accuracy")  # accuracy: exact match of the whole sequence
    description = "sequence-to-sequence copy of a random string of 32 symbols"
    builder_class = SparseformerCopy
    generation_keys = ("data_seed", "num_train", "num_validation", "num_test", "min_len", "max_len")

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        n_train, n_eval, min_len, max_len = {
            "tiny": (1000, 100, 8, 64),
            "small": (10000, 500, 16, 256),
            "paper": (100000, 2000, 64, 1024),
        }[scale]
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            data_seed=0,  # seed of the generated data (the training seed only sets the shuffle order)
            num_train=n_train,  # training pairs
            num_validation=n_eval,  # validation pairs
            num_test=n_eval,  # test pairs
            min_len=min_len,  # shortest source string
            max_len=max_len,  # padded source length (a multiple of 64); sources have at most max_len - 1 symbols
            max_target_len=max_len,  # padded target length: the copy plus EOS
        )

    def features(self) -> dict[str, Any]:
        return {"inputs": int_sequence()}

    def generate(self, params: dict[str, Any]) -> dict[str, list[Example]]:
        out = {}
        for i, (split, size) in enumerate(split_sizes(params).items()):
            strings = generate(size, (params["data_seed"], i), params["min_len"], params["max_len"] - 1)
            out[split] = [{"inputs": s} for s in strings]
        return out

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        return encode_pair(example["inputs"], example["inputs"], data)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return CODEC.decode(ids)

    def codec(self, config: ml_collections.ConfigDict) -> WordCodec:
        return CODEC


SparseformerCopy.BUILDER_CONFIGS = default_builder_configs(Copy)
