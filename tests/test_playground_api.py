"""The playground's server side: the page and its files (nothing from elsewhere), the projector's card with its
training verdict, and the admin-only user listing and 2-D map (403 for other keys; coordinates, never vectors)."""
from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from e2p.serve import ServeConfig, create_app
from e2p.serve.card import read_verdict
from e2p.serve.keys import add_key, load_keys
from e2p.serve.playground import STATIC
from e2p.serve.usermap import as_the_projector_reads, pca_2d
from e2p.store import EmbeddingStore
from e2p.store.vectors import next_string
from conftest import ADMIN, API, MODEL, Server, tiny_model, vec

REPORT = {"verdict": {"carries_person": True, "text": "YES: the embedding carries the person on users never trained "
                                                      "on: perplexity e2p vs shared_prefix -1.49% [-2.49, -0.44]"},
          "validation": {"comparisons": {"e2p_vs_shared_prefix": {"relative_change": -0.0149, "ci95": [-0.0249, -0.0044]},
                                         "e2p_vs_shuffled": {"relative_change": -0.0244, "ci95": [-0.0337, -0.0154]}}},
          "person_scale": 0.75, "verdict_users": 20}
ACME_ADMIN = "sk-acme-admin-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("projector")
    (folder / "training_report.json").write_text(json.dumps(REPORT))
    store = EmbeddingStore(tmp_path_factory.mktemp("store") / "users.db")
    for i in range(30):
        store.put(f"user-{i:02d}", vec(i))
    store.put("other", vec(99), tenant="acme")
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    add_key(keys, "acme", "admin", ACME_ADMIN)
    config = ServeConfig(model_name=MODEL, api_keys=[API], admin_key=ADMIN, max_tokens_limit=32,
                         projector_dir=str(folder), keys=load_keys(keys))
    server = Server(create_app(tiny_model(), store, config))
    yield server
    server.stop()


def get(server, path, key=ADMIN, **params):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + path, params=params, headers=headers, timeout=30)


def test_the_page_and_its_files_load_nothing_from_elsewhere(server):
    page = get(server, "/playground", key=None)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text)
    assert {"/playground/app.js", "/playground/playground.css"} <= set(assets)
    for name in [p.name for p in STATIC.iterdir()]:
        text = get(server, f"/playground/{name}", key=None).text
        # no CDN, no font or script from another host (the one URL is the SVG namespace's name in admin.js)
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), name
        assert "localStorage" not in text and "document.cookie" not in text, name
    for bad in ("nope.js", "..%2Fapp.py", "app.py", "index"):
        assert get(server, f"/playground/{bad}", key=None).status_code == 404


def test_the_card_says_what_the_projector_is_and_what_was_measured(server):
    assert get(server, "/v1/projector", key=None).status_code == 401
    card = get(server, "/v1/projector", key=API).json()
    assert card["model"] == MODEL and card["backbone"] == "tiny-llama" and card["engine"] == "torch"
    assert (card["personalized"], card["num_prefix_tokens"], card["injection"], card["embedding_dim"]) == (True, 2, "input", 8)
    assert card["caller"] == {"tenant": "default", "admin": False}
    assert get(server, "/v1/projector").json()["caller"]["admin"] is True
    report = card["report"]
    assert report["carries_person"] is True and report["text"].startswith("YES")
    assert report["comparisons"]["e2p_vs_shuffled"] == {"relative_change": -0.0244, "ci95": [-0.0337, -0.0154]}
    assert "carries the person" in card["report_note"]


def test_a_projector_without_a_report_is_unmeasured(tmp_path):
    report, note = read_verdict(tmp_path)
    assert report is None and "unmeasured" in note
    (tmp_path / "training_report.json").write_text("{not json")
    assert read_verdict(tmp_path)[0] is None
    (tmp_path / "training_report.json").write_text(json.dumps({**REPORT, "verdict": {"carries_person": False, "text": "NO"}}))
    report, note = read_verdict(tmp_path)
    assert report.carries_person is False and "NOT shown" in note


def test_listing_and_map_are_admin_only_and_never_send_a_vector(server):
    for path in ("/v1/users", "/v1/users/map"):
        denied = get(server, path, key=API)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
        assert get(server, path, key="wrong").status_code == 401
    page = get(server, "/v1/users", limit=10).json()
    assert page["total"] == 30 and page["has_more"] and page["next_after"] == "user-09"
    assert set(page["data"][0]) == {"user", "dim", "version", "updated_at"}
    rest = get(server, "/v1/users", limit=100, after=page["next_after"]).json()
    assert [r["user"] for r in rest["data"]] == [f"user-{i:02d}" for i in range(10, 30)] and not rest["has_more"]
    assert [r["user"] for r in get(server, "/v1/users", prefix="user-1").json()["data"]] == [f"user-1{i}" for i in range(10)]
    assert get(server, "/v1/users", prefix="zzz").json()["data"] == []
    assert get(server, "/v1/users", limit=0).status_code == 400
    assert get(server, "/v1/users", prefix="a\x01").status_code == 400
    got = get(server, "/v1/users/map")
    assert got.status_code == 200
    map_ = got.json()
    assert (map_["total"], map_["shown"], map_["damaged"]) == (30, 30, 0) and len(map_["explained_variance"]) == 2
    assert all(set(p) == {"user", "x", "y"} for p in map_["points"])
    assert "other" not in json.dumps(map_) and "other" not in json.dumps(page)  # another tenant's user
    acme = get(server, "/v1/users", key=ACME_ADMIN).json()  # an admin of another tenant sees its own users only
    assert [r["user"] for r in acme["data"]] == ["other"] and acme["total"] == 1
    assert [p["user"] for p in get(server, "/v1/users/map", key=ACME_ADMIN).json()["points"]] == ["other"]
    assert get(server, "/v1/projector", key=ACME_ADMIN).json()["caller"] == {"tenant": "acme", "admin": True}
    small = get(server, "/v1/users/map", limit=5).json()
    assert small["shown"] == 5 and small["total"] == 30
    spec = get(server, "/openapi.json", key=None).json()
    for path in ("/v1/projector", "/v1/users", "/v1/users/map"):
        assert "$ref" in json.dumps(spec["paths"][path]["get"]["responses"]["200"])  # a documented response model
    assert "/playground" not in spec["paths"]


def test_pca_map_matches_numpy_and_is_stable():
    rng = np.random.default_rng(0)
    along = rng.normal(size=(40, 1)) * np.array([[3.0, 1.0, 0.0, 0.0]]) + rng.normal(size=(40, 4)) * 0.01
    coords, shares = pca_2d(along)
    assert shares[0] > 0.99 and abs(np.corrcoef(coords[:, 0], along[:, 0])[0, 1]) > 0.999
    again, _ = pca_2d(along[::-1].copy())
    assert np.allclose(again[::-1], coords)  # the same users, the same picture (signs fixed)
    assert pca_2d(np.ones((1, 4)))[0].tolist() == [[0.0, 0.0]]
    x = as_the_projector_reads(np.array([[2.0, 0.0], [1.0, 1.0], [1.0, 0.0]]), np.array([1.0, 0.0]))
    assert np.allclose(x, [[1, 0], [0, 1], [0, 0]])


def test_prefix_search_bounds_in_code_point_order(tmp_path):
    assert next_string("ab") == "ac" and next_string("a\U0010ffff") == "b" and next_string("\U0010ffff") is None
    assert next_string("a\ud7ff") == "a\ue000"
    store = EmbeddingStore(tmp_path / "s.db")
    for user in ["a", "ab", "ab/c", "abz", "ab\U0001f600", "ac", "b", "é", "éa"]:
        store.put(user, [1.0, 0.0])
    assert [r["user"] for r in store.listing(prefix="ab")] == ["ab", "ab/c", "abz", "ab\U0001f600"]
    assert [r["user"] for r in store.listing(prefix="é")] == ["é", "éa"]
    assert [r["user"] for r in store.listing(prefix="ab", after="ab/c", limit=1)] == ["abz"]


def test_the_shipped_projectors_carry_a_measured_card():
    """The playground's card of a shipped projector shows what was measured (verdict and intervals), not "not measured"."""
    from e2p.config import resolve_projector
    from e2p.serve.card import read_verdict

    for name in ("persona-deep-k1", "persona-input-k1"):
        verdict, note = read_verdict(resolve_projector(name))
        assert verdict is not None and note.startswith("measured on the Synthetic-Persona-Chat test people"), name
        assert {"e2p_vs_shared_prefix", "e2p_vs_shuffled"} <= set(verdict.comparisons) and verdict.text, name
