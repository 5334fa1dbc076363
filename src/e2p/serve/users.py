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

import numpy as np
from fastapi import APIRouter, Depends, Request

from ..data.live_profile import serving_rule
from ..errors import ConfigError, DataError, EmbeddingError
from ..store import DEFAULT_TENANT, StoreBusyError, StoreError
from ..store.vectors import as_vector
from .auth import Caller, admin_caller, inference_caller
from .embedder import TextEmbeddingError, UserEmbedder
from .protocol import dump
from .protocol_users import (EmbeddingData, EmbeddingList, EmbeddingPut, EmbeddingsRequest, EmbeddingUsage,
                             UserEmbeddingDeleted, UserEmbeddingInfo, UserEmbeddingWithVector, UserEvents, UserProfileInfo)
from .serving import APIError, OpenAIServing

log = logging.getLogger("e2p.serve")


def retry_later(exc: StoreBusyError) -> APIError:
    """A store that is busy (SQLite: another writer) or unreachable (PostgreSQL down): 503 with Retry-After."""
    return APIError(503, str(exc), type="server_error", code=exc.code, headers={"retry-after": "1"})


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
        config = serving.model.projector.config if dim is not None else None
        # the live profile's rule (e2p.data.live_profile): the projector's profile.json, or a plain mean
        self.rule = serving_rule(self.config.projector_dir, config, self.config.profile_rule) if config else None
        with_style = self.rule if self.rule is not None and self.rule.style else None  # more than the encoder's mean
        self.embedder = UserEmbedder(config, encoder, with_style) if dim is not None else None
        # the encoder runs one text at a time anyway (UserEmbedder's lock): one thread, so waiting texts hold none
        self.text_admission = Admission(self.config.max_embed_requests, 1, "text-embedding requests",
                                        "embedding_queue_full")
        self.user_admission = Admission(self.config.max_user_requests, 4, "user-embedding requests", "user_queue_full")

    async def embed_texts(self, texts: list[str], param: str):
        """-> ([N, embedding_dim] vectors, input tokens), with the projector's own encoder."""
        if self.embedder is None:
            raise APIError(400, "this server's projector reads no user embedding (none, or a shared prefix): there is "
                                "nothing to embed", param=param, code="no_user_embedding")
        return await self._run_encoder(self.embedder.embed, texts, param)

    async def _run_encoder(self, fn, texts: list[str], param: str):
        """`fn(texts)` on the encoder's thread: bad texts are a 400 naming `param`, an encoder that cannot load a 503."""
        try:
            return await self.text_admission.run(fn, texts)
        except TextEmbeddingError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_value") from None
        except ConfigError as exc:
            raise APIError(503, f"the text encoder is unavailable: {exc}", type="server_error",
                           code="encoder_unavailable") from None

    # --- the live profile -----------------------------------------------------------------------------
    async def post_events(self, user_id: str, body: UserEvents, tenant: str, admin: bool) -> dict:
        """Fold what `tenant`'s user did (texts, then vectors, in order) into their live profile; an admin key may
        start a new user's profile, any other key only adds to a known user's (404 otherwise)."""
        self.serving.check_user(user_id)
        rule = self._rule("events")
        vectors = []
        for i, v in enumerate(body.vectors or []):
            try:
                vectors.append(as_vector(v, rule.dim))
            except EmbeddingError as exc:
                raise APIError(400, f"vectors.{i}: {exc}", param=f"vectors.{i}", code="invalid_embedding") from None
        texts = list(body.texts or [])
        items = [await self._encode_items(texts, "texts")] if texts else []
        items.append(np.asarray(vectors, dtype=np.float32).reshape(len(vectors), rule.dim))
        return await self.fold(user_id, tenant, np.concatenate(items), texts + [None] * len(vectors), create=admin)

    async def remember(self, req, messages: list[dict], tenant: str) -> dict:
        """A chat's `"e2p": {"remember": true}`: its last user message folded into the user's profile before the
        answer, where the tenant allows it. -> response headers."""
        if tenant not in self.config.remember_tenants:
            raise APIError(403, f"tenant {tenant!r} does not allow `remember`: its operator turns it on with `e2p keys "
                                f"tenant --file KEYS --tenant {tenant} --allow-remember` (or `e2p serve "
                                "--allow-remember` for the default tenant)", param="e2p.remember",
                           code="remember_not_allowed")
        user = req.end_user
        if not user or req.e2p.embedding is not None:
            raise APIError(400, "`remember` folds the message into a stored user's profile: send `user` and no inline "
                                "`e2p.embedding`", param="e2p.remember", code="invalid_value")
        said = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        if not said:
            raise APIError(400, "`remember` needs a user message with text", param="messages", code="invalid_value")
        self._rule("e2p.remember")
        record = await self.fold(user, tenant, await self._encode_items(said[-1:], "messages"), said[-1:],
                                 create=False)
        return {"x-e2p-remembered": str(record["events"])}

    def _rule(self, param: str):
        if self.rule is None:
            raise APIError(400, "this server's projector has no live-profile rule (it reads no user embedding, or one "
                                "made of several slots): store whole vectors with PUT", param=param,
                           code="no_profile_rule")
        return self.rule

    async def _encode_items(self, texts: list[str], param: str) -> np.ndarray:
        """The encoder's own vectors of `texts`: what a live profile folds in."""
        if self.embedder is None:
            self._rule(param)
        return (await self._run_encoder(self.embedder.encode_items, texts, param))[0]

    async def fold(self, user: str, tenant: str, items: np.ndarray, texts: list, create: bool) -> dict:
        """Items folded into `tenant`'s `user`'s running sums in one store transaction -> UserProfileInfo."""
        rule, folded = self.rule, {}

        def update(blob):
            folded["sums"] = sums = rule.fold_stored(blob, items, texts)
            return sums.to_bytes(), rule.vector(sums)

        try:
            record = await self.user_admission.run(self.store.update_profile, user, update, tenant, create)
        except StoreBusyError as exc:
            raise retry_later(exc) from None
        except DataError as exc:
            raise APIError(409, str(exc), param="user", code="profile_mismatch") from None
        except (EmbeddingError, StoreError) as exc:
            raise APIError(400, str(exc), param="user", code="invalid_embedding") from None
        if record is None:
            raise APIError(404, f"user {user!r} has no stored embedding: an admin key starts a new user's profile "
                                "from events (POST /v1/users/{id}/events)", param="user", code="user_not_found")
        self.metrics.store_writes.labels("events").inc()
        log.info("events folded", extra={**self.serving.who(tenant, user), "version": record.version,
                                          "events": len(texts)})
        return dump(UserProfileInfo(**record.metadata(), events=folded["sums"].events,
                                    half_life_events=rule.half_life_events))

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
            raise retry_later(exc) from None
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
            raise retry_later(exc) from None
        except StoreError as exc:
            raise APIError(500, f"{exc}: the user was not deleted, retry", type="server_error",
                           code="store_error") from None
        if not deleted:
            raise APIError(404, f"user {user_id!r} has no stored embedding", param="user", code="user_not_found")
        self.metrics.store_writes.labels("delete").inc()
        log.info("embedding deleted", extra=self.serving.who(tenant, user_id))
        return dump(UserEmbeddingDeleted(user=user_id))

    def close(self) -> None:
        """At shutdown: the embedding and user-endpoint threads finish what runs and drop what waits."""
        for admission in (self.text_admission, self.user_admission):
            admission.pool.shutdown(wait=False, cancel_futures=True)


# --- the routes: text embeddings and the user store; any id the store accepts (`org/alice` too), percent-encoded in
# the path; always the caller's own tenant's user, so another tenant's users are neither reachable nor observable ----
router = APIRouter()


@router.post("/v1/embeddings", dependencies=[Depends(inference_caller)])
async def embeddings(req: EmbeddingsRequest, request: Request):
    """OpenAI's embeddings endpoint: the vectors to store for users (or send inline as `e2p.embedding`)."""
    return await request.app.state.users.embeddings(req)


@router.put("/v1/users/{user_id:path}/embedding")
async def put_embedding(user_id: str, body: EmbeddingPut, request: Request, caller: Caller = Depends(admin_caller)):
    """Store a user's vector, or embed their profile text with the projector's encoder and store that."""
    return await request.app.state.users.put_embedding(user_id, body, caller.tenant)


@router.get("/v1/users/{user_id:path}/embedding")
async def get_embedding(user_id: str, request: Request, caller: Caller = Depends(inference_caller)):
    return await request.app.state.users.get_embedding(user_id, caller.admin, caller.tenant)


@router.post("/v1/users/{user_id:path}/events")
async def post_events(user_id: str, body: UserEvents, request: Request, caller: Caller = Depends(inference_caller)):
    """Fold what a user did (texts, item vectors) into their live profile; admins may start a new user's."""
    return await request.app.state.users.post_events(user_id, body, caller.tenant, caller.admin)


@router.delete("/v1/users/{user_id:path}/embedding")
async def delete_embedding(user_id: str, request: Request, caller: Caller = Depends(admin_caller)):
    return await request.app.state.users.delete_embedding(user_id, caller.tenant)
