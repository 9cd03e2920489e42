"""`export` round trip: `DIR/run.py`, in a process where sparseformer, flax, optax and
tensorflow-datasets cannot be imported, gives the predictions of `predict --workdir`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparseformer.infer import export as export_lib
from sparseformer.infer import predict as predict_lib
from sparseformer.infer import runtime
from sparseformer.infer.cli import export_main, predict_main

from test_predict import read, write_inputs

POISONED = ("sparseformer", "flax", "optax", "tensorflow_datasets", "tensorflow", "orbax", "ml_collections", "grain")
# Run each export's run.py in one process whose imports of the packages above fail.
PRELUDE = """
import importlib.abc, runpy, sys
BANNED = {banned!r}
class Poison(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BANNED:
            raise ImportError(f"{{name}} must not be imported by an exported model")
sys.meta_path.insert(0, Poison())
for directory, src, dst in {jobs!r}:
    sys.argv = [directory + "/run.py", src, dst, "--batch-size=4", "--max-new-tokens=5", "--quiet"]
    try:
        runpy.run_path(directory + "/run.py", run_name="__main__")
    except SystemExit as e:
        assert not e.code, (directory, e.code)
print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in BANNED))
"""


@pytest.mark.slow
def test_run_py_without_sparseformer_gives_the_checkpoint_predictions(runs, tmp_path):
    jobs, expected = [], {}
    for task, run in runs.items():
        backend = predict_lib.load_backend(str(run))
        src = tmp_path / f"{task}.jsonl"
        write_inputs(src, backend, 6, seed=3)
        ref = tmp_path / f"{task}.ref.jsonl"
        runtime.predict_file(backend, str(src), str(ref), batch_size=4, max_new_tokens=5, progress=False)
        manifest = export_lib.export_run(str(run), tmp_path / f"exp_{task}")
        assert manifest["kind"] == backend.kind and manifest["buckets"] == backend.buckets
        jobs.append((str(tmp_path / f"exp_{task}"), str(src), str(tmp_path / f"{task}.out.jsonl")))
        expected[task] = read(ref)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE.format(banned=POISONED, jobs=jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported: []" in proc.stdout
    for task in runs:
        got = read(tmp_path / f"{task}.out.jsonl")
        assert [g["prediction"] for g in got] == [e["prediction"] for e in expected[task]], task
        for g, e in zip(got, expected[task]):
            if "probabilities" in e:
                np.testing.assert_allclose(g["probabilities"], e["probabilities"], atol=1e-6)


def test_commands_and_refusals(runs, tmp_path):
    run = runs["listops"]
    out = tmp_path / "exp"
    assert export_main([f"--workdir={run}", f"--out={out}", "--platforms=cpu,cuda", "--buckets=max"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["buckets"] == [128] and manifest["platforms"] == ["cpu", "cuda"]
    assert manifest["input_fields"] == ["input"] and manifest["output_fields"] == ["prediction", "probabilities"]
    src = tmp_path / "in.jsonl"
    src.write_text('{"input": "[MAX 1 2 ]"}\n{"input": "[MIN 3 4 ]"}\n')
    assert predict_main([f"--artifact={out}", f"--input={src}", f"--output={tmp_path / 'a.jsonl'}", "--quiet"]) == 0
    assert predict_main([f"--workdir={run}", f"--input={src}", f"--output={tmp_path / 'w.jsonl'}", "--quiet"]) == 0
    assert [r["prediction"] for r in read(tmp_path / "a.jsonl")] == [r["prediction"] for r in read(tmp_path / "w.jsonl")]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    assert export_main([f"--workdir={run}", f"--out={tmp_path / 'other'}"]) == 2  # not an export directory
    assert export_main([f"--workdir={run}", f"--out={out}", "--platforms=gpu"]) == 2
    with pytest.raises(ValueError, match="--buckets: 0 must be positive"):
        predict_lib.load_backend(str(run), buckets=[0, 128])
