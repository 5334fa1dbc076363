"""Property-based fuzzing of the server from its own OpenAPI spec (schemathesis): whatever a client sends that the
spec allows, or nearly allows, the answer is never a 5xx. Loopback, the tiny test backbone, bounded examples."""
from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from e2p.serve import ServeConfig, create_app  # noqa: E402
from e2p.store import EmbeddingStore  # noqa: E402
from conftest import ADMIN, API, MODEL, Server, tiny_model, vec  # noqa: E402


class HashEncoder:
    """An 8-d text encoder for the tiny projector (the real all-MiniLM-L6-v2 is tested in test_serve)."""

    def encode(self, texts):
        import numpy as np

        return np.stack([np.random.default_rng(abs(hash(t)) % 2 ** 32).normal(size=8) for t in texts]).astype("float32")


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    config = ServeConfig(model_name=MODEL, api_keys=[API], admin_key=ADMIN, max_tokens_limit=8, default_max_tokens=4,
                         max_body_bytes=64 * 1024, batch_wait_ms=1)
    store = EmbeddingStore(tmp_path_factory.mktemp("fuzz") / "users.db")
    server = Server(create_app(tiny_model(), store, config, encoder=HashEncoder()))
    httpx.put(server.url + "/v1/users/ann/embedding", json={"embedding": vec(1)},
              headers={"authorization": f"Bearer {ADMIN}"}).raise_for_status()
    yield schemathesis.openapi.from_url(server.url + "/openapi.json")
    server.stop()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_gets_a_server_error(api_schema, mode):
    """Every operation, with data that fits the spec and data that does not (schemathesis' pytest plugin does not
    run on pytest 9, so the operations are walked here with plain Hypothesis)."""
    from schemathesis.generation import GenerationMode

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/users/{user_id}/embedding"}
    for operation in operations:
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(GenerationMode(mode)))
        def check(case):
            case.call_and_validate(headers={"authorization": f"Bearer {ADMIN}"}, checks=[not_a_server_error], timeout=30)

        try:
            check()
        except Unsatisfiable:  # an operation with nothing to get wrong (no body, no parameters): no negative case
            assert mode == "negative" and not operation.body and operation.path not in ("/v1/chat/completions",)
