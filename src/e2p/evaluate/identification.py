"""Identification of greedy generations: how often a reply points back to the user it was written for.

Two readers. `text`: all-MiniLM-L6-v2 cosine to each user's reference, the profile text where every example has
one (else the user's other targets). `text+style`: the same unit text vector joined with the reply's writing style
(e2p.data.headline_style: capitalisation, length, punctuation; z-scored on the references, one block of unit
norm), against each user's *other targets* (leave-one-out). The second exists because an uncased, mean-pooled
encoder cannot see what a prefix carrying the person changes most (Title Case against sentence case, length):
a reader that misses the signal would report it as absent. Intervals resample users, as everywhere in e2p.
Conditions generated for the same targets are also compared pairwise (`paired`: e2p's hits minus a control's on the
same generations, resampling users), which removes how identifiable each user is from the difference.
"""
from __future__ import annotations

import numpy as np

from .compare import resampled_users

READERS = ("text", "text+style")
PAIRED = (("e2p", "shuffled"), ("e2p", "shared_prefix"))  # the person against the controls that carry none


class TextStyleEncoder:
    """`encode(texts)`: [unit text vector ; style block], the style z-scored by `fit` (the references' own
    statistics, never the generations'), each text read as one short piece of writing."""

    def __init__(self, text_encoder):
        self.text = text_encoder
        self.mean = self.scale = None

    def _style(self, texts: list[str]) -> np.ndarray:
        from ..data.headline_style import style_features

        return np.stack([style_features([t]) for t in texts]) if texts else np.zeros((0, 12), np.float32)

    def fit(self, texts: list[str]) -> "TextStyleEncoder":
        rows = self._style(texts)
        self.mean, self.scale = rows.mean(0), np.maximum(rows.std(0), 1e-6)
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("TextStyleEncoder.fit(references) first: the style is scaled by the references")
        style = (self._style(texts) - self.mean) / self.scale / np.sqrt(len(self.mean))
        return np.concatenate([_unit(self.text.encode(texts)), style.astype(np.float32)], axis=1)


def identify(generations: dict[str, list[str]], examples: list, encoder, reader: str = "text",
             seed: int = 0) -> tuple[dict, dict]:
    """Per condition {"identification": accuracy, "identification_ci95": [lo, hi]} for `reader`, and what was
    measured (users, chance, generations, reference). Generation i belongs to examples[i]'s user; a user with one
    example has no leave-one-out reference and is left out."""
    if reader not in READERS:
        raise ValueError(f"unknown identification reader {reader!r}: one of {', '.join(READERS)}")
    n = len(next(iter(generations.values()), []))
    shown = examples[:n]
    users = sorted({ex.user for ex in examples})
    col = {u: i for i, u in enumerate(users)}
    profiles = reader == "text" and all(ex.profile_text for ex in examples)
    if reader == "text+style":
        encoder = TextStyleEncoder(encoder).fit([ex.target for ex in examples])
    if profiles:
        first: dict = {}
        for ex in examples:
            first.setdefault(ex.user, ex.profile_text)
        refs = _unit(encoder.encode([first[u] for u in users]))
        keep = list(range(n))
    else:
        targets = encoder.encode([ex.target for ex in examples])
        if reader == "text":
            targets = _unit(targets)
        sums = np.zeros((len(users), targets.shape[1]), np.float32)
        sizes = np.zeros(len(users))
        for ex, t in zip(examples, targets):
            sums[col[ex.user]] += t
            sizes[col[ex.user]] += 1
        keep = [i for i in range(n) if sizes[col[shown[i].user]] > 1]
        refs = np.stack([_unit(_without(sums, col[shown[i].user], targets[i])) for i in keep]) if keep else None
    own = np.array([col[shown[i].user] for i in keep], dtype=int)
    who = [shown[i].user for i in keep]
    out, hits_of = {}, {}
    for name, texts in generations.items():
        if not keep:
            out[name] = {"identification": float("nan"), "identification_ci95": [float("nan")] * 2}
            continue
        g = _unit(encoder.encode([texts[i] for i in keep]))
        # profile references are [U, D]; leave-one-out ones [N, U, D], the user's own never holding the target
        sim = g @ refs.T if profiles else np.einsum("nud,nd->nu", refs, g)
        hits = (sim.argmax(1) == own).astype(float)
        hits_of[name] = hits
        out[name] = {"identification": float(hits.mean()), "identification_ci95": user_interval(hits, who, seed)}
    info = {"users": len(users), "chance": 1 / len(users), "generations": len(keep), "reader": reader,
            "reference": "profile_text" if profiles else "the user's other targets",
            "paired": paired_identification(hits_of, who, seed),
            "generation_users": who, "hits": {name: h.astype(int).tolist() for name, h in hits_of.items()}}
    return out, info


def paired_identification(hits: dict[str, np.ndarray], users: list[str], seed: int = 0) -> dict:
    """For each (a, b) of PAIRED present: accuracy a minus b on the same generations, its 95% interval over users
    (the same draws for both), and how many users a identifies more often and less often than b."""
    out = {}
    for a, b in PAIRED:
        if a in hits and b in hits:  # filled only when some generation was scored
            diff = hits[a] - hits[b]
            per_user: dict = {}
            for u, d in zip(users, diff):
                per_user.setdefault(u, []).append(d)
            means = [float(np.mean(v)) for v in per_user.values()]
            out[f"{a}_vs_{b}"] = {"difference": float(diff.mean()), "ci95": user_interval(diff, users, seed),
                                  "users_higher": sum(m > 0 for m in means), "users_lower": sum(m < 0 for m in means),
                                  "users": len(means)}
    return out


def user_interval(values: np.ndarray, groups: list[str], seed: int = 0, n: int = 1000) -> list[float]:
    """95% percentile interval of the mean of `values`, resampling groups (users) with all their rows."""
    means = [values[pick].mean() for pick in resampled_users(groups, n, seed)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _without(sums: np.ndarray, row: int, vector: np.ndarray) -> np.ndarray:
    """`sums` with `vector` taken out of one user's row: that user's reference without the generated example."""
    out = sums.copy()
    out[row] -= vector
    return out


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
