"""What monitoring follows, measured the same way at training time and on new inputs.

`probe_stats(rt, state, batches)` runs the probe step (`step.make_probe_step`) over batches and
averages: `agreement` (the share of predictions that the same parameters give with dense
attention), and per attention call and head `layer_fidelity` (KL from dense attention rows to
the model's, on the sampled rows) and `layer_captured` (the share of the model's attention mass
computed exactly). At the end of training the trainer stores these, over a sample of the
training split, as `monitor_reference.json` in the run directory; `sparseformer monitor`
computes the same on new inputs and compares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

REFERENCE = "monitor_reference.json"
REFERENCE_EXAMPLES = 256  # training examples the reference is measured on (the monitor's default sample)


def probe_stats(rt: Any, state: Any, batches: Iterable[dict[str, np.ndarray]], *, max_examples: int | None = None) -> dict[str, Any]:
    """Probe averages over `batches` (stopping after `max_examples` real examples)."""
    agree = np.zeros(2)
    fid = cap = None
    examples = 0
    for batch in batches:
        n = int(np.sum(batch["example_mask"]))
        if n == 0:
            continue
        out = rt.probe(state, batch)
        agree += np.asarray([float(out["agreement"][0]), float(out["agreement"][1])])
        f, c = np.asarray(out["layer_fidelity"], np.float64), np.asarray(out["layer_captured"], np.float64)
        fid = n * f if fid is None else fid + n * f
        cap = n * c if cap is None else cap + n * c
        examples += n
        if max_examples is not None and examples >= max_examples:
            break
    if not examples:
        raise ValueError("no examples to probe")
    fid, cap = fid / examples, cap / examples
    return {
        "num_examples": examples,
        "agreement": float(agree[0] / agree[1]) if agree[1] else math.nan,
        "fidelity": float(np.mean(fid)) if fid.size else 0.0,
        "captured": float(np.mean(cap)) if cap.size else 1.0,
        "layer_fidelity": fid.tolist(),
        "layer_captured": cap.tolist(),
    }


def training_reference(rt: Any, state: Any, *, examples: int = REFERENCE_EXAMPLES) -> dict[str, Any]:
    """`probe_stats` on the first `examples` of the training split (as its pipeline shuffles it)."""
    config = rt.config
    batches = rt.pipeline("train")
    stats = probe_stats(rt, state, batches, max_examples=examples)
    return {"task": config.task, "attention": config.get("attention_name", ""), "split": "train",
            "max_len": int(config.data.max_len), **stats}
