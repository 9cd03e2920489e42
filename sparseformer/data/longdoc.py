"""A long-document classification dataset written as JSON Lines files, for trying `adopt` on files.

Each document is a project report: filler sentences from a small English vocabulary, a few facts
("project birch was delayed .") near its start, and a question at its end ("question : what
happened to project birch ?"). The label is the status of the project asked about: four classes.
The other facts are decoys (other projects, any status), so the answer is neither a keyword count
nor anything near the question: it is `answer_region` of the document away at least, and only
attention that reaches from the question back to the fact finds it (a local window does not).

    python experiments/make_longdoc.py --out=data/longdoc              # train/dev/test .jsonl
    sparseformer train --config=configs/files.py:kind=classify,attention=dense,scale=small \
        --config.data.train_file=data/longdoc/train.jsonl --config.data.eval_file=data/longdoc/dev.jsonl \
        --config.data.test_file=data/longdoc/test.jsonl --workdir=runs/longdoc_dense

The output is a pure function of the arguments (numpy's PCG64 from the seed and the split).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

STATUSES = ("approved", "cancelled", "delayed", "finished")
PROJECTS = (
    "alder", "birch", "cedar", "elm", "fir", "hazel", "larch", "maple",
    "oak", "pine", "rowan", "spruce", "willow", "yew", "ash", "beech",
)  # fmt: skip
FILLER = tuple("""
the a team met on monday tuesday and talked about budget plans for next quarter while staff
reviewed costs sales numbers looked steady although several customers asked questions regarding
delivery times our office moved two desks near window because light seemed better there everyone
agreed that coffee machine needs repair soon meanwhile new hires finished training week with good
feedback from mentors managers shared slides describing goals risks timelines dependencies vendors
contracts hiring marketing research support travel weather lunch parking printer network update
""".split())  # fmt: skip


def document(rng: np.random.Generator, num_words: int, num_facts: int, answer_region: float,
             distractors: float = 0.0, filler: tuple[str, ...] = FILLER) -> tuple[str, str]:
    """One report of about `num_words` words and its label (the queried project's status)."""
    projects = rng.choice(len(PROJECTS), size=num_facts, replace=False)
    statuses = rng.integers(0, len(STATUSES), size=num_facts)
    asked = int(rng.integers(0, num_facts))
    question = ["question", ":", "what", "happened", "to", "project", PROJECTS[projects[asked]], "?"]
    # filler sentences of 5-12 words and a full stop, until the document is long enough
    lengths = rng.integers(5, 13, size=max(1, num_words // 5))
    count = int(np.searchsorted(np.cumsum(lengths + 1), max(1, num_words - len(question)))) + 1
    lengths = lengths[:count]
    words = rng.choice(filler, size=int(lengths.sum()))
    if distractors:  # status words outside any fact
        swap = rng.random(words.shape[0]) < distractors
        words = np.where(swap, rng.choice(STATUSES, size=words.shape[0]), words)
    cuts = np.cumsum(lengths)[:-1]
    body = [[*map(str, part), "."] for part in np.split(words, cuts)]
    # the facts replace sentences in the leading `answer_region` of the body, in distinct places
    region = max(num_facts, int(len(body) * answer_region))
    if len(body) < region:
        body += [["."]] * (region - len(body))
    slots = np.sort(rng.choice(region, size=num_facts, replace=False))
    for slot, p, st in zip(slots, projects, statuses):
        body[slot] = ["project", PROJECTS[p], "was", STATUSES[st], "."]
    text = [w for sent in body for w in sent] + question
    return " ".join(text), STATUSES[statuses[asked]]


def write_split(path: str | Path, num_docs: int, *, seed: int, split: int, num_words: int, num_facts: int,
                answer_region: float, distractors: float, min_words: int | None = None,
                filler_words: int = len(FILLER)) -> Path:
    """Write `num_docs` documents as JSON Lines (`text`, `label`) to `path` (atomically); their
    lengths are log-uniform in `[min_words, num_words]` (all `num_words` by default)."""
    rng = np.random.Generator(np.random.PCG64([seed, split]))
    low = num_words if min_words is None else min_words
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            # log-uniform lengths: as many short documents (which teach where the answer is) as long ones
            n = int(round(np.exp(rng.uniform(np.log(low), np.log(num_words))))) if low < num_words else num_words
            text, label = document(rng, n, num_facts, answer_region, distractors, FILLER[:filler_words])
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    os.replace(tmp, path)
    return path


def write_dataset(out: str | Path, *, num_train: int = 8000, num_eval: int = 500, num_words: int = 960,
                  min_words: int | None = None, num_facts: int = 1, answer_region: float = 0.25,
                  distractors: float = 0.0, filler_words: int = len(FILLER), seed: int = 0) -> dict[str, Path]:
    """`train.jsonl`, `dev.jsonl` and `test.jsonl` in `out`. Training documents have
    `min_words`-`num_words` words (default: all `num_words`); dev and test all have `num_words`."""
    if not 1 <= num_facts <= len(PROJECTS):
        raise ValueError(f"num_facts: {num_facts} must be in [1, {len(PROJECTS)}]")
    if not 0.0 < answer_region <= 1.0:
        raise ValueError(f"answer_region: {answer_region} must be in (0, 1]")
    if not 0.0 <= distractors < 1.0:
        raise ValueError(f"distractors: {distractors} must be in [0, 1)")
    if not 1 <= filler_words <= len(FILLER):
        raise ValueError(f"filler_words: {filler_words} must be in [1, {len(FILLER)}]")
    if min_words is not None and not 1 <= min_words <= num_words:
        raise ValueError(f"min_words: {min_words} must be in [1, num_words={num_words}]")
    sizes = {"train": num_train, "dev": num_eval, "test": num_eval}
    return {name: write_split(Path(out) / f"{name}.jsonl", n, seed=seed, split=i, num_words=num_words,
                              num_facts=num_facts, answer_region=answer_region, distractors=distractors,
                              min_words=min_words if name == "train" else None, filler_words=filler_words)
            for i, (name, n) in enumerate(sizes.items())}
