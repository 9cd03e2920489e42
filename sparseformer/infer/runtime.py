"""Batched prediction over a JSON Lines file, independent of how the model runs.

`predict_file(backend, IN, OUT)` reads one JSON object per line, tokenizes its text fields with the
task's codec, groups the inputs into length buckets and batches, calls `backend.run(bucket, arrays)`
for each batch, and writes each input object plus its `prediction` (and, for classifiers, its
`probabilities`) to OUT, in input order. The backend is the checkpoint (`sparseformer predict
--workdir`, jitted programs) or an exported artifact (`--artifact`, and `DIR/run.py`); both run
this same loop, so they batch, pad and decode identically.

Batching wastes little on padding:
- a few fixed bucket lengths (chosen when the model is loaded or exported): a batch is padded only
  to the shortest bucket that holds its longest input;
- inputs are read `window` at a time, sorted by length within the window and cut into full batches
  (`plan`), so a batch holds inputs of similar lengths and only the window's last batch is part
  full; the window's outputs are written back in input order;
- a batch's rows are padded to a power of two (at most `batch_size`), so at most
  `len(buckets) * (log2(batch_size) + 1)` shapes are ever compiled, however many batches run.

Errors name the file and line: a line that is not valid JSON, lacks a field, has a token the task
does not know, or is longer than the model allows stops the run (or, with `skip_bad`, is reported
and skipped). The output is written to a temporary file and renamed at the end, so a failed run
leaves no half-written file.

This module needs only Python and numpy: `export` copies it into the artifact directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

# The JSON fields each model kind reads, and its programs' array arguments (in order).
FIELDS: dict[str, tuple[str, ...]] = {
    "classifier": ("input",),
    "dual_encoder": ("input1", "input2"),
    "seq2seq": ("source",),
    "lm": ("input",),
}
ARRAYS: dict[str, tuple[str, ...]] = {
    "classifier": ("inputs", "inputs_mask"),
    "dual_encoder": ("inputs1", "inputs1_mask", "inputs2", "inputs2_mask"),
    "seq2seq": ("inputs", "inputs_mask"),
    "lm": ("inputs", "lengths", "max_new"),
}
PAD_ID = 0


class BadLine(ValueError):
    """One input line the model cannot take; the message names the file and line."""


class Backend(Protocol):
    """What runs the model: the description of its inputs and one call per batch."""

    kind: str  # classifier, dual_encoder, seq2seq or lm
    buckets: Sequence[int]  # allowed padded lengths, ascending; the last is the model's max_len
    codec: Any  # text <-> ids (sparseformer.data.text_codec)
    labels: Sequence[str] | None  # class names (classifiers), or None for class indices
    prompt_prefix: Sequence[int]  # ids a language model's prompt starts with

    def run(self, bucket: int, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]: ...


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """The shortest bucket that holds `length` tokens (ValueError past the longest)."""
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"{length} tokens, more than the model's max_len {buckets[-1]}")


def row_bucket(n: int, batch_size: int) -> int:
    """Rows a batch of `n` inputs is padded to: the next power of two, at most `batch_size`."""
    return min(1 << max(n - 1, 0).bit_length(), batch_size) if n < batch_size else batch_size


@dataclasses.dataclass
class Item:
    """One input line: its position, its JSON object and its token ids (one list per field)."""

    index: int
    line: int
    record: dict[str, Any]
    ids: list[list[int]]

    @property
    def length(self) -> int:
        return max(len(x) for x in self.ids)


def encode_record(record: Any, backend: Backend, *, truncate: bool = False) -> list[list[int]]:
    """The token ids of a JSON object's text fields; `ValueError` with the reason when it cannot."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    max_len = int(backend.buckets[-1])
    out = []
    for field in FIELDS[backend.kind]:
        if field not in record:
            raise ValueError(f"lacks the field {field!r} (a {backend.kind} reads {', '.join(map(repr, FIELDS[backend.kind]))})")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"field {field!r} must be a string, got {type(text).__name__}")
        ids = list(backend.prompt_prefix if backend.kind == "lm" else ()) + backend.codec.encode(text)
        if not ids:
            raise ValueError(f"field {field!r} has no tokens")
        if len(ids) > max_len:
            if not truncate:
                raise ValueError(f"field {field!r} has {len(ids)} tokens, more than the model's max_len {max_len} "
                                 "(--truncate keeps the first max_len)")
            ids = ids[:max_len]
        out.append(ids)
    return out


def _pad(rows: list[list[int]], n_rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((n_rows, length), PAD_ID, np.int32)
    mask = np.zeros((n_rows, length), np.bool_)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


def batch_arrays(kind: str, items: Sequence[Item], bucket: int, n_rows: int, *, max_new: int = 0) -> tuple[np.ndarray, ...]:
    """The program's arrays (`ARRAYS[kind]`) for some items padded to `bucket` x `n_rows`."""
    if kind == "dual_encoder":
        a, am = _pad([it.ids[0] for it in items], n_rows, bucket)
        b, bm = _pad([it.ids[1] for it in items], n_rows, bucket)
        return a, am, b, bm
    ids, mask = _pad([it.ids[0] for it in items], n_rows, bucket)
    if kind == "lm":
        return ids, np.maximum(mask.sum(1), 1).astype(np.int32), np.int32(max_new)
    return ids, mask


def prediction_fields(backend: Backend, item: Item, outputs: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    """What a row's outputs add to its JSON object."""
    if "probabilities" in outputs:
        p = np.asarray(outputs["probabilities"][row], np.float64)
        label = int(np.argmax(p))
        named = backend.labels is not None
        return {"prediction": backend.labels[label] if named else label,
                "probabilities": {backend.labels[i]: float(x) for i, x in enumerate(p)} if named else [float(x) for x in p]}
    ids = np.asarray(outputs["ids"][row])
    if backend.kind == "lm":  # the continuation after the prompt
        ids = ids[len(item.ids[0]):]
    return {"prediction": backend.codec.decode(ids)}


def plan(items: Sequence[Item], buckets: Sequence[int], batch_size: int) -> list[tuple[int, list[Item]]]:
    """Full batches of similar lengths: the items sorted by length, cut every `batch_size`, each batch
    padded to the bucket of its longest item. At most one batch (the last) is not full; a batch at a
    bucket boundary pads its shorter items to the next bucket rather than being split in two part-full
    batches (splitting by bucket made more, smaller batches: slower where the batch's cost does not
    shrink with its rows, as in a decoding loop)."""
    keyed = sorted(items, key=lambda it: (it.length, it.index))
    return [(choose_bucket(keyed[min(i + batch_size, len(keyed)) - 1].length, buckets), keyed[i:i + batch_size])
            for i in range(0, len(keyed), batch_size)]


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """`(line number, text)` of the non-blank lines of a file (`-` is standard input)."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        for n, text in enumerate(f, 1):
            if text.strip():
                yield n, text
    finally:
        if f is not sys.stdin:
            f.close()


@dataclasses.dataclass
class Summary:
    """What a prediction run did."""

    written: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # one message per skipped line
    batches: int = 0
    padded_tokens: int = 0  # tokens computed (rows x bucket), real and padding
    real_tokens: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": len(self.skipped), "batches": self.batches,
                "padding_fraction": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0,
                "seconds": self.seconds}


class _Progress:
    """A progress bar on standard error (tqdm when installed, else a line now and then)."""

    def __init__(self, total: int | None, enabled: bool):
        self.total, self.enabled, self.done, self._last = total, enabled, 0, 0.0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="line", desc="predict", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last > 5:
            self._last = time.monotonic()
            print(f"predict: {self.done}/{self.total if self.total is not None else '?'} lines", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def predict_file(
    backend: Backend,
    input_path: str,
    output_path: str,
    *,
    batch_size: int = 32,
    window: int | None = None,
    skip_bad: bool = False,
    truncate: bool = False,
    max_new_tokens: int = 32,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> Summary:
    """Predict every line of `input_path` into `output_path` (see the module docstring).

    `window`: inputs sorted together (default `batch_size * 32`). `max_new_tokens`: a language
    model's continuation length. `report` receives each skipped line's message (default: stderr).
    Raises `BadLine` on the first bad line unless `skip_bad`.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size: {batch_size} must be >= 1")
    window = window or batch_size * 32
    report = report or (lambda msg: print(f"skipped {msg}", file=sys.stderr, flush=True))
    summary = Summary()
    t0 = time.perf_counter()
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output_path)}.", suffix=".tmp", dir=out_dir)
    bar = _Progress(_count_lines(input_path) if progress else None, progress)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            chunk: list[tuple[int, str]] = []
            for line_no, text in read_lines(input_path):
                chunk.append((line_no, text))
                if len(chunk) >= window:
                    _window(backend, chunk, input_path, out, summary, batch_size, skip_bad, truncate, max_new_tokens, report)
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                _window(backend, chunk, input_path, out, summary, batch_size, skip_bad, truncate, max_new_tokens, report)
                bar.update(len(chunk))
        os.replace(tmp, output_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _window(backend: Backend, chunk: list[tuple[int, str]], path: str, out: Any, summary: Summary, batch_size: int,
            skip_bad: bool, truncate: bool, max_new: int, report: Callable[[str], None]) -> None:
    items: list[Item] = []
    for line_no, text in chunk:
        try:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
            ids = encode_record(record, backend, truncate=truncate)
        except ValueError as e:
            msg = f"{path}:{line_no}: {e}"
            if not skip_bad:
                raise BadLine(msg + " (--skip-bad reports and skips such lines)") from None
            summary.skipped.append(msg)
            report(msg)
            continue
        items.append(Item(len(items), line_no, record, ids))
    results: list[dict[str, Any] | None] = [None] * len(items)
    for bucket, group in plan(items, backend.buckets, batch_size):
        n_rows = row_bucket(len(group), batch_size)
        arrays = batch_arrays(backend.kind, group, bucket, n_rows, max_new=max_new)
        outputs = {k: np.asarray(v) for k, v in backend.run(bucket, arrays).items()}
        for row, it in enumerate(group):
            results[it.index] = prediction_fields(backend, it, outputs, row)
        summary.batches += 1
        summary.padded_tokens += n_rows * bucket * len(FIELDS[backend.kind])
        summary.real_tokens += sum(sum(len(x) for x in it.ids) for it in group)
    for it, res in zip(items, results):
        out.write(json.dumps({**it.record, **(res or {})}, ensure_ascii=False) + "\n")
        summary.written += 1
