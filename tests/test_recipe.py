"""Recipe helpers that decide what the projector is trained on (the persona experiments' recipe in research/)."""
import torch

from e2p import Projector
from e2p.data.persona import PersonaExample
from e2p.model import E2PModel, new_config
from e2p.training.calibration import calibrate_person_scale
from research.persona.recipe import PersonaRecipeConfig as RecipeConfig
from research.persona.recipe import person_table, persona_key, reconstruction_items, split_people
from e2p.evaluate.scoring import Item


class CountingEncoder:
    dim = 8

    def __init__(self):
        self.seen = []

    def encode(self, texts, **_):
        self.seen.extend(texts)
        return torch.stack([torch.full((self.dim,), float(len(t))) for t in texts]).numpy()


def _ex(pid, persona, reply="ok"):
    return PersonaExample(pid, tuple(persona), (("user", "hi"),), reply)


def test_grown_persona_gets_its_own_row():
    old = _ex("p1", ["i like dogs."])
    grown = _ex("p1", ["i like dogs.", "i got a puppy."])
    index, table = person_table([old, grown], CountingEncoder(), key=persona_key)
    assert index[persona_key(old)] != index[persona_key(grown)] and table.shape[0] == 2
    index, table = person_table([old, grown], CountingEncoder())  # by person: the first persona seen
    assert table.shape[0] == 1


def test_sentence_reconstruction_targets_come_from_the_embedded_view(tiny):
    backbone, projector = tiny, Projector(new_config(tiny, embedding_dim=8))
    long = [f"i {verb} {thing}." for verb in ("like", "love", "play") for thing in ("dogs", "cats", "music", "guitar")]
    examples = [_ex("a", long), _ex("b", ["i like dogs.", "i am a nurse.", "i love music."])]
    enc = CountingEncoder()
    items, table = reconstruction_items(backbone, projector, examples, enc, RecipeConfig(reconstruct_sentences=2))
    assert len(items) == 2 and table.shape[0] == 2  # one item per distinct persona
    tok = backbone.tokenizer
    for item, view in zip(items, enc.seen):
        target = tok.decode([t for t in item.row.target if t != tok.eos_token_id])  # the restated sentences
        sentences = [s.strip() + "." for s in target.replace(" .", ".").split(".") if s.strip()]
        assert len(sentences) == 2 and all(s in view for s in sentences), (target, view)
    assert 4 <= enc.seen[0].count(".") <= 6  # a long persona is embedded as a 4-6 sentence view


def test_novel_sentence_validation_strips_validation_sentences_from_training():
    shared = "i have two dogs."
    examples = [_ex(f"p{i}", [shared if i % 2 else f"i was born in {i}.", f"my number is {i}."]) for i in range(10)]
    train, val = split_people(examples, 3, seed=0, novel_sentences=True)
    val_sentences = {s for e in val for s in e.persona}
    assert {e.person_id for e in train}.isdisjoint({e.person_id for e in val})
    assert not any(s in val_sentences for e in train for s in e.persona)  # new people with new sentences
    plain, _ = split_people(examples, 3, seed=0)
    if any(shared in e.persona for e in val):  # without it, training keeps the sentence validation people share
        assert any(shared in e.persona for e in plain)


def test_person_scale_calibration_picks_the_lowest_validation_loss(tiny):
    projector = Projector(new_config(tiny, embedding_dim=8, injection="deep"))
    torch.nn.init.normal_(projector.mlp[-1].weight, std=5.0)  # a wildly over-confident person part
    model = E2PModel(tiny, projector)
    items = [Item(model.format("hi", reply=f"hello number {i}"), i % 4) for i in range(8)]
    report = calibrate_person_scale(tiny, projector, items, torch.randn(4, 8), [0.5, 1.0])
    losses = {float(k): v for k, v in report["validation_loss"].items()}
    assert set(losses) == {0.0, 0.5, 1.0}  # the shared prefix is always a candidate
    assert projector.config.person_scale == report["chosen"] == min(losses, key=losses.get)


class SentenceEncoder:
    """Distinct, deterministic vectors per sentence (a stand-in for MiniLM in tiny runs)."""
    dim = 8
    name = "fake-sentences"

    def encode(self, texts, **_):
        import numpy as np

        out = []
        for t in texts:
            v = np.random.default_rng(sum(map(ord, t))).standard_normal(self.dim).astype("float32")
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def test_recipe_with_sentence_slots_trains_one_prefix_token_per_sentence(tiny, tmp_path):
    from e2p.data.encoders import SentenceSlotEncoder
    from research.persona.recipe import run_recipe

    facts = ["i like dogs.", "i am a nurse.", "i love music.", "i live in ohio.", "i drive a truck.", "i hate rain."]
    examples = [_ex(f"p{i}", [facts[i % 6], facts[(i + 1) % 6], facts[(i + 3) % 6]], reply=f"hello number {i}")
                for i in range(12)]
    cfg = RecipeConfig(embedding_slots=3, shared_steps=2, reconstruct_steps=2, e2p_steps=2, batch_size=4, eval_every=1,
                       val_people=3, val_examples=4, novel_val_sentences=False, hidden_dims=[16])
    run_recipe(tiny, SentenceEncoder(), examples, tmp_path, cfg, progress=False)
    projector = Projector.from_pretrained(tmp_path)
    assert projector.config.embedding_slots == 3 and projector.config.num_prefix_tokens == 3
    assert projector.config.embedding_dim == 24 and len(projector.config.embedding_mean) == 8
    vectors = torch.tensor(SentenceSlotEncoder(SentenceEncoder(), 3).encode(["i like dogs. i am a nurse."]))
    assert vectors.shape == (1, 24) and vectors[0, 16:].abs().sum() == 0  # two sentences: the third slot is unused
    projector.eval()
    prefix = projector(vectors)
    assert prefix.shape == (1, 3, projector.config.prefix_dim)
    assert torch.equal(prefix[0, 2], projector.shared[2])  # an unused slot gets no person part


# --- one shuffled control; typed data; one report ----------------------------------------------------------------
def _contract(n_users=6, per_user=3, dim=8):
    import numpy as np

    from e2p.data.contract import Example, UserTable

    rng = np.random.default_rng(0)
    users = UserTable([f"u{i}" for i in range(n_users)], rng.normal(size=(n_users, dim)).astype("float32"))
    words = ["dogs", "cats", "music", "guitar"]
    examples = [Example(f"u{i % n_users}", "tell me about yourself", f"i like {words[i % 4]} and {words[(i // 3) % 4]} .",
                        profile_text=f"i love {words[i % n_users % 4]}") for i in range(n_users * per_user)]
    return users, examples


def test_derangement_draws_another_user_for_every_row():
    from e2p.evaluate.scoring import derangement

    people = ["a", "a", "b", "c", "c", "c", "d"]
    for seed in range(20):
        swap = derangement(people, seed)
        assert all(people[j] != p for p, j in zip(people, swap)), (seed, swap)
    assert derangement(people, 3) == derangement(people, 3) != derangement(people, 4)


def test_the_shuffled_figure_of_a_training_curve_is_the_shuffled_figure_of_eval(tiny, tmp_path):
    """Validation during training (`evaluate_loss(shuffle_people=True)`) and the `shuffled` condition of `e2p eval`
    draw another user by one rule, so on the same rows and seed they give the same figure."""
    import pytest

    from e2p.evaluate import Condition, run_conditions
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.stage_runner import example_items
    from e2p.evaluate.scoring import evaluate_loss

    users, examples = _contract()
    projector = Projector(new_config(tiny, embedding_dim=8, injection="deep", dropout=0.0))
    torch.nn.init.normal_(projector.mlp[-1].weight, std=1.0, generator=torch.Generator().manual_seed(0))
    projector.save_pretrained(tmp_path / "p")
    model = E2PModel(tiny, projector)
    items = example_items(tiny, projector, examples, users.index, RecipeConfig(max_target_tokens=32))
    own = evaluate_loss(model, items, users.tensor(), batch_size=4)
    for seed in (0, 5):
        scores = run_conditions(tiny, [Condition("shuffled", tmp_path / "p", embeddings="shuffled")], examples, users,
                                max_target_tokens=32, batch_size=16, seed=seed, progress=False)
        in_eval = float(scores["nll"]["shuffled"].sum() / scores["counts"].sum())
        in_curve = evaluate_loss(model, items, users.tensor(), batch_size=4, shuffle_people=True, seed=seed)
        assert in_curve == pytest.approx(in_eval, rel=1e-5)
        assert abs(in_curve - own) > 1e-4  # another user's embedding really changed the scores


def test_example_items_carry_the_user_index_and_the_profile_only_with_text(tiny):
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.stage_runner import example_items

    users, examples = _contract()
    projector = Projector(new_config(tiny, embedding_dim=8))
    plain = example_items(tiny, projector, examples, users.index, RecipeConfig())
    text = example_items(tiny, projector, examples, users.index, RecipeConfig(), with_text=True)
    assert [it.person for it in plain] == [users.index[ex.user] for ex in examples] == [it.person for it in text]
    assert all(len(t.row.pre) + len(t.row.post) > len(p.row.pre) + len(p.row.post) for p, t in zip(plain, text))
    assert all(it.person == -1 for it in example_items(tiny, projector, examples, None, RecipeConfig()))


def test_the_training_report_is_built_once_and_written_once(tiny, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from e2p.training.recipe_config import RecipeConfig

    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10)
    writes = []
    real = Path.write_text

    def recording(self, *a, **k):
        if self.name == "training_report.json":
            writes.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", recording)
    cfg = RecipeConfig(injection="input", hidden_dims=[8], shared_steps=2, e2p_steps=2, text_steps=1, batch_size=2,
                       val_examples=2, eval_every=2, person_scales=[0.5, 1.0])
    report = train_on_examples(tiny, users, examples, tmp_path, cfg, val_users=4, progress=False)
    assert writes == [tmp_path / "training_report.json"]
    assert json.loads((tmp_path / "training_report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["stages"]) == {"shared_prefix", "e2p", "shared_prefix_text", "e2p_text"}
    assert report["seconds"] >= sum(s["seconds"] for s in report["stages"].values())  # every stage, none twice
    assert report["train_items"] == report["train_examples"] and "person_scale" in report and "verdict" in report
