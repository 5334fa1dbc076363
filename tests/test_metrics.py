import numpy as np
import pytest

from e2p.errors import EmbeddingError
from e2p.evaluate.text_metrics import bleu, persona_consistency, rouge


def test_rouge_identical_and_disjoint():
    s = ["the cat sat on the mat", "dogs love long walks in the park"]
    assert rouge(s, s) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge(["alpha beta"], ["gamma delta"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    r = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 1, R = 3/6
    assert rouge(["a b c"], [["x y", "a b c"]])["rouge1"] == 1.0  # best of several references
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"])


def test_bleu_identical_and_partial():
    s = ["the quick brown fox jumps over the lazy dog", "a second sentence that is long enough"]
    assert bleu(s, s) == pytest.approx(100.0)
    assert bleu(["completely unrelated words here now"], ["the quick brown fox jumps"]) < 5
    assert 0 < bleu(["the quick brown fox jumps over a dog"], s[:1]) < 100


def test_persona_consistency_prefers_own():
    rng = np.random.default_rng(0)
    personas = rng.standard_normal((4, 8))
    index = np.array([0, 1, 2, 3, 0, 1])
    replies = personas[index] + 0.1 * rng.standard_normal((6, 8))
    out = persona_consistency(replies, personas, index)
    assert out["accuracy"] == 1.0 and out["mean_rank"] == 1.0 and out["mrr"] == 1.0
    assert out["margin"] > 0.5 and out["n"] == 6 and out["n_personas"] == 4
    assert out["chance_accuracy"] == 0.25
    # aligned "own persona per reply" form: repeated personas are merged into one candidate
    aligned = persona_consistency(replies, personas[index])
    assert aligned["n_personas"] == 4 and aligned["margin"] == pytest.approx(out["margin"])
    # replies pointing at the wrong persona rank it last
    worst = persona_consistency(-personas, personas, np.arange(4), return_per_example=True)
    assert worst["margin"] < 0 and worst["accuracy"] == 0.0


def test_persona_consistency_known_values_and_errors():
    personas = np.eye(3)
    replies = np.array([[1.0, 0, 0], [1.0, 1.0, 0]])  # second reply ties between persona 0 and 1
    out = persona_consistency(replies, personas, [0, 1], return_per_example=True)
    np.testing.assert_allclose(out["ranks"], [1.0, 1.5])
    np.testing.assert_allclose(out["margins"], [1.0, np.sqrt(0.5) - np.sqrt(0.5) / 2])
    assert out["accuracy"] == 0.5
    with pytest.raises(EmbeddingError, match="zero rows"):
        persona_consistency(np.zeros((1, 3)), personas, [0])
    with pytest.raises(EmbeddingError, match="same encoder"):
        persona_consistency(np.ones((1, 4)), personas, [0])
    with pytest.raises(EmbeddingError, match="persona_index"):
        persona_consistency(replies, personas, [0, 5])
