"""Write the long-document classification dataset (JSON Lines) used to measure `sparseformer adopt`.

    python experiments/make_longdoc.py --out=data/longdoc [--num_train=8000] [--num_words=900]

See `sparseformer/data/longdoc.py` for what a document is; the README of experiments/ for what
was measured on it.
"""

from __future__ import annotations

import argparse
import sys

from sparseformer.data.longdoc import write_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for train.jsonl, dev.jsonl, test.jsonl")
    p.add_argument("--num_train", type=int, default=8000, help="training documents")
    p.add_argument("--num_eval", type=int, default=500, help="documents in dev and in test")
    p.add_argument("--num_words", type=int, default=960, help="words (and punctuation) per document")
    p.add_argument("--min_words", type=int, default=None,
                   help="training documents have min_words to num_words words, log-uniform (default: all num_words); dev and test num_words")
    p.add_argument("--num_facts", type=int, default=1, help="facts per document (one is asked about; more: decoys)")
    p.add_argument("--answer_region", type=float, default=0.25, help="facts lie in this leading share of the text")
    p.add_argument("--distractors", type=float, default=0.0, help="chance that a filler word is a status word")
    p.add_argument("--filler_words", type=int, default=None, help="distinct filler words (default: all of them)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = write_dataset(a.out, num_train=a.num_train, num_eval=a.num_eval, num_words=a.num_words,
                          min_words=a.min_words, num_facts=a.num_facts, answer_region=a.answer_region,
                          distractors=a.distractors, seed=a.seed,
                          **({"filler_words": a.filler_words} if a.filler_words else {}))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
