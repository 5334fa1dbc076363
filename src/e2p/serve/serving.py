"""The base every endpoint family shares: `OpenAIServing` holds the loaded model, its embedding store, the batcher
and the metrics, and takes the steps more than one family needs (the model's name, a user id, the user's stored
or inline embedding). `ServeConfig` (limits and keys) and `APIError` (an OpenAI-shaped error) live here too.

The families, as in vLLM's OpenAI entrypoint: `prompts` + `chat` (chat and completions: checks, formatting,
answers, streams), `users` (embeddings and the user store), `health` (healthz, models); `auth` checks keys and
`app` puts thin routes in front of them all."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from ..errors import EmbeddingError
from ..engines.base import Engine
from ..store import DEFAULT_TENANT, CorruptEmbeddingError, EmbeddingStore, StoreError
from ..store.vectors import as_vector, check_user_id
from .batching import Batcher
from .engine_batching import EngineLoopBatcher
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, dump

log = logging.getLogger("e2p.serve")


@dataclass
class ServeConfig:
    """Limits and keys. Keys: inference needs one of `api_keys` (or the admin key); writes need `admin_key`. Those
    two are the default tenant's; `keys` (serve.keys.KeyEntry, from a `--keys` file) adds hashed keys of any tenant,
    each with its role. A request's users are its key's tenant's.

    With no key at all the server is open (fine on loopback for development; the CLI refuses other hosts).
    """

    model_name: str = "e2p"
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    keys: list = field(default_factory=list)  # serve.keys.KeyEntry: hashed keys of tenants, with their roles
    log_user_ids: bool = False  # True: log lines name the user a request speaks for (default: the tenant only)
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_batch_size: int = 8
    fair_shares: bool = True  # decode steps by tenants' fair shares of tokens (serve.fair_share); False: all rows step
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 120.0
    allow_unknown_users: bool = False  # True: an unknown `user` gets the unpersonalized backbone instead of 404
    max_messages: int = 256  # chat messages per request (older turns past max_prompt_tokens are dropped anyway)
    max_prompt_chars: int = 32_000  # characters of text per request, so formatting stays short for everyone
    stall_seconds: float = 30.0  # /healthz fails when the batcher has made no step for this long while busy
    metrics_key: str | None = None  # set: GET /metrics needs `Authorization: Bearer <metrics_key>` (or the admin key)
    max_stop_strings: int = 16  # `stop` strings per request: matching runs in the one decoding thread
    max_stop_chars: int = 256  # characters per stop string (the tail searched each step is this long)
    max_embed_requests: int = 8  # text embeddings in flight (/v1/embeddings, PUT {"text"}), one encoder thread; 429 above
    max_user_requests: int = 32  # PUT / GET / DELETE /v1/users/{id}/embedding in flight, own threads; 429 above
    profile_rule: str | None = None  # the live profile's rule file (default: the projector's profile.json, else a mean)
    remember_tenants: frozenset = frozenset()  # tenants whose chats may send "e2p": {"remember": true}
    otlp_endpoint: str | None = None  # export OpenTelemetry traces of requests there (OTLP/HTTP); None: no tracing
    tenant_limits: dict = field(default_factory=dict)  # tenant -> serve.limits.Limits: each key's default rate limits
    projector_dir: str | None = None  # the served projector's folder: the card (GET /v1/projector) reads its training_report.json

    @property
    def open(self) -> bool:
        return not self.api_keys and not self.admin_key and not self.keys


class APIError(Exception):
    """Becomes an OpenAI-shaped error: a JSON response with `status`, or a stream's error event."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}` (protocol.ErrorResponse)."""
        return dump(ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                                  code=self.code)))


class OpenAIServing:
    """What every endpoint family shares, in small steps that raise `APIError`: the config, model, store, batcher
    (started and stopped by the app's lifespan) and metrics, and the user's embedding."""

    def __init__(self, model: Engine, store: EmbeddingStore, config: ServeConfig | None = None, tracing=None):
        from .tracing import Tracing

        self.config = config = config or ServeConfig()
        self.tracing = tracing or Tracing()
        self.model, self.store = model, store
        self.metrics = Metrics()
        self.tokenizer_lock = threading.Lock()
        # an engine with its own decode loop (vLLM) batches rows itself: the server only hands them over
        batching = EngineLoopBatcher if getattr(model, "own_decode_loop", False) else Batcher
        self.batcher = batching(model, max_batch=config.max_batch_size, wait_ms=config.batch_wait_ms,
                                max_queue=config.max_queue, tokenizer_lock=self.tokenizer_lock, metrics=self.metrics,
                                fair_shares=config.fair_shares)
        projector = model.projector
        self.embedding_dim = (projector.config.embedding_dim
                              if projector is not None and not projector.config.is_shared else None)
        if self.embedding_dim is not None:
            store.claim_dim(self.embedding_dim)  # refuses a store of another encoder at start-up
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name not in (self.config.model_name, self.model.backbone_name):
            raise APIError(404, f"model {name!r} does not exist: this server serves {self.config.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    @staticmethod
    def check_user(user_id: str) -> str:
        try:
            return check_user_id(user_id)
        except EmbeddingError as exc:
            raise APIError(400, str(exc), param="user", code="invalid_value") from None

    def who(self, tenant: str, user: str) -> dict:
        """Log fields for a request about `tenant`'s `user`: the tenant, and the user id only with --log-user-ids."""
        return {"tenant": tenant, "user": user} if self.config.log_user_ids else {"tenant": tenant}

    # --- the user's embedding -------------------------------------------------------------------------
    async def resolve_embedding(self, req: ChatCompletionRequest | CompletionRequest,
                                tenant: str = DEFAULT_TENANT) -> tuple[torch.Tensor | None, dict]:
        """-> (embedding or None, headers describing where it came from): inline `e2p.embedding`, else the stored
        embedding of `user` in the caller's `tenant`, else none."""
        dim, metrics = self.embedding_dim, self.metrics
        if dim is None:  # no projector or a shared prefix: users make no difference
            return None, {"x-e2p-embedding": "none"}
        inline = req.e2p.embedding if req.e2p is not None else None
        if inline is not None:
            try:
                vector = as_vector(inline, dim)
            except EmbeddingError as exc:
                raise APIError(400, str(exc), param="e2p.embedding", code="invalid_embedding") from None
            metrics.personalized.labels("inline").inc()
            return torch.from_numpy(vector), {"x-e2p-embedding": "inline"}
        user = req.end_user
        if user:
            record = await self.stored(user, tenant)
            if record is None:
                if self.config.allow_unknown_users:
                    metrics.personalized.labels("unknown_user").inc()
                    return None, {"x-e2p-embedding": "none"}
                raise APIError(404, f"user {user!r} has no stored embedding: PUT /v1/users/{{id}}/embedding "
                                    "or `e2p users import` first, send one inline in `e2p.embedding`, or omit `user`",
                               param="user", code="user_not_found")
            if record.dim != dim:
                raise APIError(409, f"the stored embedding of {user!r} has {record.dim} values, the projector needs "
                                    f"{dim}: store it again", param="user", code="invalid_embedding")
            metrics.personalized.labels("store").inc()
            return torch.from_numpy(record.vector), {"x-e2p-embedding": "store",
                                                     "x-e2p-embedding-version": str(record.version)}
        metrics.personalized.labels("none").inc()
        return None, {"x-e2p-embedding": "none"}

    async def stored(self, user: str, tenant: str = DEFAULT_TENANT, admission=None):
        """`tenant`'s stored record of `user` (None if unknown), read on the shared threads (a chat) or on
        `admission`'s (the user endpoints' `users.Admission`); a damaged row or a busy / damaged store is an error for this request only."""
        try:
            with self.tracing.span("store.get", tenant=tenant):
                if admission is not None:
                    return await admission.run(self.store.get, user, tenant)
                return await run_in_threadpool(self.store.get, user, tenant)
        except CorruptEmbeddingError as exc:
            raise APIError(409, str(exc), param="user", code="corrupt_embedding") from None
        except StoreError as exc:
            log.error("store read failed", extra={**self.who(tenant, user), "error": str(exc)})
            raise APIError(503, f"the embedding store cannot be read: {exc}", type="server_error",
                           code="store_unavailable", headers={"retry-after": "1"}) from None
