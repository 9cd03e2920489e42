"""Text <-> token ids for the tasks' raw inputs and outputs (`predict`, `export`).

A codec turns the raw text of one input into the ids the task's data gives the model, and ids back
into text. It is described by a small JSON-able spec, so an exported model carries it beside its
functions: this module needs only Python and numpy (and sentencepiece for a subword codec), and is
copied as is into every export directory.

Kinds:
  words          whitespace-separated tokens, each a vocabulary entry (id = offset + index); tokens
                 listed in `skip` are dropped on input (ListOps' parentheses)
  bytes          UTF-8 bytes, byte b is id b + offset
  sentencepiece  a SentencePiece model file (ids as the model gives them)

Ids 0, 1, 2 are padding, begin and end for every task: decoding stops at the first end id and
drops padding and begin ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
KINDS = ("words", "bytes", "sentencepiece")


def _until_eos(ids: Sequence[int] | np.ndarray) -> list[int]:
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(int(i))
    return out


class Codec:
    """Base class: `encode(text) -> ids`, `decode(ids) -> text`, `spec() -> dict`."""

    kind = ""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """A JSON-able description; `files` lists the files it needs (names relative to its directory)."""
        raise NotImplementedError


class WordCodec(Codec):
    """Whitespace-separated tokens from a fixed vocabulary: token `vocab[i]` is id `offset + i`."""

    kind = "words"

    def __init__(self, vocab: Sequence[str], *, offset: int = 3, skip: Sequence[str] = (), name: str = ""):
        self.vocab, self.offset, self.skip, self.name = tuple(vocab), int(offset), tuple(skip), name
        self._ids = {t: self.offset + i for i, t in enumerate(self.vocab)}
        if len(self._ids) != len(self.vocab):
            raise ValueError("text codec: the vocabulary has repeated tokens")

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in text.split():
            if tok in self.skip:
                continue
            if tok not in self._ids:
                shown = " ".join(self.vocab[:20]) + (" ..." if len(self.vocab) > 20 else "")
                prefix = f"{self.name}: " if self.name else ""
                raise ValueError(f"{prefix}unknown token {tok!r}; known tokens: {shown}")
            ids.append(self._ids[tok])
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        n = len(self.vocab)
        return " ".join(self.vocab[i - self.offset] for i in _until_eos(ids) if 0 <= i - self.offset < n)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": list(self.vocab), "offset": self.offset, "skip": list(self.skip),
                "name": self.name, "files": []}


class ByteCodec(Codec):
    """UTF-8 bytes: byte b is id `b + offset`."""

    kind = "bytes"

    def __init__(self, *, offset: int = 3):
        self.offset = int(offset)

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + self.offset).tolist()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        raw = bytes(i - self.offset for i in _until_eos(ids) if 0 <= i - self.offset < 256)
        return raw.decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "offset": self.offset, "files": []}


class SentencePieceCodec(Codec):
    """A SentencePiece model (the `translate` task's subword vocabulary)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm  # only this codec needs it

        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode(_until_eos(ids))

    def spec(self) -> dict[str, Any]:
        name = os.path.basename(self.model_file)
        return {"kind": self.kind, "model": name, "files": [name]}


def from_spec(spec: dict[str, Any], directory: str = ".") -> Codec:
    """The codec a `spec()` describes; its files are looked up in `directory`."""
    kind = spec.get("kind")
    if kind == "words":
        return WordCodec(spec["vocab"], offset=spec.get("offset", 3), skip=spec.get("skip", ()), name=spec.get("name", ""))
    if kind == "bytes":
        return ByteCodec(offset=spec.get("offset", 3))
    if kind == "sentencepiece":
        return SentencePieceCodec(os.path.join(directory, spec["model"]))
    raise ValueError(f"text codec kind {kind!r} is not one of {', '.join(KINDS)}")
