"""OpenTelemetry traces (issue 45), off by default: with a tracer provider (here an in-process exporter; `e2p serve
--otlp-endpoint` exports over OTLP/HTTP) one chat request is one trace with spans for the route, the store lookup,
the queue, the prefill and the decode, in that order, and no user id anywhere."""
from __future__ import annotations

import httpx
import pytest

from conftest import ADMIN, API, MODEL, PROMPT, Server, tiny_model, vec

from e2p.serve import ServeConfig, create_app
from e2p.store import EmbeddingStore


def test_a_chat_request_is_one_trace_with_store_queue_prefill_and_decode(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = ServeConfig(model_name=MODEL, api_keys=[API], admin_key=ADMIN)
    server = Server(create_app(tiny_model(), EmbeddingStore(tmp_path / "s.db"), config, tracer_provider=provider))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.put("/v1/users/secret-user-7/embedding", json={"embedding": vec(1)},
                              headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
            exporter.clear()
            r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {API}"},
                            json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
                                  "user": "secret-user-7"})
            assert r.status_code == 200
    finally:
        server.stop()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"POST /v1/chat/completions", "store.get", "queue", "prefill", "decode"} <= set(spans)
    root = spans["POST /v1/chat/completions"]
    assert root.attributes["http.route"] == "/v1/chat/completions" and root.attributes["http.response.status_code"] == 200
    for name in ("store.get", "queue", "prefill", "decode"):  # one trace, under the request's span
        assert spans[name].context.trace_id == root.context.trace_id and spans[name].parent.span_id == root.context.span_id
    assert spans["queue"].end_time <= spans["prefill"].end_time <= spans["decode"].end_time <= root.end_time
    assert spans["store.get"].start_time >= root.start_time and spans["decode"].attributes["completion_tokens"] >= 1
    text = repr([(s.name, dict(s.attributes or {})) for s in exporter.get_finished_spans()])
    assert "secret-user-7" not in text  # never a user id


def test_tracing_is_off_by_default(tmp_path):
    from e2p.serve.tracing import Tracing

    off = Tracing()
    assert not off.on and off.recorder() is None
    with off.span("x") as span:
        assert span is None
