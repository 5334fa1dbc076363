"""Text-overlap and persona-consistency metrics for the evaluation suite.

- :func:`rouge`: mean ROUGE-1 / ROUGE-2 / ROUGE-L F1 over (prediction, reference) pairs (``rouge-score``), in [0, 1].
- :func:`bleu`: corpus BLEU (``sacrebleu``, its default 13a tokenization and exponential smoothing), in [0, 100].
- :func:`persona_consistency`: how much closer a generated reply's embedding is to its own persona than to the
  other personas (mean margin, retrieval accuracy, mean rank, MRR).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..errors import EmbeddingError

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


def bleu(preds: Sequence[str], refs: Refs) -> float:
    """Corpus BLEU in [0, 100] (sacrebleu defaults: 13a tokenization, up to 4-grams, brevity penalty).

    Computed from n-gram counts pooled over the whole corpus, not averaged over sentences. A reference may
    be a list of strings; examples with fewer references than others are padded with their first one.
    """
    import sacrebleu

    preds, multi = _pairs(preds, refs)
    n_refs = max(len(r) for r in multi)
    streams = [[r[i] if i < len(r) else r[0] for r in multi] for i in range(n_refs)]
    return float(sacrebleu.corpus_bleu(preds, streams).score)


def _unit(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise EmbeddingError(f"{name} must be a 2-D [n, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise EmbeddingError(f"{name} has NaN or inf values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise EmbeddingError(f"{name} has {int((norms == 0).sum())} zero rows: cosine similarity is undefined")
    return x / norms


def persona_consistency(reply_embeddings, persona_embeddings, persona_index=None,
                        return_per_example: bool = False) -> dict:
    """Does a generated reply's embedding point to its own persona rather than to the others?

    reply_embeddings: [N, d], one row per generated reply. persona_embeddings: [P, d], one row per persona.
    persona_index: [N] ints, the row of each reply's own persona. When None, persona_embeddings must be
    aligned with the replies ([N, d], row i = reply i's own persona, the "own personas" form); identical rows
    are then merged first, so a persona repeated over several replies is one candidate, not several.

    With cosine similarities ``s_ij`` between reply i and persona j, and o = own persona of reply i:

    - ``margin``: mean over replies of ``s_io - mean_{j != o} s_ij`` (> 0: closer to own persona than average);
    - ``rank``: ``1 + #{j != o: s_ij > s_io} + 0.5 * #{j != o: s_ij == s_io}`` (ties share ranks);
      ``mean_rank`` averages it, ``mrr`` averages ``1 / rank``;
    - ``accuracy``: fraction of replies whose own persona is strictly the most similar (rank 1);
    - ``own_similarity`` / ``other_similarity``: the mean of ``s_io`` and of ``mean_{j != o} s_ij``;
    - ``chance_accuracy`` = 1 / P and ``chance_mean_rank`` = (P + 1) / 2, for reference.

    Returns floats (plus ``n`` and ``n_personas``); with `return_per_example`, also the arrays ``margins`` and
    ``ranks``.
    """
    r = _unit(reply_embeddings, "reply_embeddings")
    p = np.asarray(persona_embeddings, dtype=np.float64)
    if persona_index is None:
        if len(p) != len(r):
            raise EmbeddingError(f"{len(r)} replies but {len(p)} personas: pass persona_index, or one persona row "
                                 "per reply")
        p, index = np.unique(p, axis=0, return_inverse=True)
        index = np.asarray(index).reshape(-1)
    else:
        index = np.asarray(persona_index).reshape(-1)
        if len(index) != len(r):
            raise EmbeddingError(f"persona_index has {len(index)} entries for {len(r)} replies")
        if not np.issubdtype(index.dtype, np.integer) or len(p) == 0 or index.min() < 0 or index.max() >= len(p):
            raise EmbeddingError(f"persona_index must hold integer rows of persona_embeddings (0..{len(p) - 1})")
    p = _unit(p, "persona_embeddings")
    if r.shape[1] != p.shape[1]:
        raise EmbeddingError(f"reply embeddings are {r.shape[1]}-d but persona embeddings {p.shape[1]}-d: "
                             "embed both with the same encoder")
    n, n_p = len(r), len(p)
    if n_p < 2:
        raise EmbeddingError("persona consistency needs at least 2 distinct personas to compare against")
    s = r @ p.T
    rows = np.arange(n)
    own = s[rows, index]
    mask = np.ones_like(s, dtype=bool)
    mask[rows, index] = False
    others = np.where(mask, s, 0.0).sum(axis=1) / (n_p - 1)
    greater = ((s > own[:, None]) & mask).sum(axis=1)
    ties = ((s == own[:, None]) & mask).sum(axis=1)
    ranks = 1.0 + greater + 0.5 * ties
    margins = own - others
    out = {"margin": float(margins.mean()), "accuracy": float((ranks == 1.0).mean()),
           "mean_rank": float(ranks.mean()), "mrr": float((1.0 / ranks).mean()),
           "own_similarity": float(own.mean()), "other_similarity": float(others.mean()),
           "chance_accuracy": 1.0 / n_p, "chance_mean_rank": (n_p + 1) / 2.0, "n": n, "n_personas": n_p}
    if return_per_example:
        out["margins"], out["ranks"] = margins, ranks
    return out
