"""The server survives its users: no autograd memory in decoding, no request that fails its neighbours, no
request that stalls the others, a store that takes writes during an import, and clear 4xx for bad input."""
from __future__ import annotations

import concurrent.futures
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from e2p.errors import DataError
from e2p.formatting import Segments
from e2p.serve import ServeConfig, create_app
from e2p.serve.batching import Batcher, GenerationError, GenRequest
from e2p.store import CorruptEmbeddingError, EmbeddingStore, StoreError, import_embeddings
from conftest import ADMIN, API, MODEL, PROMPT, Server, assert_error, slowed, tiny_model, vec

AUTH = {"authorization": f"Bearer {API}"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """A server whose batcher waits 300 ms for company, so concurrent requests share one batch."""
    model = tiny_model()
    store = EmbeddingStore(tmp_path_factory.mktemp("faults") / "users.db")
    config = ServeConfig(model_name=MODEL, api_keys=[API], admin_key=ADMIN, max_tokens_limit=32, batch_wait_ms=300,
                         max_batch_size=8, max_messages=64, max_prompt_chars=2000, metrics_key="metrics-key")
    app = create_app(model, store, config)
    server = Server(app)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        for user in ("ann", "bob", "cat"):
            assert http.put(f"/v1/users/{user}/embedding", json={"embedding": vec(hash(user) % 100)},
                            headers=ADMIN_AUTH).status_code == 200
        yield server, app, store, http
    server.stop()


def together(http, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Send all requests at once (they land in one batch) and return their responses in order."""
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda pr: http.post(pr[0], json=pr[1]), requests))


# --- 1. memory: decoding builds no autograd graph ------------------------------------------------------
def test_step_decoding_keeps_no_autograd_graph():
    model = tiny_model()
    assert any(p.requires_grad for p in model.projector.parameters())  # as after training: the trap
    rows = [model.format("hi how are you ?")]
    dec = model.start_decoding(rows, [torch.tensor(vec(1))])
    logits = model.next_logits(dec)
    model.advance(dec, logits.argmax(-1))
    assert not dec.last.requires_grad and not logits.requires_grad
    assert not any(layer.keys.requires_grad for layer in dec.cache.layers)


# --- 2. one request never fails its neighbours -------------------------------------------------------------
def test_bad_requests_fail_alone_in_a_shared_batch(batched):
    server, app, store, http = batched
    good = [("/v1/chat/completions", chat_body(user=u)) for u in ("ann", "bob", "cat")]
    alone = [r.json()["choices"][0]["message"]["content"] for r in together(http, good)]
    bad = [
        ("/v1/chat/completions", chat_body(temperature=1, seed=2 ** 64)),  # overflowed the generator
        ("/v1/chat/completions", chat_body(temperature=1, top_p=1e-300, seed=1)),  # NaN into multinomial
        ("/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 4}),  # a zero-length row
    ]
    responses = together(http, good + bad)
    assert [r.json()["choices"][0]["message"]["content"] for r in responses[:3]] == alone
    assert_error(responses[3], 400, param="seed")
    assert responses[4].status_code == 200, responses[4].text  # a tiny nucleus still holds the likeliest token
    assert_error(responses[5], 400, "invalid_value", "prompt")


def test_damaged_stored_vectors_fail_only_their_user(batched):
    server, app, store, http = batched
    for user, vector in (("nan", [float("nan")] + vec(2)[1:]), ("short", vec(3)[:5])):
        assert http.put(f"/v1/users/{user}/embedding", json={"embedding": vec(4)}, headers=ADMIN_AUTH).status_code == 200
        with sqlite3.connect(store.path) as db:  # damage written behind the server's back (disk, another tool)
            db.execute("UPDATE embeddings SET vector=? WHERE user=?", (np.asarray(vector, np.float32).tobytes(), user))
    responses = together(http, [("/v1/chat/completions", chat_body(user=u)) for u in ("ann", "nan", "short", "bob")])
    assert responses[0].status_code == 200 and responses[3].status_code == 200
    for r, user in zip(responses[1:3], ("nan", "short")):
        assert_error(r, 409, "corrupt_embedding", "user")
        assert user in r.json()["error"]["message"] and "store it again" in r.json()["error"]["message"]
        assert_error(http.get(f"/v1/users/{user}/embedding", headers=ADMIN_AUTH), 409, "corrupt_embedding")
    with pytest.raises(CorruptEmbeddingError):
        store.get("nan")


def test_batcher_isolates_a_request_the_model_cannot_take():
    """The safety net under validation: a row whose prefill fails (here an empty one, which the server refuses
    earlier) or whose logits are not finite gets its own error; the others finish with their own text."""
    model = tiny_model()
    batcher = Batcher(model, max_batch=8, wait_ms=200)
    batcher.start()
    try:
        good = [GenRequest(segments=model.format(PROMPT), embedding=torch.tensor(vec(i)), max_tokens=6) for i in range(3)]
        empty = GenRequest(segments=Segments(pre=[], post=[]), embedding=None, max_tokens=6)
        nan = GenRequest(segments=model.format(PROMPT), embedding=torch.full((8,), float("nan")), max_tokens=6)
        futures = [batcher.submit(r) for r in good[:2] + [empty, nan] + good[2:]]
        texts = [f.result(30).text for f in futures[:2] + futures[4:]]
        for f in futures[2:4]:
            with pytest.raises(GenerationError):
                f.result(30)
    finally:
        batcher.stop()
    expected = [model.generate([PROMPT], [torch.tensor(vec(i))], max_new_tokens=6)[0] for i in range(3)]
    assert texts == expected


# --- 3. no request stalls the others -----------------------------------------------------------------------
def test_long_chats_are_refused_fast_and_turns_drop_in_log_time(batched):
    server, app, store, http = batched
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"line {i}"} for i in range(1500)]
    started = time.monotonic()
    assert_error(http.post("/v1/chat/completions", json=chat_body(messages=many)), 400, "too_many_messages", "messages")
    assert_error(http.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "hi " * 1000}])),
                 400, "context_length_exceeded", "messages")
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi " * 1000, "max_tokens": 4}), 400,
                 "context_length_exceeded", "prompt")
    assert time.monotonic() - started < 2
    model = app.state.model
    renders = []
    real = model.formatter.render
    model.formatter.render = lambda *a, **k: renders.append(1) or real(*a, **k)
    try:
        segments = model.format([{"role": "user", "content": "hi"}] * 1001)  # 48-token limit: most turns drop
    finally:
        del model.formatter.render
    assert len(segments.post) <= model.max_prompt_tokens
    assert len(renders) <= 16  # bisection, where dropping one turn at a time rendered ~1000 times


def test_a_client_that_gives_up_frees_its_row_at_once(tmp_path):
    model = slowed(tiny_model(), 0.05)
    app = create_app(model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name=MODEL, max_tokens_limit=400))
    server = Server(app)
    body = {"model": MODEL, "prompt": "i like", "max_tokens": 400, "temperature": 0.8, "seed": 3}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
        gave_up = time.monotonic()
        while app.state.batcher.busy:
            assert time.monotonic() - gave_up < 1.0, "the abandoned row kept decoding"  # 400 steps would take 20 s
            time.sleep(0.01)
    finally:
        server.stop()


def test_a_queued_request_behind_others_can_leave():
    """Leaving the queue removes that request itself (comparing requests field by field compared their tensors:
    a client that gave up behind others got a 500, found by benchmarks/serve_soak.py)."""
    model = tiny_model()
    batcher = Batcher(model)  # not started: everything stays queued
    queued = [GenRequest(segments=model.format(PROMPT), embedding=torch.tensor(vec(i)), max_tokens=4) for i in range(3)]
    for r in queued:
        batcher.submit(r)
    batcher.discard(queued[2])
    assert batcher.depth() == 2 and queued[2].cancelled and not queued[0].cancelled


def test_healthz_fails_while_the_worker_is_stuck(tmp_path):
    model = slowed(tiny_model(), 1.5)
    app = create_app(model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name=MODEL, stall_seconds=0.5))
    server = Server(app)
    try:
        assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
        t = threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions", timeout=30,
                                                       json={"model": MODEL, "prompt": "i like", "max_tokens": 2}))
        t.start()
        time.sleep(1.0)
        health = httpx.get(server.url + "/healthz")
        assert health.status_code == 503 and health.json()["status"] == "stalled", health.text
        assert health.json()["seconds_since_step"] > 0.5 and health.json()["rss_bytes"] > 0
        t.join(30)
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()


# --- 4. the store takes writes while an import runs ----------------------------------------------------------
def test_store_takes_writes_and_reads_while_an_import_runs(tmp_path):
    path = tmp_path / "users.db"
    server_store, importer = EmbeddingStore(path, dim=8, timeout=2.0), EmbeddingStore(path, timeout=2.0)
    server_store.put("live", vec(1))

    def slow_chunks():  # a long import: 6 chunks, 0.3 s apart
        for c in range(6):
            time.sleep(0.3)
            yield [f"u{c}-{i}" for i in range(100)], np.random.default_rng(c).normal(size=(100, 8)).astype(np.float32)

    done = {}
    t = threading.Thread(target=lambda: done.setdefault("n", importer.import_chunks(slow_chunks())))
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    server_store.put("during", vec(2))  # another process's writer: waited 10 s, then "database is locked"
    put_s = time.monotonic() - started
    slowest_read = 0.0
    while t.is_alive():
        started = time.monotonic()
        assert server_store.get("live") is not None
        slowest_read = max(slowest_read, time.monotonic() - started)
        time.sleep(0.02)
    t.join()
    assert done["n"] == 600 and len(server_store) == 602
    assert put_s < 0.5 and slowest_read < 0.1, (put_s, slowest_read)


def test_store_reads_are_not_blocked_by_a_waiting_writer(tmp_path):
    """One store object shared by threads (the server): a PUT waiting on another process's write lock must not
    hold up reads of other users."""
    path = tmp_path / "users.db"
    store = EmbeddingStore(path, dim=8, timeout=1.5)
    store.put("a", vec(1))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        writer = threading.Thread(target=lambda: pytest.raises(StoreError, store.put, "b", vec(2)))
        writer.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert store.get("a") is not None
        assert time.monotonic() - started < 0.1
        writer.join()
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_busy_store_answers_503_not_500(tmp_path):
    path = tmp_path / "users.db"
    app = create_app(tiny_model(), EmbeddingStore(path, timeout=0.3), ServeConfig(model_name=MODEL, admin_key=ADMIN))
    server = Server(app)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        r = httpx.put(server.url + "/v1/users/x/embedding", json={"embedding": vec(1)}, headers=ADMIN_AUTH)
        assert_error(r, 503, "store_busy")
        assert r.headers["retry-after"] == "1"
        other.execute("ROLLBACK")
        assert httpx.put(server.url + "/v1/users/x/embedding", json={"embedding": vec(1)},
                         headers=ADMIN_AUTH).status_code == 200
    finally:
        other.close()
        server.stop()


def test_a_damaged_store_file_is_a_clear_error(tmp_path):
    path = tmp_path / "users.db"
    store = EmbeddingStore(path, dim=8)
    store.put_many([(f"user-{i:05d}", vec(i)) for i in range(3000)])
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    middle = (len(data) // page // 2) * page
    data[middle:middle + 2 * page] = b"\xde\xad\xbe\xef" * (page // 2)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged|not a usable"):
        damaged = EmbeddingStore(path)
        len(damaged)
        for user in damaged.users(limit=5000):
            damaged.get(user)


# --- 6. the smaller ones ------------------------------------------------------------------------------------
def test_lone_surrogates_are_a_400_everywhere(batched):
    server, app, store, http = batched
    json_headers = {**AUTH, "content-type": "application/json"}
    surrogate = '"\\ud800"'
    bodies = [
        ("POST", "/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (MODEL, surrogate)),
        ("POST", "/v1/chat/completions", '{"model": "%s", "user": %s, "messages": [{"role": "user", "content": "hi"}]}' % (MODEL, surrogate)),
        ("POST", "/v1/completions", '{"model": "%s", "prompt": %s}' % (MODEL, surrogate)),
        ("POST", "/v1/embeddings", '{"model": "%s", "input": %s}' % (MODEL, surrogate)),
        ("PUT", "/v1/users/x/embedding", '{"text": %s}' % surrogate),
    ]
    for method, url, body in bodies:
        headers = {**json_headers, **(ADMIN_AUTH if method == "PUT" else {})}
        r = http.request(method, url, content=body.encode(), headers=headers)
        assert_error(r, 400)
        assert "surrogate" in r.json()["error"]["message"]


def test_vector_values_must_be_numbers(batched, tmp_path):
    server, app, store, http = batched
    for bad in (["1.5"] + vec(1)[1:], [True] + vec(1)[1:]):
        assert_error(http.put("/v1/users/x/embedding", json={"embedding": bad}, headers=ADMIN_AUTH), 400, param="embedding.0")
        assert_error(http.post("/v1/chat/completions", json=chat_body(e2p={"embedding": bad})), 400)
    path = tmp_path / "users.jsonl"
    path.write_text('{"user": "a", "embedding": ["1.5", 2.0]}\n')
    with pytest.raises(DataError, match="not a number"):
        import_embeddings(path, EmbeddingStore(tmp_path / "s.db"))


def test_import_refuses_null_user_ids_and_reads_excel_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = EmbeddingStore(tmp_path / "s.db")
    parquet = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user": ["a", None], "embedding": [[1.0, 2.0], [3.0, 4.0]]}), parquet)
    with pytest.raises(DataError, match="row 1.*missing"):
        import_embeddings(parquet, store)
    assert len(store) == 0 and store.get("None") is None
    csv = tmp_path / "excel.csv"
    csv.write_bytes("\ufeffuser,e0,e1\r\nann,1.0,2.0\r\n".encode("utf-8"))
    assert import_embeddings(csv, store) == 1 and store.get("ann").vector.tolist() == [1.0, 2.0]


def test_openapi_spec_and_metrics_key(batched):
    server, app, store, http = batched
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/healthz"} <= set(spec["paths"])
    assert_error(httpx.get(server.url + "/metrics"), 401, "invalid_api_key")
    assert_error(httpx.get(server.url + "/metrics", headers=AUTH), 401)
    assert "e2p_" in httpx.get(server.url + "/metrics", headers={"authorization": "Bearer metrics-key"}).text


def test_one_seed_semantics_python_api_and_server(batched):
    """The same user, prompt, settings and seed give the same text from E2PModel.generate (what `e2p generate
    --seed` runs), alone or in a batch, and from the server, alone or sharing a batch."""
    server, app, store, http = batched
    model = app.state.model
    settings = dict(do_sample=True, temperature=0.9, top_p=0.95, seed=5, max_new_tokens=8)
    users = [torch.tensor(vec(i)) for i in (11, 12, 13)]
    batch = model.generate([PROMPT] * 3, embeddings=users, **settings)
    alone = [model.generate([PROMPT], embeddings=[u], **settings)[0] for u in users]
    assert batch == alone and len(set(batch)) > 1
    body = lambda i: chat_body(temperature=0.9, top_p=0.95, seed=5, e2p={"embedding": vec(i)})
    served = [r.json()["choices"][0]["message"]["content"] for r in together(http, [("/v1/chat/completions", body(i))
                                                                                   for i in (11, 12, 13)])]
    assert served == batch
    other_seed = model.generate([PROMPT], embeddings=users[:1], **{**settings, "seed": 6})[0]
    assert other_seed != batch[0]  # the seed matters


def test_a_row_that_fails_mid_stream_ends_with_an_error_event(tmp_path):
    """A failure of this request's row after its first text (the status is already sent) ends its stream with an
    OpenAI error event and [DONE], not a broken connection."""
    model = tiny_model()
    real, calls = model.next_logits, {"n": 0}

    def poisoned(dec):  # the third step of the stream gives NaN logits
        calls["n"] += 1
        logits = real(dec)
        return logits.fill_(float("nan")) if calls["n"] == 3 else logits

    model.next_logits = poisoned
    server = Server(create_app(model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name=MODEL)))
    body = {"model": MODEL, "prompt": "i like", "max_tokens": 8, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert '"code":"generation_failed"' in lines[-2]
        model.next_logits = real
        assert httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=30).status_code == 200
    finally:
        server.stop()
