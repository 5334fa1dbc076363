"""Tenants (issue 28): every API key belongs to a tenant (a key file of hashes, `e2p keys add`), a request's `user`
is looked up in its own tenant only, an admin manages its own tenant's users only, and another tenant can neither
read, use, overwrite nor delete a user, nor learn whether one exists. Logs and /metrics name no user unless
--log-user-ids. Bad keys and key files get one line saying what to fix."""
from __future__ import annotations

import io
import json
import logging
import os
import stat

import httpx
import numpy as np
import pytest

from e2p.cli import main
from e2p.serve import ServeConfig, create_app
from e2p.serve.keys import KeyFileError, add_key, load_keys
from e2p.serve.logs import JsonFormatter
from e2p.store import EmbeddingStore
from test_privacy_store import files_holding
from conftest import MODEL, PROMPT, Server, assert_error, tiny_model

KEYS = {("acme", "user"): "sk-acme-user-0123456789", ("acme", "admin"): "sk-acme-admin-0123456789",
        ("globex", "user"): "sk-globex-user-0123456789", ("globex", "admin"): "sk-globex-admin-0123456789"}
LEGACY_API, LEGACY_ADMIN = "legacy-key", "legacy-admin"


def auth(tenant, role):
    return {"authorization": f"Bearer {KEYS[tenant, role]}"}


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0, **kw}


def vector(seed: int) -> list[float]:
    return np.random.default_rng(seed).uniform(-1e5, 1e5, 8).astype(np.float32).tolist()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    for (tenant, role), key in KEYS.items():
        add_key(path, tenant, role, key)
    return path


def serve(tmp_path, key_file, **config):
    store = EmbeddingStore(tmp_path / "store" / "users.db")
    config = ServeConfig(model_name=MODEL, api_keys=[LEGACY_API], admin_key=LEGACY_ADMIN, keys=load_keys(key_file),
                         max_tokens_limit=16, **config)
    return Server(create_app(tiny_model(), store, config)), store


def answers(http, headers_of) -> list:
    """Everything globex can ask about `alice`, as (status, body, headers without random ids)."""
    calls = [("GET", "/v1/users/alice/embedding", "user", None), ("GET", "/v1/users/alice/embedding", "admin", None),
             ("DELETE", "/v1/users/alice/embedding", "admin", None),
             ("POST", "/v1/chat/completions", "user", chat_body(user="alice")),
             ("POST", "/v1/chat/completions", "admin", chat_body(safety_identifier="alice")),
             ("POST", "/v1/completions", "user", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "user": "alice"})]
    out = []
    for method, url, role, body in calls:
        r = http.request(method, url, json=body, headers=headers_of(role))
        headers = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date")}
        out.append((r.status_code, r.json(), headers))
    return out


def test_another_tenant_cannot_read_use_overwrite_delete_or_detect_a_user(tmp_path, key_file):
    server, store = serve(tmp_path, key_file)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            globex = lambda role: auth("globex", role)  # noqa: E731
            before = answers(http, globex)  # nobody called alice anywhere
            assert [a[0] for a in before] == [404] * 6 and {a[1]["error"]["code"] for a in before} == {"user_not_found"}
            secret = vector(1)
            r = http.put("/v1/users/alice/embedding", json={"embedding": secret}, headers=auth("acme", "admin"))
            assert r.status_code == 200 and r.json()["version"] == 1
            after = answers(http, globex)  # acme's alice exists now: globex sees exactly the same
            assert after == before
            # acme uses its alice; its user key cannot write
            r = http.post("/v1/chat/completions", json=chat_body(user="alice"), headers=auth("acme", "user"))
            assert r.status_code == 200 and r.headers["x-e2p-embedding"] == "store"
            assert_error(http.put("/v1/users/alice/embedding", json={"embedding": vector(9)},
                                  headers=auth("acme", "user")), 403, "permission_denied")
            # globex's alice is another person: acme's stays as it was
            r = http.put("/v1/users/alice/embedding", json={"embedding": vector(2)}, headers=auth("globex", "admin"))
            assert r.status_code == 200 and r.json()["version"] == 1
            mine = http.get("/v1/users/alice/embedding", headers=auth("acme", "admin")).json()
            assert mine["version"] == 1 and np.allclose(mine["embedding"], secret)
            theirs = http.get("/v1/users/alice/embedding", headers=auth("globex", "admin")).json()
            assert np.allclose(theirs["embedding"], vector(2))
            assert http.delete("/v1/users/alice/embedding", headers=auth("globex", "admin")).status_code == 200
            assert http.get("/v1/users/alice/embedding", headers=auth("acme", "user")).json()["version"] == 1
            # the single-key flags are the default tenant, a third namespace
            legacy = {"authorization": f"Bearer {LEGACY_ADMIN}"}
            assert_error(http.get("/v1/users/alice/embedding", headers=legacy), 404, "user_not_found")
            assert http.put("/v1/users/alice/embedding", json={"embedding": vector(3)}, headers=legacy).status_code == 200
            r = http.post("/v1/chat/completions", json=chat_body(user="alice"),
                          headers={"authorization": f"Bearer {LEGACY_API}"})
            assert r.status_code == 200 and r.headers["x-e2p-embedding"] == "store"
            assert store.get("alice", "acme").version == 1 and store.get("alice") is not None
            # an unknown key: 401, whatever it asks
            for key in ("sk-unknown-0123456789", KEYS["acme", "admin"] + "x", "legacy-key,legacy-admin"):
                assert_error(http.get("/v1/users/alice/embedding", headers={"authorization": f"Bearer {key}"}), 401,
                             "invalid_api_key")
                assert_error(http.post("/v1/chat/completions", json=chat_body(),
                                       headers={"authorization": f"Bearer {key}"}), 401, "invalid_api_key")
            # DELETE over HTTP deletes the bytes: in none of the store's files afterwards
            folder = store.path.parent
            raw = np.asarray(secret, np.float32).tobytes()
            assert files_holding(folder, raw)
            assert http.delete("/v1/users/alice/embedding", headers=auth("acme", "admin")).status_code == 200
            assert files_holding(folder, raw) == []
    finally:
        server.stop()


def _logged(caplog) -> str:
    """What the server logged (e2p and uvicorn; not this test's own HTTP client, which logs its URLs)."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(r) for r in caplog.records if r.name.split(".")[0] in ("e2p", "uvicorn"))


@pytest.mark.parametrize("log_user_ids", [False, True])
def test_logs_and_metrics_name_no_user_unless_asked(tmp_path, key_file, caplog, log_user_ids):
    server, store = serve(tmp_path, key_file, log_user_ids=log_user_ids)
    user = "alice-7f3a"
    try:
        with caplog.at_level(logging.DEBUG), httpx.Client(base_url=server.url, timeout=30) as http:
            admin = auth("acme", "admin")
            assert http.put(f"/v1/users/{user}/embedding", json={"embedding": vector(1)}, headers=admin).status_code == 200
            assert http.get(f"/v1/users/{user}/embedding", headers=auth("acme", "user")).status_code == 200
            assert http.post("/v1/chat/completions", json=chat_body(user=user), headers=admin).status_code == 200
            assert http.post("/v1/chat/completions", json=chat_body(user=user + "-x"), headers=admin).status_code == 404
            assert http.get(f"/v1/users/{user}-y/embedding", headers=admin).status_code == 404
            assert http.delete(f"/v1/users/{user}/embedding", headers=admin).status_code == 200
            metrics = http.get("/metrics").text
    finally:
        server.stop()
    logged = _logged(caplog)
    assert "embedding stored" in logged and '"tenant": "acme"' in logged and "e2p_requests_total" in metrics
    assert user not in metrics
    assert (user in logged) == log_user_ids, logged
    assert not any(key in logged or key in metrics for key in KEYS.values())


# --- the key file and `e2p keys add` -----------------------------------------------------------------------------
def test_keys_add_writes_hashes_only(tmp_path, monkeypatch, capsys):
    path = tmp_path / "conf" / "keys.json"
    assert main(["keys", "add", "--file", str(path), "--tenant", "acme", "--role", "admin",
                 "--key", "sk-first-key-0123456789"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-second-key-0123456789\n"))
    assert main(["keys", "add", "--file", str(path), "--tenant", "globex", "--role", "user"]) == 0
    text = path.read_text()
    assert "sk-first-key" not in text and "sk-second-key" not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    entries = load_keys(path)
    assert [(e.tenant, e.role) for e in entries] == [("acme", "admin"), ("globex", "user")]
    assert entries[1].matches("sk-second-key-0123456789") and not entries[1].matches("sk-second-key-012345678")
    assert [p.name for p in path.parent.iterdir()] == ["keys.json"]  # no temporary file left behind
    capsys.readouterr()
    # the same key twice, a short key, a bad role or tenant: one line each, nothing written
    for argv in (["--tenant", "x", "--role", "user", "--key", "sk-first-key-0123456789"],
                 ["--tenant", "x", "--role", "user", "--key", "short"],
                 ["--tenant", "bad tenant", "--role", "user", "--key", "sk-third-key-0123456789"]):
        assert main(["keys", "add", "--file", str(path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert path.read_text() == text
    with pytest.raises(SystemExit):
        main(["keys", "add", "--file", str(path), "--tenant", "x", "--role", "owner", "--key", "sk-k-0123456789abc"])


@pytest.mark.parametrize("content, says", [
    ("{not json", "is not JSON (line 1"),
    ('{"keys": []}', '"format": "e2p-keys/1"'),
    ('{"format": "e2p-keys/1", "keys": [{"tenant": "acme", "role": "owner", "hash": "sha256:00:00"}]}',
     "keys[0]: role 'owner' is not a role: use \"user\" or \"admin\""),
    ('{"format": "e2p-keys/1", "keys": [{"tenant": "", "role": "user", "hash": "x"}]}', "keys[0]: tenant ''"),
    ('{"format": "e2p-keys/1", "keys": [{"tenant": "a", "role": "user", "hash": "md5:abc"}]}', '"hash" must be'),
    ('{"format": "e2p-keys/1", "keys": [{"tenant": "a", "role": "user", "key": "sk-plain"}]}', "plain \"key\""),
])
def test_a_bad_key_file_is_one_line_saying_what_to_fix(tmp_path, capsys, content, says):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(KeyFileError) as info:
        load_keys(path)
    assert says in str(info.value) and "\n" not in str(info.value)
    # `e2p serve` stops on it before loading any model
    assert main(["serve", "--keys", str(path), "--store", str(tmp_path / "s.db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: key file") and says in err and "\n" not in err
    assert main(["serve", "--keys", str(tmp_path / "missing.json"), "--store", str(tmp_path / "s.db")]) == 2
    assert "e2p keys add --file" in capsys.readouterr().err


def test_users_delete_command(tmp_path, capsys):
    folder = tmp_path / "store"
    store = EmbeddingStore(folder / "users.db")
    secret = np.asarray(vector(5), np.float32)
    store.put("alice", secret, tenant="acme")
    store.put("alice", vector(6))  # the default tenant's alice
    store.close()
    assert files_holding(folder, secret.tobytes())
    assert main(["users", "delete", "alice", "--store", str(folder / "users.db"), "--tenant", "acme"]) == 0
    assert "deleted alice (tenant acme)" in capsys.readouterr().out
    assert files_holding(folder, secret.tobytes()) == []
    assert EmbeddingStore(folder / "users.db").get("alice") is not None
    assert main(["users", "delete", "alice", "--store", str(folder / "users.db"), "--tenant", "acme"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no stored embedding for 'alice' in tenant acme" in err and "\n" not in err
