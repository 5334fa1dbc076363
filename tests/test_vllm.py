"""E2P on vLLM, for real: the in-process engine (`--engine vllm`) and the gateway (`e2p serve --vllm-url`) in front of a
real `vllm serve` on loopback, both on SmolLM2 in float32 on the CPU, checked token for token against the torch
engine. One vLLM engine per test session for each mode (each loads in about 30 s here)."""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from conftest import ADMIN, API, Server, assert_error

from e2p.errors import ConfigError
from e2p.engines.vllm_gateway import decode_tensor, tensor2base64

USERS = [torch.randn(8, generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)] + [None]
PROMPTS = ["Hi, what do you do on weekends?", "What is your favourite food?", "Tell me about yourself."]
NEW_TOKENS = 24
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine: plenty for these tests


def _vllm():
    return pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh test installs vllm-cpu)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- without vLLM running --------------------------------------------------------------------------------------------
def test_the_wire_encoding_is_vllms():
    _vllm()
    from vllm.utils.serial_utils import tensor2base64 as vllms

    x = torch.randn(5, 64)
    assert tensor2base64(x) == vllms(x)
    assert torch.equal(decode_tensor(tensor2base64(x)), x)


@pytest.mark.parametrize("position", ["start", "after_system", "after_sink"])
def test_a_rows_prompt_is_the_torch_engines_inputs_embeds(tiny, tmp_path, position):
    """What vLLM gets (token-embedding rows with the prefix spliced in) is exactly the torch engine's inputs_embeds."""
    from e2p import Projector
    from e2p.engines.vllm import VLLMModel
    from e2p.model import E2PModel, new_config

    tiny.model.save_pretrained(tmp_path / "tiny")
    info = tiny.info()
    info.folder = tmp_path / "tiny"
    torch.manual_seed(0)
    p = Projector(new_config(tiny, embedding_dim=8, num_prefix_tokens=2, prefix_position=position)).eval()
    torch.nn.init.normal_(p.mlp[-1].weight, std=0.5)
    torch_model, vllm_model = E2PModel(tiny, p, autocast=False), VLLMModel(info, p)
    messages = [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hi how are you ?"}]
    user = torch.randn(8)
    row = vllm_model.format(messages, reply="i am fine .")
    job = vllm_model.job(row, user, max_tokens=4)
    want = torch_model.build([row], [user])["inputs_embeds"][0]
    assert torch.equal(job.embeds, want)
    assert job.is_token.count(False) == 2 and len(job.token_ids) == len(want)
    plain = vllm_model.job(vllm_model.format(messages), None, max_tokens=4)
    assert all(plain.is_token) and plain.token_ids == vllm_model.format(messages).pre + vllm_model.format(messages).post


def test_deep_and_lora_projectors_are_refused_in_one_line_before_vllm_loads(capsys):
    from e2p.cli import main
    from e2p.config import E2PConfig, resolve_projector
    from e2p.engines import check_engine

    with pytest.raises(ConfigError, match="vllm engine takes input-injection projectors only"):
        check_engine("vllm", E2PConfig.load(resolve_projector("persona-deep-k1")))
    t = time.monotonic()
    assert main(["generate", "--engine", "vllm", "--projector", "persona-deep-k1", "--persona", "x", "--message", "hi"]) == 2
    assert time.monotonic() - t < 5  # nothing loaded
    err = capsys.readouterr().err.strip()
    assert "input-injection projectors only" in err and len(err.splitlines()) == 1


def test_vllm_engine_arguments_pass_through():
    import argparse

    from e2p.engines import add_engine_arguments, vllm_engine_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--engine", "vllm", "--tensor-parallel-size", "2", "--vllm-arg", "gpu_memory_utilization=0.8",
                              "--vllm-arg", "enable-prefix-caching=false", "--vllm-arg", "kv_cache_dtype=fp8"])
    assert vllm_engine_args(args) == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8,
                                      "enable_prefix_caching": False, "kv_cache_dtype": "fp8"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        vllm_engine_args(parser.parse_args(["--vllm-arg", "oops"]))


def test_an_unreachable_vllm_is_one_clear_error_at_start_up():
    from e2p.engines.vllm_gateway import VLLMGateway

    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot reach the vLLM server.*--enable-prompt-embeds"):
        VLLMGateway(f"http://127.0.0.1:{_free_port()}")
    assert time.monotonic() - t < 10


# --- the torch engine's replies: what both vLLM modes must equal ------------------------------------------------------
@pytest.fixture(scope="session")
def projector_dir(tmp_path_factory, real_backbone):
    """An input projector (k=2) on SmolLM2 whose random person part gives each user clearly different greedy text
    (the shipped persona-input-k1 barely tells users apart: its card says so)."""
    from e2p import Projector
    from e2p.model import new_config

    torch.manual_seed(0)
    p = Projector(new_config(real_backbone, embedding_dim=8, num_prefix_tokens=2, injection="input")).eval()
    torch.nn.init.normal_(p.mlp[-1].weight, std=0.5)
    folder = tmp_path_factory.mktemp("vllm") / "spread"
    p.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def torch_replies(projector_dir):
    """Greedy token ids of the torch engine (float32) for 4 users x 3 prompts, and the scored loss of each row."""
    import e2p

    model = e2p.load(projector_dir, dtype="float32")
    prompts, users = _grid()
    rows = [model.model.format(p) for p in prompts]
    tokens = model.model.generate_tokens(rows, model.users(users), max_new_tokens=NEW_TOKENS)
    scored = [model.model.format(p, reply="I like cooking and long walks.") for p in prompts]
    loss = model.model.loss(scored, model.users(users), reduction="none")[0].detach()
    return {"tokens": tokens, "loss": loss, "scored": scored}


def _grid():
    return [p for p in PROMPTS for _ in USERS], [u for _ in PROMPTS for u in USERS]


# --- in process: --engine vllm ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def in_process(projector_dir):
    _vllm()
    import e2p

    model = e2p.load(projector_dir, engine="vllm", max_new_tokens=128,
                     vllm_args={"enable_prefix_caching": True})
    yield model
    model.model.close()


@pytest.mark.backbone
def test_in_process_greedy_replies_equal_the_torch_engines_token_for_token(in_process, torch_replies):
    prompts, users = _grid()
    got = in_process.model.generate_tokens([in_process.model.format(p) for p in prompts], in_process.users(users),
                                           max_new_tokens=NEW_TOKENS)
    assert got == torch_replies["tokens"]  # 12 rows, 4 users (one without an embedding) mixed in one vLLM batch
    assert len({tuple(t) for t in got[:4]}) == 4  # the users really differ


@pytest.mark.backbone
def test_in_process_scores_target_tokens_as_the_torch_engine(in_process, torch_replies):
    _, users = _grid()
    nll, counts = in_process.model.loss(torch_replies["scored"], in_process.users(users), reduction="none")
    assert torch.allclose(nll, torch_replies["loss"], atol=2e-3, rtol=1e-4), (nll, torch_replies["loss"])
    assert counts.min() > 0


@pytest.mark.backbone
def test_a_user_without_embedding_is_plain_vllm(in_process):
    from vllm import SamplingParams

    row = in_process.model.format(PROMPTS[0])
    ours = in_process.model.generate_tokens([row], [None], max_new_tokens=NEW_TOKENS)[0]
    # vLLM on the token ids alone, through its own engine (no e2p in the way)
    runner = in_process.model.runner
    with runner._cond:  # the engine is driven by e2p's thread: use vLLM's LLM only while that thread is idle
        plain = runner.llm.generate({"prompt_token_ids": row.pre + row.post},
                                    SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    want = [t for t in plain[0].outputs[0].token_ids if t not in in_process.model.eos_ids]
    assert ours == want


@pytest.mark.backbone
def test_prefix_caching_keeps_each_users_own_reply(in_process):
    """Prefix caching is on in this engine: two users with the same prompt, alone and then together, each keep their
    own reply (the upstream bug made cached embedding prompts answer for each other)."""
    m = in_process.model
    row = m.format(PROMPTS[0])
    everyone = in_process.users(USERS[:3])
    replies = [m.generate_tokens([row], [u], max_new_tokens=NEW_TOKENS)[0] for u in everyone]
    i, j = next((i, j) for i in range(3) for j in range(i + 1, 3) if replies[i] != replies[j])  # two who differ
    users, alone = [everyone[i], everyone[j]], [replies[i], replies[j]]
    together = m.generate_tokens([row, row], users, max_new_tokens=NEW_TOKENS)
    again = m.generate_tokens([row, row], users[::-1], max_new_tokens=NEW_TOKENS)
    assert together == alone and again == alone[::-1]


@pytest.mark.backbone
def test_seeded_sampling_is_the_same_alone_and_in_a_batch(in_process):
    m = in_process.model
    row = m.format(PROMPTS[2])
    users = in_process.users(USERS[:3])
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, seed=7)
    alone = m.generate_tokens([row], users[:1], **kw)[0]
    batch = m.generate_tokens([row] * 3, users, **kw)
    assert batch[0] == alone
    other = m.generate_tokens([row], users[:1], **{**kw, "seed": 8})[0]
    assert other != alone


def _serve(model, **config):
    from e2p.serve import ServeConfig, create_app
    from e2p.store import EmbeddingStore

    import tempfile

    store = EmbeddingStore(os.path.join(tempfile.mkdtemp(prefix="e2p-vllm-"), "users.db"))
    return Server(create_app(model, store, ServeConfig(model_name="e2p-vllm", api_keys=[API], admin_key=ADMIN,
                                                        **config)))


def _put_users(client: httpx.Client, personal) -> None:
    for i, vector in enumerate(USERS[:3]):
        r = client.put(f"/v1/users/u{i}/embedding", json={"embedding": vector},
                       headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text


def _chat(client: httpx.Client, user: str | None, prompt: str, **extra) -> httpx.Response:
    body = {"model": "e2p-vllm", "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW_TOKENS,
            "temperature": 0, **extra}
    if user:
        body["user"] = user
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API}"})


def _stream_text(client: httpx.Client, user: str, prompt: str, **extra) -> tuple[str, str]:
    import json

    body = {"model": "e2p-vllm", "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW_TOKENS,
            "temperature": 0, "stream": True, "user": user, **extra}
    text, finish = "", None
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return text, finish


def _served_replies_equal_torch(client, model, torch_replies):
    """Every (user, prompt) through the server equals the torch engine's greedy reply, decoded as e2p decodes, and a
    streamed reply is the same text."""
    _put_users(client, model)
    prompts, users = _grid()
    for i, (prompt, persona) in enumerate(zip(prompts, users)):
        r = _chat(client, f"u{USERS.index(persona)}" if persona else None, prompt)
        assert r.status_code == 200, r.text
        want = model.model.tokenizer.decode(torch_replies["tokens"][i], skip_special_tokens=True).strip()
        assert r.json()["choices"][0]["message"]["content"] == want, (i, persona, prompt)
        assert r.headers["x-e2p-embedding"] == ("store" if persona else "none")
    whole = _chat(client, "u1", PROMPTS[1]).json()["choices"][0]
    text, finish = _stream_text(client, "u1", PROMPTS[1])  # the deltas add up to the whole reply
    assert text == whole["message"]["content"] and finish == whole["finish_reason"]


@pytest.mark.backbone
def test_the_server_on_the_in_process_engine(in_process, torch_replies):
    server = _serve(in_process.model)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            _served_replies_equal_torch(client, in_process, torch_replies)
            whole = _chat(client, "u0", PROMPTS[0]).json()["choices"][0]
            cut = whole["message"]["content"].split()[2]
            stopped = _chat(client, "u0", PROMPTS[0], stop=[cut]).json()["choices"][0]
            assert stopped["finish_reason"] == "stop" and cut not in stopped["message"]["content"]
            short = _chat(client, "u0", PROMPTS[0], max_tokens=3).json()
            assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
            assert_error(_chat(client, "nobody", PROMPTS[0]), 404, "user_not_found")
    finally:
        server.stop()


# --- gateway: e2p serve --vllm-url in front of a real `vllm serve` ----------------------------------------------------
@pytest.fixture(scope="module")
def vllm_server():
    """A real vLLM OpenAI server on a loopback port, on the converted SmolLM2 folder, with prompt embeddings on."""
    _vllm()
    from e2p.backbone import load_backbone_info

    port = _free_port()
    folder = load_backbone_info().folder
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"e2p-vllm-serve-{port}.log"), "w")
    # `python -m ...api_server` rather than the `vllm` script: vllm-cpu's script looks for a package named "vllm"
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                             "--enable-prompt-embeds", "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1",
                             "--port", str(port), "--max-model-len", "256"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"vllm serve exited; see {log.name}"
        assert time.monotonic() < deadline, f"vllm serve did not start in 300 s; see {log.name}"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield proc, url
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    log.close()


@pytest.fixture(scope="module")
def gateway(vllm_server, projector_dir):
    import e2p

    _, url = vllm_server
    return e2p.load(projector_dir, engine="vllm", vllm_url=url, max_new_tokens=128, max_prompt_tokens=96)


@pytest.mark.backbone
def test_gateway_greedy_replies_equal_the_torch_engines_token_for_token(gateway, torch_replies):
    prompts, users = _grid()
    got = gateway.model.generate_tokens([gateway.model.format(p) for p in prompts], gateway.users(users),
                                        max_new_tokens=NEW_TOKENS)
    assert got == torch_replies["tokens"]
    sent = sorted(list(gateway.model.runner.sent_bytes)[-len(prompts):])
    plain = sum(u is None for u in users)  # a row without a user goes as token ids, the others as embeddings
    assert all(b < 5_000 for b in sent[:plain]) and all(20_000 < b < 400_000 for b in sent[plain:])


@pytest.mark.backbone
def test_the_gateway_server_streams_answers_and_maps_upstream_faults(gateway, torch_replies, vllm_server):
    server = _serve(gateway.model, max_tokens_limit=400, request_timeout_s=60)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            _served_replies_equal_torch(client, gateway, torch_replies)
            # vLLM refuses (prompt + 400 tokens > its 256-token context): an OpenAI-shaped 502 with vLLM's reason
            r = _chat(client, "u1", PROMPTS[1], max_tokens=400)
            assert_error(r, 502, "upstream_error")
            assert "vLLM" in r.json()["error"]["message"]
            # vLLM goes away: 503 with Retry-After, at once, and the server itself stays up
            proc, _ = vllm_server
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            t = time.monotonic()
            r = _chat(client, "u1", PROMPTS[1])
            assert_error(r, 503, "upstream_unavailable")
            assert r.headers["retry-after"] == "1" and time.monotonic() - t < 10
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()


def test_a_silent_upstream_is_a_504_within_the_timeout():
    """An upstream that accepts the connection and never answers: the row fails with 504, nothing hangs."""
    from e2p.engines.vllm import VLLMJob
    from e2p.engines.vllm_gateway import VLLMGateway
    from e2p.errors import UpstreamError

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(sock.accept()) for _ in range(8)], daemon=True).start()
    # with the served model's name given, the gateway looks nothing up at start-up (this upstream would not answer)
    gw = VLLMGateway(f"http://127.0.0.1:{sock.getsockname()[1]}", model="m", timeout=1.5)
    job = VLLMJob(embeds=torch.zeros(3, 8), token_ids=[1, 2, 3], is_token=[True] * 3, max_tokens=4)
    t = time.monotonic()
    gw.submit(job)
    with pytest.raises(UpstreamError) as err:
        job.future.result(timeout=20)
    assert err.value.status == 504 and time.monotonic() - t < 10
    gw.close()
    sock.close()


@pytest.mark.backbone
def test_e2p_eval_on_the_vllm_engine_scores_as_the_torch_engine(in_process, real_backbone):
    """The evaluation loop on vLLM (`e2p eval --engine vllm`: every condition on one vLLM engine) gives the torch
    engine's perplexities: the shipped input projector on 12 examples of the shipped sample."""
    from e2p.data.contract import load_examples, load_users
    from e2p.engines.vllm import VLLMModel
    from e2p.evaluate import evaluate_examples
    from e2p.evaluate.demo import SAMPLE

    users = load_users(SAMPLE / "users.npz")
    examples = load_examples(SAMPLE / "examples.jsonl", users)
    runner = in_process.model.runner
    on_vllm = lambda b, projector=None, config=None: VLLMModel(b, projector, config, runner=runner)  # noqa: E731
    kw = dict(limit=12, generate=0, encoder=False, progress=False, only=["none", "shared_prefix", "e2p"])
    got = evaluate_examples(real_backbone, users, examples, "persona-input-k1", engine=on_vllm, **kw)
    want = evaluate_examples(real_backbone, users, examples, "persona-input-k1", **kw)
    for name in ("none", "shared_prefix", "e2p"):
        a, b = got["conditions"][name]["perplexity"], want["conditions"][name]["perplexity"]
        assert abs(a - b) / b < 1e-3, (name, a, b)
