"""The user-embedding endpoints: `POST /v1/embeddings` (text -> the vector this server's projector reads, with its own
encoder) and `PUT` / `GET` / `DELETE /v1/users/{id}/embedding` (the store). Each kind runs on threads of its own
behind an `Admission`, so that a flood of them is refused (429) instead of queueing or starving the chats."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import logging
import threading
from typing import Callable

from ..errors import ConfigError, EmbeddingError
from ..store import DEFAULT_TENANT, StoreBusyError, StoreError
from ..vectors import as_vector
from .embedder import TextEmbeddingError, UserEmbedder
from .protocol import (EmbeddingData, EmbeddingList, EmbeddingPut, EmbeddingsRequest, EmbeddingUsage,
                       UserEmbeddingDeleted, UserEmbeddingInfo, UserEmbeddingWithVector, dump)
from .serving import APIError, OpenAIServing

log = logging.getLogger("e2p.serve")


class Admission:
    """At most `limit` requests of one kind in flight, each run on this kind's own threads: the next one is refused
    at once (429 with Retry-After), so that a flood of text embeddings or user-endpoint calls can neither queue
    without bound nor take the shared thread pool that personalized chats read the store through."""

    def __init__(self, limit: int, threads: int, what: str, code: str):
        if limit < 1:
            raise ValueError(f"the limit on {what} must be >= 1")
        self.limit, self.what, self.code, self.active = limit, what, code, 0
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"e2p-{code}")
        self._lock = threading.Lock()

    async def run(self, fn: Callable, *args):
        """`fn(*args)` on this kind's threads, or 429 when `limit` requests of this kind are in flight already."""
        with self._lock:
            if self.active >= self.limit:
                raise APIError(429, f"{self.limit} {self.what} are in flight already: retry after a short wait",
                               type="rate_limit_error", code=self.code, headers={"retry-after": "1"})
            self.active += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))
        finally:
            with self._lock:
                self.active -= 1


class UserServing:
    """Text embeddings and the store's endpoints over `serving`'s store; `encoder`: the text encoder (default: the
    projector's own, loaded on first use)."""

    def __init__(self, serving: OpenAIServing, encoder=None):
        self.serving, self.config, self.store, self.metrics = serving, serving.config, serving.store, serving.metrics
        self.embedding_dim = dim = serving.embedding_dim
        self.embedder = UserEmbedder(serving.model.projector.config, encoder) if dim is not None else None
        # the encoder runs one text at a time anyway (UserEmbedder's lock): one thread, so waiting texts hold none
        self.text_admission = Admission(self.config.max_embed_requests, 1, "text-embedding requests",
                                        "embedding_queue_full")
        self.user_admission = Admission(self.config.max_user_requests, 4, "user-embedding requests", "user_queue_full")

    async def embed_texts(self, texts: list[str], param: str):
        """-> ([N, embedding_dim] vectors, input tokens), with the projector's own encoder."""
        if self.embedder is None:
            raise APIError(400, "this server's projector reads no user embedding (none, or a shared prefix): there is "
                                "nothing to embed", param=param, code="no_user_embedding")
        try:
            return await self.text_admission.run(self.embedder.embed, texts)
        except TextEmbeddingError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_value") from None
        except ConfigError as exc:
            raise APIError(503, f"the text encoder is unavailable: {exc}", type="server_error",
                           code="encoder_unavailable") from None

    async def embeddings(self, req: EmbeddingsRequest) -> dict:
        """OpenAI's embeddings endpoint: the vectors to store for users (or send inline as `e2p.embedding`)."""
        if self.embedder is None or req.model != self.embedder.name:  # the encoder's own name is accepted too
            self.serving.check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if req.dimensions is not None and req.dimensions != self.embedding_dim:
            raise APIError(400, f"dimensions must be {self.embedding_dim} (what the projector reads) or omitted",
                           param="dimensions", code="invalid_value")
        vectors, tokens = await self.embed_texts(texts, "input")
        encode = ((lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if req.encoding_format == "base64"
                  else (lambda v: [float(x) for x in v]))
        return dump(EmbeddingList(model=req.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
                                  data=[EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(vectors)]))

    async def put_embedding(self, user_id: str, body: EmbeddingPut, tenant: str = DEFAULT_TENANT) -> dict:
        """Store `tenant`'s user's vector, or embed their profile text with the projector's encoder and store that."""
        self.serving.check_user(user_id)
        vector = body.embedding if body.text is None else (await self.embed_texts([body.text], "text"))[0][0].tolist()
        try:
            if self.embedding_dim is not None:
                as_vector(vector, self.embedding_dim)
            record = await self.user_admission.run(self.store.put, user_id, vector, tenant)
        except StoreBusyError as exc:
            raise APIError(503, str(exc), type="server_error", code="store_busy", headers={"retry-after": "1"}) from None
        except (EmbeddingError, StoreError) as exc:
            raise APIError(400, str(exc), param="embedding", code="invalid_embedding") from None
        self.metrics.store_writes.labels("put").inc()
        log.info("embedding stored", extra={**self.serving.who(tenant, user_id), "version": record.version})
        return dump(UserEmbeddingInfo(**record.metadata()))

    async def get_embedding(self, user_id: str, is_admin: bool, tenant: str = DEFAULT_TENANT) -> dict:
        """`tenant`'s user's stored embedding's metadata; the vector too for the tenant's admin."""
        self.serving.check_user(user_id)
        record = await self.serving.stored(user_id, tenant, self.user_admission)
        if record is None:
            raise APIError(404, f"user {user_id!r} has no stored embedding", param="user", code="user_not_found")
        if is_admin:
            return dump(UserEmbeddingWithVector(**record.metadata(), embedding=[float(x) for x in record.vector]))
        return dump(UserEmbeddingInfo(**record.metadata()))

    async def delete_embedding(self, user_id: str, tenant: str = DEFAULT_TENANT) -> dict:
        """Delete `tenant`'s user's vector, bytes and all (the store zeroes them and truncates its WAL)."""
        self.serving.check_user(user_id)
        try:
            deleted = await self.user_admission.run(self.store.delete, user_id, tenant)
        except StoreBusyError as exc:
            raise APIError(503, str(exc), type="server_error", code="store_busy", headers={"retry-after": "1"}) from None
        if not deleted:
            raise APIError(404, f"user {user_id!r} has no stored embedding", param="user", code="user_not_found")
        self.metrics.store_writes.labels("delete").inc()
        log.info("embedding deleted", extra=self.serving.who(tenant, user_id))
        return dump(UserEmbeddingDeleted(user=user_id))

    def close(self) -> None:
        """At shutdown: the embedding and user-endpoint threads finish what runs and drop what waits."""
        for admission in (self.text_admission, self.user_admission):
            admission.pool.shutdown(wait=False, cancel_futures=True)
