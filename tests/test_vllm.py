"""vLLM export: prompt_embeds equal the model's own inputs_embeds; request bodies and the client's wire format."""
import base64
import io
import json

import httpx
import pytest
import torch

from e2p import Projector
from e2p.errors import ConfigError
from e2p.model import E2PModel, new_config
from e2p.engines.vllm import VLLMClient, VLLMExporter, decode_tensor, tensor2base64

MESSAGES = [{"role": "user", "content": "hi , how are you ?"}, {"role": "assistant", "content": "i am fine ."},
            {"role": "user", "content": "what do you do for fun ?"}]


def _model(tiny, position="start", injection="input", k=2):
    torch.manual_seed(0)
    p = Projector(new_config(tiny, embedding_dim=8, num_prefix_tokens=k, prefix_position=position, injection=injection))
    with torch.no_grad():  # a non-zero person part, so users differ
        p.mlp[-1].weight.normal_(0, 0.1)
    return E2PModel(tiny, p, autocast=False)


def _vllm_reference_tensor2base64(x):  # vllm.utils.serial_utils.tensor2base64, as vLLM documents it
    with io.BytesIO() as buf:
        torch.save(x, buf)
        buf.seek(0)
        return base64.b64encode(buf.read()).decode("utf-8")


def test_encoding_is_vllms():
    x = torch.randn(5, 64)
    assert tensor2base64(x) == _vllm_reference_tensor2base64(x)
    back = torch.load(io.BytesIO(base64.b64decode(tensor2base64(x))), weights_only=True)
    assert torch.equal(back, x) and torch.equal(decode_tensor(tensor2base64(x)), x)


@pytest.mark.parametrize("position", ["start", "after_system", "after_sink"])
def test_prompt_embeds_equal_the_models_inputs_embeds(tiny, position):
    model = _model(tiny, position)
    model.projector.train()  # the exporter must use eval mode (no dropout) and restore the mode
    users = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    exporter = VLLMExporter(model)
    body = exporter.completion_body("tiny", MESSAGES, users[1], max_tokens=16, temperature=0)
    assert model.projector.training
    assert set(body) == {"model", "prompt_embeds", "max_tokens", "temperature"} and body["model"] == "tiny"
    json.dumps(body)  # JSON-serialisable
    got = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
    model.projector.eval()
    rows = [model.format(MESSAGES), model.format(MESSAGES[-1:])]
    row = rows[0]
    assert got.shape == (len(row.pre) + 2 + len(row.post), 64) and got.dtype == torch.float32
    with torch.no_grad():
        alone = model.build([row], users[1:2])["inputs_embeds"][0]
        batched = model.build(rows[::-1], users)["inputs_embeds"][1]  # the same user in a padded batch
        prefix = model.projector(users[1:2])[0]
    assert torch.equal(got, alone)
    assert torch.allclose(got, batched[-len(got):], atol=1e-6)
    assert torch.allclose(got[len(row.pre): len(row.pre) + 2], prefix, atol=1e-6)  # the prefix sits after `pre`
    other = decode_tensor(exporter.completion_body("tiny", MESSAGES, users[0])["prompt_embeds"])
    assert not torch.allclose(other, got)  # another user, another prompt
    half = decode_tensor(VLLMExporter(model, dtype=torch.bfloat16).completion_body("tiny", MESSAGES, users[1])["prompt_embeds"])
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), got, atol=1e-2)


@pytest.mark.parametrize("position,where", [("start", "system"), ("after_system", "user")])
def test_chat_body_carries_the_prefix_as_a_content_part(tiny, position, where):
    model = _model(tiny, position)
    user = torch.randn(8)
    body = VLLMExporter(model).chat_body("tiny", MESSAGES, user, max_tokens=8)
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    target = next(m for m in msgs if m["role"] == where)
    part, text = target["content"]
    assert part["type"] == "prompt_embeds" and text["type"] == "text"
    assert text["text"] == (model.config.system_prompt if where == "system" else MESSAGES[0]["content"])
    prefix = decode_tensor(part["data"])
    model.projector.eval()
    with torch.no_grad():
        assert prefix.shape == (2, 64) and torch.allclose(prefix, model.projector(user.unsqueeze(0))[0], atol=1e-6)
    assert sum(isinstance(m["content"], list) for m in msgs) == 1 and MESSAGES[0]["content"] == "hi , how are you ?"


def test_after_sink_chat_body_is_refused_with_advice(tiny):
    with pytest.raises(ConfigError, match="completion_body"):
        VLLMExporter(_model(tiny, "after_sink")).chat_body("tiny", MESSAGES, torch.randn(8))


def test_deep_injection_is_refused_with_advice(tiny):
    with pytest.raises(ConfigError, match="--injection input"):
        VLLMExporter(_model(tiny, injection="deep"))


def test_client_sends_the_documented_format(tiny):
    model = _model(tiny)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.method, request.url.path, request.headers.get("authorization"), body))
        if request.url.path.endswith("/completions") and "chat" not in request.url.path:
            return httpx.Response(200, json={"choices": [{"index": 0, "text": " i like dogs .", "finish_reason": "stop"}]})
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": "music !"}}]})

    exporter = VLLMExporter(model)
    user = torch.randn(8)
    with VLLMClient("http://vllm.test/v1", api_key="sk-x", transport=httpx.MockTransport(handler)) as client:
        assert client.complete(exporter, "tiny", MESSAGES, user, max_tokens=16, temperature=0) == " i like dogs ."
        assert client.chat(exporter, "tiny", MESSAGES, user, max_tokens=16) == "music !"
    (m1, p1, a1, b1), (m2, p2, a2, b2) = seen
    assert (m1, p1, a1) == ("POST", "/v1/completions", "Bearer sk-x") and (m2, p2) == ("POST", "/v1/chat/completions")
    assert "prompt" not in b1 and b1["max_tokens"] == 16 and b1["temperature"] == 0
    assert torch.equal(decode_tensor(b1["prompt_embeds"]), exporter.prompt_embeds(MESSAGES, user))
    assert b2["messages"][0]["content"][0]["type"] == "prompt_embeds"

    def failing(request):
        return httpx.Response(400, json={"error": {"message": "prompt_embeds is not enabled"}})

    with VLLMClient("http://vllm.test/v1", transport=httpx.MockTransport(failing)) as client:
        with pytest.raises(RuntimeError, match="400.*not enabled"):
            client.complete(exporter, "tiny", MESSAGES, user)


def test_plain_backbone_and_no_user(tiny):
    model = _model(tiny)
    exporter = VLLMExporter(model)
    row = model.format(MESSAGES)
    plain = exporter.prompt_embeds(MESSAGES, None)  # no user: the plain prompt, no prefix slots
    assert plain.shape[0] == len(row.pre) + len(row.post)
    assert exporter.chat_messages(MESSAGES, None)[1] == MESSAGES[0]
