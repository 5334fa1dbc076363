"""The gap-closing candidates of `e2p train` (issue 30): prototype mixing, profile slots, learning-curve subsets."""
import json

import numpy as np
import pytest
import torch

from test_recipe import _contract


def _prototype_projector(tiny, n=3, dim=4, temperature=0.1):
    from e2p.model import new_config
    from e2p.projector import Projector

    p = Projector(new_config(tiny, embedding_dim=dim, prototypes=n, prototype_temperature=temperature, injection="deep"))
    torch.manual_seed(0)
    p.prototype_keys.copy_(torch.nn.functional.normalize(torch.randn(n, dim), dim=-1))
    p.prototype_values.copy_(torch.randn(n, p.config.prefix_dim))
    return p


def test_a_prototype_projector_mixes_training_users_parts_by_similarity(tiny):
    p = _prototype_projector(tiny, temperature=1e-3)
    near_first = p.prototype_keys[0] * 5.0  # scale does not matter: the embedding is normalized
    out = p(near_first.unsqueeze(0))
    assert torch.allclose(out[0, 0], p.shared[0] + p.prototype_values[0], atol=1e-4)  # a sharp mix: the nearest
    p.config.prototype_temperature = 1e3
    out = p(near_first.unsqueeze(0))
    assert torch.allclose(out[0, 0], p.shared[0] + p.prototype_values.mean(0), atol=1e-3)  # a flat mix: the mean
    p.config.person_scale = 0.0
    assert torch.equal(p(near_first.unsqueeze(0))[0], p.shared)


def test_a_prototype_projector_round_trips_and_refuses_bad_configs(tiny, tmp_path):
    from e2p.config import E2PConfig
    from e2p.errors import ConfigError, EmbeddingError
    from e2p.projector import Projector

    p = _prototype_projector(tiny)
    p.save_pretrained(tmp_path)
    back = Projector.from_pretrained(tmp_path, tiny)
    e = torch.randn(2, 4)
    assert torch.equal(back(e), p(e))
    with pytest.raises(EmbeddingError):
        back(torch.randn(2, 5))
    with pytest.raises(ConfigError, match="prototype"):
        E2PConfig(embedding_dim=0, prototypes=3)
    with pytest.raises(ConfigError, match="temperature"):
        E2PConfig(embedding_dim=4, prototypes=3, prototype_temperature=0.0)


def test_train_with_prototypes_learns_own_parts_and_calibrates_the_temperature(tiny, tmp_path):
    from e2p.projector import Projector
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10, per_user=4)
    cfg = RecipeConfig(injection="input", hidden_dims=[8], shared_steps=2, e2p_steps=3, batch_size=2, val_examples=2,
                       eval_every=2, person_scales=[1.0], person_map="prototypes")
    report = train_on_examples(tiny, users, examples, tmp_path, cfg, val_users=4, progress=False)
    assert set(report["stages"]) == {"shared_prefix", "prototypes"}
    p = Projector.from_pretrained(tmp_path, tiny)
    assert p.config.prototypes == report["train_users"] == 6
    assert p.config.prototype_temperature == report["person_scale"]["temperature"]
    assert p.prototype_values.abs().sum() > 0  # the training users' own parts were learned
    split = json.loads((tmp_path / "split.json").read_text())
    trained = sorted(split["train"])
    keys = torch.nn.functional.normalize(users.subset(trained).tensor() - torch.tensor(p.config.embedding_mean), dim=-1)
    assert torch.allclose(p.prototype_keys, keys, atol=1e-5)  # keys: training users only, never validation users


def test_prototypes_refuse_text_stages_and_dp(tiny, tmp_path):
    from e2p.errors import DataError
    from e2p.training.privacy import PrivacyError
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10, per_user=2)
    with pytest.raises(DataError, match="text-steps"):
        RecipeConfig(person_map="prototypes", text_steps=1)
    with pytest.raises(PrivacyError, match="prototype"):
        RecipeConfig(person_map="prototypes", dp_epsilon=4.0)
    changed = RecipeConfig(person_map="prototypes")
    changed.dp_epsilon = 4.0  # changed after it was made: the recipe checks again before anything trains
    with pytest.raises(PrivacyError, match="prototype"):
        train_on_examples(tiny, users, examples, tmp_path / "dp", changed, val_users=4, progress=False)


def test_max_train_users_keeps_the_validation_users(tiny, tmp_path):
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=12, per_user=2)
    cfg = RecipeConfig(injection="input", hidden_dims=[8], shared_steps=1, e2p_steps=1, batch_size=2, val_examples=2,
                       eval_every=1, person_scales=[1.0])
    train_on_examples(tiny, users, examples, tmp_path / "all", cfg, val_users=4, progress=False)
    cfg.max_train_users = 3
    report = train_on_examples(tiny, users, examples, tmp_path / "few", cfg, val_users=4, progress=False)
    every, few = (json.loads((tmp_path / d / "split.json").read_text()) for d in ("all", "few"))
    assert report["train_users"] == 3 and set(few["train"]) < set(every["train"])
    assert (few["selection"], few["verdict"]) == (every["selection"], every["verdict"])


def test_history_slots_are_cluster_means_largest_first():
    from e2p.data.pens_contract import history_slots

    rng = np.random.default_rng(0)
    a, b = np.eye(6)[0], np.eye(6)[1]
    heads = np.stack([a + 0.01 * rng.normal(size=6) for _ in range(5)] + [b + 0.01 * rng.normal(size=6) for _ in range(2)])
    slots = history_slots(heads.astype(np.float32), 3).reshape(3, 6)
    assert np.argmax(slots[0]) == 0 and np.argmax(slots[1]) == 1  # the bigger cluster first
    assert np.allclose(np.linalg.norm(slots[:2], axis=1), 1.0, atol=1e-5)
    assert np.array_equal(history_slots(heads, 3), history_slots(heads, 3))  # deterministic
    few = history_slots(heads[:2].astype(np.float32), 4).reshape(4, 6)
    assert not few[2:].any()  # fewer headlines than slots: the rest stay unused (all zero)


def test_embedding_slots_train_one_token_per_slot(tiny, tmp_path):
    from e2p.data.contract import UserTable
    from e2p.projector import Projector
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10, per_user=2, dim=8)
    users = UserTable(users.ids, np.concatenate([users.vectors, users.vectors[::-1]], axis=1))
    cfg = RecipeConfig(injection="input", num_prefix_tokens=2, embedding_slots=2, hidden_dims=[8], shared_steps=1,
                       e2p_steps=1, batch_size=2, val_examples=2, eval_every=1, person_scales=[1.0])
    train_on_examples(tiny, users, examples, tmp_path, cfg, val_users=4, progress=False)
    p = Projector.from_pretrained(tmp_path, tiny)
    assert (p.config.embedding_slots, p.config.num_prefix_tokens, p.config.slot_dim) == (2, 2, 8)
    assert p(users.tensor()[:3]).shape == (3, 2, p.config.prefix_dim)


def test_the_numpy_projector_computes_prototype_mixing_like_torch(tiny, tmp_path):
    from e2p.engines.numpy_projector import NumpyProjector
    from e2p.model import new_config
    from e2p.projector import Projector

    p = Projector(new_config(tiny, embedding_dim=4, prototypes=3, prototype_temperature=0.2, injection="input",
                             embedding_mean=[0.1, 0.0, -0.1, 0.2], person_scale=0.5))
    torch.manual_seed(1)
    p.prototype_keys.copy_(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1))
    p.prototype_values.copy_(torch.randn(3, p.config.prefix_dim))
    p.save_pretrained(tmp_path)
    e = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    assert np.allclose(NumpyProjector.from_pretrained(tmp_path)(e), p(torch.from_numpy(e)).detach().numpy(), atol=1e-5)


def test_style_features_see_capitalisation_and_length_that_an_uncased_encoder_cannot():
    from e2p.data.headline_style import STYLE_FEATURES, StyleScaler, style_features

    title = style_features(["Man Uses Firearm For Bad Reasons", "The Best Dog Ever: A Story"])
    sentence = style_features(["man uses firearm for bad reasons", "the best dog ever: a story"])
    f = dict(zip(STYLE_FEATURES, range(len(STYLE_FEATURES))))
    assert title[f["capitalised_words"]] == 1.0 and sentence[f["capitalised_words"]] == 0.0
    assert title[f["words_per_headline"]] == sentence[f["words_per_headline"]] == 6.0
    assert title[f["colon"]] == 0.5 and not style_features([]).any()
    scaler = StyleScaler(np.stack([title, sentence]))  # fitted on training users, applied to anyone
    z = scaler(np.stack([title, sentence]))
    assert np.allclose(z.mean(0), 0.0, atol=1e-6) and z.dtype == np.float32


def test_the_report_says_which_recipe_trained(tiny, tmp_path):
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10, per_user=2)
    cfg = RecipeConfig(injection="input", hidden_dims=[8], shared_steps=1, e2p_steps=1, batch_size=2, val_examples=2,
                       eval_every=1, person_scales=[1.0], person_map="prototypes")
    report = train_on_examples(tiny, users, examples, tmp_path / "p", cfg, val_users=4, progress=False)
    assert report["recipe"]["person_map"] == "prototypes" and "verdict" in report
    saved = json.loads((tmp_path / "p" / "training_report.json").read_text())
    assert saved["recipe"]["person_map"] == "prototypes" and saved["recipe"]["hidden_dims"] == [8]
