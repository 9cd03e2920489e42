"""`sparseformer adopt`: move a trained dense model to sparse attention in measured stages.

    from sparseformer.adopt import AdoptOptions, adopt
    report = adopt(AdoptOptions(teacher="runs/dense", out="runs/adopt", attention="rsa", steps=100))
    report["verdict"]["decision"], report["verdict"]["reason"]

See `sparseformer.adopt.stages` for what each stage measures and how re-runs resume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from sparseformer.adopt.stages import STAGES, AdoptOptions, Adoption, check_options, costs, verdict


def adopt(options: AdoptOptions, log: Callable[[str], None] = print, stop_after: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage in `options.out` and write `report.json`, `report.md` and the
    plots there; returns the report. `stop_after` ends after that stage (no report)."""
    from sparseformer.adopt import report as report_lib

    check_options(options)
    run = Adoption(options, log=log)
    results = run.run(stop_after=stop_after)
    if stop_after is not None and stop_after != STAGES[-1]:
        return {"stages": results}
    v = verdict(results["stage0"], results["stage1"], results.get("stage2"), results.get("stage3"),
                max_metric_drop=options.max_metric_drop, min_speedup=options.min_speedup, speedup=options.speedup)
    report = {
        "teacher": str(Path(options.teacher)),
        "task": run.teacher.task,
        "length": run.length,
        "backend": jax.default_backend(),
        "options": {**vars(options), "lengths": list(run.lengths())},
        "verdict": v,
        "costs": costs(results, options.price_per_hour),
        "stages": results,
    }
    report = report_lib.write(report, Path(options.out))
    log(f"{v['reason']}  (report: {Path(options.out) / 'report.md'})")
    return report


__all__ = ["AdoptOptions", "adopt", "verdict", "STAGES"]
