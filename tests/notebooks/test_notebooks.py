"""Every notebook executes headless, as a user would run it (jupytext + nbclient, a python3 kernel).

The kernel is the one of the interpreter running pytest (jupyter_client maps the `python3` spec's
`python` to `sys.executable`), started in the repository root. Its environment drops the 8 fake
devices that tests/conftest.py asks for: the notebooks show single-device runs, and 8 devices
would only slow their compilation. Compiled programs go to the JAX cache the other tests share
(tests/conftest.py's JAX_COMPILATION_CACHE_DIR, inherited), so a second `make test` compiles less.
What a notebook writes (its tempfile.mkdtemp() work directory) lands in the test's tmp_path.
"""

import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[!_]*.py"))


def test_the_four_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "extend_a_variant", "adopt_step_by_step", "what_attention_selected"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               MPLBACKEND="Agg", TQDM_DISABLE="1", TMPDIR=str(tmp_path))  # run dirs land in pytest's tmp
    env.pop("PYTEST_XDIST_WORKER", None)
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.get("execution_count") for c in code)  # every cell ran, none was skipped
    shown = [o for c in code for o in c.outputs if o.output_type in ("display_data", "execute_result", "stream")]
    assert shown, f"{path.name} ran but showed nothing"  # a notebook's tables and figures are its point
