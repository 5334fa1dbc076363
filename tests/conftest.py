"""Shared test helpers: tiny randomly initialised Llama backbones and a word-level tokenizer with a chat template,
built in code; and for the server's tests a tiny model behind a real uvicorn on a loopback port."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("hi hello how are you i am fine like dogs cats music tell me about yourself what do for fun "
         "chatting with someone just met reply briefly your persona a an the love to play guitar work "
         "as teacher nurse . , ! ? system user assistant").split()

DATA = Path(os.environ.get("E2P_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_backbone(seed: int = 0, hidden: int = 64, layers: int = 2, name: str = "tiny-llama"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from e2p.backbone import Backbone, freeze

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    return freeze(Backbone(model=model, tokenizer=tok, name=name))


@pytest.fixture
def tiny():
    return make_backbone()


@pytest.fixture(scope="session")
def real_backbone():
    from e2p.backbone import load_backbone

    return load_backbone()


@pytest.fixture(scope="session")
def shared_data():
    if not (DATA / "synthetic_persona_chat").is_dir():
        pytest.skip(f"real data not found at {DATA} (set E2P_DATA)")
    return DATA


# --- the store's tests: every backend (SQLite, and PostgreSQL in a throwaway cluster of the session) ------------------
@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the session (initdb in a temporary folder, a free port), or a skip saying why."""
    from pgcluster import Cluster, why_not

    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = Cluster()
    yield cluster
    cluster.close()


def new_database(cluster) -> str:
    """A fresh database in the cluster: its DSN."""
    import uuid

    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return cluster.dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """`open_store(dim=None)` -> a store of this test's own on each backend (the same one again on each call), with
    `.spec` (the --store value) and `.backend`."""
    from e2p.store import open_store as open_spec

    spec = str(tmp_path / "s.db") if request.param == "sqlite" else new_database(request.getfixturevalue("pg_cluster"))
    opened = []

    def make(dim=None):
        opened.append(open_spec(spec, dim=dim))
        return opened[-1]

    make.spec, make.backend = spec, request.param
    yield make
    for store in opened:
        store.close()


# --- the server's tests: a tiny model behind uvicorn on a loopback port (test_serve and the serve test files) ------
from e2p import Projector  # noqa: E402
from e2p.model import E2PModel, new_config  # noqa: E402

API, ADMIN, MODEL = "test-key", "admin-key", "tiny-e2p"
PROMPT = "hi how are you ?"


def tiny_model() -> E2PModel:
    """The conftest backbone with livelier random layers, so different users really get different greedy text."""
    backbone = make_backbone()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in backbone.model.model.layers.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    projector = Projector(new_config(backbone, embedding_dim=8, num_prefix_tokens=2))
    torch.nn.init.normal_(projector.mlp[-1].weight, std=0.5)
    projector.eval()
    return E2PModel(backbone, projector, max_prompt_tokens=48)  # the machine's default precision, as `e2p serve` runs


class Server:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app, drain_seconds: float | None = None):
        """`drain_seconds`: run the server `e2p serve` runs (serve.health.DrainingServer) with that drain."""
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=30)
        if drain_seconds is None:
            self.server = uvicorn.Server(config)
        else:
            from e2p.serve.health import DrainingServer

            self.server = DrainingServer(config, drain_seconds=drain_seconds)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def vec(seed: int) -> list[float]:
    return torch.randn(8, generator=torch.Generator().manual_seed(seed)).tolist()


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


def slowed(model: E2PModel, seconds: float) -> E2PModel:
    """Each generation step takes `seconds` longer, so that streaming can be told from buffering."""
    real = model.advance

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    model.advance = slow
    return model
