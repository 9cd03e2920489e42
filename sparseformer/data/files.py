"""Your own data: tasks read from local JSON Lines, CSV or TSV files.

Three tasks, one per kind of model, all configured by `configs/files.py:kind=...`:

| task | `kind=` | fields (config keys) | model | metric |
| --- | --- | --- | --- | --- |
| `files_classify` | `classify` | `text`, `label` (`data.text_field`, `data.label_field`) | `EncoderClassifier` | accuracy |
| `files_translate` | `translate` | `source`, `target` (`data.source_field`, `data.target_field`) | `EncoderDecoder` | BLEU |
| `files_lm` | `lm` | `text` (`data.text_field`) | `DecoderLM` | perplexity (per token) |

One record per line: a JSON object (`.jsonl`), or a row of a CSV/TSV file whose first line is a
header naming the columns (read with the `csv` module; a quoted field may not span lines). Blank
lines are skipped. `data.train_file` is required; `data.eval_file` (validation) and
`data.test_file` are optional: without an eval file a seeded `data.holdout_fraction` of the
training file is held out for validation (and another for test when there is no test file);
with an eval file and no test file, test is the eval file.

Files are never loaded whole. The first read of a file validates every line (JSON or CSV syntax,
UTF-8, the fields the kind needs and their types) and records where each record starts; that
index is cached in the run's `data/` directory, keyed by the file's path, size and modification
time, and records are then read by offset (`os.pread`), so grain reads any record of a large file
directly, the checkpointed iterator position stays a small number, and each host reads its slice.

Before a run starts, `resolve(config, workdir)` reads the files once and fixes what the run learns
from them: the label set (strings, sorted; saved in `config.data.labels`, so `config.json` carries
the label map), the tokenizer (`bytes`, or a SentencePiece model trained on the training split and
saved as `workdir/data/tokenizer.model`), `model.vocab_size` and `model.num_classes`. Every later
tool (`eval`, `adopt`, `monitor`) reads them from the run's config and never recomputes them. Any
problem is a `DataFileError`, one line naming the file, the line and what is wrong, raised before
anything is written.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import ml_collections
import numpy as np

from sparseformer.data import text_codec
from sparseformer.data.base import (
    EOS_ID,
    NUM_SPECIAL,
    Example,
    Source,
    Task,
    check_choice,
    data_config,
    pad_to,
    register_task,
)

FORMATS = ("auto", "jsonl", "csv", "tsv")
TOKENIZERS = ("bytes", "spm")
SPM_TYPES = ("unigram", "bpe")
TRUNCATE = ("end", "start")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256  # byte b is token b + NUM_SPECIAL
INDEX_VERSION = 1  # bump when the cached index format changes
SPLIT_FILES = {"train": "train_file", "validation": "eval_file", "test": "test_file"}
SPM_EXTRA = "pip install 'sparseformer[files]'"


class DataFileError(ValueError):
    """A problem with a data file: one line naming the file, the line number and what is wrong."""


def _where(path: str | Path, line: int | None = None) -> str:
    return f"{path}:{line}" if line else str(path)


# ------------------------------------------------------------------------------- tokenizers
def _import_sentencepiece() -> Any:
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise ImportError(f"config.data.tokenizer='spm' needs the sentencepiece package: {SPM_EXTRA}") from e
    return spm


# ------------------------------------------------------------------------------- reading records
def file_format(path: str | Path, fmt: str = "auto") -> str:
    """`jsonl`, `csv` or `tsv`: `fmt`, or from the file's extension when `fmt` is `auto`."""
    check_choice("config.data.format", fmt, FORMATS)
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataFileError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; name it "
            f"{', '.join(sorted(EXTENSIONS))} or set config.data.format to jsonl, csv or tsv"
        )
    return EXTENSIONS[suffix]


def _decode_line(raw: bytes, path: str | Path, line: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{_where(path, line)}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _csv_row(text: str, delimiter: str, path: str | Path, line: int) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(text), delimiter=delimiter, strict=True))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataFileError(f"{_where(path, line)}: a quoted field does not end on its line (one record per line)") from None
        raise DataFileError(f"{_where(path, line)}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e})") from None
    if len(rows) != 1:
        raise DataFileError(f"{_where(path, line)}: a quoted field does not end on its line (one record per line)")
    return rows[0]


class RecordParser:
    """Parses one line of a file into a dict of fields (JSON object, or CSV/TSV row with a header)."""

    def __init__(self, path: str | Path, fmt: str, header: list[str] | None = None):
        self.path, self.fmt, self.header = str(path), fmt, header
        self.delimiter = "\t" if fmt == "tsv" else ","

    def __call__(self, text: str, line: int) -> dict[str, Any]:
        if self.fmt == "jsonl":
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{_where(self.path, line)}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataFileError(f"{_where(self.path, line)}: expected a JSON object, got {type(record).__name__}")
            return record
        row = _csv_row(text, self.delimiter, self.path, line)
        assert self.header is not None
        if len(row) != len(self.header):
            raise DataFileError(
                f"{_where(self.path, line)}: {len(row)} columns, but the header has {len(self.header)} "
                f"({', '.join(self.header)})"
            )
        return dict(zip(self.header, row))


@functools.total_ordering
class _LabelKey:
    """Sort labels naturally: integers by value, before other strings in alphabetical order."""

    def __init__(self, label: str):
        self.key = (0, int(label), "") if re.fullmatch(r"-?\d+", label) else (1, 0, label)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LabelKey) and self.key == other.key

    def __lt__(self, other: "_LabelKey") -> bool:
        return self.key < other.key


def sort_labels(labels: Sequence[str]) -> list[str]:
    return sorted(set(labels), key=_LabelKey)


def label_string(value: Any) -> str | None:
    """A label as the string it maps from (JSON strings, integers and booleans); None if not a label."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    return None


# ------------------------------------------------------------------------------- the line index
class FileIndex:
    """Where each record of a validated file starts, its line number, and its label (if any).

    `offsets [n + 1]` (byte offsets; record i is `offsets[i]:ends[i]`), `ends [n]`, `lines [n]`
    (1-based line numbers), `labels` (the distinct label strings, sorted) and `label_codes [n]`
    (an index into `labels`, -1 when the file has no labels).
    """

    def __init__(self, path: str, fmt: str, header: list[str] | None, starts: np.ndarray, ends: np.ndarray,
                 lines: np.ndarray, labels: list[str], label_codes: np.ndarray):
        self.path, self.fmt, self.header = path, fmt, header
        self.starts, self.ends, self.lines = starts, ends, lines
        self.labels, self.label_codes = labels, label_codes

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def record_labels(self) -> list[str]:
        return [self.labels[c] for c in self.label_codes] if self.labels else []


def _cache_name(path: str, fmt: str, required: dict[str, str], label_field: str) -> str:
    st = os.stat(path)
    key = json.dumps([INDEX_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns, fmt, sorted(required.items()),
                      label_field])
    return f"{Path(path).name}.{hashlib.sha1(key.encode()).hexdigest()[:16]}.index.npz"


def build_index(path: str | Path, fmt: str, required: dict[str, str], label_field: str = "",
                label_required: bool = True) -> FileIndex:
    """Read `path` once, line by line, validating every record; returns its index.

    `required` maps each field the kind needs to its config key (for the error message); the
    label field, if named, must hold a string, an integer or a boolean. Raises `DataFileError`.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataFileError(f"{path}: is a directory, not a file")
    starts: list[int] = []
    ends: list[int] = []
    lines: list[int] = []
    codes: list[int] = []
    label_ids: dict[str, int] = {}
    header: list[str] | None = None
    parser: RecordParser | None = None
    fields = dict(required)
    if label_field and label_required:
        fields[label_field] = "label_field"
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            text = _decode_line(raw, path, number)
            if not text.strip():
                continue
            if fmt != "jsonl" and header is None:
                header = [h.strip() for h in _csv_row(text, "\t" if fmt == "tsv" else ",", path, number)]
                missing = [f"{name!r} (config.data.{key})" for name, key in fields.items() if name not in header]
                if missing:
                    raise DataFileError(f"{_where(path, number)}: the header has no column {', '.join(missing)}; "
                                        f"columns: {', '.join(header)}")
                parser = RecordParser(path, fmt, header)
                continue
            if parser is None:
                parser = RecordParser(path, fmt)
            record = parser(text, number)
            for name, key in fields.items():
                if name not in record:
                    raise DataFileError(f"{_where(path, number)}: no field {name!r} (config.data.{key}); "
                                        f"fields: {', '.join(map(str, record)) or 'none'}")
                value = record[name]
                if key == "label_field":
                    if label_string(value) is None:
                        raise DataFileError(f"{_where(path, number)}: field {name!r} must be a string or an integer "
                                            f"label, got {type(value).__name__} {value!r}")
                elif not isinstance(value, str):
                    raise DataFileError(f"{_where(path, number)}: field {name!r} must be a string, got "
                                        f"{type(value).__name__}")
            code = -1
            if label_field and label_field in record:
                label = label_string(record[label_field])
                if label is None:
                    raise DataFileError(f"{_where(path, number)}: field {label_field!r} must be a string or an "
                                        f"integer label, got {type(record[label_field]).__name__}")
                code = label_ids.setdefault(label, len(label_ids))
            starts.append(start)
            ends.append(offset)
            lines.append(number)
            codes.append(code)
    if not starts:
        what = "the file is empty" if offset == 0 else "only a header or blank lines"
        raise DataFileError(f"{path}: no records ({what})")
    labels = sort_labels(label_ids)
    position = {label: i for i, label in enumerate(labels)}
    remap = np.asarray([position[label] for label in label_ids] + [-1], np.int32)  # code -1 stays -1
    return FileIndex(path, fmt, header, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                     np.asarray(lines, np.int64), labels, remap[np.asarray(codes, np.int64)])


def index_cache_path(path: str, fmt: str, required: dict[str, str], label_field: str, cache_dir: str | Path) -> Path:
    """Where the index of `path` (as it is now: size and modification time) is cached."""
    return Path(cache_dir) / _cache_name(path, fmt, required, label_field)


def read_index(cache: Path, path: str, fmt: str) -> FileIndex | None:
    """A cached index, or None when there is none (or it cannot be read)."""
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return FileIndex(path, fmt, meta["header"], z["starts"], z["ends"], z["lines"], meta["labels"], z["codes"])
    except (OSError, ValueError, KeyError):
        return None


def write_index(index: FileIndex, cache: Path) -> None:
    """Cache an index (atomically: a temporary file, then a rename)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp.npz")
    os.close(fd)
    meta = json.dumps({"header": index.header, "labels": index.labels})
    np.savez(tmp, starts=index.starts, ends=index.ends, lines=index.lines, codes=index.label_codes, meta=np.asarray(meta))
    os.replace(tmp, cache)


class FileSource:
    """Random access to the records `rows` of an indexed file, read by offset (never the whole file).

    `source[i]` is the record's dict of fields plus `_line` (its line number, for messages).
    Thread-safe (`os.pread`) and picklable (the file is reopened in each process).
    """

    def __init__(self, index: FileIndex, rows: np.ndarray | None = None):
        self.index = index
        self.rows = np.arange(len(index)) if rows is None else np.asarray(rows, np.int64)
        self._fd: int | None = None
        self._parser = RecordParser(index.path, index.fmt, index.header)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.index.path, os.O_RDONLY)
        return self._fd

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(self.rows[i])
        start, end, line = int(self.index.starts[r]), int(self.index.ends[r]), int(self.index.lines[r])
        raw = os.pread(self._file(), end - start, start)
        record = self._parser(_decode_line(raw, self.index.path, line), line)
        record["_line"] = line
        return record

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def holdout_split(n: int, fraction: float, seed: int, parts: int) -> list[np.ndarray]:
    """Seeded split of `n` records: `[train, held-out 1, ..., held-out parts]`, each held-out part
    `max(1, round(fraction * n))` records, train the rest (in file order within each part)."""
    k = max(1, int(round(fraction * n))) if parts else 0
    if n - parts * k < 1:
        raise DataFileError(f"config.data.holdout_fraction: {fraction} of {n} records leaves no training records "
                            f"({parts} held-out part(s) of {k}); give config.data.eval_file or more records")
    perm = np.random.Generator(np.random.PCG64([int(seed), 20240613])).permutation(n)
    held = [np.sort(perm[i * k:(i + 1) * k]) for i in range(parts)]
    return [np.sort(perm[parts * k:])] + held


# ------------------------------------------------------------------------------- the tasks
class FileTask(Task):
    """A task read from the user's files (see the module docstring)."""

    fields: ClassVar[tuple[str, ...]]  # config keys of the fields this kind reads
    label_key: ClassVar[str] = ""  # config key of the label field ('' if none)
    text_keys: ClassVar[tuple[str, ...]]  # the fields that are tokenized
    builtin = False
    vocab_size = BYTE_VOCAB_SIZE  # before resolve: bytes (resolve sets model.vocab_size from the tokenizer)

    def __init__(self) -> None:
        self._tokenizer: Any = None
        self._label_maps: dict[tuple[str, ...], dict[str, int]] = {}
        self._built: dict[str, tuple[FileIndex, Path]] = {}  # indexes built but not yet cached (resolve)

    # --- config ---------------------------------------------------------------------------------
    def default_data_config(self, scale: str) -> ml_collections.ConfigDict:
        self.check_scale(scale)
        fields = {"text_field": "text", "label_field": "label", "source_field": "source", "target_field": "target"}
        d = data_config(
            train_file="",  # training records: .jsonl, .csv or .tsv (one record per line; CSV/TSV with a header)
            eval_file="",  # validation records ('' = a seeded holdout of train_file)
            test_file="",  # test records ('' = the validation split)
            format="auto",  # auto (from the file extension), jsonl, csv or tsv
            **{key: fields[key] for key in self.fields},  # the field (column) names to read
            holdout_fraction=0.1,  # share of train_file held out for validation (and for test) when not given
            data_seed=0,  # seed of the holdout split
            tokenizer="bytes",  # bytes (UTF-8, 259 ids) or spm (SentencePiece trained on the training split)
            tokenizer_vocab_size={"tiny": 256, "small": 2000, "paper": 16000}[scale],  # spm: pieces asked for
            tokenizer_type="unigram",  # spm: unigram or bpe (on a small vocabulary of words bpe keeps whole words)
            tokenizer_max_chars=10_000_000,  # spm: characters of the training split it is trained on
            max_len={"tiny": 128, "small": 1024, "paper": 4096}[scale],  # tokens kept per input
            truncate="end",  # longer inputs lose their end ('end') or their start ('start')
            labels=(),  # filled in from the training file when the run starts (the label map, saved in config.json)
            artifacts_dir="",  # filled in: the run's data directory (tokenizer model, line indexes)
        )
        if self.kind == "seq2seq":
            d.max_target_len = d.max_len  # target tokens kept, EOS included
        return d

    def data_num_classes(self, data: ml_collections.ConfigDict) -> int | None:
        return len(data.labels) if self.label_key and data.labels else (0 if not self.label_key else None)

    def data_vocab_size(self, data: ml_collections.ConfigDict) -> int | None:
        return None if data.tokenizer == "spm" and not data.artifacts_dir else (
            BYTE_VOCAB_SIZE if data.tokenizer == "bytes" else int(data.tokenizer_vocab_size))

    def check_data_config(self, data: ml_collections.ConfigDict) -> None:
        """The data keys' values (not the files, nor whether `train_file` is given: `resolve` checks
        that, so that a config without files still validates for listings and sweeps)."""
        check_choice("config.data.format", data.format, FORMATS)
        check_choice("config.data.tokenizer", data.tokenizer, TOKENIZERS)
        check_choice("config.data.truncate", data.truncate, TRUNCATE)
        check_choice("config.data.tokenizer_type", data.tokenizer_type, SPM_TYPES)
        if not 0.0 <= float(data.holdout_fraction) < 0.5:
            raise ValueError(f"config.data.holdout_fraction: {data.holdout_fraction!r} must be in [0, 0.5)")
        if data.tokenizer == "spm" and not 8 <= int(data.tokenizer_vocab_size) <= 1_000_000:
            raise ValueError(f"config.data.tokenizer_vocab_size: {data.tokenizer_vocab_size!r} must be in [8, 1000000]")
        for key in self.fields:
            if not isinstance(data[key], str) or not data[key]:
                raise ValueError(f"config.data.{key}: {data[key]!r} must be a non-empty field name")
        if data.train_file and not data.eval_file and float(data.holdout_fraction) == 0.0:
            raise ValueError("config.data.holdout_fraction: 0 and no config.data.eval_file: nothing to validate on")

    # --- files ----------------------------------------------------------------------------------
    def _required(self, data: ml_collections.ConfigDict) -> dict[str, str]:
        return {data[key]: key for key in self.fields if key != self.label_key}

    def _label_field(self, data: ml_collections.ConfigDict) -> str:
        return data[self.label_key] if self.label_key else ""

    def index(self, data: ml_collections.ConfigDict, path: str, *, label_required: bool = True,
              cache: str = "write") -> FileIndex:
        """The validated index of one file, from the cache in `data.artifacts_dir` when there is
        one, else built (one pass over the file). `cache`: `write` caches a built index there,
        `defer` keeps it until `save_indexes()` (so that nothing is written before every file is
        validated), `read` never writes (new inputs to monitor)."""
        path = os.path.abspath(path)
        fmt = file_format(path, data.format)
        required, label_field = self._required(data), self._label_field(data) if label_required else ""
        if not os.path.isfile(path) or not data.artifacts_dir:
            return build_index(path, fmt, required, self._label_field(data), label_required)
        cache_path = index_cache_path(path, fmt, required, label_field, data.artifacts_dir)
        if str(cache_path) in self._built:
            return self._built[str(cache_path)][0]
        index = read_index(cache_path, path, fmt)
        if index is None:
            index = build_index(path, fmt, required, self._label_field(data), label_required)
            if cache == "write":
                write_index(index, cache_path)
            elif cache == "defer":
                self._built[str(cache_path)] = (index, cache_path)
        return index

    def save_indexes(self) -> None:
        """Cache the indexes built with `cache="defer"`."""
        for index, cache in self._built.values():
            write_index(index, cache)
        self._built.clear()

    def split_sources(self, data: ml_collections.ConfigDict, *, cache: str = "write") -> dict[str, FileSource]:
        """The three splits as `FileSource`s (a held-out split is a seeded subset of train_file)."""
        train = self.index(data, data.train_file, cache=cache)
        given = {s: data[key] for s, key in SPLIT_FILES.items() if s != "train" and data[key]}
        held = [s for s in ("validation", "test") if s not in given and not (s == "test" and "validation" in given)]
        parts = holdout_split(len(train), float(data.holdout_fraction), int(data.data_seed), len(held))
        out = {"train": FileSource(train, parts[0])}
        out.update({s: FileSource(train, rows) for s, rows in zip(held, parts[1:])})
        for split, path in given.items():
            out[split] = FileSource(self.index(data, path, cache=cache))
        if "test" not in out:
            out["test"] = out["validation"]
        return out

    def tokenizer(self, data: ml_collections.ConfigDict) -> text_codec.Codec:
        """The run's tokenizer: bytes, or the SentencePiece model `resolve` saved in `data.artifacts_dir`."""
        if data.tokenizer == "bytes":
            return text_codec.ByteCodec(offset=NUM_SPECIAL)
        path = Path(data.artifacts_dir or "") / "tokenizer.model"
        if not data.artifacts_dir or not path.exists():
            raise ValueError(f"config.data.artifacts_dir: {str(path)!r} has no tokenizer.model; the run's data "
                             "was not resolved (train_and_evaluate does it: sparseformer.data.files.resolve_run_data)")
        _import_sentencepiece()
        return text_codec.SentencePieceCodec(str(path))

    def codec(self, config: ml_collections.ConfigDict) -> text_codec.Codec:
        """The run's tokenizer, for `predict` and `export`."""
        return self.tokenizer(config.data)

    def label_names(self, config: ml_collections.ConfigDict) -> list[str] | None:
        return [str(x) for x in config.data.labels] if self.label_key else None

    def resolve(self, config: ml_collections.ConfigDict, workdir: str | Path | None) -> ml_collections.ConfigDict:
        """Validate the files and fix labels, tokenizer and vocabulary for a run in `workdir`.

        Returns a copy of `config` with `data.labels`, `data.artifacts_dir`, `model.vocab_size`
        and `model.num_classes` set. A config resolved before (a copy of a run's config) keeps its
        labels and tokenizer: every record must then use those labels. Everything is validated
        before anything is written; errors are one-line `DataFileError`s (or `ValueError`s naming
        the config key).
        """
        config = copy.deepcopy(config)
        data = config.data
        self.check_data_config(data)
        if not data.train_file:
            raise ValueError("config.data.train_file: required (a .jsonl, .csv or .tsv file of training records)")
        for key in SPLIT_FILES.values():  # later tools may run from another directory
            if data[key]:
                data[key] = os.path.abspath(os.path.expanduser(data[key]))
        resolved = bool(data.artifacts_dir)
        previous = Path(workdir) / "config.json" if workdir is not None else None
        if not resolved and previous is not None and previous.exists():  # a resumed run keeps its labels and tokenizer
            before = json.loads(previous.read_text()).get("data", {})
            if before.get("artifacts_dir"):
                data.artifacts_dir, data.labels = before["artifacts_dir"], tuple(before.get("labels", ()))
                data.tokenizer_vocab_size = int(before.get("tokenizer_vocab_size", data.tokenizer_vocab_size))
                resolved = True
        if not resolved:
            if workdir is None:
                raise ValueError("config.data.artifacts_dir: empty; resolving a file task needs a run directory")
            data.artifacts_dir = str(Path(workdir).absolute() / "data")
        # 1. validate every file (nothing is written until all of them pass)
        sources = self.split_sources(data, cache="defer")
        if self.label_key:
            train_labels = sort_labels(sources["train"].index.record_labels()[i] for i in sources["train"].rows)
            known = list(data.labels) if resolved and data.labels else train_labels
            self._check_labels(sources, known, resolved, data.label_field)
            data.labels = tuple(known)
        if data.tokenizer == "spm" and resolved and not (Path(data.artifacts_dir) / "tokenizer.model").exists():
            raise ValueError(f"config.data.artifacts_dir: {data.artifacts_dir!r} has no tokenizer.model")
        if data.tokenizer == "spm":
            _import_sentencepiece()
        # 2. write: the line indexes, then the tokenizer
        self.save_indexes()
        if data.tokenizer == "spm" and not resolved:
            from sparseformer.data.catalog import train_sentencepiece

            fields = [data[key] for key in self.text_keys]
            path = Path(data.artifacts_dir) / "tokenizer.model"
            train_sentencepiece(sources["train"], fields, str(path), int(data.tokenizer_vocab_size),
                                int(data.tokenizer_max_chars), model_type=data.tokenizer_type, max_line_chars=2000)
        vocab = BYTE_VOCAB_SIZE
        if data.tokenizer == "spm":
            model = _import_sentencepiece().SentencePieceProcessor(model_file=str(Path(data.artifacts_dir) / "tokenizer.model"))
            vocab = int(model.GetPieceSize())
        if data.tokenizer == "spm":
            data.tokenizer_vocab_size = vocab
        config.model.vocab_size = vocab
        if self.label_key:
            config.model.num_classes = len(data.labels)
        return config

    def _check_labels(self, sources: dict[str, FileSource], known: list[str], resolved: bool, field: str) -> None:
        if len(known) < 2 and not resolved:
            src = sources["train"]
            raise DataFileError(f"{src.index.path}: field {field!r} has {len(known)} distinct label(s) in "
                                f"the training records ({', '.join(known)}); a classifier needs at least 2")
        allowed = set(known)
        for split, src in sources.items():
            names = src.index.record_labels()
            for r in src.rows:
                if names[r] not in allowed:
                    where = "only in evaluation data" if split != "train" else "not among the run's labels"
                    raise DataFileError(f"{_where(src.index.path, int(src.index.lines[r]))}: label {names[r]!r} is "
                                        f"{where}; known labels: {', '.join(known[:20])}"
                                        f"{' ...' if len(known) > 20 else ''}")

    def is_prepared(self, config: ml_collections.ConfigDict) -> bool:
        return bool(config.data.get("artifacts_dir")) and os.path.exists(config.data.train_file)

    def prepare(self, config: ml_collections.ConfigDict) -> str:
        """Validate the files (nothing is written: a run's data is resolved when it starts)."""
        self.check_data_config(config.data)
        if not config.data.train_file:
            raise ValueError("config.data.train_file: required (a .jsonl, .csv or .tsv file of training records)")
        self.split_sources(config.data, cache="read")
        return str(config.data.train_file)

    # --- reading --------------------------------------------------------------------------------
    def source(self, config: ml_collections.ConfigDict, split: str) -> Source:
        data = config.data
        check_choice("split", split, tuple(SPLIT_FILES))
        if not data.artifacts_dir:
            raise ValueError("config.data.artifacts_dir: empty; the file task's data is resolved when a run starts "
                             "(train_and_evaluate), or call sparseformer.data.files.resolve_run_data(config, workdir)")
        self._tokenizer = self.tokenizer(data)
        sources = self.split_sources(data)
        if self.label_key:  # the run's label map is fixed: a new label is refused, never re-mapped
            self._check_labels(sources, list(data.labels), True, data.label_field)
        return sources[split]

    def file_pipeline(self, config: ml_collections.ConfigDict, path: str | Path, *, limit: int | None = None,
                      seed: int = 0, label_required: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """One pass of eval batches over any file in this run's format (e.g. new inputs to monitor):
        the run's tokenizer and labels, the same encoding; a label may be missing (it is then 0)
        unless `label_required`. `limit`: a seeded sample of at most that many records."""
        from sparseformer.data import pipeline as pipeline_lib

        data = config.data
        index = self.index(data, str(path), label_required=label_required, cache="read")
        rows = np.arange(len(index))
        if limit is not None and len(rows) > limit:
            rows = np.sort(np.random.Generator(np.random.PCG64(seed)).choice(len(rows), limit, replace=False))
        if self.label_key and index.labels:
            self._check_labels({"new": FileSource(index, rows)}, list(data.labels), True, data.label_field)
        self._tokenizer = self.tokenizer(data)
        return pipeline_lib.make_iterator(FileSource(index, rows), lambda ex: self.encode(ex, data),
                                          self.padding_example(data), batch_size=int(config.batch_size), train=False,
                                          seed=seed)

    def _ids(self, text: str, length: int, data: ml_collections.ConfigDict) -> np.ndarray:
        ids = np.asarray(self._tokenizer.encode(text), np.int32)
        if ids.shape[0] > length:
            ids = ids[:length] if data.truncate == "end" else ids[ids.shape[0] - length:]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        if self._tokenizer is None:
            raise RuntimeError(f"task {self.name!r}: decode needs the tokenizer; call pipeline() first")
        return self._tokenizer.decode(ids)


@register_task
class FilesClassify(FileTask):
    name = "files_classify"
    kind = "classifier"
    num_classes = 0  # from the training file's labels (config.data.labels)
    metrics = ("accuracy",)
    description = "text classification from your files (text, label)"
    fields = ("text_field", "label_field")
    label_key = "label_field"
    text_keys = ("text_field",)

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        L = int(data.max_len)
        inputs, mask = pad_to(self._ids(example[data.text_field], L, data), L)
        labels = tuple(data.labels)
        ids = self._label_maps.setdefault(labels, {name: i for i, name in enumerate(labels)})
        label = label_string(example.get(data.label_field))
        return {"inputs": inputs, "inputs_mask": mask, "labels": np.int32(ids.get(label, 0) if label is not None else 0)}


@register_task
class FilesTranslate(FileTask):
    name = "files_translate"
    kind = "seq2seq"
    metrics = ("bleu",)
    description = "sequence to sequence from your files (source, target), one shared vocabulary"
    fields = ("source_field", "target_field")
    text_keys = ("source_field", "target_field")

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        from sparseformer.data.copying import encode_pair

        source = self._ids(example[data.source_field], int(data.max_len), data)
        target = self._ids(example.get(data.target_field, ""), int(data.max_target_len) - 1, data)
        return encode_pair(source, target, data)


@register_task
class FilesLM(FileTask):
    name = "files_lm"
    kind = "lm"
    metrics = ("perplexity",)  # per token of the tokenizer
    description = "causal language model from your files (text)"
    fields = ("text_field",)
    text_keys = ("text_field",)

    def encode(self, example: Any, data: ml_collections.ConfigDict) -> Example:
        L = int(data.max_len)
        ids = self._ids(example[data.text_field], L + 1, data)
        seq = np.concatenate([[self.bos_id], ids, [EOS_ID]]).astype(np.int32)
        seq = seq[: L + 1] if data.truncate == "end" else seq[-(L + 1):]
        inputs, _ = pad_to(seq[:-1], L)
        targets, mask = pad_to(seq[1:], L)
        return {"inputs": inputs, "targets": targets, "targets_mask": mask}

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return super().decode([i for i in np.asarray(ids).tolist() if i != self.bos_id])


def resolve_run_data(config: ml_collections.ConfigDict, workdir: str | Path | None) -> ml_collections.ConfigDict:
    """`get_task(config.task).resolve(config, workdir)`: what a run learns from its data, fixed
    before it starts (file tasks); other tasks return the config unchanged."""
    from sparseformer.data.base import get_task

    return get_task(config.task).resolve(config, workdir)
