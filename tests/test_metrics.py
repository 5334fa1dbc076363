import pytest

from e2p.evaluate.text_metrics import rouge


def test_rouge_identical_and_disjoint():
    s = ["the cat sat on the mat", "dogs love long walks in the park"]
    assert rouge(s, s) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge(["alpha beta"], ["gamma delta"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    r = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 1, R = 3/6
    assert rouge(["a b c"], [["x y", "a b c"]])["rouge1"] == 1.0  # best of several references
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"])
