import json

import pytest
import torch

from e2p import BackboneMismatchError, ConfigError, EmbeddingError, Projector
from e2p.model import new_config
from e2p.projector import parameter_summary
from conftest import make_backbone


@pytest.mark.parametrize("injection,k", [("input", 1), ("input", 3), ("deep", 2)])
def test_shapes_and_norm(tiny, injection, k):
    cfg = new_config(tiny, embedding_dim=16, num_prefix_tokens=k, injection=injection)
    p = Projector(cfg)
    torch.nn.init.normal_(p.mlp[-1].weight)
    out = p(torch.randn(5, 16))
    dim = tiny.hidden_size if injection == "input" else tiny.num_layers * 2 * tiny.kv_dim
    assert out.shape == (5, k, dim)
    if injection == "input":  # scaled to the backbone's token-embedding norm
        assert torch.allclose(out.norm(dim=-1), torch.full((5, k), cfg.token_embedding_norm), rtol=1e-4)


def test_zero_init_person_part_starts_at_shared(tiny):
    p = Projector(new_config(tiny, embedding_dim=8, output_norm=False))
    out = p(torch.randn(3, 8))
    assert torch.equal(out, p.shared.unsqueeze(0).expand(3, -1, -1))


def test_save_load_roundtrip(tiny, tmp_path):
    p = Projector(new_config(tiny, embedding_dim=8, encoder_name="enc", num_prefix_tokens=2))
    torch.nn.init.normal_(p.mlp[-1].weight)
    p.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["backbone_name"] == "tiny-llama" and cfg["embedding_dim"] == 8 and cfg["encoder_name"] == "enc"
    assert cfg["num_prefix_tokens"] == 2 and cfg["backbone_hidden_size"] == tiny.hidden_size
    q = Projector.from_pretrained(tmp_path, tiny)
    p.eval(); q.eval()
    e = torch.randn(2, 8)
    assert torch.equal(p(e), q(e))
    assert "parameters" in parameter_summary(q) and q.num_parameters() == p.num_parameters()


def test_wrong_backbone_is_refused(tiny, tmp_path):
    Projector(new_config(tiny, embedding_dim=8)).save_pretrained(tmp_path)
    other = make_backbone(hidden=32, name="other")
    with pytest.raises(BackboneMismatchError, match="tiny-llama"):
        Projector.from_pretrained(tmp_path, other)


def test_bad_embeddings(tiny):
    p = Projector(new_config(tiny, embedding_dim=8))
    with pytest.raises(EmbeddingError, match="size 8"):
        p(torch.randn(2, 9))
    bad = torch.randn(2, 8)
    bad[1, 3] = float("nan")
    with pytest.raises(EmbeddingError, match="NaN"):
        p(bad)


def test_corrupt_checkpoint(tiny, tmp_path):
    Projector(new_config(tiny, embedding_dim=8)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="corrupt"):
        Projector.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="JSON"):
        Projector.from_pretrained(tmp_path)


def test_config_validation():
    from e2p import E2PConfig

    with pytest.raises(ConfigError):
        E2PConfig(injection="sideways")
    with pytest.raises(ConfigError):
        E2PConfig(num_prefix_tokens=0)
    with pytest.raises(ConfigError, match="after_sink"):
        E2PConfig(injection="deep", prefix_position="after_system")


def test_half_precision_save_loads_back_as_float32(tiny, tmp_path):
    p = Projector(new_config(tiny, embedding_dim=8))
    torch.nn.init.normal_(p.mlp[-1].weight)
    p.save_pretrained(tmp_path, dtype=torch.float16)
    q = Projector.from_pretrained(tmp_path, tiny)
    assert q.mlp[-1].weight.dtype == torch.float32
    assert torch.allclose(q.mlp[-1].weight, p.mlp[-1].weight, atol=1e-2)


def test_person_scale_moves_between_shared_and_full_person_part(tiny, tmp_path):
    p = Projector(new_config(tiny, embedding_dim=8, injection="deep")).eval()
    torch.nn.init.normal_(p.mlp[-1].weight)
    e = torch.randn(3, 8)
    full = p(e)
    p.config.person_scale = 0.0  # the shared prefix exactly
    assert torch.equal(p(e), p.shared.unsqueeze(0).expand(3, -1, -1))
    p.config.person_scale = 0.5
    half = p(e)
    assert torch.allclose(half - p.shared, 0.5 * (full - p.shared), atol=1e-6)
    p.save_pretrained(tmp_path / "p")  # the scale is part of the saved projector
    assert torch.allclose(Projector.from_pretrained(tmp_path / "p").eval()(e), half)
    with pytest.raises(ConfigError, match="person_scale"):
        new_config(tiny, embedding_dim=8, person_scale=float("nan"))


class OneHotEncoder:
    """Sentence -> a one-hot vector picked by its length (distinct, predictable embeddings)."""
    dim = 4
    name = "one-hot"

    def encode(self, texts, **_):
        import numpy as np

        return np.stack([np.eye(self.dim, dtype=np.float32)[len(t) % self.dim] for t in texts])


def test_sentence_slot_encoder_lays_out_one_vector_per_sentence():
    from e2p.data.encoders import SentenceSlotEncoder, split_sentences

    assert split_sentences("I am a cat. I like dogs! Really? yes") == ["I am a cat.", "I like dogs!", "Really?", "yes"]
    enc = SentenceSlotEncoder(OneHotEncoder(), 3)
    assert enc.dim == 12 and enc.name == "one-hot"
    v = enc.encode(["aaaa. bbbbb. cc. ddddd.", "one"]).reshape(2, 3, 4)
    assert torch.allclose(torch.tensor(v[0, 0]), torch.tensor([0, 0.7071068, 0.7071068, 0]))  # sentences 0 and 3 share slot 0
    assert v[0, 1].tolist() == [0, 0, 1, 0] and v[0, 2].tolist() == [0, 0, 0, 1]
    assert v[1, 0].tolist() == [0, 0, 0, 1] and not v[1, 1:].any()  # one sentence: slots 1-2 unused (zeros)
    with pytest.raises(ConfigError):
        SentenceSlotEncoder(OneHotEncoder(), 1)


def test_slot_projector_gives_each_sentence_its_own_prefix_token(tiny, tmp_path):
    cfg = new_config(tiny, embedding_dim=12, num_prefix_tokens=3, embedding_slots=3, output_norm=False)
    p = Projector(cfg)
    torch.nn.init.normal_(p.mlp[-1].weight)
    p.eval()
    x = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    x[1, 2] = 0  # an unused slot
    out = p(x.reshape(2, 12))
    assert out.shape == (2, 3, cfg.prefix_dim)
    assert torch.equal(out[1, 2], p.shared[2]) and not torch.equal(out[0, 2], p.shared[2])
    y = x.clone()
    y[0, 1] = torch.nn.functional.normalize(torch.randn(4), dim=-1)  # change one sentence: only its token moves
    moved = p(y.reshape(2, 12))
    assert torch.equal(moved[0, 0], out[0, 0]) and torch.equal(moved[0, 2], out[0, 2]) and not torch.equal(moved[0, 1], out[0, 1])
    p.save_pretrained(tmp_path)
    again = Projector.from_pretrained(tmp_path, tiny).eval()
    assert torch.equal(again(x.reshape(2, 12)), out)
    with pytest.raises(EmbeddingError, match="SentenceSlotEncoder"):
        p(torch.randn(1, 4))  # one joined-persona vector where the projector expects three slots


def test_slot_config_validation(tiny):
    with pytest.raises(ConfigError, match="num_prefix_tokens to 3"):
        new_config(tiny, embedding_dim=12, num_prefix_tokens=1, embedding_slots=3)
    with pytest.raises(ConfigError, match="multiple"):
        new_config(tiny, embedding_dim=10, num_prefix_tokens=3, embedding_slots=3)
    with pytest.raises(ConfigError):
        new_config(tiny, embedding_dim=12, embedding_slots=0)


def test_shipped_projectors_are_addressed_by_name(tmp_path):
    from e2p.config import resolve_projector, shipped_projectors
    from e2p.errors import ConfigError

    assert "persona-deep-k1" in shipped_projectors()
    projector = Projector.from_pretrained("persona-deep-k1")
    assert projector.config.num_prefix_tokens == 1 and resolve_projector("persona-deep-k1").is_dir()
    with pytest.raises(ConfigError, match="persona-deep-k1"):  # the error lists what is shipped
        Projector.from_pretrained("persona-deep-k9")
    with pytest.raises(ConfigError, match="no config.json"):
        Projector.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], "JSON list, not an object"),
    (lambda c: {**c, "embedding_dim": "384"}, "embedding_dim is '384'"),
    (lambda c: {**c, "hidden_dims": [1024.5]}, "hidden_dims"),
    (lambda c: {k: v for k, v in c.items() if k != "num_prefix_tokens"}, "lacks num_prefix_tokens"),
    (lambda c: {**c, "dropout": True}, "dropout is True"),
])
def test_malformed_config_json_is_refused_by_name(tmp_path, edit, message):
    import json
    import shutil

    from e2p.config import resolve_projector

    folder = tmp_path / "p"
    shutil.copytree(resolve_projector("persona-deep-k1"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(ConfigError, match=message):
        Projector.from_pretrained(folder)
