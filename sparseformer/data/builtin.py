"""Built-in tasks: data generated locally from a seed, stored as a TFDS dataset (array_record).

Each built-in task has one `GeneratorBasedBuilder` subclass; its BuilderConfig name encodes the
scale and the data seed (`small_seed0`), or a hash of the generation parameters when they differ
from every scale's defaults (`custom_seed3_1a2b3c4d5e`), so different data coexist in one
`data_dir`. Generation is a pure function of those parameters; nothing is downloaded.
"""

from __future__ import annotations

import abc
import dataclasses
import fcntl
import hashlib
import json
import os
from typing import Any, ClassVar

import ml_collections
import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from sparseformer.data.base import SCALES, Example, Source, Task, check_choice, resolve_data_dir

# The TFDS builder version of every built-in task: bump it when a generator's output changes.
BUILTIN_VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class BuiltinConfig(tfds.core.BuilderConfig):
    """A BuilderConfig carrying the generation parameters (a JSON-able dict)."""

    params: dict[str, Any] = dataclasses.field(default_factory=dict)


class BuiltinBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared TFDS builder: features and examples come from the task named `TASK`."""

    VERSION = tfds.core.Version(BUILTIN_VERSION)
    TASK: ClassVar[str]
    # TFDS derives this from the package through `importlib_resources`, which it does not
    # install; a plain path avoids that import (there are no checksums or metadata files here).
    code_path = epath.Path(__file__)

    def _task(self) -> BuiltinTask:
        from sparseformer.data.base import get_task

        task = get_task(self.TASK)
        assert isinstance(task, BuiltinTask)
        return task

    def _info(self) -> tfds.core.DatasetInfo:
        task = self._task()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"sparseformer built-in task {task.name!r}: {task.description}",
            features=tfds.features.FeaturesDict(task.features()),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # nothing to download
        splits = self._task().generate(dict(self.builder_config.params))
        return {name: self._generate_examples(examples) for name, examples in splits.items()}

    def _generate_examples(self, examples: list[Example]):  # type: ignore[override]
        for i, example in enumerate(examples):
            yield i, example


def default_builder_configs(task_cls: type[BuiltinTask]) -> list[BuiltinConfig]:
    """One BuilderConfig per scale with data seed 0 (what `tfds.builder('<name>/small_seed0')` finds)."""
    task = task_cls()
    out = []
    for scale in SCALES:
        params = task.generation_params(task.default_data_config(scale))
        out.append(BuiltinConfig(name=f"{scale}_seed{params['data_seed']}", params=params))
    return out


class BuiltinTask(Task):
    """A task whose data is generated here: subclasses give `features`, `generate` and the builder."""

    builtin = True
    builder_class: ClassVar[type[BuiltinBuilder]]
    # Keys of `config.data` that determine the generated data (everything else is read-time).
    generation_keys: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    def features(self) -> dict[str, tfds.features.FeatureConnector]:
        """The TFDS features of one stored example."""

    @abc.abstractmethod
    def generate(self, params: dict[str, Any]) -> dict[str, list[Example]]:
        """All splits from the generation parameters: a pure, seeded function."""

    def generation_params(self, data: ml_collections.ConfigDict) -> dict[str, Any]:
        return {k: data[k] for k in self.generation_keys}

    def config_name(self, data: ml_collections.ConfigDict) -> str:
        """`<scale>_seed<k>` when the parameters are a scale's defaults, else a hash of them."""
        params = self.generation_params(data)
        seed = params["data_seed"]
        for scale in SCALES:
            defaults = self.generation_params(self.default_data_config(scale))
            defaults["data_seed"] = seed
            if defaults == params:
                return f"{scale}_seed{seed}"
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        return f"custom_seed{seed}_{digest}"

    def builder(self, config: ml_collections.ConfigDict) -> BuiltinBuilder:
        data = config.data
        name = self.config_name(data)
        known = {c.name: c for c in self.builder_class.BUILDER_CONFIGS}
        # TFDS refuses a custom config named like a predefined one: pass the predefined one's name.
        builder_config = name if name in known else BuiltinConfig(name=name, params=self.generation_params(data))
        return self.builder_class(
            config=builder_config,
            data_dir=resolve_data_dir(data.get("data_dir", "")),
            file_format="array_record",
        )

    def is_prepared(self, config: ml_collections.ConfigDict) -> bool:
        return self.builder(config).is_prepared()

    def prepare(self, config: ml_collections.ConfigDict) -> str:
        """Generate the data if it is not there yet (idempotent); returns its directory.

        Several processes sharing a `data_dir` (a local sweep) take a file lock, so one generates
        and the others wait and then read.
        """
        builder = self.builder(config)
        if builder.is_prepared():
            return os.fspath(builder.data_dir)
        root = resolve_data_dir(config.data.get("data_dir", ""))
        os.makedirs(root, exist_ok=True)
        lock_path = os.path.join(root, f".{builder.name}.{builder.builder_config.name}.lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            builder = self.builder(config)  # another process may have finished meanwhile
            if not builder.is_prepared():
                print(f"sparseformer: generating task {self.name!r} ({builder.builder_config.name}) in {builder.data_dir}")
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False
                    )
                )
        return os.fspath(builder.data_dir)

    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        check_choice("split", split, ("train", "validation", "test"))
        self.prepare(config)
        return self.builder(config).as_data_source(split)


def split_sizes(params: dict[str, Any]) -> dict[str, int]:
    return {"train": params["num_train"], "validation": params["num_validation"], "test": params["num_test"]}


def split_examples(examples: list[Example], params: dict[str, Any]) -> dict[str, list[Example]]:
    """Cut one generated list into train, validation and test, in that order."""
    out, start = {}, 0
    for name, size in split_sizes(params).items():
        out[name] = examples[start : start + size]
        start += size
    return out


def int_sequence(dtype: Any = np.int32) -> tfds.features.Tensor:
    """A variable-length 1-D feature stored as raw bytes (protobuf int lists are 10x slower to write)."""
    return tfds.features.Tensor(shape=(None,), dtype=dtype, encoding=tfds.features.Encoding.BYTES)
