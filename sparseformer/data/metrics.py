"""Task metrics: accuracy, corpus BLEU through sacrebleu, perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of `predictions == labels` over the entries where `mask` is True (all if None).

    `predictions` may be logits `[..., C]` (then argmax is taken) or class ids shaped like `labels`.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"accuracy: predictions {predictions.shape} and labels {labels.shape} differ")
    correct = predictions == labels
    if mask is None:
        return float(correct.mean()) if correct.size else 0.0
    mask = np.broadcast_to(np.asarray(mask, bool), correct.shape)
    total = int(mask.sum())
    return float(correct[mask].sum() / total) if total else 0.0


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> tuple[float, str]:
    """Corpus BLEU of detokenized `hypotheses` and the sacrebleu signature, e.g.
    `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`.

    `references` is one reference per hypothesis (a list of strings) or several reference streams
    (a list of lists of strings, each as long as `hypotheses`).
    """
    from sacrebleu.metrics import BLEU

    hypotheses = list(hypotheses)
    refs = list(references)
    streams = [refs] if not refs or isinstance(refs[0], str) else [list(r) for r in refs]
    for stream in streams:
        if len(stream) != len(hypotheses):
            raise ValueError(f"bleu: {len(hypotheses)} hypotheses but a reference stream of {len(stream)}")
    metric = BLEU()
    score = metric.corpus_score(hypotheses, streams)
    return float(score.score), str(metric.get_signature())


def perplexity(total_nll: float, total_tokens: float) -> float:
    """`exp(total_nll / total_tokens)`: the perplexity of summed negative log-likelihoods (nats)."""
    if total_tokens <= 0:
        raise ValueError(f"perplexity: total_tokens must be positive, got {total_tokens}")
    return float(math.exp(total_nll / total_tokens))
