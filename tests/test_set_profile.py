"""A user as a set of items: the projector's attention pooling (config.set_items) reads the one item that matters,
where one averaged vector cannot; the set is order-free, empty items are masked, an empty set is the average person."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from e2p import Projector
from e2p.errors import ConfigError
from e2p.model import new_config

N, D = 10, 16  # items per set, item size: dim 0 flags the item that matters, dims 1.. are its value


def _sets(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets of N random items, exactly one flagged; -> ([B, N, D] items, [B, D - 1] the flagged item's value)."""
    items = torch.randn(batch, N, D, generator=gen)
    items[..., 0] = 0.0
    pick = torch.randint(0, N, (batch,), generator=gen)
    items[torch.arange(batch), pick, 0] = 3.0
    return items, items[torch.arange(batch), pick, 1:]


def _fit(projector: Projector, embed, target_map: torch.Tensor, steps: int = 400) -> float:
    """Train the projector's token to point where `target_map` sends the flagged value; -> mean cosine on new sets."""
    opt = torch.optim.Adam(projector.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        items, value = _sets(64, gen)
        out = projector(embed(items))[:, 0]
        loss = 1 - torch.nn.functional.cosine_similarity(out, value @ target_map).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    projector.eval()
    items, value = _sets(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(torch.nn.functional.cosine_similarity(projector(embed(items))[:, 0], value @ target_map).mean())


def test_a_set_profile_reads_the_item_that_matters_where_the_mean_cannot(tiny):
    target_map = torch.randn(D - 1, tiny.hidden_size, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    as_set = Projector(new_config(tiny, embedding_dim=N * D, set_items=N, dropout=0.0, hidden_dims=[128]))
    as_mean = Projector(new_config(tiny, embedding_dim=D, dropout=0.0, hidden_dims=[128]))
    set_score = _fit(as_set, lambda items: items.reshape(len(items), -1), target_map)
    mean_score = _fit(as_mean, lambda items: items.mean(1), target_map)
    print(f"cosine to the flagged item's target: set {set_score:.3f}, mean {mean_score:.3f}")
    assert set_score > 0.9 and mean_score < 0.6


def test_the_set_is_order_free_masks_empty_items_and_round_trips(tiny, tmp_path):
    torch.manual_seed(0)
    p = Projector(new_config(tiny, embedding_dim=N * D, set_items=N, dropout=0.0)).eval()
    torch.nn.init.normal_(p.mlp[-1].weight, std=0.3)
    items = torch.randn(2, N, D)
    items[:, 6:] = 0.0  # four empty items
    out = p(items.reshape(2, -1))
    shuffled = items[:, torch.tensor([3, 0, 5, 1, 2, 4, 6, 7, 8, 9])]
    assert torch.allclose(p(shuffled.reshape(2, -1)), out, atol=1e-5)
    with torch.no_grad():
        _, weights = p.pool(items.reshape(2, -1))
    assert float(weights[..., 6:].abs().max()) == 0.0 and torch.allclose(weights.sum(-1), torch.ones(2, 1))
    empty = p(torch.zeros(1, N * D))
    assert torch.allclose(empty[0], p._normed(p.shared.unsqueeze(0))[0], atol=1e-6)  # no item: the average person
    p.save_pretrained(tmp_path / "set")
    back = Projector.from_pretrained(tmp_path / "set", tiny).eval()
    assert back.config.set_items == N and torch.equal(back(items.reshape(2, -1)), out)
    from e2p.engines.numpy_projector import NumpyProjector

    with pytest.raises(ConfigError, match="set-profile projector"):  # its formula has no pooling: refused by name
        NumpyProjector.from_pretrained(tmp_path / "set")


def test_set_profile_settings_are_checked(tiny):
    with pytest.raises(ConfigError, match="not a multiple of set_items"):
        new_config(tiny, embedding_dim=55, set_items=N)
    with pytest.raises(ConfigError, match="no embedding_slots"):
        new_config(tiny, embedding_dim=N * D, set_items=N, embedding_slots=2, num_prefix_tokens=2)


def test_events_feed_the_set_newest_kept_online_equals_batch(tmp_path):
    """The live profile of a set rule: each event appends its item (the oldest out past set_items), online equals
    batch, the stored bytes round-trip, and a rule's set embedding is what the projector reads."""
    from e2p.data.live_profile import ProfileRule, ProfileSet

    rule = ProfileRule(dim=4, set_items=3)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 4)).astype("float32")
    texts = [None] * 5
    batch = rule.batch(vectors, texts)
    sums = rule.empty()
    for v, t in zip(vectors, texts):  # one event at a time, through the stored bytes as a server does
        sums = rule.fold_stored(sums.to_bytes() if sums.events else None, v[None], [t])
    assert sums.events == 5 and np.array_equal(rule.vector(sums), batch) and batch.shape == (12,)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(batch.reshape(3, 4), unit[2:], atol=1e-6)  # the newest three, oldest first
    two = rule.batch(vectors[:2], texts[:2]).reshape(3, 4)
    assert np.allclose(two[:2], unit[:2], atol=1e-6) and not two[2].any()  # room left: an all-zero block
    from e2p.errors import DataError

    with pytest.raises(DataError, match="another rule"):
        ProfileSet.from_bytes(sums.to_bytes(), ProfileRule(dim=5, set_items=3))
    assert ProfileRule.load(rule.save(tmp_path / "r.json")).set_items == 3
