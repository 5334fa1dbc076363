"""--device / --dtype: what 'auto' means where, clear refusals, everything following the backbone, checkpointing."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import make_backbone
from e2p.devices import Precision, cpu_has_native_bf16, resolve_device, resolve_dtype
from e2p.errors import ConfigError
from e2p.model import DeepInjectionError, E2PModel, new_config
from e2p.formatting import Segments
from e2p.projector import Projector

CPU = torch.device("cpu")


def test_auto_device_is_the_cpu_without_an_accelerator():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == CPU
    assert resolve_device(None) == CPU
    assert resolve_device("cpu") == CPU


@pytest.mark.parametrize("spec", ["cuda", "cuda:3"])
def test_a_missing_gpu_is_refused_with_what_to_do(spec):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="--device cpu"):
        resolve_device(spec)


def test_an_unknown_device_names_the_choices():
    with pytest.raises(ConfigError, match="auto\\|cpu\\|cuda"):
        resolve_device("tpu0")


def test_auto_dtype_on_a_cpu_is_float32_to_generate_and_native_bf16_to_train():
    assert resolve_dtype("auto", CPU) == Precision(torch.float32, None)
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert resolve_dtype("auto", CPU, training=True) == Precision(torch.float32, expected)
    # bf16 on a CPU: exact float32 weights with bf16 autocast; float16 is for GPUs
    assert resolve_dtype("bfloat16", CPU) == Precision(torch.float32, torch.bfloat16)
    assert resolve_dtype(torch.float32, CPU) == Precision(torch.float32, None)
    with pytest.raises(ConfigError, match="GPUs"):
        resolve_dtype("float16", CPU)
    with pytest.raises(ConfigError, match="auto\\|float32"):
        resolve_dtype("int8", CPU)


def test_a_cuda_device_gets_bf16_weights_without_autocast():
    cuda = torch.device("cuda", 0)  # the rule needs no GPU to check (only auto asks the GPU whether it has bf16)
    assert resolve_dtype("bfloat16", cuda) == Precision(torch.bfloat16, None)
    assert resolve_dtype("float16", cuda) == Precision(torch.float16, None)
    assert resolve_dtype("float32", cuda) == Precision(torch.float32, None)


def test_the_model_generates_in_float32_and_trains_in_the_native_precision_by_default():
    """The server's and the API's default on this machine: no autocast for generation, whatever the CPU."""
    tiny = make_backbone()
    p = Projector(new_config(tiny, embedding_dim=8))
    assert E2PModel(tiny, p).autocast is None
    assert E2PModel(tiny, p, training=True).autocast == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert E2PModel(tiny, p, autocast=True).autocast == torch.bfloat16
    assert p.shared.device == tiny.device


def test_load_backbone_takes_device_and_dtype(tmp_path):
    from e2p.backbone import load_backbone

    tiny = make_backbone()
    tiny.model.save_pretrained(tmp_path / "bb")
    tiny.tokenizer.save_pretrained(tmp_path / "bb")
    bb = load_backbone(str(tmp_path / "bb"), device="cpu", dtype="bfloat16")
    assert bb.device == CPU and bb.dtype == torch.float32  # on a CPU bf16 is autocast over float32 weights
    assert bb.precision() == Precision(torch.float32, torch.bfloat16)
    assert E2PModel(bb, None).autocast == torch.bfloat16
    bb32 = load_backbone(str(tmp_path / "bb"), device="cpu", dtype="float32")
    assert E2PModel(bb32, None).autocast is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_cli_refuses_a_missing_gpu_before_loading_anything():
    proc = subprocess.run([sys.executable, "-m", "e2p.cli", "generate", "--device", "cuda", "--persona", "x",
                           "--message", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--device cpu" in proc.stderr


def test_gradient_checkpointing_gives_the_same_loss_and_gradient_and_refuses_deep():
    from e2p.backbone import enable_gradient_checkpointing

    rows = lambda m: [m.format("hi how are you ?", reply="i am fine"), m.format("tell me about yourself", reply="i like dogs")]
    emb = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))

    def loss_and_grad(checkpointing: bool):
        tiny = make_backbone()
        if checkpointing:
            enable_gradient_checkpointing(tiny)
        torch.manual_seed(0)
        p = Projector(new_config(tiny, embedding_dim=8, injection="input", dropout=0.0))
        with torch.no_grad():
            p.mlp[-1].weight.normal_(0, 0.1)
        m = E2PModel(tiny, p, autocast=False)
        loss = m.loss(rows(m), emb)
        loss.backward()
        return float(loss), p.mlp[0].weight.grad.clone(), tiny

    plain_loss, plain_grad, _ = loss_and_grad(False)
    ck_loss, ck_grad, tiny = loss_and_grad(True)
    assert tiny.model.is_gradient_checkpointing
    assert ck_loss == pytest.approx(plain_loss, abs=1e-6)
    assert torch.allclose(ck_grad, plain_grad, atol=1e-6)
    with pytest.raises(DeepInjectionError, match="input"):
        E2PModel(tiny, Projector(new_config(tiny, embedding_dim=8, injection="deep")))


def test_after_sink_rows_each_keep_their_own_first_token_in_a_mixed_batch():
    """Two rows whose prompts start with different tokens: together, each scores what it scores alone."""
    tiny = make_backbone()
    cfg = new_config(tiny, embedding_dim=8, injection="deep", prefix_position="after_sink", hidden_dims=[16])
    p = Projector(cfg)
    with torch.no_grad():
        p.mlp[-1].weight.normal_(0, 0.5)
    m = E2PModel(tiny, p.eval(), autocast=False)
    ids = lambda text: tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [Segments(pre=[], post=ids("hi how are you ?"), target=ids("i am fine")),
            Segments(pre=[], post=ids("tell me about yourself"), target=ids("i like dogs"))]
    assert rows[0].post[0] != rows[1].post[0]
    users = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    together, _ = m.loss(rows, users, reduction="none")
    alone = torch.cat([m.loss([r], users[i:i + 1], reduction="none")[0] for i, r in enumerate(rows)])
    assert torch.allclose(together, alone, atol=1e-5)
