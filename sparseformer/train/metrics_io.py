"""Where metrics go: `log.jsonl`, TensorBoard event files, a progress bar, `metrics.json`.

Only process 0 writes; other processes get a writer that does nothing, so the loop has no
`if process_index == 0` branches.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: _jsonable(v) for k, v in obj.items()}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def truncate_log(path: str | Path, after_step: int) -> None:
    """Drop `log.jsonl` lines logged after `after_step` (a resumed run logs those steps again)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= after_step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut short by a kill
    path.write_text("".join(k + "\n" for k in keep))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MetricsWriter:
    """JSON lines + TensorBoard + tqdm for one run; inert when `active` is False."""

    def __init__(self, workdir: str | Path, *, active: bool, total_steps: int, initial_step: int, progress: bool = True):
        self.active = active
        self.workdir = Path(workdir)
        self._tb = None
        self._bar = None
        if not active:
            return
        from tensorboardX import SummaryWriter

        self._logs: dict[str, Any] = {}
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=1.0, file=sys.stderr)

    def write(self, step: int, scalars: dict[str, float], prefix: str = "", log_name: str = "log.jsonl") -> None:
        """One JSON line (`{"step": ..., **scalars}`) in `log_name` and one TensorBoard point per scalar.

        Training goes to `log.jsonl` (every line has `step` and `loss`); evaluations to `eval.jsonl`.
        """
        if not self.active:
            return
        if log_name not in self._logs:
            self._logs[log_name] = open(self.workdir / log_name, "a")
        record = {"step": int(step), **{prefix + k: _jsonable(float(v)) for k, v in scalars.items()}}
        self._logs[log_name].write(json.dumps(record) + "\n")
        self._logs[log_name].flush()
        for k, v in scalars.items():
            self._tb.add_scalar(f"{prefix.rstrip('_') or 'train'}/{k}", float(v), int(step))

    def progress(self, step: int, loss: float, steps_per_second: float | None) -> None:
        if self._bar is None:
            return
        self._bar.n = int(step)
        postfix = {"loss": f"{loss:.4f}"}
        if steps_per_second:
            postfix["steps/s"] = f"{steps_per_second:.2f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        for f in self._logs.values():
            f.close()
