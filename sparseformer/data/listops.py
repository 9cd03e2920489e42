"""ListOps (Long Range Arena grammar), seeded and byte-for-byte reproducible.

Grammar (Nangia & Bowman 2018, as generated for LRA): a node below the maximum depth is an
operator with probability 0.25, else a value 0-9; an operator is one of MIN, MAX, MED (median,
rounded down) and SM (sum mod 10) and takes 2 to `max_args` arguments. The length of an example
counts one token per value and two per operator (its opening and its `]`); the model sees
exactly those tokens (the parentheses of the text form are dropped, as LRA does).

Unlike the original generator, randomness comes from one explicitly seeded numpy PCG64 stream
(`sparseformer.data.rng.Uniform`), so the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sparseformer.data.base import NUM_SPECIAL, Example, data_config, pad_to, register_task
from sparseformer.data.text_codec import WordCodec
from sparseformer.data.rng import Uniform
from sparseformer.data.builtin import (
    BuiltinBuilder,
    BuiltinTask,
    default_builder_configs,
    int_sequence,
    split_examples,
    split_sizes,
)

OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # probability of an operator node below the maximum depth (LRA's VALUE_P)
# Model vocabulary after the shared specials: the ten digits, the four operators, the closing bracket.
TOKENS: tuple[str, ...] = tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_IDS: dict[str, int] = {t: NUM_SPECIAL + i for i, t in enumerate(TOKENS)}
VOCAB_SIZE = NUM_SPECIAL + len(TOKENS)


class _TooLong(Exception):
    pass


def _median_floor(values: list[int]) -> int:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def _apply(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return _median_floor(values)  # an even count averages the middle two: rounded down
    return sum(values) % 10  # [SM


def _tree(u: Uniform, out: list[str], depth: int, budget: int, max_depth: int, max_args: int) -> tuple[int, int]:
    """Append one subtree's text tokens to `out`; return (length, value).

    Abandoned (`_TooLong`) as soon as its length exceeds `budget`: the tree would be rejected
    anyway, so the accepted examples keep the grammar's distribution conditioned on the bounds.
    """
    r = u()
    if depth < max_depth and r < VALUE_P:
        if budget < 2:
            raise _TooLong
        num_args = 2 + u.below(max_args - 1)
        op = OPERATORS[u.below(len(OPERATORS))]
        out.append("(")
        out.append(op)
        length = 2
        values = []
        for _ in range(num_args):
            sub_len, sub_val = _tree(u, out, depth + 1, budget - length, max_depth, max_args)
            values.append(sub_val)
            length += sub_len
        out.append(END)
        out.append(")")
        return length, _apply(op, values)
    if budget < 1:
        raise _TooLong
    # The value reuses the node's draw: given r >= VALUE_P (or any r at max depth) it is uniform.
    lo = VALUE_P if depth < max_depth else 0.0
    v = min(int((r - lo) / (1.0 - lo) * 10), 9)
    out.append(_DIGITS[v])
    return 1, v


_DIGITS = tuple(str(d) for d in range(10))


def generate(
    num_examples: int,
    seed: int,
    min_length: int,
    max_length: int,
    max_depth: int = 10,
    max_args: int = 10,
) -> list[tuple[str, int]]:
    """`num_examples` distinct ListOps examples `(tokens, label)`, lengths in `[min_length, max_length]`.

    `tokens` is the space-separated text in the original format, e.g.
    `( [MAX 2 9 ( [MIN 4 7 ] ) 0 ] )`; trees whose length falls outside the bounds are rejected
    and regenerated, and duplicates are dropped, so the result depends only on the arguments.
    """
    if not 1 <= min_length <= max_length:
        raise ValueError(f"listops: need 1 <= min_length ({min_length}) <= max_length ({max_length})")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"listops: max_depth ({max_depth}) must be >= 1 and max_args ({max_args}) >= 2")
    u = Uniform(seed)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    attempts, limit = 0, 10_000 * max(num_examples, 1)
    while len(out) < num_examples:
        attempts += 1
        if attempts > limit:
            raise ValueError(
                f"listops: found only {len(out)} of {num_examples} distinct trees with length in "
                f"[{min_length}, {max_length}] after {limit} attempts; widen the bounds or raise max_depth"
            )
        tokens: list[str] = []
        try:
            length, value = _tree(u, tokens, 1, max_length, max_depth, max_args)
        except _TooLong:
            continue
        if length < min_length:
            continue
        text = " ".join(tokens)
        if text in seen:
            continue
        seen.add(text)
        out.append((text, value))
    return out


CODEC = WordCodec(TOKENS, offset=NUM_SPECIAL, skip=("(", ")"), name="listops")


def tokenize(text: str) -> list[int]:
    """Text form -> model token ids (parentheses dropped). Unknown tokens raise `ValueError`."""
    return CODEC.encode(text)


def detokenize(ids: Sequence[int] | np.ndarray) -> str:
    return CODEC.decode(ids)


class SparseformerListops(BuiltinBuilder):
    """TFDS builder of the built-in ListOps task."""

    TASK = "listops"


@register_task
class ListOps(BuiltinTask):
    name = "listops"
    kind = "classifier"
    vocab_size = VOCAB_SIZE
    num_classes = 10
    metrics = ("accuracy",)
    description = "ListOps (LRA grammar): evaluate nested MIN/MAX/MED/SM expressions, 10 classes"
    builder_class = SparseformerListops
    generation_keys = (
        "data_seed", "num_train", "num_validation", "num_test", "min_len", "max_len", "max_depth", "max_args"
    )  # fmt: skip

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        sizes = {
            # num_train, num_eval, min_len, max_len, max_depth
            "tiny": (1000, 200, 16, 128, 6),
            "small": (16000, 1000, 32, 256, 6),
            "paper": (96000, 2000, 500, 2048, 10),
        }[scale]
        n_train, n_eval, min_len, max_len, max_depth = sizes
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            data_seed=0,  # seed of the generated data (the training seed only sets the shuffle order)
            num_train=n_train,  # training examples
            num_validation=n_eval,  # validation examples
            num_test=n_eval,  # test examples
            min_len=min_len,  # shortest example in tokens (a shorter tree is regenerated)
            max_len=max_len,  # longest example and the padded length (a multiple of 64)
            max_depth=max_depth,  # maximum depth of the tree (LRA: 10)
            max_args=10,  # maximum arguments of an operator (LRA: 10)
        )

    def features(self) -> dict[str, Any]:
        return {"inputs": int_sequence(), "label": tfds.features.ClassLabel(num_classes=10)}

    def generate(self, params: dict[str, Any]) -> dict[str, list[Example]]:
        total = sum(split_sizes(params).values())
        pairs = generate(
            total,
            seed=params["data_seed"],
            min_length=params["min_len"],
            max_length=params["max_len"],
            max_depth=params["max_depth"],
            max_args=params["max_args"],
        )
        examples = [{"inputs": np.asarray(tokenize(text), np.int32), "label": label} for text, label in pairs]
        return split_examples(examples, params)

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        inputs, mask = pad_to(example["inputs"], int(data.max_len))
        return {"inputs": inputs, "inputs_mask": mask, "labels": np.int32(example["label"])}

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return detokenize(ids)

    def codec(self, config: ml_collections.ConfigDict) -> WordCodec:
        return CODEC


SparseformerListops.BUILDER_CONFIGS = default_builder_configs(ListOps)
