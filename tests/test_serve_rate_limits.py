"""Per-key rate limits from the key file (a tenant's default, a key's own override), under the real server: a limited
key gets OpenAI's x-ratelimit headers on every answer and a 429 with retry-after above its limit, decided before its
body is read; tokens count prompt + completion; other keys and tenants are untouched."""
from __future__ import annotations

import time

import httpx
import pytest

from conftest import MODEL, PROMPT, Server, tiny_model

from e2p.cli import main
from e2p.serve import ServeConfig, create_app
from e2p.serve.keys import KeyFileError, add_key, load_keys, set_tenant, tenant_limits
from e2p.serve.limits import Limits
from e2p.store import EmbeddingStore

LIMITED, OWN, FREE, OTHER = "sk-limited-0123456789", "sk-own-limit-0123456789", "sk-free-0123456789ab", "sk-other-0123456789"


@pytest.fixture
def server(tmp_path):
    keys = tmp_path / "keys.json"
    add_key(keys, "acme", "user", LIMITED)  # the tenant's default: 3 requests a minute
    add_key(keys, "acme", "user", OWN, Limits(tokens_per_minute=40))  # its own tokens limit, the tenant's requests
    add_key(keys, "globex", "user", OTHER)
    set_tenant(keys, "acme", requests_per_minute=3)
    config = ServeConfig(model_name=MODEL, api_keys=[FREE], keys=load_keys(keys), tenant_limits=tenant_limits(keys),
                         max_tokens_limit=64)
    srv = Server(create_app(tiny_model(), EmbeddingStore(tmp_path / "s.db"), config))
    yield srv
    srv.stop()


def _chat(client, key, max_tokens=4, body=None):
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, content=body,
                       json=None if body is not None else {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                                                           "max_tokens": max_tokens})


def test_a_key_over_its_request_limit_gets_429_with_openai_headers(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        seen = []
        for _ in range(3):
            r = _chat(client, LIMITED)
            assert r.status_code == 200
            assert r.headers["x-ratelimit-limit-requests"] == "3"
            seen.append(int(r.headers["x-ratelimit-remaining-requests"]))
        assert seen == [2, 1, 0]
        t0 = time.monotonic()
        r = _chat(client, LIMITED, body=b"{not even json")  # refused on its headers: the body is never read
        held = time.monotonic() - t0
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert 0.9 < held < 5  # held until the key could retry or 1 s: a client retrying at once costs 1 refusal/s
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded" and "retry after" in err["message"]
        assert r.headers["x-ratelimit-remaining-requests"] == "0" and r.headers["x-ratelimit-reset-requests"].endswith("s")
        # other keys and tenants are untouched, and an unlimited key carries no rate-limit headers
        for key in (FREE, OTHER):
            r = _chat(client, key)
            assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers
        r = _chat(client, OWN)  # same tenant, its own bucket (the tenant's 3 requests, its own 40 tokens)
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "2"


def test_tokens_per_minute_count_prompt_and_completion(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = _chat(client, OWN, max_tokens=8)
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-tokens"] == "40"
        used = r.json()["usage"]["total_tokens"]
        assert used > 0
        r = _chat(client, OWN, max_tokens=8)  # the first answer's tokens were debited
        assert r.status_code in (200, 429)
        if r.status_code == 200:
            assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 40 - used
            r = _chat(client, OWN, max_tokens=8)
        assert r.status_code == 429 and r.headers["x-ratelimit-remaining-tokens"] == "0"
        stream = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {LIMITED}"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2,
                                   "stream": True})
        assert stream.status_code == 200 and stream.headers["x-ratelimit-limit-requests"] == "3"


def test_keys_cli_writes_limits_and_refuses_bad_ones(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "add", "--file", str(path), "--tenant", "acme", "--role", "user", "--key", LIMITED,
                 "--requests-per-minute", "30", "--tokens-per-minute", "5000"]) == 0
    assert load_keys(path)[0].limits == Limits(30, 5000)
    assert main(["keys", "tenant", "--file", str(path), "--tenant", "acme", "--requests-per-minute", "60",
                 "--allow-remember"]) == 0
    assert main(["keys", "tenant", "--file", str(path), "--tenant", "acme", "--tokens-per-minute", "100"]) == 0
    assert tenant_limits(path) == {"acme": Limits(60, 100)}
    import json

    assert json.loads(path.read_text())["tenants"]["acme"]["allow_remember"] is True  # untouched by a later call
    assert main(["keys", "tenant", "--file", str(path), "--tenant", "acme", "--requests-per-minute", "0"]) == 0
    assert tenant_limits(path) == {"acme": Limits(None, 100)}  # 0: the limit removed
    capsys.readouterr()
    assert main(["keys", "add", "--file", str(path), "--tenant", "acme", "--role", "user", "--key", OWN,
                 "--requests-per-minute", "-5"]) == 2
    assert "whole number >= 1" in capsys.readouterr().err
    body = json.loads(path.read_text())
    body["keys"][0]["tokens_per_minute"] = "lots"
    path.write_text(json.dumps(body))
    with pytest.raises(KeyFileError, match=r"keys\[0\]: tokens_per_minute must be a whole number"):
        load_keys(path)
