"""The live profile: events folded into a user's embedding as running sums (e2p.data.live_profile), through the store,
the server's `POST /v1/users/{id}/events`, a chat's opt-in `remember` and `e2p users update`."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from conftest import make_backbone
from e2p import Projector
from e2p.data.headline_style import STYLE_FEATURES, StyleScaler, style_features
from e2p.data.live_profile import PROFILE_FILE, ProfileRule, ProfileSums, read_events
from e2p.errors import DataError
from e2p.model import E2PModel, new_config
from e2p.serve import ServeConfig, create_app
from e2p.serve.keys import add_key, load_keys, set_tenant, tenant_settings
from e2p.store import EmbeddingStore
from conftest import Server, assert_error

HEADLINES = ["Stocks Rally As Fed Holds Rates", "why the new iPhone matters: a review", "NASA's 'Artemis' launch delayed!",
             "5 things to know about the election, explained.", "Local team wins - again", "Is coffee good for you?",
             "BREAKING: storm hits the coast", "A quiet town, a loud mystery"]


def style_rule(dim: int = 384, half_life=None) -> ProfileRule:
    scaler = StyleScaler(np.stack([style_features(HEADLINES[i::3]) for i in range(3)]))
    return ProfileRule(dim=dim, style=scaler.to_dict(), half_life_events=half_life)


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_online_equals_batch_and_the_data_adapters_formula():
    rule = style_rule()
    vectors = unit_rows(len(HEADLINES), 384, 0)
    sums = rule.empty()
    for v, h in zip(vectors, HEADLINES):  # one event at a time, through the stored bytes as a server keeps them
        sums = ProfileSums.from_bytes(rule.fold(sums, v[None], [h]).to_bytes(), rule)
    online, batch = rule.vector(sums), rule.batch(vectors, HEADLINES)
    mean = vectors.mean(0)
    scaler = StyleScaler(np.stack([style_features(HEADLINES[i::3]) for i in range(3)]))
    before = np.concatenate([mean / np.linalg.norm(mean), scaler(style_features(HEADLINES)[None])[0]])
    assert online.shape == (384 + len(STYLE_FEATURES),) and sums.events == len(HEADLINES)
    np.testing.assert_allclose(online, batch, atol=1e-6)
    np.testing.assert_allclose(batch, before, atol=1e-5)  # what `e2p data pens` wrote before the rule existed
    # an item given as a vector moves the mean, never the style
    with_item = rule.vector(rule.fold(sums, unit_rows(1, 384, 1), [None]))
    np.testing.assert_allclose(with_item[384:], online[384:], atol=1e-7)
    assert not np.allclose(with_item[:384], online[:384])


def test_half_life_weighs_older_events_less_and_travels_with_the_rule(tmp_path):
    rule = ProfileRule(dim=2, normalize=False, half_life_events=1)
    got = rule.batch(np.asarray([[1.0, 0.0], [0.0, 1.0]]), [None, None])
    np.testing.assert_allclose(got, [0.5 / 1.5, 1.0 / 1.5], atol=1e-7)  # one event old: half the weight
    assert ProfileRule.load(rule.save(tmp_path / "r.json")).to_dict() == rule.to_dict()
    with pytest.raises(DataError, match="half_life_events"):
        ProfileRule(dim=2, half_life_events=0)
    with pytest.raises(DataError, match="another rule"):
        ProfileSums.from_bytes(style_rule().empty().to_bytes(), ProfileRule(dim=384))


def test_the_store_keeps_sums_with_the_vector_and_forgets_them_on_put_and_delete(tmp_path):
    rule = ProfileRule(dim=4)
    store = EmbeddingStore(tmp_path / "s.db")

    def update(blob):
        sums = rule.fold(rule.empty() if blob is None else ProfileSums.from_bytes(blob, rule), unit_rows(1, 4, 0), [None])
        return sums.to_bytes(), rule.vector(sums)

    assert store.update_profile("ann", update, create=False) is None and store.get("ann") is None
    assert store.update_profile("ann", update).version == 1
    assert store.update_profile("ann", update).version == 2
    assert ProfileSums.from_bytes(store.profile_sums("ann"), rule).events == 2
    store.update_profile("ann", update, tenant="other")
    store.put("ann", [1.0, 0.0, 0.0, 0.0])  # a whole vector from outside replaces the profile
    assert store.profile_sums("ann") is None and store.profile_sums("ann", "other") is not None
    assert store.delete("ann", "other") and store.profile_sums("ann", "other") is None


# --- the server ------------------------------------------------------------------------------------
KEYS = {"acme-admin": ("acme", "admin"), "acme-user-key-01": ("acme", "user"), "beta-user-key-001": ("beta", "user"),
        "beta-admin-key-01": ("beta", "admin")}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A server whose projector reads a text + style profile (384 + 12), with its rule as profile.json; tenants acme
    (remember allowed) and beta (not)."""
    from e2p.data.encoders import TextEncoder

    tmp = tmp_path_factory.mktemp("live")
    backbone = make_backbone()
    rule = style_rule()
    projector = Projector(new_config(backbone, embedding_dim=rule.embedding_dim, num_prefix_tokens=1)).eval()
    projector.save_pretrained(tmp / "proj")
    rule.save(tmp / "proj" / PROFILE_FILE)
    for key, (tenant, role) in KEYS.items():
        add_key(tmp / "keys.json", tenant, role, key + "-padding")
    set_tenant(tmp / "keys.json", "acme", allow_remember=True)
    assert tenant_settings(tmp / "keys.json") == {"acme": {"allow_remember": True}}
    config = ServeConfig(model_name="tiny", keys=load_keys(tmp / "keys.json"), max_tokens_limit=8,
                         projector_dir=str(tmp / "proj"), remember_tenants=frozenset({"acme"}))
    encoder = TextEncoder()
    store = EmbeddingStore(tmp / "users.db")
    server = Server(create_app(E2PModel(backbone, projector), store, config, encoder=encoder))
    yield server, rule, encoder, store
    server.stop()


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}-padding"}


def test_events_build_a_new_users_profile_and_the_next_reply_uses_it(live):
    server, rule, encoder, store = live
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/users/ann/events", json={"texts": HEADLINES[:3]}, headers=auth("acme-admin"))
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1 and r.json()["events"] == 3 and r.json()["object"] == "user.profile"
        expected = rule.batch(encoder.encode(HEADLINES[:3]), HEADLINES[:3])
        np.testing.assert_allclose(store.get("ann", "acme").vector, expected, atol=1e-5)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "user": "ann", "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=chat, headers=auth("acme-user-key-01")).headers[
            "x-e2p-embedding-version"] == "1"
        item = unit_rows(1, 384, 3)[0].tolist()
        r = http.post("/v1/users/ann/events", json={"texts": [HEADLINES[3]], "vectors": [item]},
                      headers=auth("acme-user-key-01"))  # a user key adds to a known user's profile
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["events"] == 5
        online = store.get("ann", "acme").vector
        batch = rule.batch(np.concatenate([encoder.encode(HEADLINES[:4]), [item]]), HEADLINES[:4] + [None])
        np.testing.assert_allclose(online, batch, atol=1e-5)
        assert http.post("/v1/chat/completions", json=chat, headers=auth("acme-user-key-01")).headers[
            "x-e2p-embedding-version"] == "2"
        metrics = http.get("/metrics").text  # the tenant labels the timing histograms; no user id appears
        assert 'e2p_time_to_first_token_seconds_count{tenant="acme"}' in metrics and 'user="' not in metrics
        # tenants: beta does not see acme's ann
        assert_error(http.post("/v1/users/ann/events", json={"texts": ["x"]}, headers=auth("beta-user-key-001")),
                     404, "user_not_found")


def test_bad_events_get_4xx_and_change_nothing(live):
    server, rule, _, store = live
    with httpx.Client(base_url=server.url, timeout=60) as http:
        admin = auth("beta-admin-key-01")
        assert http.post("/v1/users/bo/events", json={"texts": ["first"]}, headers=admin).status_code == 200
        before = store.get("bo", "beta")
        sums = store.profile_sums("bo", "beta")
        nan = '{"vectors": [[' + ", ".join(["NaN"] + ["0.1"] * 383) + "]]}"
        cases = [
            (http.post("/v1/users/bo/events", content=nan, headers={**admin, "content-type": "application/json"}),
             400, "invalid_embedding"),
            (http.post("/v1/users/bo/events", json={"vectors": [[0.1] * 12]}, headers=admin), 400, "invalid_embedding"),
            (http.post("/v1/users/bo/events", json={"texts": ["fine", "  "]}, headers=admin), 400, "invalid_value"),
            (http.post("/v1/users/bo/events", json={"texts": []}, headers=admin), 400, None),
            (http.post("/v1/users/bo/events", json={"text": "typo"}, headers=admin), 400, None),
            (http.post("/v1/users/nobody/events", json={"texts": ["x"]}, headers=auth("beta-user-key-001")),
             404, "user_not_found"),
            (http.post("/v1/users/bo/events", json={"texts": ["x"]}), 401, "invalid_api_key"),
        ]
        for response, status, code in cases:
            assert_error(response, status, code)
        after = store.get("bo", "beta")
        assert after.version == before.version and np.array_equal(after.vector, before.vector)
        assert store.profile_sums("bo", "beta") == sums and store.get("nobody", "beta") is None


def test_remember_is_opt_in_per_tenant(live):
    server, _, _, store = live
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for key in ("acme-admin", "beta-admin-key-01"):
            assert http.post("/v1/users/cy/events", json={"texts": ["hello"]}, headers=auth(key)).status_code == 200
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "I love sailing"}], "user": "cy",
                "max_tokens": 2, "e2p": {"remember": True}}
        assert_error(http.post("/v1/chat/completions", json=chat, headers=auth("beta-user-key-001")), 403,
                     "remember_not_allowed", "e2p.remember")
        assert store.get("cy", "beta").version == 1  # refused: nothing folded
        r = http.post("/v1/chat/completions", json=chat, headers=auth("acme-user-key-01"))
        assert r.status_code == 200, r.text
        assert r.headers["x-e2p-remembered"] == "2" and r.headers["x-e2p-embedding-version"] == "2"
        assert_error(http.post("/v1/chat/completions", json={**chat, "user": "nobody"}, headers=auth("acme-user-key-01")),
                     404, "user_not_found")
        assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "user": "cy", "max_tokens": 2,
                                                        "e2p": {"remember": True}}, headers=auth("acme-user-key-01")),
                     400, "invalid_value", "e2p.remember")


def test_users_update_folds_an_event_file_by_the_same_rule(tmp_path):
    from e2p.cli import main

    rule = ProfileRule(dim=3, normalize=False)
    rule.save(tmp_path / "rule.json")
    events = [{"user": "ann", "vector": [1, 0, 0]}, {"user": "bo", "vector": [0, 2, 0]}, {"user": "ann", "vector": [0, 0, 3]}]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    assert main(["users", "update", str(tmp_path / "events.jsonl"), "--store", str(tmp_path / "s.db"),
                 "--rule", str(tmp_path / "rule.json"), "--quiet"]) == 0
    store = EmbeddingStore(tmp_path / "s.db")
    np.testing.assert_allclose(store.get("ann").vector, [0.5, 0, 1.5])
    assert store.get("bo").version == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"user": "ann", "vector": [1, 0, 0]}) + "\n"
                                        + json.dumps({"user": "ann", "vector": [1, 0]}) + "\n")
    with pytest.raises(DataError, match="line 2"):
        read_events(tmp_path / "bad.jsonl", rule)
    assert main(["users", "update", str(tmp_path / "bad.jsonl"), "--store", str(tmp_path / "s.db"),
                 "--rule", str(tmp_path / "rule.json"), "--quiet"]) == 2
    assert store.get("ann").version == 1  # checked whole before anything was folded


def test_deleting_a_user_deletes_their_running_sums_bytes_and_all(tmp_path):
    from test_privacy_store import files_holding

    rule = ProfileRule(dim=8, normalize=False)
    folder = tmp_path / "store"
    store = EmbeddingStore(folder / "s.db")
    item = np.asarray([[3.14159265358979, 2.71828182845904, 1.41421356237309, 1.73205080756887,
                        2.23606797749978, 0.57721566490153, 1.61803398874989, 4.66920160910299]])

    def update(blob):
        sums = rule.fold(rule.empty() if blob is None else ProfileSums.from_bytes(blob, rule), item, [None])
        return sums.to_bytes(), rule.vector(sums)

    for n in range(40):  # neighbours, so the deleted row is one cell among others on its page
        store.update_profile(f"n{n}", update)
    store.update_profile("ann", update)
    store.update_profile("ann", update)  # sums of 2 x item: bytes no other row holds
    needle = (2 * item[0]).astype("<f8").tobytes()
    assert files_holding(folder, needle)
    assert store.delete("ann")
    assert files_holding(folder, needle) == [] and store.profile_sums("ann") is None
