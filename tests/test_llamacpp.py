"""The llama.cpp engine on the real SmolLM2: the same answers as torch on a float32 GGUF of the same weights, mixed
users in one llama.cpp batch, deep projectors refused by name, and the edge lines of docs/edge.md without torch."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2p.backbone import cache_dir, default_gguf
from e2p.engines.gguf_convert import dequantize_gguf
from e2p.model import E2PModel, new_config
from e2p.projector import Projector

pytestmark = pytest.mark.backbone
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What do you do on weekends?", "Tell me about yourself.", "What is your favourite food?",
           "Do you have any pets?"]


@pytest.fixture(scope="module")
def f32_gguf(real_backbone):
    """The bundled Q4_1 GGUF de-quantized to float32: exactly the weights the torch path runs."""
    path = cache_dir() / "gguf" / "SmolLM2-135M-Instruct-f32.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        dequantize_gguf(default_gguf("SmolLM2-135M-Instruct"), path)
    return path


@pytest.fixture(scope="module")
def input_projector(real_backbone):
    torch.manual_seed(0)
    p = Projector(new_config(real_backbone, embedding_dim=384, injection="input"))
    with torch.no_grad():
        p.mlp[-1].weight.normal_(0, 0.05)  # a person part large enough that users get different replies
    return p.eval()


@pytest.fixture(scope="module")
def users():
    return torch.randn(16, 384, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llama_model(real_backbone, input_projector, f32_gguf):
    from e2p.engines.llamacpp import LlamaCppModel

    return LlamaCppModel(real_backbone, input_projector, gguf=f32_gguf, n_seq_max=16)


def test_greedy_tokens_match_torch_on_a_float32_gguf(real_backbone, input_projector, llama_model, users):
    """16 users x 4 prompts, 16 greedy tokens: llama.cpp on the same float32 weights gives torch's tokens."""
    torch_model = E2PModel(real_backbone, input_projector)
    same, rows = 0, 0
    for prompt in PROMPTS:
        segs = [torch_model.format(prompt)] * 16
        a = torch_model.generate_tokens(segs, users, max_new_tokens=16)
        b = llama_model.generate_tokens(segs, users, max_new_tokens=16)
        same += sum(x == y for x, y in zip(a, b))
        rows += len(a)
        assert len({tuple(t) for t in b}) > 1  # the users' prefixes reach llama.cpp: not one reply for all
    assert same >= rows - 2, f"{same}/{rows} rows identical"  # measured: see docs/performance.md


def test_target_losses_match_torch(real_backbone, input_projector, llama_model, users):
    torch_model = E2PModel(real_backbone, input_projector)
    rows = [torch_model.format(p, reply="I like hiking with my two dogs.") for p in PROMPTS]
    a, na = torch_model.loss(rows, users[:4], reduction="none")
    b, nb = llama_model.loss(rows, users[:4], reduction="none")
    assert torch.equal(na, nb)
    assert torch.allclose(a, b, rtol=2e-3), (a, b)
    shared_only = llama_model.loss(rows, None, reduction="none")[0]
    assert not torch.allclose(shared_only, b, rtol=1e-3)  # the embedding changes the scores


def test_mixed_users_in_one_llamacpp_batch_give_each_row_its_text_alone(real_backbone, llama_model, users):
    segs = [llama_model.format(PROMPTS[i % 4]) for i in range(8)]
    embeddings = [users[i] if i != 3 else None for i in range(8)]  # one row without a user, same batch
    together = llama_model.generate_tokens(segs, embeddings, max_new_tokens=12)
    alone = [llama_model.generate_tokens([s], [e], max_new_tokens=12)[0] for s, e in zip(segs, embeddings)]
    assert together == alone
    # continuous batching: at most 3 rows at once, rows joining as others finish
    assert llama_model.generate_tokens(segs, embeddings, max_new_tokens=12, batch_size=3) == together
    assert llama_model.engine.free_seqs == list(range(16))  # every finished row gave its KV cells back


def test_a_row_on_q8_0_decodes_the_same_whatever_rows_share_its_batch(real_backbone, input_projector, users):
    """Each row in its own KV stream, so it attends to its own cells only: on Q8_0 (5 random projectors x 16
    rows x 32 tokens) 76 of 80 rows equal their text alone against 23 of 80 with one unified cache; what is left
    is the quantized matmul kernels of a 16-token batch summing in another order than a 1-token one."""
    from e2p.engines.llamacpp import LlamaCppModel

    q8 = LlamaCppModel(real_backbone, input_projector, gguf="q8_0", n_seq_max=16)
    q8.eos_ids = [-1]
    segs = [q8.format(PROMPTS[i % 4]) for i in range(16)]
    embeddings = [users[i % len(users)] for i in range(16)]
    together = q8.generate_tokens(segs, embeddings, max_new_tokens=32)
    alone = [q8.generate_tokens([s], [e], max_new_tokens=32)[0] for s, e in zip(segs, embeddings)]
    assert sum(a == b for a, b in zip(together, alone)) >= 14, (together, alone)


def test_a_row_that_outgrows_its_kv_cells_gets_a_clear_error_and_frees_them(f32_gguf):
    from e2p.engines.llamacpp_backend import LlamaCppBackend, LlamaCppError, Prompt, tokenize

    backend = LlamaCppBackend(f32_gguf, n_ctx_seq=256, n_seq_max=2, n_batch=128)
    seqs = backend.take_seqs(1)
    with pytest.raises(LlamaCppError, match="outgrew its 256 KV cells"):
        backend.prefill([Prompt([], tokenize(backend, "hello " * 400))], [None], seqs)
    backend.release(seqs)
    logits, nxt = backend.prefill([Prompt([], tokenize(backend, "hello"))], [None], backend.take_seqs(1))
    assert nxt == [1] and logits[0].shape == (1, backend.n_vocab)


def test_gguf_q8_0_is_the_bundled_weights_converted_once(real_backbone, input_projector, llama_model, users):
    """--gguf q8_0: made once from the f32 file and cached; close to the f32 weights (first-step logits)."""
    from e2p.engines.gguf_convert import resolve_gguf
    from e2p.engines.llamacpp import LlamaCppModel

    path = resolve_gguf("SmolLM2-135M-Instruct", "q8_0")
    made = path.stat().st_mtime_ns
    assert resolve_gguf("SmolLM2-135M-Instruct", "Q8_0") == path and path.stat().st_mtime_ns == made
    assert path.stat().st_size < 0.35 * resolve_gguf("SmolLM2-135M-Instruct", "f32").stat().st_size
    q8 = LlamaCppModel(real_backbone, input_projector, gguf="q8_0", n_seq_max=4)
    segs = [q8.format(p) for p in PROMPTS]
    a = q8.next_logits(q8.start_decoding(segs, users[:4]))
    b = llama_model.next_logits(llama_model.start_decoding(segs, users[:4]))
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    with pytest.raises(ValueError, match="one of f32, q8_0, q4_0"):
        from e2p.engines.gguf_convert import derived_gguf
        derived_gguf(path, "q5_k")


def test_a_deep_projector_is_refused_with_the_engine_named(real_backbone, f32_gguf):
    from e2p.engines.llamacpp import LlamaCppModel
    from e2p.errors import ConfigError

    deep = Projector(new_config(real_backbone, embedding_dim=384, injection="deep"))
    with pytest.raises(ConfigError, match="llama-cpp engine takes input-injection projectors"):
        LlamaCppModel(real_backbone, deep, gguf=f32_gguf)


def test_the_edge_lines_run_without_torch():
    """docs/edge.md's Python block in a process where `import torch` fails."""
    text = (ROOT / "docs" / "edge.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    blocker = "import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
    proc = subprocess.run([sys.executable, "-c", blocker + block], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip()) > 5


def test_the_edge_chat_string_is_the_torch_path_prompt(real_backbone):
    """The edge block writes SmolLM2's template by hand: it must be the very prompt E2PModel formats."""
    from e2p.engines.numpy_projector import NumpyProjector

    projector = NumpyProjector.from_pretrained("persona-input-k1")
    system = projector.config["system_prompt"]
    chat = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat do you do on weekends?<|im_end|>\n"
            "<|im_start|>assistant\n")
    model = E2PModel(real_backbone, Projector.from_pretrained("persona-input-k1", real_backbone))
    assert real_backbone.tokenizer(chat, add_special_tokens=False)["input_ids"] == model.format(PROMPTS[0]).post


@pytest.mark.parametrize("hidden", [[32], []])
def test_numpy_projector_equals_the_torch_projector(tmp_path, hidden):
    """docs/edge.md's formula in numpy gives the torch projector's prefixes (an MLP and a linear map)."""
    from conftest import make_backbone

    from e2p.engines.numpy_projector import NumpyProjector

    tiny = make_backbone()
    torch.manual_seed(1)
    torch_p = Projector(new_config(tiny, embedding_dim=12, num_prefix_tokens=2, hidden_dims=hidden, person_scale=0.7,
                                   embedding_mean=torch.randn(12).tolist()))
    with torch.no_grad():
        torch_p.mlp[-1].weight.normal_(0, 0.3)
    torch_p.eval().save_pretrained(tmp_path / "p")
    e = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch_p(e).numpy()
    got = NumpyProjector.from_pretrained(tmp_path / "p")(e.numpy())
    assert got.shape == expected.shape == (5, 2, tiny.hidden_size)
    assert abs(got - expected).max() < 1e-5


def test_the_server_batches_llamacpp_rows_like_torch_rows(tmp_path, llama_model, users):
    """`e2p serve --engine llama-cpp`: concurrent requests of different users share llama.cpp batches (continuous
    batching through the one decode loop) and each gets the text the Python API gives for that user."""
    import concurrent.futures

    import httpx
    from conftest import Server

    from e2p.serve import ServeConfig, create_app
    from e2p.store import EmbeddingStore

    app = create_app(llama_model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name="m", max_batch_size=8,
                                                                                 batch_wait_ms=100))
    server = Server(app)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for i in range(6):
                assert http.put(f"/v1/users/u{i}/embedding", json={"embedding": users[i].tolist()}).status_code == 200

            def ask(i):
                r = http.post("/v1/chat/completions", json={"model": "m", "user": f"u{i}", "max_tokens": 10, "temperature": 0,
                                                            "messages": [{"role": "user", "content": PROMPTS[i % 4]}]})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(ask, range(6)))
        assert max(app.state.batcher.batch_sizes) > 1  # rows really shared a batch
        expected = [llama_model.generate([PROMPTS[i % 4]], [users[i]], max_new_tokens=10)[0] for i in range(6)]
        assert sum(a == e for a, e in zip(answers, expected)) >= 5, (answers, expected)
    finally:
        server.stop()


NO_TORCH_WEIGHTS = r"""
import gc, json, sys
from pathlib import Path
import numpy as np, torch
import e2p
from transformers import PreTrainedModel

model = e2p.load("persona-input-k1", engine="llama-cpp", max_batch_size=3, max_new_tokens=12)
users = np.load(next(Path(e2p.__file__).parent.glob("demo_data/*/users.npz")))["embedding"]  # real MiniLM users
replies = model.generate("What do you do on weekends?", users=[users[0], users[1], None], max_new_tokens=12)
gc.collect()
tensors = sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.Tensor))
models = [type(o).__name__ for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
print(json.dumps({"replies": replies, "tensor_values": tensors, "models": models, "memory": model.model.memory(),
                  "projector": model.projector.num_parameters()}))
"""


def test_the_llamacpp_engine_generates_with_no_torch_backbone_weights_loaded(real_backbone):
    """A process of its own (the test session holds the torch backbone): `e2p.load(..., engine="llama-cpp")` reads
    the backbone's tokenizer and sizes only; the torch tensors alive after generating are the projector's."""
    out = subprocess.run([sys.executable, "-c", NO_TORCH_WEIGHTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert all(r.strip() for r in got["replies"]) and len(set(got["replies"])) > 1
    assert got["models"] == []  # no transformers model object at all
    assert got["tensor_values"] < 2 * got["projector"] + 100_000  # SmolLM2's 135M weights would be ~1,000x more
    assert got["memory"]["gguf_bytes"] > 50_000_000 and got["memory"]["rss_bytes"] < 1_500_000_000


def test_llamacpp_rows_set_aside_keep_their_kv_cells_and_give_the_same_tokens(llama_model, users):
    """Fair shares set rows aside between steps (Generation.focus, LlamaDecoding.split): their sequences keep their KV
    cells, and every row's greedy tokens equal those of a plain run."""
    from e2p.engines.generation import DecodeRow, Generation

    segs = [llama_model.format(p) for p in PROMPTS[:3]]

    def run(focus: bool) -> list[list[int]]:
        gen = Generation(llama_model)
        rows = [DecodeRow(temperature=0.0, top_p=1.0, seed=None, max_tokens=10) for _ in range(3)]
        gen.add(rows, segs, list(users[:3]))
        step = 0
        while gen.rows or gen.waiting:
            if focus:
                wanted = {1} if step in (6, 7) else {0, 2} if 1 <= step <= 5 else {0, 1, 2}
                gen.focus(lambda r: rows.index(r) in wanted)
            gen.step()
            step += 1
        return [r.tokens for r in rows]

    assert run(True) == run(False)
