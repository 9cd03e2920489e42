"""`sparseformer monitor`: has the sparse attention of a trained model drifted from dense attention
on new inputs? For a scheduled job: exit status 1 and a one-line reason when a threshold is crossed.

    sparseformer monitor --workdir=runs/adopt/stage2 --input=new.jsonl [--max-fidelity=0.1] [--min-agreement=0.95]

It runs the model on a sample of the new inputs (a file in the run's own format, read with the
run's tokenizer; labels are not needed), measures what the trainer recorded on the training data at
the end of training (`monitor_reference.json`, see `sparseformer.train.probe`): per layer the
fidelity (KL from dense attention rows to the model's) and the share of attention mass computed
exactly, and the agreement of the model's predictions with the same parameters under dense
attention; prints both side by side, and checks:

- fidelity: every layer's fidelity at most `--max-fidelity` (default: twice its training-time
  value plus `FIDELITY_SLACK`);
- agreement: at least `--min-agreement` (default: the training-time value minus `AGREEMENT_SLACK`);
- captured mass: every layer's at least `--min-captured` (only when given).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

FIDELITY_SLACK = 0.02  # nats: the default threshold is 2 x the training-time fidelity + this
AGREEMENT_SLACK = 0.05  # the default threshold is the training-time agreement - this


def load_reference(workdir: str | Path) -> dict[str, Any]:
    from sparseformer.train.probe import REFERENCE

    path = Path(workdir) / REFERENCE
    if not path.exists():
        cfg = Path(workdir) / "config.json"
        why = ("it is not a run directory" if not cfg.exists() else
               "the run uses dense attention (nothing to monitor) or did not finish")
        raise FileNotFoundError(f"{path} is missing: {why}")
    return json.loads(path.read_text())


def thresholds(reference: dict[str, Any], *, max_fidelity: float | None = None, min_agreement: float | None = None,
               min_captured: float | None = None) -> dict[str, Any]:
    """The limits each quantity is checked against: per layer for fidelity and captured mass."""
    layers = [sum(h) / len(h) for h in reference["layer_fidelity"]]
    return {
        "max_fidelity": [max_fidelity if max_fidelity is not None else 2 * f + FIDELITY_SLACK for f in layers],
        "min_agreement": min_agreement if min_agreement is not None else reference["agreement"] - AGREEMENT_SLACK,
        "min_captured": min_captured,
    }


def compare(reference: dict[str, Any], new: dict[str, Any], limits: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Table rows (`quantity`, `training`, `new`, `threshold`, `ok`) and the crossed thresholds' reasons."""
    rows, reasons = [], []

    def mean(h: list[float]) -> float:
        return sum(h) / len(h) if h else math.nan

    ok = new["agreement"] >= limits["min_agreement"]
    rows.append({"quantity": "agreement with dense", "training": reference["agreement"], "new": new["agreement"],
                 "threshold": f">= {limits['min_agreement']:.3f}", "ok": ok})
    if not ok:
        reasons.append(f"agreement with dense attention {new['agreement']:.3f} < {limits['min_agreement']:.3f} "
                       f"(--min-agreement; {reference['agreement']:.3f} at training time)")
    for i, (ref_f, new_f, ref_c, new_c) in enumerate(zip(reference["layer_fidelity"], new["layer_fidelity"],
                                                          reference["layer_captured"], new["layer_captured"])):
        limit = limits["max_fidelity"][i]
        f_ok = mean(new_f) <= limit
        rows.append({"quantity": f"layer {i} fidelity (KL)", "training": mean(ref_f), "new": mean(new_f),
                     "threshold": f"<= {limit:.4f}", "ok": f_ok})
        if not f_ok:
            reasons.append(f"layer {i} fidelity {mean(new_f):.4f} > {limit:.4f} (--max-fidelity; "
                           f"{mean(ref_f):.4f} at training time)")
        c_limit = limits["min_captured"]
        c_ok = c_limit is None or mean(new_c) >= c_limit
        rows.append({"quantity": f"layer {i} captured mass", "training": mean(ref_c), "new": mean(new_c),
                     "threshold": "-" if c_limit is None else f">= {c_limit:.3f}", "ok": c_ok})
        if not c_ok:
            reasons.append(f"layer {i} captured mass {mean(new_c):.3f} < {c_limit:.3f} (--min-captured; "
                           f"{mean(ref_c):.3f} at training time)")
    return rows, reasons


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("quantity", "training", "new", "threshold", "status")
    body = [(r["quantity"], f"{r['training']:.4f}", f"{r['new']:.4f}", r["threshold"], "ok" if r["ok"] else "CROSSED")
            for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def monitor(workdir: str | Path, *, input: str | None = None, split: str | None = None, sample: int = 256,
            seed: int = 0, max_fidelity: float | None = None, min_agreement: float | None = None,
            min_captured: float | None = None) -> dict[str, Any]:
    """Measure a sample of new inputs (`input`: a file in the run's format; or a `split` of the run's
    task) as the trainer measured the training data, and compare. Returns the report (`ok`,
    `reason`, `rows`, `reference`, `new`, `thresholds`)."""
    from sparseformer.train.loop import restore_run
    from sparseformer.train.probe import probe_stats

    reference = load_reference(workdir)
    if (input is None) == (split is None):
        raise ValueError("give one of --input (a file of new inputs) or --split")
    rt, state, step = restore_run(workdir)
    task = rt.comps.task
    if input is not None:
        if not hasattr(task, "file_pipeline"):
            raise ValueError(f"--input: task {rt.config.task!r} does not read files; use --split, or a run of "
                             "configs/files.py")
        batches = task.file_pipeline(rt.config, input, limit=sample, seed=seed)
    else:
        batches = rt.pipeline(split)
    new = probe_stats(rt, state, batches, max_examples=sample)
    limits = thresholds(reference, max_fidelity=max_fidelity, min_agreement=min_agreement, min_captured=min_captured)
    rows, reasons = compare(reference, new, limits)
    return {"workdir": str(workdir), "step": step, "input": input or f"split {split}", "ok": not reasons,
            "reason": reasons[0] if reasons else "", "reasons": reasons, "rows": rows, "reference": reference,
            "new": new, "thresholds": limits}


def monitor_main(argv: list[str]) -> int:
    """`sparseformer monitor`: 0 when every threshold holds, 1 when one is crossed, 2 on bad arguments."""
    p = argparse.ArgumentParser(prog="sparseformer monitor", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status: 0 all thresholds hold, 1 a threshold is crossed, 2 bad arguments")
    p.add_argument("--workdir", required=True, help="run directory of a trained sparse-attention model")
    p.add_argument("--input", help="new inputs: a .jsonl/.csv/.tsv file in the run's format (labels not needed)")
    p.add_argument("--split", choices=["train", "validation", "test"], help="or a split of the run's own task")
    p.add_argument("--sample", type=int, default=256, help="records measured (a seeded sample of the input)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--max-fidelity", type=float, default=None,
                   help=f"largest fidelity (KL) allowed in any layer (default: 2 x training-time + {FIDELITY_SLACK})")
    p.add_argument("--min-agreement", type=float, default=None,
                   help=f"smallest agreement with dense attention allowed (default: training-time - {AGREEMENT_SLACK})")
    p.add_argument("--min-captured", type=float, default=None, help="smallest captured mass allowed in any layer")
    p.add_argument("--out", help="also write the report as JSON here")
    a = p.parse_args(argv)
    prog = "sparseformer monitor"
    if a.sample < 1:
        print(f"{prog}: --sample: {a.sample} must be >= 1", file=sys.stderr)
        return 2
    try:
        report = monitor(a.workdir, input=a.input, split=a.split, sample=a.sample, seed=a.seed,
                         max_fidelity=a.max_fidelity, min_agreement=a.min_agreement, min_captured=a.min_captured)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    new = report["new"]
    print(f"{a.workdir} (step {report['step']}, attention {report['reference'].get('attention', '?')}): "
          f"{new['num_examples']} examples of {report['input']} against {report['reference']['num_examples']} "
          "training examples")
    print(format_table(report["rows"]))
    if a.out:
        from sparseformer.train.metrics_io import write_json

        write_json(a.out, report)
    if not report["ok"]:
        print(f"{prog}: {report['reason']}", file=sys.stderr)
        return 1
    return 0
