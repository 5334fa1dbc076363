import json

import numpy as np
import pytest

from e2p.data.behaviour import CONFIG_FILE, CoClickEncoder
from e2p.errors import ConfigError, DataError


def histories(n_users=30, seed=0):
    """Two taste clusters (news A* and B*) plus a few shared popular items."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_users):
        group = "A" if i % 2 == 0 else "B"
        picks = [f"{group}{j}" for j in rng.choice(15, size=6, replace=False)]
        out.append(picks + [f"P{j}" for j in rng.choice(3, size=1)])
    return out


@pytest.mark.parametrize("weighting", ["bm25", "tfidf", "binary"])
def test_fit_encode_shapes_and_clusters(weighting):
    h = histories()
    enc = CoClickEncoder(dim=4, weighting=weighting).fit(h)
    e = enc.encode(h)
    assert e.shape == (30, 4) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sims = e @ e.T
    same = np.add.outer(np.arange(30) % 2, np.arange(30) % 2) != 1
    np.fill_diagonal(same, False)
    diff = np.add.outer(np.arange(30) % 2, np.arange(30) % 2) == 1
    assert sims[same].mean() > sims[diff].mean() + 0.3


def test_fold_in_matches_fit_users_and_ignores_unknown():
    h = histories()
    enc = CoClickEncoder(dim=5).fit(h)
    fitted = enc.encode(h)
    new = enc.encode([list(reversed(h[3])) + ["UNSEEN1", "UNSEEN2"], h[7] + h[7]])
    np.testing.assert_allclose(new[0], fitted[3], atol=1e-6)
    np.testing.assert_allclose(new[1], fitted[7], atol=1e-6)


def test_empty_history_zero_or_raise():
    h = histories()
    enc = CoClickEncoder(dim=3).fit(h)
    e = enc.encode([["UNSEEN"], []])
    assert np.all(e == 0)
    strict = CoClickEncoder(dim=3, on_empty="raise").fit(h)
    with pytest.raises(DataError, match="no news ID known"):
        strict.encode([["UNSEEN"]])
    with pytest.raises(DataError, match="wrap a single history"):
        enc.encode(["A1", "A2"])


def test_deterministic_and_dim_clipped():
    h = histories()
    a = CoClickEncoder(dim=4).fit(h).encode(h)
    b = CoClickEncoder(dim=4).fit(list(h)).encode(h)
    np.testing.assert_array_equal(a, b)
    small = CoClickEncoder(dim=64).fit(h[:5])
    assert small.dim == 4 and small.encode(h[:5]).shape == (5, 4)


def test_save_load_roundtrip(tmp_path):
    h = histories()
    enc = CoClickEncoder(dim=4, weighting="tfidf").fit(h)
    enc.save_pretrained(tmp_path / "cc")
    assert not list((tmp_path / "cc").glob("*.pkl")) and not list((tmp_path / "cc").glob("*.bin"))
    cfg = json.loads((tmp_path / "cc" / CONFIG_FILE).read_text())
    assert cfg["item_ids"] == enc.item_ids and cfg["weighting"] == "tfidf"
    back = CoClickEncoder.from_pretrained(tmp_path / "cc")
    probe = h + [["A1", "B2", "UNSEEN"]]
    np.testing.assert_array_equal(back.encode(probe), enc.encode(probe))
    with pytest.raises(ConfigError, match="not a saved CoClickEncoder"):
        CoClickEncoder.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not fitted"):
        CoClickEncoder().encode([["A1"]])


@pytest.mark.parametrize("kind", ["als", "item2vec"])
def test_alternative_encoders_separate_tastes_and_round_trip(kind, tmp_path):
    from e2p.data.behaviour import click_encoder

    h = histories()
    enc = click_encoder(kind, dim=4).fit(h)
    e = enc.encode(h)
    assert e.shape == (30, 4) and np.isfinite(e).all()
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sims = e @ e.T
    same = (np.arange(30)[:, None] % 2) == (np.arange(30)[None, :] % 2)
    np.fill_diagonal(same, False)
    assert sims[same].mean() > sims[~same & ~np.eye(30, dtype=bool)].mean() + 0.3
    enc.save_pretrained(tmp_path / kind)
    back = CoClickEncoder.from_pretrained(tmp_path / kind)  # the base loader returns the saved kind
    assert type(back) is type(enc)
    np.testing.assert_allclose(back.encode(h), e, atol=1e-6)
    # a user outside the fit is folded in from their clicks alone: the same clicks give the same vector
    np.testing.assert_allclose(enc.encode([h[3] + ["never-seen"]]), e[3:4], atol=1e-5)


def test_als_fold_in_is_implicits_exact_user_solve():
    from implicit.cpu.als import AlternatingLeastSquares

    from e2p.data.behaviour import ALSEncoder

    h = histories()
    enc = ALSEncoder(dim=4).fit(h)
    x, lengths = enc._binary(h[:5])
    w = enc._weight(x, lengths).astype(np.float32).tocsr()
    ref = AlternatingLeastSquares(factors=4, regularization=enc.regularization, alpha=enc.alpha, use_cg=False)
    ref.item_factors = enc.item_factors
    np.testing.assert_allclose(enc._project(w), ref.recalculate_user(list(range(5)), w), rtol=1e-3, atol=1e-4)


def test_loading_one_kind_as_another_is_refused(tmp_path):
    from e2p.data.behaviour import ALSEncoder, Item2VecEncoder, click_encoder

    Item2VecEncoder(dim=3).fit(histories()).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="Item2VecEncoder"):
        ALSEncoder.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown behaviour encoder"):
        click_encoder("word2vec")
