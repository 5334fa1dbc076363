"""The gap-closing candidates of `e2p train` (issue 30) that stay: profile slots, learning-curve subsets; and the
removal of the one that lost (prototype mixing): old files that name it are refused with what to do."""
import json

import numpy as np
import pytest

from test_recipe import _contract


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
                       eval_every=1, person_scales=[1.0], prefix_position="after_sink")
    report = train_on_examples(tiny, users, examples, tmp_path / "p", cfg, val_users=4, progress=False)
    assert report["recipe"]["prefix_position"] == "after_sink" and "verdict" in report
    saved = json.loads((tmp_path / "p" / "training_report.json").read_text())
    assert saved["recipe"]["prefix_position"] == "after_sink" and saved["recipe"]["hidden_dims"] == [8]


def test_prototype_mixing_is_gone_and_old_files_naming_it_are_refused_clearly(tiny, tmp_path, capsys):
    """Prototype mixing lost its study and was removed: an old run's recipe.json (person_map "mlp") still loads, one
    that asks for prototypes and a prototype projector's config.json are refused with what to do."""
    from e2p.cli import build_parser
    from e2p.config import E2PConfig
    from e2p.errors import ConfigError, DataError
    from e2p.model import new_config
    from e2p.projector import Projector
    from e2p.training.recipe_config import RecipeConfig, recipe_from_args

    old = tmp_path / "recipe.json"
    old.write_text(json.dumps({"person_map": "mlp", "hidden_dims": [8]}))
    assert RecipeConfig.load(old).hidden_dims == [8]
    old.write_text(json.dumps({"person_map": "prototypes"}))
    with pytest.raises(DataError, match="prototype mixing lost its study"):
        RecipeConfig.load(old)
    args = build_parser().parse_args(["train", "--users", "u", "--examples", "e", "--out", "o", "--person-map",
                                      "prototypes"])
    with pytest.raises(DataError, match="--person-map"):
        recipe_from_args(args)
    folder = tmp_path / "proto"
    config = new_config(tiny, embedding_dim=4).to_dict() | {"prototypes": 3, "prototype_temperature": 0.1}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="prototype-mixing projector"):
        E2PConfig.load(folder)
    from e2p.engines.numpy_projector import NumpyProjector

    Projector(new_config(tiny, embedding_dim=4)).save_pretrained(tmp_path / "weights")
    (folder / "model.safetensors").write_bytes((tmp_path / "weights" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="prototype-mixing projector"):  # the numpy reader: the same refusal
        NumpyProjector.from_pretrained(folder)
    config["prototypes"] = 0  # what every older projector wrote: read as before
    (folder / "config.json").write_text(json.dumps(config))
    assert E2PConfig.load(folder).embedding_dim == 4
