"""Recipe helpers that decide what the projector is trained on (the persona experiments' recipe in research/)."""
import torch

from e2p import Projector
from e2p.data.persona import PersonaExample
from e2p.model import E2PModel, new_config
from e2p.recipe import calibrate_person_scale
from research.persona.recipe import PersonaRecipeConfig as RecipeConfig
from research.persona.recipe import person_table, persona_key, reconstruction_items, split_people
from e2p.train import Item


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
    from e2p.encoders import SentenceSlotEncoder
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
