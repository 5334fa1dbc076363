"""A few end-to-end checks on the real SmolLM2 backbone and the real persona data."""
import json
import subprocess
import sys
import time

import pytest
import torch

from e2p import Projector
from e2p.model import E2PModel, new_config

pytestmark = pytest.mark.backbone


def test_default_backbone_is_frozen_and_cached(real_backbone):
    from e2p.backbone import load_backbone

    assert real_backbone.hidden_size == 576 and real_backbone.num_layers == 30
    assert not real_backbone.model.training
    assert not any(p.requires_grad for p in real_backbone.model.parameters())
    t = time.time()
    again = load_backbone()
    assert time.time() - t < 15  # the converted cache, not the ~40 s GGUF de-quantization
    assert torch.equal(again.model.model.embed_tokens.weight, real_backbone.model.model.embed_tokens.weight)


def test_real_backbone_mixed_batch(real_backbone):
    torch.manual_seed(0)
    p = Projector(new_config(real_backbone, embedding_dim=384, injection="deep"))
    torch.nn.init.normal_(p.mlp[-1].weight, std=0.01)
    p.eval()
    m = E2PModel(real_backbone, p, autocast=False)
    prompts = ["Hi! What do you do for fun?", "Do you have any pets?"]
    emb = torch.randn(2, 384)
    together = m.generate(prompts, [emb[0], None], max_new_tokens=8)
    assert together[0] == m.generate(prompts[:1], [emb[0]], max_new_tokens=8)[0]
    assert together[1] == m.generate(prompts[1:], [None], max_new_tokens=8)[0]


def test_cli_train_generate_eval(shared_data, tmp_path):
    out = tmp_path / "proj"
    spc = shared_data / "synthetic_persona_chat"
    run = lambda *a: subprocess.run([sys.executable, "-m", "e2p.cli", *a], capture_output=True, text=True, timeout=900)
    r = run("train", "--data", str(spc / "Synthetic-Persona-Chat_valid.csv"), "--out", str(out), "--steps", "6",
            "--batch-size", "4", "--text-steps", "1", "--val-examples", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    for sub in ["", "shared_prefix", "shared_prefix_text", "e2p_text"]:
        assert (out / sub / "config.json").is_file(), sub
    r = run("generate", "--projector", str(out), "--persona", "I love hiking. I have two dogs.",
            "--persona", "I am a chef.", "--message", "What do you do for fun?", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("[persona:") == 2
    r = run("eval", "--data", str(spc / "Synthetic-Persona-Chat_test.csv"), "--projector", str(out),
            "--out", str(tmp_path / "ev"), "--limit", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["examples"] == 12
    assert set(res["conditions"]) == {"none", "text", "shared_prefix", "shared_prefix_text", "shuffled", "e2p", "e2p_text"}
    for c in res["conditions"].values():
        assert c["perplexity"] > 1 and c["tokens_per_request"] > 0
    assert res["conditions"]["text"]["tokens_per_request"] > res["conditions"]["none"]["tokens_per_request"]
    assert (tmp_path / "ev" / "REPORT.md").is_file() and (tmp_path / "ev" / "evaluation.png").is_file()


def test_cli_errors_are_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "e2p.cli", "generate", "--projector", str(tmp_path), "--persona", "x",
                        "--message", "hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "config.json" in r.stderr


def test_first_run_prints_no_third_party_noise(tmp_path):
    """A newcomer's first command converts the bundled GGUF (into a fresh cache here): transformers' conversion
    and "Loading weights" bars stay quiet without -v; the reply comes; the default projector is the shipped one."""
    import os

    env = {**os.environ, "E2P_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "e2p.cli", "generate", "--persona", "I am a chef in Paris.",
                        "--message", "What do you do?", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct" / "config.json").is_file()
    for noise in ("Converting", "Loading weights", "it/s]"):
        assert noise not in r.stderr, r.stderr
    assert r.stdout.strip()
