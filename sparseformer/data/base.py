"""The task contract (see docs/interfaces.md, section "Tasks") and the task registry.

A task is a class registered by name with `@register_task`; `get_task(name)` returns an
instance. A task describes what the trainer needs (model kind, vocabulary, classes, metrics,
lengths per scale) and turns a raw random-access source into fixed-shape numpy batches through
the shared grain pipeline in `sparseformer.data.pipeline`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import ml_collections
import numpy as np

from sparseformer.data import text_codec

SCALES: tuple[str, ...] = ("tiny", "small", "paper")
KINDS: tuple[str, ...] = ("classifier", "dual_encoder", "seq2seq", "lm")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Token ids shared by every task: 0 pads, 1 begins, 2 ends; task tokens start at 3.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3

Example = dict[str, np.ndarray]


class Source(Protocol):
    """A random-access split: what `tfds.data_source` returns, or an in-memory list."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class BatchIterator(Protocol):
    """What `Task.pipeline` returns: numpy batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise `ValueError` naming `key`, the bad `value` and the `allowed` values."""
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def resolve_data_dir(data_dir: str | None = None) -> str:
    """`data_dir`, else `$SPARSEFORMER_DATA_DIR`, else `~/tensorflow_datasets`."""
    if data_dir:
        return os.path.expanduser(data_dir)
    env = os.environ.get("SPARSEFORMER_DATA_DIR")
    return os.path.expanduser(env) if env else os.path.expanduser("~/tensorflow_datasets")


class Task(abc.ABC):
    """One task: its metadata, its data config per scale, and its pipeline.

    Subclasses set the class attributes, implement `default_data_config`, `source` (a raw
    random-access split) and `encode` (one raw example -> fixed-length numpy arrays).
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # one of KINDS: the model it feeds
    vocab_size: ClassVar[int]
    num_classes: ClassVar[int] = 0  # 0 unless a classifier
    metrics: ClassVar[tuple[str, ...]]  # the first one is the task metric (the name in metrics.json)
    builtin: ClassVar[bool] = False  # generated locally (True) or read from a catalog/user directory
    description: ClassVar[str] = ""
    pad_id: ClassVar[int] = PAD_ID
    bos_id: ClassVar[int] = BOS_ID
    eos_id: ClassVar[int] = EOS_ID
    prompt_prefix: ClassVar[tuple[int, ...]] = ()  # ids a language model's sequences start with (lm1b: BOS)

    @property
    def metric(self) -> str:
        """The task metric: the name its value has in `metrics.json`."""
        return self.metrics[0]

    # --- what each task defines -------------------------------------------------------------
    @abc.abstractmethod
    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        """The `config.data` block for `scale` (lengths, sizes, seeds, directories)."""

    @abc.abstractmethod
    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        """The raw random-access examples of `split` (prepares built-in data if missing)."""

    @abc.abstractmethod
    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        """One raw example -> padded numpy arrays with this kind's keys (without `example_mask`)."""

    def prepare(self, config: ml_collections.ConfigDict) -> str:
        """Make the data available (generate a built-in task; check a catalog one). Returns where."""
        raise NotImplementedError

    def is_prepared(self, config: ml_collections.ConfigDict) -> bool:
        """Whether `pipeline` can read the data without preparing anything."""
        return False

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids -> detokenized text, stopping at the first `eos_id` and skipping padding."""
        raise NotImplementedError(f"task {self.name!r} has no text decoding")

    def codec(self, config: ml_collections.ConfigDict) -> "text_codec.Codec":
        """The text form of this task's inputs and outputs (`sparseformer.data.text_codec`): raw text
        -> the ids its data gives the model (no padding, no EOS), and back. For `predict` and `export`."""
        raise NotImplementedError(f"task {self.name!r} has no text form of its inputs (e.g. images)")

    def label_names(self, config: ml_collections.ConfigDict) -> list[str] | None:
        """Names of a classifier's classes, in class order; None: predictions are the class index."""
        return None

    # --- shared -------------------------------------------------------------------------------
    def pipeline(
        self,
        config: ml_collections.ConfigDict,
        split: str,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> BatchIterator:
        """Numpy batches of `config.batch_size // process_count` examples of this process's slice.

        Train repeats forever, reshuffled each epoch from `seed` (the training seed, separate from
        `config.data.data_seed`). Other splits make one pass; the last batch is padded with rows
        whose `example_mask` is False, and every process yields the same number of batches.
        The iterator's `get_state()` is a JSON-serialisable dict; `set_state` resumes exactly.
        """
        from sparseformer.data import pipeline as pipeline_lib

        check_choice("split", split, SPLITS)
        data = config.data
        src = self.source(config, split)
        return pipeline_lib.make_iterator(
            src,
            lambda ex: self.encode(ex, data),
            self.padding_example(data),
            batch_size=int(config.batch_size),
            train=split == "train",
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def padding_example(self, data: ml_collections.ConfigDict) -> Example:
        """An all-padding example with this kind's keys and shapes (eval batches are topped up with it)."""
        shapes = self.example_shapes(data)
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}

    def example_shapes(self, data: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Shape and dtype of each key of one encoded example, from the fixed lengths in `data`."""
        L = int(data.max_len)
        if self.kind == "classifier":
            return {"inputs": ((L,), np.int32), "inputs_mask": ((L,), np.bool_), "labels": ((), np.int32)}
        if self.kind == "dual_encoder":
            return {
                "inputs1": ((L,), np.int32), "inputs1_mask": ((L,), np.bool_),
                "inputs2": ((L,), np.int32), "inputs2_mask": ((L,), np.bool_),
                "labels": ((), np.int32),
            }  # fmt: skip
        if self.kind == "seq2seq":
            Lt = int(data.max_target_len)
            return {
                "inputs": ((L,), np.int32), "inputs_mask": ((L,), np.bool_),
                "targets": ((Lt,), np.int32), "targets_mask": ((Lt,), np.bool_),
            }  # fmt: skip
        if self.kind == "lm":
            return {"inputs": ((L,), np.int32), "targets": ((L,), np.int32), "targets_mask": ((L,), np.bool_)}
        raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")

    def check_scale(self, scale: str) -> None:
        check_choice("scale", scale, SCALES)


# --- helpers for encoders --------------------------------------------------------------------
def pad_to(ids: Sequence[int] | np.ndarray, length: int, key: str = "max_len") -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned `ids` padded with `PAD_ID` to `length`, and its mask. Too long raises."""
    ids = np.asarray(ids, dtype=np.int32)
    if ids.shape[0] > length:
        raise ValueError(f"config.data.{key}: an example has {ids.shape[0]} tokens, more than {length}")
    out = np.zeros((length,), np.int32)
    out[: ids.shape[0]] = ids
    mask = np.zeros((length,), np.bool_)
    mask[: ids.shape[0]] = True
    return out, mask


def ids_until_eos(ids: Sequence[int] | np.ndarray, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> list[int]:
    """The ids before the first `eos_id`, padding dropped."""
    out = []
    for i in np.asarray(ids).tolist():
        if i == eos_id:
            break
        if i != pad_id:
            out.append(int(i))
    return out


# --- the registry ----------------------------------------------------------------------------
_REGISTRY: dict[str, type[Task]] = {}
T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator: make `cls` available to `get_task(cls.name)`."""
    check_choice(f"{cls.__name__}.kind", cls.kind, KINDS)
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """The names of all registered tasks, in registration order."""
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    """The task registered as `name`; an unknown name raises `ValueError` listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"config.task: unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def data_config(**fields: Any) -> ml_collections.ConfigDict:
    """A `config.data` ConfigDict (kept as a function so each call returns a fresh object)."""
    return ml_collections.ConfigDict(dict(fields))


def registry_items() -> Mapping[str, type[Task]]:
    """Read-only view of the registry (name -> task class)."""
    return dict(_REGISTRY)


Encoder = Callable[[Any], Example]
