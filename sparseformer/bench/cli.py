"""`sparseformer bench`: attention presets against `jax.nn.dot_product_attention`, across lengths.

Example:
  sparseformer bench --quick --out=bench
  sparseformer bench --presets=dense,local,rsa --lengths=1024,2048,4096,8192,16384 --out=bench_full
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

QUICK = {"lengths": (1024, 2048), "repeats": 3, "rss": "none"}
"""What `--quick` changes (each still overridable by its own flag): under about two minutes on 2 CPU
cores, where compiling the 14 programs per length takes most of the time (a fresh-process memory
probe costs a JAX import and a compile more per case, so quick leaves them out: `--rss=largest`)."""


def _parser() -> argparse.ArgumentParser:
    from sparseformer.bench.runner import RSS_MODES, BenchOptions

    d = BenchOptions()
    p = argparse.ArgumentParser(
        prog="sparseformer bench",
        description="Speed, memory, FLOPs and fidelity of attention presets against dense attention "
        "(jax.nn.dot_product_attention), forward and forward+backward, across sequence lengths. "
        "Writes OUT/bench.json, OUT/bench.md and OUT/bench.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--presets", default=",".join(d.presets), help="comma-separated; 'dense' is the jax.nn baseline, 'dense_pallas' JAX's Pallas flash attention (GPU), 'PRESET/exact' a preset's selection alone, 'PRESET/scan' (masked, pallas) the preset on that exact kernel; any with ';section.field=value' overrides")
    p.add_argument("--lengths", default=None, help=f"comma-separated token counts (default {','.join(map(str, d.lengths))}; --quick: {','.join(map(str, QUICK['lengths']))})")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--causal", action="store_true", help="causal attention (default bidirectional)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=None, help=f"timed rounds (default {d.repeats}; --quick: {QUICK['repeats']})")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls per case after compilation")
    p.add_argument("--passes", default=",".join(d.passes), help="fwd, fwd_bwd")
    p.add_argument("--rss", default=None, choices=RSS_MODES, help=f"which cases get a fresh-process peak-memory probe (default {d.rss}; --quick: {QUICK['rss']})")
    p.add_argument("--no-fidelity", action="store_true", help="skip the fidelity measurement (error against exact attention)")
    p.add_argument("--fidelity-seed", type=int, default=None, help="seed of every fidelity input (default: each kind's own; "
                   "sparseformer.bench.inputs.HELD_OUT_SEEDS were kept aside to check that nothing was tuned to the defaults)")
    p.add_argument("--dense-impl", default=d.dense_impl, choices=["auto", "xla", "cudnn"], help="auto: cuDNN on a GPU for 16-bit inputs")
    p.add_argument("--quick", action="store_true", help="small lengths and fewer rounds: under about two minutes on this CPU")
    p.add_argument("--compile-only", action="store_true", help="compile every case and record XLA's compiled memory and FLOPs only (no timing, fidelity or probes): the memory table at lengths too large to run")
    return p


def options_from_args(args: argparse.Namespace) -> "BenchOptions":  # noqa: F821 (imported lazily)
    """Flags -> BenchOptions, applying `--quick` defaults to what was not given explicitly."""
    from sparseformer.bench.runner import BenchOptions, parse_csv

    d = BenchOptions()
    quick = QUICK if args.quick else {}
    return BenchOptions(
        presets=parse_csv(args.presets),
        lengths=parse_csv(args.lengths, int) if args.lengths else quick.get("lengths", d.lengths),
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        causal=args.causal,
        dtype=args.dtype,
        repeats=args.repeats if args.repeats is not None else quick.get("repeats", d.repeats),
        warmup=args.warmup,
        passes=parse_csv(args.passes),
        rss=args.rss or quick.get("rss", d.rss),
        fidelity=not args.no_fidelity,
        fidelity_seed=args.fidelity_seed,
        dense_impl=args.dense_impl,
        compile_only=args.compile_only,
    )


def bench_main(argv: list[str]) -> int:
    """Parse flags, run the benchmark, write the three files; 1 if any case failed, 2 on bad flags."""
    if any(a == "--model" or a.startswith("--model=") for a in argv):  # trained models: sparseformer.infer.bench
        from sparseformer.infer.bench import bench_models_main

        return bench_models_main(argv)
    args = _parser().parse_args(argv)
    from sparseformer.bench import methods, report, runner

    options = options_from_args(args)
    try:
        runner.validate_options(options, methods.known_names())
    except ValueError as e:
        print(f"sparseformer bench: {e}", file=sys.stderr)
        return 2
    command = "sparseformer bench " + " ".join(shlex.quote(a) for a in argv)
    bench = runner.run(options, checkpoint=lambda partial: report.write_json(dict(partial, command=command), args.out))
    paths = report.write(bench, args.out, command=command)
    print(report.markdown(bench, command=command))
    print("wrote " + ", ".join(paths.values()))
    failed = [r for r in bench["results"] if r.get("error")]
    for r in failed:
        print(f"error: {r['preset']} at {r['length']} ({r['pass']}): {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def options_dict(argv: list[str]) -> dict:
    """The options `argv` resolves to, as a dict (for tests and logs)."""
    return dataclasses.asdict(options_from_args(_parser().parse_args(argv)))
