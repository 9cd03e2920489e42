"""`sparseformer adopt`: parse the flags and call `sparseformer.adopt.adopt`."""

from __future__ import annotations

import argparse
import sys

DOC = """From a trained dense run to sparse attention, in measured stages, with a go/no-go verdict.

  stage 0  the dense model: metric, latency, throughput, memory at the data's length
  stage 1  the same weights with --attention, no training: metric, fidelity per layer and head, speed, memory
  stage 2  --steps of fine-tuning distilled from the dense model: metric, fidelity
  stage 3  speed and memory at --lengths; with --price-per-hour, the cost of a million predictions

Writes OUT/stage<N>.json as each stage finishes (a re-run skips what is done with the same inputs),
OUT/stage2/ (the fine-tuned run: `sparseformer monitor --workdir=OUT/stage2 --input=...`),
OUT/report.md, OUT/report.json and plots. Exit status 0 whatever the verdict (it is in the report
and on the last line); 1 when a stage fails; 2 for bad arguments.

example:
  sparseformer adopt --teacher=runs/dense --attention=rsa --out=runs/adopt --steps=100 \\
      --max-metric-drop=1 --min-speedup=2 --lengths=2048,4096 --price-per-hour=0.40
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def adopt_main(argv: list[str]) -> int:
    from sparseformer.adopt.stages import AdoptOptions

    p = argparse.ArgumentParser(prog="sparseformer adopt", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="run directory of a model trained with dense attention")
    p.add_argument("--out", required=True, help="directory for the stages, the report and the plots")
    p.add_argument("--attention", default="rsa", help="attention preset to adopt (sparseformer presets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.attention.KEY=VALUE",
                   help="change the preset (repeatable), e.g. --set=model.attention.selection.top_k=8")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps of stage 2")
    p.add_argument("--max-metric-drop", type=float, default=1.0,
                   help="largest loss of the task metric for 'go': points of accuracy or BLEU, percent of perplexity")
    p.add_argument("--min-speedup", type=float, default=2.0, help="smallest speed-up for 'go', at the data's length")
    p.add_argument("--speedup", choices=["latency", "throughput"], default="latency",
                   help="what the speed-up threshold reads: batch-1 latency or throughput at the best batch size")
    p.add_argument("--lengths", type=_ints, default=(), help="stage 3 lengths (default: 2x and 4x the data's length)")
    p.add_argument("--price-per-hour", type=float, default=None, help="machine price per hour, for the cost of predictions")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 8), help="throughput is measured at these batch sizes")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--sample", type=int, default=256, help="test examples probed for fidelity and agreement")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="stage 2's constant learning rate (default: a quarter of the teacher's)")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak memory (saves a JAX start per measurement)")
    a = p.parse_args(argv)
    options = AdoptOptions(
        teacher=a.teacher, out=a.out, attention=a.attention, overrides=tuple(a.overrides), steps=a.steps,
        max_metric_drop=a.max_metric_drop, min_speedup=a.min_speedup, speedup=a.speedup, lengths=a.lengths,
        price_per_hour=a.price_per_hour, batch_sizes=a.batch_sizes, repeats=a.repeats, sample=a.sample,
        learning_rate=a.learning_rate, distill_weight=a.distill_weight, distill_temperature=a.distill_temperature,
        rss=not a.no_rss,
    )
    from sparseformer.adopt import adopt
    from sparseformer.adopt.stages import check_options

    prog = "sparseformer adopt"
    try:
        check_options(options)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    try:
        adopt(options, log=lambda msg: print(f"adopt: {msg}", flush=True))
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
