"""Catalog tasks: TFDS datasets the user prepares once (`text`, `image`, `translate`, `lm1b`).

They are read with `tfds.data_source`, which needs the array_record file format. Preparing them
downloads the data and, for these datasets, needs TensorFlow (`pip install 'sparseformer[tf]'`);
nothing here ever downloads: an unprepared dataset raises `DatasetNotPreparedError` with the
exact command to run.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sparseformer.data.base import (
    BOS_ID,
    EOS_ID,
    NUM_SPECIAL,
    Example,
    Source,
    Task,
    check_choice,
    data_config,
    ids_until_eos,
    pad_to,
    register_task,
    resolve_data_dir,
)
from sparseformer.data.text_codec import ByteCodec, SentencePieceCodec

BYTE_VOCAB_SIZE = NUM_SPECIAL + 256  # byte b is token b + NUM_SPECIAL


class DatasetNotPreparedError(RuntimeError):
    """A catalog dataset is missing from `data_dir`; the message says how to prepare it."""


def prepare_command(tfds_name: str, data_dir: str) -> str:
    """The shell commands that prepare `tfds_name` in `data_dir` for `tfds.data_source`."""
    return (
        "pip install 'sparseformer[tf]'\n"
        f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}', data_dir='{data_dir}', "
        "file_format='array_record').download_and_prepare()\""
    )


def catalog_source(tfds_name: str, split: str, data_dir: str, module: str | None = None) -> Source:
    """`tfds` random-access split of a prepared catalog dataset; never downloads."""
    if module:
        importlib.import_module(module)  # builders TFDS does not register until imported
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    try:
        return builder.as_data_source(split)
    except Exception as e:  # not prepared, or prepared in a format without random access
        if not builder.is_prepared():
            raise DatasetNotPreparedError(
                f"dataset {tfds_name!r} is not prepared in {data_dir} (config.data.data_dir). "
                f"Prepare it once (downloads the data; needs TensorFlow):\n{prepare_command(tfds_name, data_dir)}"
            ) from e
        raise DatasetNotPreparedError(
            f"dataset {tfds_name!r} in {data_dir} cannot be read by tfds.data_source ({e}). "
            f"It must be prepared with file_format='array_record':\n{prepare_command(tfds_name, data_dir)}"
        ) from e


def text_bytes(text: Any) -> np.ndarray:
    """A str or bytes -> byte token ids."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32) + NUM_SPECIAL


def decode_bytes(ids: Sequence[int] | np.ndarray) -> str:
    raw = bytes(i - NUM_SPECIAL for i in ids_until_eos(ids) if NUM_SPECIAL <= i < BYTE_VOCAB_SIZE)
    return raw.decode("utf-8", errors="replace")


def grayscale_tokens(image: np.ndarray) -> np.ndarray:
    """`[H, W, 3]` or `[H, W(, 1)]` uint8 -> `[H * W]` intensity tokens (ITU-R 601 luma, as tf.image)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 3:
        gray = np.rint(image.astype(np.float32) @ np.array([0.2989, 0.5870, 0.1140], np.float32))
    else:
        gray = image.reshape(image.shape[0], image.shape[1])
    return np.clip(gray, 0, 255).astype(np.int32).reshape(-1) + NUM_SPECIAL


class CatalogTask(Task):
    """A TFDS catalog dataset read through `tfds.data_source`."""

    tfds_name: ClassVar[str]
    tfds_module: ClassVar[str | None] = None
    # Our split name -> the dataset's split name (a dataset without validation evaluates on test).
    split_map: ClassVar[dict[str, str]] = {"train": "train", "validation": "validation", "test": "test"}

    def _data_dir(self, config: ml_collections.ConfigDict) -> str:
        return resolve_data_dir(config.data.get("data_dir", ""))

    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        check_choice("split", split, tuple(self.split_map))
        return catalog_source(self.tfds_name, self.split_map[split], self._data_dir(config), self.tfds_module)

    def is_prepared(self, config: ml_collections.ConfigDict) -> bool:
        if self.tfds_module:
            importlib.import_module(self.tfds_module)
        return tfds.builder(self.tfds_name, data_dir=self._data_dir(config)).is_prepared()

    def prepare(self, config: ml_collections.ConfigDict) -> str:
        """Check that the dataset is readable (no download); raises `DatasetNotPreparedError`."""
        self.source(config, "train")
        return self._data_dir(config)

    def prepare_hint(self, data_dir: str) -> str:
        return prepare_command(self.tfds_name, data_dir)


@register_task
class Text(CatalogTask):
    name = "text"
    kind = "classifier"
    vocab_size = BYTE_VOCAB_SIZE
    num_classes = 2
    metrics = ("accuracy",)
    description = "IMDB reviews as bytes (LRA text): positive or negative"
    tfds_name = "imdb_reviews"
    split_map = {"train": "train", "validation": "test", "test": "test"}

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            max_len={"tiny": 256, "small": 1024, "paper": 4096}[scale],  # bytes kept (longer reviews are cut)
        )

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        inputs, mask = pad_to(text_bytes(example["text"])[: int(data.max_len)], int(data.max_len))
        return {"inputs": inputs, "inputs_mask": mask, "labels": np.int32(example["label"])}

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return decode_bytes(ids)

    def codec(self, config: ml_collections.ConfigDict) -> ByteCodec:
        return ByteCodec(offset=NUM_SPECIAL)


@register_task
class Image(CatalogTask):
    name = "image"
    kind = "classifier"
    vocab_size = NUM_SPECIAL + 256  # intensity p is token p + NUM_SPECIAL
    num_classes = 10
    metrics = ("accuracy",)
    description = "CIFAR-10 as a sequence of 1024 grayscale pixels (LRA image)"
    tfds_name = "cifar10"
    split_map = {"train": "train", "validation": "test", "test": "test"}

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            max_len=1024,  # 32 x 32 pixels (fixed by the images)
        )

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        pixels = grayscale_tokens(example["image"])
        if pixels.shape[0] != int(data.max_len):
            raise ValueError(f"config.data.max_len: {data.max_len}, but an image has {pixels.shape[0]} pixels")
        return {"inputs": pixels, "inputs_mask": np.ones_like(pixels, np.bool_), "labels": np.int32(example["label"])}


@register_task
class LM1B(CatalogTask):
    name = "lm1b"
    kind = "lm"
    vocab_size = BYTE_VOCAB_SIZE
    metrics = ("perplexity",)  # per byte
    description = "One Billion Word sentences, byte-level causal language model"
    tfds_name = "lm1b"
    prompt_prefix = (BOS_ID,)  # every sequence starts with BOS
    split_map = {"train": "train", "validation": "test", "test": "test"}

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            max_len={"tiny": 128, "small": 256, "paper": 512}[scale],  # tokens per sequence (longer sentences are cut)
        )

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        L = int(data.max_len)
        seq = np.concatenate([[self.bos_id], text_bytes(example["text"]), [EOS_ID]]).astype(np.int32)[: L + 1]
        inputs, _ = pad_to(seq[:-1], L)
        targets, mask = pad_to(seq[1:], L)
        return {"inputs": inputs, "targets": targets, "targets_mask": mask}

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return decode_bytes([i for i in np.asarray(ids).tolist() if i != self.bos_id])

    def codec(self, config: ml_collections.ConfigDict) -> ByteCodec:
        return ByteCodec(offset=NUM_SPECIAL)


@register_task
class Translate(CatalogTask):
    name = "translate"
    kind = "seq2seq"
    vocab_size = 32000  # the largest `spm_vocab_size` allowed
    metrics = ("bleu",)
    description = "WMT14 German-English with a SentencePiece vocabulary trained on the training split"
    tfds_name = "wmt14_translate/de-en"
    tfds_module = "tensorflow_datasets.translate.wmt14"

    def __init__(self) -> None:
        self._spm: Any = None  # the SentencePiece processor of the last pipeline (used by `decode`)

    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        length = {"tiny": 64, "small": 128, "paper": 256}[scale]
        return data_config(
            data_dir="",  # where TFDS data lives; empty: $SPARSEFORMER_DATA_DIR, else ~/tensorflow_datasets
            max_len=length,  # source subword tokens kept
            max_target_len=length,  # target subword tokens kept, EOS included
            source_lang="de",  # 'de' or 'en'
            target_lang="en",  # the other one
            spm_vocab_size={"tiny": 1000, "small": 8000, "paper": 32000}[scale],  # SentencePiece vocabulary (<= 32000)
            spm_max_corpus_chars=10_000_000,  # characters of the training split the vocabulary is trained on
        )

    def tokenizer(self, config: ml_collections.ConfigDict) -> Any:
        """The SentencePiece model for this data config, trained and cached in `data_dir` if missing."""
        data = config.data
        check_choice("config.data.source_lang", data.source_lang, ("de", "en"))
        check_choice("config.data.target_lang", data.target_lang, tuple({"de", "en"} - {data.source_lang}))
        if not 1 <= int(data.spm_vocab_size) <= self.vocab_size:
            raise ValueError(f"config.data.spm_vocab_size: {data.spm_vocab_size} must be in [1, {self.vocab_size}]")
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError("task 'translate' needs sentencepiece: pip install 'sparseformer[translate]'") from e
        data_dir = self._data_dir(config)
        name = f"{self.tfds_name.replace('/', '_')}.{data.spm_vocab_size}.{data.spm_max_corpus_chars}"
        path = os.path.join(data_dir, "sparseformer_spm", name + ".model")
        if not os.path.exists(path):
            train = catalog_source(self.tfds_name, "train", data_dir, self.tfds_module)
            train_sentencepiece(train, ("de", "en"), path, int(data.spm_vocab_size), int(data.spm_max_corpus_chars))
        self._spm = spm.SentencePieceProcessor(model_file=path)
        self._spm_path = path
        return self._spm

    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        src = super().source(config, split)
        self.tokenizer(config)
        return src

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        def ids(text: Any) -> list[int]:
            return self._spm.encode(text.decode("utf-8") if isinstance(text, bytes) else text)

        source = ids(example[data.source_lang])[: int(data.max_len)]
        target = ids(example[data.target_lang])[: int(data.max_target_len) - 1]
        from sparseformer.data.copying import encode_pair

        return encode_pair(np.asarray(source, np.int32), np.asarray(target, np.int32), data)

    def codec(self, config: ml_collections.ConfigDict) -> SentencePieceCodec:
        """The SentencePiece model of this data config (trained first if missing, as `tokenizer`)."""
        self.tokenizer(config)
        return SentencePieceCodec(self._spm_path)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        if self._spm is None:
            raise RuntimeError("task 'translate': decode needs the vocabulary; call pipeline() or tokenizer() first")
        return self._spm.decode(ids_until_eos(ids))


def train_sentencepiece(
    source: Source, fields: Sequence[str], path: str, vocab_size: int, max_corpus_chars: int
) -> str:
    """Train a unigram SentencePiece model on the first `max_corpus_chars` characters of `fields`.

    As the Flax WMT example does, with our special ids (pad 0, bos 1, eos 2, unk 3). The model is
    written to a temporary name first and renamed, so a crash never leaves a half-written file.
    """
    import sentencepiece as spm

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        chars = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for i in range(len(source)):
                example = source[i]
                for field in fields:
                    line = example[field]
                    line = line.decode("utf-8") if isinstance(line, bytes) else line
                    line = line.replace("\n", " ").strip()
                    f.write(line + "\n")
                    chars += len(line)
                if chars >= max_corpus_chars:
                    break
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            hard_vocab_limit=False,  # a small corpus (or mock data) may not support the full size
            minloglevel=2,
        )
        os.replace(prefix + ".model", path)
    return path
