"""Recipe helpers that decide what the projector is trained on."""
import torch

from e2p import Projector
from e2p.data.persona import PersonaExample
from e2p.model import new_config
from e2p.recipe import RecipeConfig, _reconstruction_items, person_table, persona_key


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
    items, table = _reconstruction_items(backbone, projector, examples, enc, RecipeConfig(reconstruct_sentences=2))
    assert len(items) == 2 and table.shape[0] == 2  # one item per distinct persona
    tok = backbone.tokenizer
    for item, view in zip(items, enc.seen):
        target = tok.decode([t for t in item.row.target if t != tok.eos_token_id])  # the restated sentences
        sentences = [s.strip() + "." for s in target.replace(" .", ".").split(".") if s.strip()]
        assert len(sentences) == 2 and all(s in view for s in sentences), (target, view)
    assert 4 <= enc.seen[0].count(".") <= 6  # a long persona is embedded as a 4-6 sentence view
