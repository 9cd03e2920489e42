"""Metrics: BLEU against sacrebleu's documented value, accuracy with masks, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparseformer.data import get_task
from sparseformer.data.metrics import accuracy, bleu, perplexity

HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_bleu_matches_sacrebleu_documented_value():
    score, signature = bleu(HYPS, REFS)
    assert score == pytest.approx(48.530827, abs=1e-5)  # the example in sacrebleu's README
    assert signature.startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    score1, signature1 = bleu(HYPS, REFS[0])  # one reference per hypothesis
    assert score1 == pytest.approx(45.067506, abs=1e-5) and signature1.startswith("nrefs:1|")
    assert bleu(REFS[0], REFS[0])[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="reference stream"):
        bleu(HYPS, REFS[0][:2])


def test_bleu_on_decoded_translations():
    task = get_task("synth_translate")
    from sparseformer.data import synth_translate as st

    ids = st.word_ids()
    pairs = st.generate(20, seed=0, min_len=8, max_len=63)
    refs = [task.decode([ids[w] for w in t] + [2, 0, 0]) for _, t in pairs]
    assert refs[0] == " ".join(pairs[0][1])
    assert bleu(refs, refs)[0] == pytest.approx(100.0)
    assert bleu([r.split(" ", 1)[1] for r in refs], refs)[0] < 100.0


def test_accuracy_and_perplexity():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = np.array([1, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    assert accuracy(logits, labels, mask=np.array([True, False, True])) == 1.0
    assert accuracy(np.array([[1, 2], [3, 4]]), np.array([[1, 0], [3, 0]]), mask=np.array([[1, 0], [1, 1]], bool)) == pytest.approx(2 / 3)
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="total_tokens"):
        perplexity(1.0, 0)
