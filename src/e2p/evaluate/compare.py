"""Comparisons between conditions scored on the same examples: paired intervals over users, identification.

Every interval resamples *users* (all of a user's examples together), because users, not examples, are what a
new deployment draws anew.
"""
from __future__ import annotations

import math

import numpy as np


def resampled_users(groups: list[str], n: int = 1000, seed: int = 0):
    """`n` bootstrap draws of row indices: users (groups) drawn with replacement, each with all of their rows."""
    rng = np.random.default_rng(seed)
    uniq = sorted(set(groups))
    members = {g: [] for g in uniq}
    for i, g in enumerate(groups):
        members[g].append(i)
    idx_lists = [np.array(members[g]) for g in uniq]
    for _ in range(n):
        yield np.concatenate([idx_lists[j] for j in rng.integers(0, len(uniq), len(uniq))])


def paired_bootstrap(a: np.ndarray, b: np.ndarray, counts: np.ndarray, groups: list[str], n: int = 1000, seed: int = 0):
    """Relative perplexity change b->a ((ppl_a / ppl_b) - 1) with a 95% interval, resampling people."""
    diffs = [math.exp((a[pick].sum() - b[pick].sum()) / counts[pick].sum()) - 1
             for pick in resampled_users(groups, n, seed)]
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def compare(per_condition: dict[str, np.ndarray], counts: np.ndarray, users: list[str],
            pairs: list[tuple[str, str]], seed: int = 0) -> dict:
    """For each (a, b) pair present: the relative perplexity change a vs b and its 95% interval over users."""
    out = {}
    for a, b in pairs:
        if a in per_condition and b in per_condition:
            change = math.exp((per_condition[a].sum() - per_condition[b].sum()) / counts.sum()) - 1
            lo, hi = paired_bootstrap(per_condition[a], per_condition[b], counts, users, seed=seed)
            out[f"{a}_vs_{b}"] = {"relative_change": change, "ci95": [lo, hi]}
    return out


# --- membership inference (e2p audit): how well scores tell members from non-members ---------------------------
def auc(member_scores, nonmember_scores) -> float:
    """P(a member's score > a non-member's), ties counting half (the Mann-Whitney AUC): 0.5 is chance."""
    m = np.asarray(member_scores, float)
    n = np.asarray(nonmember_scores, float)
    if not len(m) or not len(n):
        return float("nan")
    allv = np.concatenate([m, n])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        tie = allv == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def auc_interval(member_scores, nonmember_scores, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUC, resampling members and non-members (users) with replacement."""
    rng = np.random.default_rng(seed)
    m, u = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if not len(m) or not len(u):
        return float("nan"), float("nan")
    draws = [auc(m[rng.integers(0, len(m), len(m))], u[rng.integers(0, len(u), len(u))]) for _ in range(n)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over every threshold, members the positives."""
    m, u = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    thresholds = np.unique(np.concatenate([m, u, [np.inf]]))[::-1]
    tpr = np.array([(m >= t).mean() for t in thresholds])
    fpr = np.array([(u >= t).mean() for t in thresholds])
    return fpr, tpr
