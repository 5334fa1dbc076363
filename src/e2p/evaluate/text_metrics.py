"""Text overlap for the evaluation loop: :func:`rouge`, the mean ROUGE-1 / ROUGE-2 / ROUGE-L F1 over (prediction,
reference) pairs (``rouge-score``), in [0, 1]. (Identification of generations is `identification.py`.)"""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)

Refs = Sequence[str] | Sequence[Sequence[str]]


def _pairs(preds: Sequence[str], refs: Refs) -> tuple[list[str], list[list[str]]]:
    if isinstance(preds, str) or isinstance(refs, str):
        raise ValueError("preds and refs must be lists of strings (one per example), not a single string")
    preds = list(preds)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: pass one reference (or list) per prediction")
    if not preds:
        raise ValueError("no predictions to score")
    multi = [[r] if isinstance(r, str) else list(r) for r in refs]
    if any(not r for r in multi):
        raise ValueError("every prediction needs at least one reference")
    return [p or "" for p in preds], multi


def rouge(preds: Sequence[str], refs: Refs, use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE F1 over examples: ``{"rouge1", "rouge2", "rougeL"}``, each in [0, 1].

    ROUGE-n F1 is the harmonic mean of n-gram precision and recall of the prediction against the reference;
    ROUGE-L uses the longest common subsequence (sentence level, not summary-level rougeLsum). Tokens are
    lower-cased alphanumeric words, Porter-stemmed when `use_stemmer`. A reference may be a list of strings
    (several references): the best-scoring one counts, per metric.
    """
    from rouge_score import rouge_scorer

    preds, multi = _pairs(preds, refs)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    totals = dict.fromkeys(keys, 0.0)
    for p, rs in zip(preds, multi):
        for k in keys:
            totals[k] += max(scorer.score(r, p)[k].fmeasure for r in rs)
    return {k: v / len(preds) for k, v in totals.items()}
