"""Identification by text and by text + writing style, with intervals over users (e2p.evaluate.identification)."""
from __future__ import annotations

import numpy as np
import pytest

from e2p.data.contract import Example
from e2p.evaluate.identification import TextStyleEncoder, identify, user_interval

TITLE = ["Stocks Rally As Markets Cheer Rate Cut", "City Council Approves New Park Budget",
         "Local Team Wins The Championship Again", "Storm Brings Heavy Rain To The Coast"]
LOWER = ["new study links coffee to longer life.", "school board delays vote on calendar.",
         "police seek driver after crash downtown.", "airline adds routes for the holidays."]


@pytest.fixture(scope="module")
def minilm():
    from e2p.data.encoders import TextEncoder

    return TextEncoder()


def test_the_style_reader_sees_case_that_the_uncased_encoder_cannot(minilm):
    """A Title-Case writer and a lower-case writer (with final periods), each replying with the same headline in
    their own style: all-MiniLM-L6-v2 is uncased, so by text the two replies are one, while text + style tells
    each reply's author, and swapping the replies makes it wrong every time."""
    examples = [Example("title", "hi", h) for h in TITLE] + [Example("lower", "hi", h) for h in LOWER]
    title, lower = "Weather Service Warns Of Cold Weekend", "weather service warns of cold weekend."
    replies = {"own style": [title] * 4 + [lower] * 4, "swapped": [lower] * 4 + [title] * 4}
    by_text, _ = identify(replies, examples, minilm, "text")
    by_style, info = identify(replies, examples, minilm, "text+style")
    assert by_text["own style"]["identification"] <= 0.5
    assert by_style["own style"]["identification"] == 1.0 and by_style["swapped"]["identification"] == 0.0
    assert info["reader"] == "text+style" and info["reference"] == "the user's other targets" and info["chance"] == 0.5
    assert by_style["own style"]["identification_ci95"] == [1.0, 1.0]


def test_the_style_encoder_refuses_to_read_before_it_is_fitted(minilm):
    with pytest.raises(RuntimeError, match="fit"):
        TextStyleEncoder(minilm).encode(["A Headline"])
    with pytest.raises(ValueError, match="text\\+style"):
        identify({"a": ["x"]}, [Example("u", "hi", "x")], minilm, "style only")


def test_the_interval_resamples_users_not_rows():
    # one user always right (10 rows), one always wrong (1 row): rows would say ~0.91 tightly; users say anything
    values = np.array([1.0] * 10 + [0.0])
    lo, hi = user_interval(values, ["a"] * 10 + ["b"], seed=0)
    assert lo == 0.0 and hi == 1.0
    assert user_interval(np.ones(6), list("aabbcc")) == [1.0, 1.0]


def test_paired_identification_compares_conditions_on_the_same_generations(minilm):
    """e2p's replies in each author's own style, the shuffled control's swapped: the paired difference is +1 for
    every user, with its interval over users, and each generation's hit is kept for re-analysis."""
    examples = [Example("title", "hi", h) for h in TITLE] + [Example("lower", "hi", h) for h in LOWER]
    title, lower = "Weather Service Warns Of Cold Weekend", "weather service warns of cold weekend."
    replies = {"e2p": [title] * 4 + [lower] * 4, "shuffled": [lower] * 4 + [title] * 4,
               "shared_prefix": [title] * 8}
    _, info = identify(replies, examples, minilm, "text+style")
    vs_shuffled, vs_shared = info["paired"]["e2p_vs_shuffled"], info["paired"]["e2p_vs_shared_prefix"]
    assert vs_shuffled["difference"] == 1.0 and vs_shuffled["ci95"] == [1.0, 1.0]
    assert vs_shuffled["users_higher"] == 2 and vs_shuffled["users_lower"] == 0
    assert vs_shared["difference"] == 0.5 and vs_shared["users_higher"] == 1 and vs_shared["users_lower"] == 0
    assert info["hits"]["shuffled"] == [0] * 8 and len(info["generation_users"]) == 8
    assert "e2p_vs_shuffled" not in identify({"e2p": replies["e2p"]}, examples, minilm, "text+style")[1]["paired"]
