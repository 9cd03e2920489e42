"""Long Range Arena release files, read from a directory the user gives (`config.data.lra_dir`).

- `lra_listops`: `basic_{train,val,test}.tsv` (columns `Source`, `Target`; header row), from
  `lra_release/listops-1000/`.
- `lra_retrieval`: AAN `new_aan_pairs.{train,eval,test}.tsv` (columns label, id1, id2, text1,
  text2; no header), from `lra_release/tsv_data/`; a dual encoder on bytes.
- `lra_pathfinder`: a Pathfinder difficulty directory (e.g. `pathfinder32/curv_contour_length_14/`)
  with `metadata/<n>.npy` (text lines: image dir, image name, _, label, ...) and `imgs/<n>/*.png`;
  split 80/10/10 in metadata order as LRA does; needs Pillow to decode the PNGs.

The files are read into memory once per pipeline (paths only, for Pathfinder).
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np

from sparseformer.data import listops
from sparseformer.data.base import NUM_SPECIAL, Example, Source, Task, check_choice, data_config, pad_to, register_task
from sparseformer.data.catalog import BYTE_VOCAB_SIZE, decode_bytes, grayscale_tokens, text_bytes
from sparseformer.data.text_codec import ByteCodec

_LRA_DIR_HELP = "config.data.lra_dir: the directory of the Long Range Arena release files for task {task!r}"


class LRATask(Task):
    """A task read from LRA release files in `config.data.lra_dir`."""

    files: ClassVar[dict[str, str]]  # our split -> file name (or pattern) in lra_dir

    def lra_dir(self, config: ml_collections.ConfigDict) -> str:
        path = os.path.expanduser(config.data.get("lra_dir", "") or "")
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(
                _LRA_DIR_HELP.format(task=self.name)
                + f" (expected {', '.join(sorted(set(self.files.values())))}); got {path or 'nothing'!r}"
            )
        return path

    def file(self, config: ml_collections.ConfigDict, split: str) -> str:
        check_choice("split", split, tuple(self.files))
        path = os.path.join(self.lra_dir(config), self.files[split])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{_LRA_DIR_HELP.format(task=self.name)}: {path} is missing")
        return path

    def is_prepared(self, config: ml_collections.ConfigDict) -> bool:
        try:
            return all(os.path.exists(self.file(config, s)) for s in self.files)
        except FileNotFoundError:
            return False

    def prepare(self, config: ml_collections.ConfigDict) -> str:
        """Check that the release files are there (nothing to generate)."""
        for split in self.files:
            self.file(config, split)
        return self.lra_dir(config)


def _read_tsv(path: str, header: bool) -> list[list[str]]:
    csv.field_size_limit(sys.maxsize)  # AAN documents are long
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


@register_task
class LRAListOps(LRATask):
    name = "lra_listops"
    kind = "classifier"
    vocab_size = listops.VOCAB_SIZE
    num_classes = 10
    metrics = ("accuracy",)
    description = "ListOps from the LRA release TSV files (config.data.lra_dir)"
    files = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        return data_config(
            lra_dir="",  # directory with basic_{train,val,test}.tsv (lra_release/listops-1000)
            max_len=2048,  # padded length (LRA's examples are below 2000 tokens; longer ones are cut)
        )

    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        rows = _read_tsv(self.file(config, split), header=True)
        return [{"inputs": np.asarray(listops.tokenize(src), np.int32), "label": int(tgt)} for src, tgt in rows]

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        inputs, mask = pad_to(example["inputs"][: int(data.max_len)], int(data.max_len))
        return {"inputs": inputs, "inputs_mask": mask, "labels": np.int32(example["label"])}

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return listops.detokenize(ids)

    def codec(self, config: ml_collections.ConfigDict) -> Any:
        return listops.CODEC


@register_task
class LRARetrieval(LRATask):
    name = "lra_retrieval"
    kind = "dual_encoder"
    vocab_size = BYTE_VOCAB_SIZE
    num_classes = 2
    metrics = ("accuracy",)
    description = "AAN document matching from the LRA release TSV files, bytes, dual encoder"
    files = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        return data_config(
            lra_dir="",  # directory with new_aan_pairs.{train,eval,test}.tsv (lra_release/tsv_data)
            max_len={"tiny": 256, "small": 1024, "paper": 4096}[scale],  # bytes kept per document
        )

    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        out = []
        for row in _read_tsv(self.file(config, split), header=False):
            if len(row) < 5:
                raise ValueError(f"{self.files[split]}: expected 5 tab-separated columns, got {len(row)}")
            out.append({"label": int(float(row[0])), "text1": row[3], "text2": row[4]})
        return out

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        L = int(data.max_len)
        x1, m1 = pad_to(text_bytes(example["text1"])[:L], L)
        x2, m2 = pad_to(text_bytes(example["text2"])[:L], L)
        return {"inputs1": x1, "inputs1_mask": m1, "inputs2": x2, "inputs2_mask": m2, "labels": np.int32(example["label"])}

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return decode_bytes(ids)

    def codec(self, config: ml_collections.ConfigDict) -> Any:
        return ByteCodec(offset=NUM_SPECIAL)


@register_task
class LRAPathfinder(LRATask):
    name = "lra_pathfinder"
    kind = "classifier"
    vocab_size = BYTE_VOCAB_SIZE  # intensity p is token p + 3
    num_classes = 2
    metrics = ("accuracy",)
    description = "Pathfinder images from the LRA release (a difficulty directory), pixel sequence"
    files = {"train": "metadata", "validation": "metadata", "test": "metadata"}
    fractions: ClassVar[tuple[float, float]] = (0.8, 0.9)  # split boundaries, as LRA

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        return data_config(
            lra_dir="",  # a difficulty directory with metadata/ and imgs/ (e.g. pathfinder32/curv_contour_length_14)
            max_len=1024,  # pixels per image (32 x 32 for pathfinder32)
        )

    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        root = self.lra_dir(config)
        meta_files = glob.glob(os.path.join(self.file(config, split), "*.npy"))
        # Numeric order of the metadata files (0.npy, 1.npy, ..., 10.npy), then line order.
        meta_files.sort(key=lambda p: (len(os.path.basename(p)), os.path.basename(p)))
        items = []
        for meta in meta_files:
            with open(meta, encoding="utf-8") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 4:
                        items.append((os.path.join(root, parts[0], parts[1]), int(parts[3])))
        if not items:
            raise FileNotFoundError(f"{_LRA_DIR_HELP.format(task=self.name)}: no metadata lines under {root}/metadata")
        a, b = (int(f * len(items)) for f in self.fractions)
        chosen = {"train": items[:a], "validation": items[a:b], "test": items[b:]}[split]
        return [{"path": p, "label": y} for p, y in chosen]

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        try:
            from PIL import Image as PILImage
        except ImportError as e:
            raise ImportError("task 'lra_pathfinder' needs Pillow to read PNG images: pip install pillow") from e
        with PILImage.open(example["path"]) as img:
            pixels = grayscale_tokens(np.asarray(img.convert("L")))
        if pixels.shape[0] != int(data.max_len):
            raise ValueError(f"config.data.max_len: {data.max_len}, but {example['path']} has {pixels.shape[0]} pixels")
        return {"inputs": pixels, "inputs_mask": np.ones_like(pixels, np.bool_), "labels": np.int32(example["label"])}
