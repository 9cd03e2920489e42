"""Multi-query associative recall (MQAR, as in Zoology) for causal language models.

A sequence starts with `num_pairs` key-value pairs (`k1 v1 k2 v2 ...`; keys distinct, from the
first half of the token range, values from the second half); later, each key comes back once at a
position drawn from a power law over the remaining slots, followed by its value. The loss and
the accuracy count only the positions whose next token is such an answer (`targets_mask`);
every other position is a random token. Recall needs attention to the exact earlier key, which
is what separates attention from its cheap approximations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from sparseformer.data.base import NUM_SPECIAL, Example, data_config, register_task
from sparseformer.data.text_codec import WordCodec
from sparseformer.data.builtin import BuiltinBuilder, BuiltinTask, default_builder_configs, int_sequence, split_sizes

MAX_TOKENS = 8192  # the largest token range any scale uses (Zoology's vocabulary)
VOCAB_SIZE = NUM_SPECIAL + MAX_TOKENS
CODEC = WordCodec([str(i) for i in range(MAX_TOKENS)], offset=NUM_SPECIAL, name="mqar")  # token i is written `i`


def generate(
    num_examples: int,
    seed: int | Sequence[int],
    length: int,
    num_pairs: int,
    num_tokens: int,
    power_a: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(inputs, targets, targets_mask)`, each `[n, length]`: a pure function of its arguments.

    `targets[:, t]` is the token after `inputs[:, t]`; `targets_mask` marks the answers.
    """
    if not 2 <= num_tokens <= MAX_TOKENS or num_pairs > num_tokens // 2:
        raise ValueError(
            f"config.data.num_tokens: {num_tokens} must be in [2, {MAX_TOKENS}] "
            f"with num_pairs ({num_pairs}) <= num_tokens // 2"
        )
    context = 2 * num_pairs
    space = (length + 1 - context) // 2  # (query, answer) slots after the pairs
    if num_pairs < 1 or space < num_pairs:
        raise ValueError(f"config.data.num_pairs: {num_pairs} pairs and their queries do not fit in max_len={length}")
    rng = np.random.Generator(np.random.PCG64(seed))
    n, half = num_examples, num_tokens // 2
    seq = rng.integers(0, num_tokens, size=(n, length + 1), dtype=np.int64)
    values = rng.integers(half, num_tokens, size=(n, num_pairs))
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1, dtype=np.float64))
    keys = np.empty((n, num_pairs), np.int64)
    gaps = np.empty((n, num_pairs), np.int64)
    for start in range(0, n, 1024):  # in chunks: the [rows, space] and [rows, half] draws stay small
        m = min(1024, n - start)
        keys[start : start + m] = np.argsort(rng.random((m, half)), axis=1)[:, :num_pairs]
        # Gumbel top-k: distinct slots drawn without replacement with probability ~ slot ** (a - 1).
        scores = log_p + rng.gumbel(size=(m, space))
        gaps[start : start + m] = np.argsort(-scores, axis=1)[:, :num_pairs]
    seq[:, 0:context:2] = keys
    seq[:, 1:context:2] = values
    rows = np.arange(n)[:, None]
    query_pos = context + 2 * gaps
    seq[rows, query_pos] = keys
    seq[rows, query_pos + 1] = values
    mask = np.zeros((n, length), np.bool_)
    mask[rows, query_pos] = True
    seq = (seq + NUM_SPECIAL).astype(np.int32)
    return seq[:, :-1], seq[:, 1:], mask


class SparseformerMqar(BuiltinBuilder):
    """TFDS builder of the built-in MQAR task."""

    TASK = "mqar"


@register_task
class MQAR(BuiltinTask):
    name = "mqar"
    kind = "lm"
    vocab_size = VOCAB_SIZE
    metrics = ("accuracy",)
    description = "multi-query associative recall (Zoology) for causal LMs; accuracy on the answers"
    builder_class = SparseformerMqar
    generation_keys = (
        "data_seed", "num_train", "num_validation", "num_test", "max_len", "num_pairs", "num_tokens", "power_a"
    )  # fmt: skip

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        n_train, n_eval, max_len, num_pairs, num_tokens = {
            "tiny": (1000, 200, 128, 8, 64),
            "small": (20000, 1000, 256, 16, 256),
            "paper": (100000, 3000, 1024, 64, 8192),
        }[scale]
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            data_seed=0,  # seed of the generated data (the training seed only sets the shuffle order)
            num_train=n_train,  # training sequences
            num_validation=n_eval,  # validation sequences
            num_test=n_eval,  # test sequences
            max_len=max_len,  # sequence length (a multiple of 64)
            num_pairs=num_pairs,  # key-value pairs, each queried once
            num_tokens=num_tokens,  # token range used (keys: first half, values: second half; <= 8192)
            power_a=0.01,  # power-law exponent of the query positions (Zoology's default)
        )

    def features(self) -> dict[str, Any]:
        return {
            "inputs": int_sequence(),
            "targets": int_sequence(),
            "targets_mask": int_sequence(np.bool_),
        }

    def generate(self, params: dict[str, Any]) -> dict[str, list[Example]]:
        out = {}
        for i, (split, size) in enumerate(split_sizes(params).items()):
            inputs, targets, mask = generate(
                size,
                seed=(params["data_seed"], i),
                length=params["max_len"],
                num_pairs=params["num_pairs"],
                num_tokens=params["num_tokens"],
                power_a=params["power_a"],
            )
            out[split] = [{"inputs": x, "targets": y, "targets_mask": m} for x, y, m in zip(inputs, targets, mask)]
        return out

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        L = int(data.max_len)
        inputs = np.asarray(example["inputs"], np.int32)
        if inputs.shape != (L,):
            raise ValueError(f"config.data.max_len: {L}, but the stored sequences have length {inputs.shape[0]}")
        return {
            "inputs": inputs,
            "targets": np.asarray(example["targets"], np.int32),
            "targets_mask": np.asarray(example["targets_mask"], np.bool_),
        }

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return CODEC.decode(ids)

    def codec(self, config: ml_collections.ConfigDict) -> WordCodec:
        return CODEC


SparseformerMqar.BUILDER_CONFIGS = default_builder_configs(MQAR)
