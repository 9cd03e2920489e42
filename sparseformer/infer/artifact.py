"""An exported model directory as a prediction backend; the code behind `DIR/run.py`.

    DIR/manifest.json        task, kind, buckets, input and output fields, codec, labels, files
    DIR/params.npz           the parameters, as the flat list of arrays the functions take first
    DIR/bucket_<L>.jax       one serialized `jax.export` function per bucket length L (symbolic batch)
    DIR/<vocabulary files>   e.g. a SentencePiece model
    DIR/runtime/             this file, runtime.py and text_codec.py (copied by `export`)
    DIR/run.py               python DIR/run.py IN.jsonl OUT.jsonl [--batch-size=N] ...

Needs Python, jax and numpy only (and sentencepiece for a subword vocabulary): no sparseformer,
flax, optax or tensorflow-datasets. `sparseformer predict --artifact=DIR` uses this same module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import numpy as np

if __package__:  # inside sparseformer
    from ..data import text_codec
    from . import runtime
else:  # copied into an export directory: run.py put DIR/runtime on sys.path
    import runtime  # type: ignore[no-redef]
    import text_codec  # type: ignore[no-redef]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.npz"


def leaf_name(i: int) -> str:
    return f"p{i:05d}"


def bucket_file(length: int) -> str:
    return f"bucket_{length:05d}.jax"


class ArtifactBackend:
    """The exported functions of a directory, called on batches (`runtime.Backend`)."""

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a directory written by `sparseformer export`")
        with open(path, encoding="utf-8") as f:
            self.manifest: dict[str, Any] = json.load(f)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {self.manifest.get('format_version')!r}; this reader knows {FORMAT_VERSION}")
        m = self.manifest
        self.kind = m["kind"]
        self.buckets = [int(b) for b in m["buckets"]]
        self.labels = m.get("labels")
        self.prompt_prefix = tuple(m.get("prompt_prefix", ()))
        self.codec = text_codec.from_spec(m["codec"], directory)
        with np.load(os.path.join(directory, m["params"])) as z:
            self.leaves = [jax.numpy.asarray(z[leaf_name(i)]) for i in range(int(m["num_params_arrays"]))]
        self._fns: dict[int, Any] = {}

    def function(self, bucket: int) -> Any:
        """The deserialized function of a bucket, jitted (compiled once per batch shape)."""
        if bucket not in self._fns:
            with open(os.path.join(self.directory, self.manifest["functions"][str(bucket)]), "rb") as f:
                exported = jax.export.deserialize(bytearray(f.read()))
            self._fns[bucket] = jax.jit(exported.call)
        return self._fns[bucket]

    def run(self, bucket: int, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        return jax.device_get(self.function(bucket)(self.leaves, *arrays))


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    """The flags `run.py` and `sparseformer predict` share."""
    p.add_argument("--batch-size", type=int, default=32, help="inputs per batch (rows are padded to a power of two)")
    p.add_argument("--window", type=int, default=None, help="inputs sorted by length together (default 32 batches)")
    p.add_argument("--skip-bad", action="store_true", help="report and skip bad lines instead of stopping")
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than max_len instead of refusing them")
    p.add_argument("--max-new-tokens", type=int, default=32, help="language models: tokens to generate per prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_and_report(backend: Any, args: argparse.Namespace, prog: str) -> int:
    """`runtime.predict_file` with the shared flags; prints a one-line summary; 1 on a bad line."""
    try:
        s = runtime.predict_file(
            backend, args.input, args.output, batch_size=args.batch_size, window=args.window,
            skip_bad=args.skip_bad, truncate=args.truncate, max_new_tokens=args.max_new_tokens, progress=not args.quiet,
        )  # fmt: skip
    except (runtime.BadLine, FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    j = s.to_json()
    print(f"{prog}: wrote {j['written']} predictions to {args.output} ({j['skipped']} skipped, {j['batches']} batches, "
          f"{100 * j['padding_fraction']:.0f}% padding, {j['seconds']:.1f} s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, *, directory: str | None = None) -> int:
    """`python DIR/run.py IN.jsonl OUT.jsonl [flags]`."""
    directory = directory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(prog="run.py", description=f"Predict with the exported model in {directory}: one JSON "
                                "object per line in, the same objects with their `prediction` out, in order.")
    p.add_argument("input", help="JSON Lines input ('-' for standard input)")
    p.add_argument("output", help="JSON Lines output (written to a temporary file, then renamed)")
    add_predict_flags(p)
    args = p.parse_args(argv)
    try:
        backend = ArtifactBackend(directory)
    except (FileNotFoundError, ValueError) as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2
    return run_and_report(backend, args, "run.py")


RUN_PY = '''#!/usr/bin/env python3
"""Predict with this exported sparseformer model (needs Python, jax and numpy only).

    python run.py IN.jsonl OUT.jsonl [--batch-size=32] [--skip-bad] [--max-new-tokens=32]

See manifest.json for the task, the input fields each line needs and the output fields added.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "runtime"))

import artifact  # noqa: E402

if __name__ == "__main__":
    sys.exit(artifact.main(sys.argv[1:], directory=HERE))
'''
