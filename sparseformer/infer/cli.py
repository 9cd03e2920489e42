"""`sparseformer predict` and `sparseformer export`: parse flags, then call the library.

    sparseformer predict --workdir=runs/x --input=in.jsonl --output=out.jsonl [--batch-size=32]
    sparseformer predict --artifact=exported/x --input=in.jsonl --output=out.jsonl
    sparseformer export --workdir=runs/x --out=exported/x [--platforms=cpu,cuda]
"""

from __future__ import annotations

import argparse
import sys


def _buckets(text: str | None) -> list[int] | None:
    """`--buckets`: None (automatic), or comma-separated lengths; `max`: pad everything to max_len."""
    if not text:
        return None
    if text == "max":
        return [-1]
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--buckets: {text!r} is not comma-separated integers or 'max'") from None


def _resolve(buckets: list[int] | None, max_len: int) -> list[int] | None:
    return [max_len] if buckets == [-1] else buckets


PREDICT_EPILOG = """input: one JSON object per line with the task's text fields: "input" (classifiers, language
models), "source" (translation), "input1" and "input2" (dual encoders). Each output line is the
input object plus "prediction" (the label, or text) and, for classifiers, "probabilities".

examples:
  sparseformer predict --workdir=runs/listops --input=in.jsonl --output=out.jsonl
  sparseformer predict --workdir=runs/translate --input=src.jsonl --output=out.jsonl --beam-size=4
  sparseformer predict --artifact=exported/listops --input=in.jsonl --output=out.jsonl --skip-bad
"""


def _add_decoding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam-size", type=int, default=None, help="translation: beam search width (default: the run's config)")
    p.add_argument("--decode-len-ratio", type=float, default=None, help="translation: end each output (EOS) by "
                   "RATIO x its source's tokens + --decode-len-extra, 0 for max_target_len only (default: the run's config)")
    p.add_argument("--decode-len-extra", type=int, default=None, help="translation: see --decode-len-ratio")


def _decoding(args: argparse.Namespace) -> dict:
    from sparseformer.infer.predict import DECODING_KEYS

    return {k: getattr(args, k) for k in DECODING_KEYS}


def predict_main(argv: list[str]) -> int:
    from sparseformer.infer.artifact import add_predict_flags, run_and_report

    p = argparse.ArgumentParser(
        prog="sparseformer predict", epilog=PREDICT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict with a trained run (its latest checkpoint) or an exported directory, in length-bucketed "
        "batches; output lines in input order, written to a temporary file and renamed at the end.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a run directory (config.json + checkpoints/)")
    src.add_argument("--artifact", help="a directory written by `sparseformer export`")
    p.add_argument("--input", required=True, help="JSON Lines input ('-' for standard input)")
    p.add_argument("--output", required=True, help="JSON Lines output")
    _add_decoding_flags(p)
    p.add_argument("--buckets", default=None, help="--workdir: comma-separated bucket lengths ending at max_len, or "
                   "'max' to pad every input to max_len (default: powers of two the attention can run)")
    add_predict_flags(p)
    args = p.parse_args(argv)
    try:
        if args.artifact:
            if any(v is not None for v in _decoding(args).values()) or args.buckets:
                raise ValueError("--beam-size, --decode-len-* and --buckets are fixed when exporting; pass them to "
                                 "`sparseformer export`")
            from sparseformer.infer.artifact import ArtifactBackend

            backend = ArtifactBackend(args.artifact)
        else:
            from sparseformer.infer import model as model_lib
            from sparseformer.infer import predict as predict_lib

            m = predict_lib.with_decoding(model_lib.trained_model(args.workdir), **_decoding(args))
            backend = predict_lib.ModelBackend(m, buckets=_resolve(_buckets(args.buckets), int(m.config.model.max_len)))
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"sparseformer predict: {e}", file=sys.stderr)
        return 2
    return run_and_report(backend, args, "sparseformer predict")


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sparseformer export",
        description="Serialize a trained run's inference with jax.export (one function per bucket length, symbolic "
        "batch size), with its vocabulary, manifest.json and run.py: `python OUT/run.py IN.jsonl OUT.jsonl` then "
        "needs only Python, jax and numpy.",
    )
    p.add_argument("--workdir", required=True, help="a run directory (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="the export directory (replaced if it holds an earlier export)")
    p.add_argument("--platforms", default="cpu", help="comma-separated: cpu, cuda, rocm, tpu (one artifact runs on each)")
    p.add_argument("--buckets", default=None, help="comma-separated bucket lengths ending at max_len, or 'max'")
    _add_decoding_flags(p)
    args = p.parse_args(argv)
    try:
        from sparseformer.infer import export as export_lib
        from sparseformer.infer import model as model_lib
        from sparseformer.infer import predict as predict_lib

        m = predict_lib.with_decoding(model_lib.trained_model(args.workdir), **_decoding(args))
        buckets = _resolve(_buckets(args.buckets), int(m.config.model.max_len))
        manifest = export_lib.export_model(m, args.out, platforms=args.platforms.split(","), buckets=buckets,
                                           source=args.workdir)
    except (FileNotFoundError, FileExistsError, ValueError, NotImplementedError) as e:
        print(f"sparseformer export: {e}", file=sys.stderr)
        return 2
    print(f"sparseformer export: {manifest['task']} ({manifest['kind']}, attention {manifest['attention']}, step "
          f"{manifest['step']}) -> {args.out}: buckets {','.join(map(str, manifest['buckets']))}, platforms "
          f"{','.join(manifest['platforms'])}; run it with: python {args.out}/run.py IN.jsonl OUT.jsonl")
    return 0
