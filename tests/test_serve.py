"""`e2p serve` end to end: a tiny backbone in-process, uvicorn on a loopback port, the real `openai` client."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import ADMIN, API, MODEL, PROMPT, Server, assert_error, make_backbone, slowed, tiny_model, vec
from e2p import Projector
from e2p.model import E2PModel, new_config
from e2p.serve import ServeConfig, create_app
from e2p.store import EmbeddingStore



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_model()
    store = EmbeddingStore(tmp_path_factory.mktemp("store") / "users.db")
    config = ServeConfig(model_name=MODEL, api_keys=[API], admin_key=ADMIN, max_tokens_limit=32, default_max_tokens=8,
                         max_body_bytes=64 * 1024, batch_wait_ms=50, max_batch_size=8)
    app = create_app(model, store, config)
    server = Server(app)
    yield server, model, app
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=API, max_retries=0)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0].url, headers={"authorization": f"Bearer {API}"}, timeout=30) as c:
        yield c


def admin_put(http, user, vector):
    r = http.put(f"/v1/users/{user}/embedding", json={"embedding": vector}, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return r.json()


def expected(model, prompt, vector, n=8):
    emb = [torch.tensor(vector)] if vector is not None else [None]
    return model.generate([prompt], emb, max_new_tokens=n)[0]


def chat(client, user=None, extra_body=None, **kw):
    kw = {"temperature": 0, "max_tokens": 8, **kw, **({"user": user} if user else {})}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                          extra_body=extra_body, **kw)


# --- OpenAI surface ------------------------------------------------------------------------------
def test_models_health_and_metrics(served, client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(served[0].url + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    chat(client)
    metrics = httpx.get(served[0].url + "/metrics").text
    for name in ("e2p_requests_total", "e2p_request_latency_seconds_bucket", "e2p_batch_size_bucket", "e2p_queue_depth"):
        assert name in metrics
    assert 'route="/v1/chat/completions"' in metrics
    # where a request's time goes, per tenant (never per user): queue, time to first token, time per output token
    for name in ("e2p_queue_seconds", "e2p_time_to_first_token_seconds", "e2p_time_per_output_token_seconds"):
        count = next(line for line in metrics.splitlines() if line.startswith(name + '_count{tenant="default"}'))
        assert float(count.split()[-1]) >= 1, name


def test_readiness_turns_503_while_draining_and_when_the_store_does_not_answer(tmp_path):
    """/readyz is what a load balancer asks: 200 when the model is loaded and the store answers; on SIGTERM the server
    (e2p serve's DrainingServer) answers 503 at once and keeps serving for its drain period, then stops; a store
    that does not answer makes it 503 while /healthz (liveness) stays 200."""
    import signal

    store = EmbeddingStore(tmp_path / "users.db")
    server = Server(create_app(tiny_model(), store, ServeConfig(model_name=MODEL, api_keys=[API], max_tokens_limit=8)),
                    drain_seconds=1.0)
    auth = {"authorization": f"Bearer {API}"}
    chat_body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json() == {"ready": True, "model_loaded": True, "store": "ok",
                                                                "draining": False}
            server.server.handle_exit(signal.SIGTERM, None)
            draining = http.get("/readyz")
            assert draining.status_code == 503 and draining.json()["draining"] is True
            assert http.post("/v1/chat/completions", json=chat_body, headers=auth).status_code == 200  # still serving
        server.thread.join(20)
        assert not server.thread.is_alive()  # stopped after the drain
    finally:
        server.stop()
    store = EmbeddingStore(tmp_path / "other.db")
    server = Server(create_app(tiny_model(), store, ServeConfig(model_name=MODEL, max_tokens_limit=8)))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/readyz").status_code == 200
            store.close()  # the store stops answering (its connections are gone)
            gone = http.get("/readyz")
            assert gone.status_code == 503 and gone.json()["store"] == "unavailable" and not gone.json()["draining"]
            assert http.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        server.stop()


def test_chat_and_completion_with_stored_user(served, client, http):
    _, model, _ = served
    admin_put(http, "alice", vec(1))
    out = chat(client, user="alice")
    assert out.choices[0].message.content == expected(model, PROMPT, vec(1))
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 8
    plain = chat(client)
    assert plain.choices[0].message.content == expected(model, PROMPT, None)
    assert plain.choices[0].message.content != out.choices[0].message.content
    comp = client.completions.create(model=MODEL, prompt="i like", max_tokens=6, temperature=0, user="alice")
    from e2p.formatting import Segments

    ids = model.tokenizer("i like", add_special_tokens=False)["input_ids"]
    toks = model.generate_tokens([Segments([], ids)], [torch.tensor(vec(1))], max_new_tokens=6)[0]
    decode = lambda t: model.tokenizer.decode(t, skip_special_tokens=True)
    assert comp.choices[0].text == decode(ids + toks)[len("i like"):]  # the continuation, its leading space kept
    assert comp.usage.prompt_tokens == len(ids) + 2  # the user's two soft tokens take context like text tokens
    plain_comp = client.completions.create(model=MODEL, prompt="i like", max_tokens=6, temperature=0)
    assert plain_comp.usage.prompt_tokens == len(ids)
    sampled = client.completions.create(model=MODEL, prompt="i like", max_tokens=6, temperature=0.8, top_p=0.9, seed=7)
    again = client.completions.create(model=MODEL, prompt="i like", max_tokens=6, temperature=0.8, top_p=0.9, seed=7)
    assert sampled.choices[0].text == again.choices[0].text  # a seeded request runs alone: reproducible


def test_streaming_matches_non_streaming(served, client, http):
    admin_put(http, "sam", vec(2))
    whole = chat(client, user="sam").choices[0].message.content
    parts, finish = [], None
    for chunk in chat(client, user="sam", stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == whole and finish in ("stop", "length") and len(parts) > 2
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="i like", max_tokens=6, temperature=0, user="sam", stream=True) if c.choices)
    assert text == client.completions.create(model=MODEL, prompt="i like", max_tokens=6, temperature=0, user="sam").choices[0].text
    raw = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                  "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] <= 3


def test_row_text_sends_only_settled_text():
    """Deltas never include what a later token could change: trailing spaces (chat replies), a half-decoded
    character or the start of a stop string; they always add up to the final (trimmed, cut) text."""
    from e2p.serve.detokenize import RowText

    pieces = [" Hel", "lo", " wor", "ld", " ", "", "é", " ST", "AR", " ST", "OP", " more"]  # "" : half a character
    row, tokens = RowText(pieces.__getitem__, ["STOP"], trim=True), []
    deltas = []
    for i in range(len(pieces)):  # the decode loop appends a token to the row, then the text takes the row's tokens
        if not row.stopped:
            tokens.append(i)
            deltas.append(row.add(tokens))
    assert deltas == ["Hel", "lo", " wor", "ld", "", "", " é", " ", "STAR", " ", ""]
    final, last = row.finish(tokens)
    assert row.stopped and final == "Hello world é STAR " and "".join(deltas) + last == final
    plain = RowText(pieces.__getitem__, [], trim=True)
    for i in range(5):
        plain.add(list(range(i + 1)))
    assert plain.sent == "Hello world" and plain.finish(list(range(5))) == ("Hello world", "")
    exact = RowText(pieces.__getitem__, [])  # /v1/completions: the text exactly, leading and trailing spaces too
    assert exact.add([0]) == " Hel" and exact.finish(list(range(5))) == (" Hello world ", "lo world ")


def test_stream_arrives_while_generating_and_stops_early(tmp_path):
    model = slowed(tiny_model(), 0.05)
    app = create_app(model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name=MODEL, max_tokens_limit=64))
    server = Server(app)
    body = {"model": MODEL, "prompt": "i like", "max_tokens": 24, "temperature": 0, "stream": True}
    try:
        whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=30).json()
        assert whole["usage"]["completion_tokens"] > 12, "the tiny model should write a while"
        arrivals, texts = [], []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    arrivals.append(time.monotonic())
                    texts.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(texts) == whole["choices"][0]["text"]
        assert arrivals[-1] - arrivals[0] > 0.3  # ~24 steps of 50 ms: the first text came long before the last
        # a stop string ends the row at once (fewer tokens generated), streamed or not
        words = whole["choices"][0]["text"].split()
        stop = words[len(words) // 3]
        cut = whole["choices"][0]["text"][: whole["choices"][0]["text"].find(stop)]
        stopped = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "stop": [stop]}, timeout=30).json()
        assert stopped["choices"][0]["text"] == cut and stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"]
        # a client that leaves mid-stream frees its row: the batch ends long before 24 slow steps
        started = time.monotonic()
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "max_tokens": 64}, timeout=30) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))
        deadline = time.monotonic() + 10
        while app.state.batcher.busy:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert time.monotonic() - started < 64 * 0.05
    finally:
        server.stop()


def test_requests_join_a_running_batch(tmp_path):
    """Continuous batching: a request that arrives while a long one decodes joins its batch at the next step and
    finishes on its own schedule, with the same text it gets alone."""
    model = slowed(tiny_model(), 0.05)
    app = create_app(model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name=MODEL, max_tokens_limit=64))
    server = Server(app)
    long = {"model": MODEL, "prompt": "i like", "max_tokens": 64, "temperature": 0}
    short = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0,
             "e2p": {"embedding": vec(5)}}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            alone = c.post("/v1/chat/completions", json=short).json()["choices"][0]["message"]["content"]
            done = {}
            t = threading.Thread(target=lambda: done.setdefault("long", (c.post("/v1/completions", json=long), time.monotonic())))
            t.start()
            time.sleep(0.5)  # the long request is ~10 of its 64 slow steps in
            app.state.batcher.batch_sizes.clear()
            started = time.monotonic()
            r = c.post("/v1/chat/completions", json=short)
            short_done = time.monotonic()
            t.join(30)
        assert r.json()["choices"][0]["message"]["content"] == alone
        assert short_done - started < 1.5  # 4 steps after joining, not after the long request's remaining ~2.7 s
        assert done["long"][1] > short_done + 0.5 and done["long"][0].json()["usage"]["completion_tokens"] == 64
        assert 2 in app.state.batcher.batch_sizes  # it ran in the long request's batch
    finally:
        server.stop()


def test_a_tenants_flood_does_not_hold_every_row_from_another_tenant():
    """Fair admission: with both rows held by tenant A's long requests and more of A's queued, tenant B's short request
    joins at the next step in a guest row (B has no row running), not after A's rows free, and not after all of A's."""
    from e2p.serve.batching import Batcher, GenRequest

    model = slowed(tiny_model(), 0.01)
    model.eos_ids = []  # every row runs its max_tokens: the schedule, not the random text, decides the order
    segments = model.format(PROMPT)
    batcher = Batcher(model, max_batch=2, wait_ms=50)
    flood = [GenRequest(segments, None, max_tokens=30, tenant="a") for _ in range(6)]
    short = GenRequest(segments, None, max_tokens=2, tenant="b")
    done_at = {}
    named = [(f"a{i}", r) for i, r in enumerate(flood)] + [("b", short)]
    for name, r in named:
        r.future.add_done_callback(lambda _, name=name: done_at.setdefault(name, time.monotonic()))
    for r in flood:
        batcher.submit(r)
    batcher.start()
    time.sleep(0.15)  # A's first two requests hold both rows, four more of A's wait
    batcher.submit(short)  # B arrives behind all of A's
    try:
        for _, r in named:
            r.future.result(timeout=120)
    finally:
        batcher.stop()
    # B joined the full batch at once: done long before A's first two requests, which held both rows
    assert done_at["b"] < done_at["a0"] and done_at["b"] < done_at["a1"] < done_at["a5"]
    assert max(batcher.batch_sizes) == 3  # two rows and one guest row, never more


def test_live_update_and_inline_embedding(served, client, http):
    _, model, _ = served
    first = admin_put(http, "bob", vec(3))
    r1 = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                          user="bob", temperature=0, max_tokens=8)
    before = r1.parse().choices[0].message.content
    second = admin_put(http, "bob", vec(4))
    assert (first["version"], second["version"]) == (1, 2)
    r2 = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                          user="bob", temperature=0, max_tokens=8)
    after = r2.parse().choices[0].message.content
    assert (r1.headers["x-e2p-embedding-version"], r2.headers["x-e2p-embedding-version"]) == ("1", "2")
    assert before == expected(model, PROMPT, vec(3)) and after == expected(model, PROMPT, vec(4)) and before != after
    inline = chat(client, extra_body={"e2p": {"embedding": vec(4)}})
    assert inline.choices[0].message.content == after
    meta = http.get("/v1/users/bob/embedding").json()
    assert meta["version"] == 2 and meta["dim"] == 8 and "embedding" not in meta  # the vector only for the admin
    full = http.get("/v1/users/bob/embedding", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert full["embedding"] == pytest.approx(vec(4))
    assert http.delete("/v1/users/bob/embedding", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, user="bob")


def test_concurrent_users_match_each_alone(served, client, http):
    _, model, app = served
    users = [f"c{i}" for i in range(5)]
    for i, u in enumerate(users):
        admin_put(http, u, vec(10 + i))
    kinds = [dict(user=u) for u in users] + [dict(), dict(extra_body={"e2p": {"embedding": vec(99)}})]
    # sampled rows share the batch too: a seeded one samples from its own generator, so its text is reproducible
    kinds += [dict(user="c0", temperature=0.9, top_p=0.8, seed=11), dict(user="c1", temperature=1.2, seed=5)]
    alone = [chat(client, **k).choices[0].message.content for k in kinds]
    app.state.batcher.batch_sizes.clear()
    results = [None] * len(kinds)
    barrier = threading.Barrier(len(kinds))

    def run(i):
        barrier.wait()
        results[i] = chat(client, **kinds[i]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    assert max(app.state.batcher.batch_sizes) > 4  # they really were generated together, greedy and sampled
    assert len(set(alone)) > 3  # and the users really differ
    assert alone[5] == expected(model, PROMPT, None) and alone[0] == expected(model, PROMPT, vec(10))


# --- bad input ------------------------------------------------------------------------------------
def test_every_bad_input_gets_an_openai_error(served, client, http):
    url = "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    assert_error(http.post(url, json={"model": MODEL, "messages": msg, "user": "nobody"}), 404, "user_not_found", "user")
    assert_error(http.post(url, json={"model": MODEL, "messages": msg, "e2p": {"embedding": [1.0, 2.0]}}), 400,
                 "invalid_embedding", "e2p.embedding")
    nan = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "e2p": {"embedding": [NaN, 1, 1, 1, 1, 1, 1, 1]}}' % MODEL
    assert_error(http.post(url, content=nan, headers={"content-type": "application/json"}), 400, "invalid_embedding")
    assert_error(http.post(url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}),
                 400, "invalid_json")
    assert_error(http.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hello " * 60}]}), 400,
                 "context_length_exceeded")
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi " * 60}), 400, "context_length_exceeded")
    assert_error(http.post(url, json={"model": MODEL, "messages": msg, "max_tokens": 1000}), 400, "invalid_value", "max_tokens")
    assert_error(http.post(url, json={"model": MODEL, "messages": msg, "temperature": 5}), 400, "invalid_value", "temperature")
    assert_error(http.post(url, json={"model": MODEL}), 400, "missing_required_parameter", "messages")
    assert_error(http.post(url, json={"model": "gpt-9", "messages": msg}), 404, "model_not_found", "model")
    assert_error(http.post(url, json={"model": MODEL, "messages": msg, "n": 2}), 400, param="n")
    assert_error(http.post(url, content=b"x" * (70 * 1024), headers={"content-type": "application/json"}), 413,
                 "request_too_large")
    assert_error(http.get("/v1/nothing"), 404)
    with pytest.raises(openai.NotFoundError) as exc:
        chat(client, user="nobody")
    assert exc.value.status_code == 404 and exc.value.code == "user_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, extra_body={"e2p": {"embedding": [1.0]}})
    assert exc.value.code == "invalid_embedding"
    # writes are checked too
    admin = {"authorization": f"Bearer {ADMIN}"}
    assert_error(http.put("/v1/users/x/embedding", json={"embedding": [1.0, 2.0]}, headers=admin), 400, "invalid_embedding")
    assert_error(http.put("/v1/users/x/embedding", content='{"embedding": [NaN, 0, 0, 0, 0, 0, 0, 0]}',
                          headers={**admin, "content-type": "application/json"}), 400, "invalid_embedding")
    assert_error(http.get("/v1/users/x/embedding"), 404, "user_not_found")
    # and the server keeps serving
    assert chat(client).choices[0].message.content
    assert httpx.get(served[0].url + "/healthz").status_code == 200


def test_auth(served, http):
    url = served[0].url
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(httpx.post(url + "/v1/chat/completions", json=body), 401, "invalid_api_key")
    assert_error(httpx.post(url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer wrong"}), 401,
                 "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    # the inference key cannot write; the admin key can also do inference
    assert_error(http.put("/v1/users/eve/embedding", json={"embedding": vec(5)}), 403, "permission_denied")
    assert_error(http.delete("/v1/users/eve/embedding"), 403, "permission_denied")
    assert httpx.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200


# --- load shedding, timeouts, shutdown ----------------------------------------------------------------
def test_queue_full_timeout_and_graceful_shutdown(tmp_path):
    model = tiny_model()
    gate, entered = threading.Event(), threading.Event()
    real = model.start_decoding

    def gated(*args, **kwargs):
        entered.set()
        assert gate.wait(30)
        return real(*args, **kwargs)

    model.start_decoding = gated
    config = ServeConfig(model_name=MODEL, max_queue=2, max_batch_size=1, batch_wait_ms=1, request_timeout_s=1.0)
    app = create_app(model, EmbeddingStore(tmp_path / "s.db"), config)
    server = Server(app)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            responses = {}

            def post(name):
                responses[name] = c.post("/v1/chat/completions", json=body)

            first = threading.Thread(target=post, args=("first",))
            first.start()
            assert entered.wait(10)  # the worker holds the first request
            queued = [threading.Thread(target=post, args=(f"q{i}",)) for i in range(2)]
            for t in queued:
                t.start()
            deadline = time.time() + 10
            while app.state.batcher.depth() < 2:
                assert time.time() < deadline
                time.sleep(0.01)
            assert_error(c.post("/v1/chat/completions", json=body), 429, "queue_full")
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}])
            for t in queued:  # they time out while the worker is stuck
                t.join(10)
            for i in range(2):
                assert_error(responses[f"q{i}"], 504, "timeout")
            assert "e2p_queue_depth 0.0" in httpx.get(server.url + "/metrics").text
            gate.set()
            first.join(10)
            assert_error(responses["first"], 504, "timeout")  # its own 1 s timeout passed while it was held
            assert c.post("/v1/chat/completions", json=body).status_code == 200  # and the server keeps serving
    finally:
        gate.set()
        server.stop()
    assert not server.thread.is_alive()


def test_graceful_shutdown_finishes_in_flight(tmp_path):
    model = tiny_model()
    gate, entered = threading.Event(), threading.Event()
    real = model.start_decoding

    def gated(*args, **kwargs):
        entered.set()
        assert gate.wait(30)
        return real(*args, **kwargs)

    model.start_decoding = gated
    app = create_app(model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name=MODEL))
    server = Server(app)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)))
    t.start()
    assert entered.wait(10)
    server.server.should_exit = True  # what SIGTERM does
    time.sleep(0.3)
    assert server.thread.is_alive()  # still finishing the request in flight
    gate.set()
    t.join(10)
    server.thread.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"] is not None
    assert not server.thread.is_alive() and not app.state.batcher.alive


# --- text -> embedding with the projector's own encoder --------------------------------------------------
def test_embeddings_endpoint_and_text_puts_use_the_projectors_encoder(tmp_path):
    """`POST /v1/embeddings` (the real openai client, base64 by default) and `PUT ... {"text"}` embed with the
    real all-MiniLM-L6-v2, laid out as the projector reads it (one block per sentence with slots)."""
    from e2p.data.encoders import SentenceSlotEncoder, TextEncoder

    backbone = make_backbone()
    projector = Projector(new_config(backbone, embedding_dim=2 * 384, embedding_slots=2, num_prefix_tokens=2)).eval()
    app = create_app(E2PModel(backbone, projector), EmbeddingStore(tmp_path / "s.db"),
                     ServeConfig(model_name=MODEL, api_keys=[API], admin_key=ADMIN, max_tokens_limit=8))
    server = Server(app)
    texts = ["I love dogs. I play chess.", "I am a nurse."]
    expected = SentenceSlotEncoder(TextEncoder(), 2).encode(texts)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API, max_retries=0)
        got = client.embeddings.create(model=MODEL, input=texts)
        assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 8
        assert torch.allclose(torch.tensor([d.embedding for d in got.data]), torch.from_numpy(expected), atol=1e-5)
        as_floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[1], encoding_format="float")
        assert torch.allclose(torch.tensor(as_floats.data[0].embedding), torch.from_numpy(expected[1]), atol=1e-5)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            admin = {"authorization": f"Bearer {ADMIN}"}
            r = http.put("/v1/users/ann/embedding", json={"text": texts[0]}, headers=admin)
            assert r.status_code == 200, r.text
            stored = http.get("/v1/users/ann/embedding", headers=admin).json()["embedding"]
            assert torch.allclose(torch.tensor(stored), torch.from_numpy(expected[0]), atol=1e-5)
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   user="ann", max_tokens=4, temperature=0)
            assert reply.usage.completion_tokens >= 1
            auth = {"authorization": f"Bearer {API}"}
            assert_error(http.post("/v1/embeddings", json={"model": MODEL, "input": []}, headers=auth), 400, "invalid_value", "input")
            assert_error(http.post("/v1/embeddings", json={"model": MODEL, "input": ["ok", " "]}, headers=auth), 400, "invalid_value", "input")
            assert_error(http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "dimensions": 384}, headers=auth),
                         400, "invalid_value", "dimensions")
            assert_error(http.post("/v1/embeddings", json={"model": "gpt-4", "input": "x"}, headers=auth), 404, "model_not_found")
            assert_error(http.post("/v1/embeddings", json={"model": MODEL, "input": [[1, 2]]}, headers=auth), 400, "invalid_value")
            assert_error(http.put("/v1/users/bo/embedding", json={"text": "x", "embedding": [0.0] * 768}, headers=admin), 400)
            assert_error(http.put("/v1/users/bo/embedding", json={}, headers=admin), 400)
            assert_error(http.put("/v1/users/bo/embedding", json={"text": "x"}, headers=auth), 403, "permission_denied")
            assert http.get("/v1/users/bo/embedding", headers=admin).status_code == 404  # nothing half-written
    finally:
        server.stop()
