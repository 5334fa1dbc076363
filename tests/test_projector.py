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
