"""`e2p.load`'s model: users as texts (the projector's encoder and profile rule), vectors or None, one call."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_backbone
from e2p import Projector
from e2p.data.live_profile import PROFILE_FILE
from e2p.errors import ConfigError
from e2p.loading import PersonalizedModel
from e2p.model import E2PModel, new_config
from test_live_profile import style_rule


def test_text_vector_and_no_user_rows_in_one_call(tmp_path):
    from e2p.data.encoders import TextEncoder

    backbone, rule = make_backbone(), style_rule()
    torch.manual_seed(0)
    projector = Projector(new_config(backbone, embedding_dim=rule.embedding_dim, num_prefix_tokens=1)).eval()
    torch.nn.init.normal_(projector.mlp[-1].weight, std=0.5)
    projector.save_pretrained(tmp_path)
    rule.save(tmp_path / PROFILE_FILE)
    encoder = TextEncoder()
    model = PersonalizedModel(E2PModel(backbone, projector), tmp_path, encoder)
    text = "Stocks Rally As Fed Holds Rates"
    embedded = model.embed([text])
    np.testing.assert_allclose(embedded[0], rule.batch(encoder.encode([text]), [text]), atol=1e-6)
    vector = np.random.default_rng(0).normal(size=rule.embedding_dim).astype(np.float32)
    got = model.generate("hi how are you ?", users=[text, vector, None], max_new_tokens=6)
    want = model.model.generate(["hi how are you ?"] * 3, embeddings=[torch.from_numpy(embedded[0]),
                                                                      torch.from_numpy(vector), None], max_new_tokens=6)
    assert got == want
    assert model.generate("hi how are you ?", users=vector, max_new_tokens=6) == want[1]
    with pytest.raises(ConfigError, match="one user"):
        model.generate(["hi", "how"], users=[None], max_new_tokens=2)
    with pytest.raises(Exception, match="values"):
        model.generate("hi", users=[np.zeros(3)], max_new_tokens=2)
