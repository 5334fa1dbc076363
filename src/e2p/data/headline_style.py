"""How a user writes headlines, as a few numbers from their history: the part of a person a text encoder misses.

all-MiniLM-L6-v2 is uncased and mean pooling averages length away, yet on PENS the share of capitalised words
(sentence case vs Title Case) and the headline length are the most stable traits of a writer: across the
training pool a user's history predicts their held-out headlines' capitalisation with r = 0.96 and their length
with r = 0.91 (docs/studies.md). These features are computed from the history alone, like the text profile.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

STYLE_FEATURES = ("capitalised_words", "all_caps_words", "words_per_headline", "characters_per_word", "question",
                  "colon", "quote", "digit", "exclamation", "comma", "dash", "final_period")

_QUOTES = re.compile(r"[\"'\u2018\u2019\u201c\u201d]")


# the sums the features are ratios of (so a live profile can keep them as running sums, e2p.data.live_profile):
# headlines, words, words starting with a letter, of those capitalised and all caps, characters of words, then one
# count per headline flag, in STYLE_FEATURES' order from "question" on
STYLE_COUNTERS = ("headlines", "words", "alpha_words", "capitalised", "all_caps", "word_characters",
                  "question", "colon", "quote", "digit", "exclamation", "comma", "dash", "final_period")


def style_counts(text: str) -> np.ndarray:
    """[len(STYLE_COUNTERS)] float64: one headline's contribution to the sums."""
    words = text.split()
    alpha = [w for w in words if w[:1].isalpha()]
    flags = ["?" in text, ":" in text, bool(_QUOTES.search(text)), any(c.isdigit() for c in text), "!" in text,
             "," in text, "-" in text or "\u2013" in text or "\u2014" in text, text.rstrip().endswith(".")]
    return np.asarray([1, len(words), len(alpha), sum(w[0].isupper() for w in alpha),
                       sum(len(w) > 1 and w.isupper() for w in alpha), sum(len(w) for w in words), *flags],
                      dtype=np.float64)


def style_from_counts(c: np.ndarray) -> np.ndarray:
    """The summed counters -> [len(STYLE_FEATURES)] float64: shares and means (zeros for no headline)."""
    heads, words, alpha = c[0], c[1], c[2]
    if heads <= 0:
        return np.zeros(len(STYLE_FEATURES), dtype=np.float64)
    ratio = lambda a, b: a / b if b > 0 else 0.0
    return np.asarray([ratio(c[3], alpha), ratio(c[4], alpha), words / heads, ratio(c[5], words),
                       *(c[6:] / heads)], dtype=np.float64)


def style_features(headlines: Sequence[str]) -> np.ndarray:
    """[len(STYLE_FEATURES)] float32: shares and means over the headlines (zeros for none)."""
    counts = sum((style_counts(h) for h in headlines), np.zeros(len(STYLE_COUNTERS)))
    return style_from_counts(counts).astype(np.float32)


class StyleScaler:
    """z-scores fitted on the training pool's users only, so test users are scaled by what training saw."""

    def __init__(self, rows: np.ndarray):
        self.mean = rows.mean(0)
        self.scale = np.maximum(rows.std(0), 1e-6)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        # one block of unit expected norm, so it weighs like the unit text vector it is joined to
        return ((rows - self.mean) / self.scale / np.sqrt(rows.shape[1])).astype(np.float32)

    def to_dict(self) -> dict:
        return {"features": list(STYLE_FEATURES), "mean": self.mean.tolist(), "scale": self.scale.tolist()}
