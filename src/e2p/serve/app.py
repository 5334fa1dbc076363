"""The OpenAI-compatible FastAPI app: chat / completions (streamed or not), models, the embedding store, ops."""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ConfigError, EmbeddingError
from ..model import E2PModel, PromptTooLongError, Segments
from ..store import CorruptEmbeddingError, EmbeddingStore, StoreBusyError, StoreError, as_vector, check_user_id
from .embedder import TextEmbeddingError, UserEmbedder
from .batching import Batcher, GenRequest, GenResult, QueueFullError, RequestTimeoutError, ShuttingDownError
from .metrics import Metrics
from .schemas import (ChatChoice, ChatChoiceMessage, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                      ChatCompletionRequest, ChatDelta, Completion, CompletionChoice, CompletionRequest, EmbeddingPut,
                      EmbeddingsRequest,
                      ModelCard, ModelList, Usage, dump, new_id)

log = logging.getLogger("e2p.serve")
access_log = logging.getLogger("e2p.serve.access")


@dataclass
class ServeConfig:
    """Limits and keys. Keys: inference needs one of `api_keys` (or the admin key); writes need `admin_key`.

    With no key at all the server is open (fine on loopback for development; the CLI refuses other hosts).
    """

    model_name: str = "e2p"
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 120.0
    allow_unknown_users: bool = False  # True: an unknown `user` gets the unpersonalized backbone instead of 404
    max_messages: int = 256  # chat messages per request (older turns past max_prompt_tokens are dropped anyway)
    max_prompt_chars: int = 32_000  # characters of text per request, so formatting stays short for everyone
    stall_seconds: float = 30.0  # /healthz fails when the batcher has made no step for this long while busy
    metrics_key: str | None = None  # set: GET /metrics needs `Authorization: Bearer <metrics_key>` (or the admin key)

    @property
    def open(self) -> bool:
        return not self.api_keys and not self.admin_key


class ClientGoneError(Exception):
    """The client disconnected before its non-streamed answer was ready."""


async def disconnected(request: Request) -> None:
    """Return when the client disconnects: the body is read already, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected; never spin


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), for /healthz and the soak benchmark."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class APIError(Exception):
    """Becomes an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes with 413 before the app parses them (pure ASGI, works for chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body is larger than {self.limit} bytes: send a shorter prompt or embedding",
                                 code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.limit:
                        return await too_big(scope, receive, send)
                except ValueError:
                    return await error_response(400, "bad Content-Length header")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def create_app(model: E2PModel, store: EmbeddingStore, config: ServeConfig | None = None, encoder=None) -> FastAPI:
    """The app around a loaded E2PModel (with its projector) and an embedding store. The batcher starts with the app.

    `encoder`: the text encoder for `/v1/embeddings` and `{"text": ...}` puts (default: the projector's own,
    loaded on first use)."""
    config = config or ServeConfig()
    metrics = Metrics()
    tokenizer_lock = threading.Lock()
    batcher = Batcher(model, max_batch=config.max_batch_size, wait_ms=config.batch_wait_ms, max_queue=config.max_queue,
                      tokenizer_lock=tokenizer_lock, metrics=metrics)
    projector = model.projector
    embedding_dim = projector.config.embedding_dim if projector is not None and not projector.config.is_shared else None
    if embedding_dim is not None:
        store._claim_dim(embedding_dim)  # refuses a store of another encoder at start-up
    embedder = UserEmbedder(projector.config, encoder) if embedding_dim is not None else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("serving", extra={"model": config.model_name, "embedding_dim": embedding_dim, "store": str(store.path),
                                   "max_batch": config.max_batch_size, "max_queue": config.max_queue})
        try:
            yield
        finally:
            log.info("shutting down: finishing queued requests", extra={"queued": batcher.depth()})
            await run_in_threadpool(batcher.stop, True)
            log.info("stopped")

    app = FastAPI(title="e2p", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.batcher, app.state.store, app.state.metrics, app.state.config, app.state.model = (
        batcher, store, metrics, config, model)

    # --- errors -----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON ({first.get('msg', '')}): send a JSON object",
                                  code="invalid_json")
        loc = tuple(first.get("loc", ()))
        param = _param(loc)
        if first.get("type") == "missing":
            return error_response(400, f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
        return error_response(400, f"invalid value for {param or 'the body'}: {first.get('msg', 'invalid')}",
                              param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /v1/models, /v1/chat/completions, /v1/completions"
        return error_response(exc.status_code, message, code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, "internal error; see the server log", type="server_error", code="internal_error")

    # --- access log + metrics (outermost), body limit (inside it) ---------------------------------------
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["x-request-id"] = request_id
            return response
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.latency.labels(route).observe(elapsed)
            access_log.info("request", extra={"request_id": request_id, "method": request.method, "route": route,
                                              "status": status, "seconds": round(elapsed, 4)})

    # --- auth -----------------------------------------------------------------------------------------
    def _key(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _is_admin(key: str | None) -> bool:
        return bool(key and config.admin_key and hmac.compare_digest(key.encode(), config.admin_key.encode()))

    def authorize(request: Request, admin: bool = False) -> bool:
        """Raise 401 / 403 unless allowed; return whether the caller holds the admin key."""
        key = _key(request)
        is_admin = _is_admin(key)
        if config.open:
            return True
        if key is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
        if admin:
            if not config.admin_key:
                raise APIError(403, "embedding writes are disabled: start the server with --admin-key (or E2P_ADMIN_KEY)",
                               code="permission_denied")
            if not is_admin:
                wrong = not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys)
                if wrong:
                    raise APIError(401, "incorrect API key", code="invalid_api_key")
                raise APIError(403, "this needs the admin key", code="permission_denied")
            return True
        if is_admin or any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
            return is_admin
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    # --- shared request handling -------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name not in (config.model_name, model.backbone.name):
            raise APIError(404, f"model {name!r} does not exist: this server serves {config.model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    def max_tokens_of(value: int | None) -> int:
        n = value if value is not None else config.default_max_tokens
        if n > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {n}, the limit is {config.max_tokens_limit}: ask for fewer tokens",
                           param="max_tokens", code="invalid_value")
        return n

    async def resolve_embedding(req) -> tuple[torch.Tensor | None, dict]:
        """-> (embedding or None, headers describing where it came from)."""
        if embedding_dim is None:  # no projector or a shared prefix: users make no difference
            return None, {"x-e2p-embedding": "none"}
        inline = req.e2p.embedding if req.e2p is not None else None
        if inline is not None:
            try:
                vector = as_vector(inline, embedding_dim)
            except EmbeddingError as exc:
                raise APIError(400, str(exc), param="e2p.embedding", code="invalid_embedding") from None
            metrics.personalized.labels("inline").inc()
            return torch.from_numpy(vector), {"x-e2p-embedding": "inline"}
        if req.user:
            record = await stored(req.user)
            if record is None:
                if config.allow_unknown_users:
                    metrics.personalized.labels("unknown_user").inc()
                    return None, {"x-e2p-embedding": "none"}
                raise APIError(404, f"user {req.user!r} has no stored embedding: PUT /v1/users/{{id}}/embedding "
                                    "or `e2p users import` first, send one inline in `e2p.embedding`, or omit `user`",
                               param="user", code="user_not_found")
            if record.dim != embedding_dim:
                raise APIError(409, f"the stored embedding of {req.user!r} has {record.dim} values, the projector needs "
                                    f"{embedding_dim}: store it again", param="user", code="invalid_embedding")
            metrics.personalized.labels("store").inc()
            return torch.from_numpy(record.vector), {"x-e2p-embedding": "store",
                                                     "x-e2p-embedding-version": str(record.version)}
        metrics.personalized.labels("none").inc()
        return None, {"x-e2p-embedding": "none"}

    async def stored(user: str):
        """The user's stored record (None if unknown); a damaged row or a busy / damaged store is an error for
        this request only."""
        try:
            return await run_in_threadpool(store.get, user)
        except CorruptEmbeddingError as exc:
            raise APIError(409, str(exc), param="user", code="corrupt_embedding") from None
        except StoreError as exc:
            log.error("store read failed", extra={"user": user, "error": str(exc)})
            raise APIError(503, f"the embedding store cannot be read: {exc}", type="server_error",
                           code="store_unavailable", headers={"retry-after": "1"}) from None

    def check_size(texts: list[str], param: str) -> None:
        """Bounded work before the batcher: formatting and tokenizing stay short and linear for every request."""
        chars = sum(len(t) for t in texts)
        if chars > config.max_prompt_chars:
            metrics.rejected.labels("prompt_too_long").inc()
            raise APIError(400, f"the prompt is {chars} characters, the limit is {config.max_prompt_chars}: "
                                "shorten it or drop older turns", param=param, code="context_length_exceeded")

    def _format_chat(messages: list[dict]) -> Segments:
        with tokenizer_lock:
            return model.format(messages)

    def _format_raw(prompt: str) -> Segments:
        with tokenizer_lock:
            ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > model.max_prompt_tokens:
            raise PromptTooLongError(f"prompt is {len(ids)} tokens, the limit is {model.max_prompt_tokens}: shorten it")
        return Segments(pre=[], post=list(ids))

    async def segments_of(fn, arg, param: str) -> Segments:
        try:
            segments = await run_in_threadpool(fn, arg)
        except PromptTooLongError as exc:
            metrics.rejected.labels("prompt_too_long").inc()
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        if not segments.pre and not segments.post:
            raise APIError(400, "the prompt is empty: send some text", param=param, code="invalid_value")
        return segments

    def submit(segments: Segments, embedding, req, max_tokens: int, on_delta=None) -> GenRequest:
        job = GenRequest(segments=segments, embedding=embedding, max_tokens=max_tokens, temperature=req.temperature,
                         top_p=req.top_p, seed=req.seed, stops=req.stop_list(), on_delta=on_delta,
                         deadline=time.monotonic() + config.request_timeout_s)
        try:
            batcher.submit(job)
        except QueueFullError:
            metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is busy ({config.max_queue} requests queued): retry after a short wait",
                           type="rate_limit_error", code="queue_full", headers={"retry-after": "1"}) from None
        except ShuttingDownError:
            raise APIError(503, "the server is shutting down: retry on another instance", type="server_error",
                           code="shutting_down") from None
        return job

    async def settle(job: GenRequest, awaitable):
        """Await a step of `job` within its deadline, turning timeouts and shutdowns into API errors; a client
        that leaves (cancellation) or times out frees the job's place in the queue or its row in the batch."""
        try:
            return await asyncio.wait_for(awaitable, timeout=max(job.deadline - time.monotonic(), 0.001))
        except asyncio.CancelledError:  # the client went away
            batcher.discard(job)
            raise
        except ClientGoneError:
            batcher.discard(job)
            metrics.rejected.labels("client_gone").inc()
            raise APIError(499, "the client closed the request", code="client_closed_request") from None
        except (asyncio.TimeoutError, RequestTimeoutError):
            batcher.discard(job)
            metrics.rejected.labels("timeout").inc()
            raise APIError(504, f"generation did not finish within {config.request_timeout_s:g}s: ask for fewer tokens "
                                "or retry later", type="server_error", code="timeout") from None
        except ShuttingDownError:
            raise APIError(503, "the server is shutting down: retry on another instance", type="server_error",
                           code="shutting_down") from None

    async def generate(segments: Segments, embedding, req, max_tokens: int, request: Request) -> GenResult:
        """A non-streamed job's result; if the client disconnects first, its row is freed at the next step."""
        job = submit(segments, embedding, req, max_tokens)
        return await settle(job, until_done_or_gone(job, request))

    async def until_done_or_gone(job: GenRequest, request: Request) -> GenResult:
        done = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not done.done():
            raise ClientGoneError()
        return done.result()

    class TextStream:
        """A streamed job: its text deltas as the batch produces them, then its GenResult. `start` waits for the
        first delta (or the end), so that a request failing before any text still gets its HTTP error status."""

        def __init__(self, segments: Segments, embedding, req, max_tokens: int):
            loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
            put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)
            self.job = submit(segments, embedding, req, max_tokens, on_delta=put)
            self.job.future.add_done_callback(lambda _: put(None))  # after every delta: the end

        async def next(self) -> str | None:
            item = await settle(self.job, self.queue.get())
            if item is None:
                await self.result()  # raises the job's error, if it failed
            return item

        async def result(self) -> GenResult:
            return await settle(self.job, asyncio.shield(asyncio.wrap_future(self.job.future)))

        async def start(self) -> "TextStream":
            self.first = await self.next()
            return self

        async def deltas(self) -> AsyncIterator[str]:
            item = self.first
            while item is not None:
                yield item
                item = await self.next()

        def close(self) -> None:
            if not self.job.future.done():
                batcher.discard(self.job)

    def usage_of(result: GenResult) -> Usage:
        return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                     total_tokens=result.prompt_tokens + result.completion_tokens)

    def check_common(req) -> None:
        check_model(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported: send several requests instead", param="n", code="invalid_value")
        if req.user is not None:
            try:
                check_user_id(req.user)
            except EmbeddingError as exc:
                raise APIError(400, str(exc), param="user", code="invalid_value") from None

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"

    def stream(text: TextStream, head: list[dict], delta_chunk, tail, headers: dict) -> StreamingResponse:
        """Server-sent events: `head` chunks, one chunk per text delta as it is generated, then `tail(result)`.
        An error after the first byte (the status is sent) ends the stream with an OpenAI error event."""
        async def events() -> AsyncIterator[str]:
            try:
                for chunk in head:
                    yield sse(chunk)
                async for delta in text.deltas():
                    yield sse(delta_chunk(delta))
                for chunk in tail(await text.result()):
                    yield sse(chunk)
            except APIError as exc:
                yield sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
            finally:
                text.close()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", **headers})

    # --- OpenAI endpoints -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        authorize(request)
        check_common(req)
        max_tokens = max_tokens_of(req.max_completion_tokens or req.max_tokens)
        if len(req.messages) > config.max_messages:
            raise APIError(400, f"{len(req.messages)} messages, the limit is {config.max_messages}: send the recent "
                                "turns only", param="messages", code="too_many_messages")
        messages = []
        for i, m in enumerate(req.messages):
            if m.role == "tool":
                raise APIError(400, "tool messages are not supported", param=f"messages.{i}.role", code="invalid_value")
            try:
                text = m.text()
            except ValueError as exc:
                raise APIError(400, str(exc), param=f"messages.{i}.content", code="invalid_value") from None
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        check_size([m["content"] for m in messages], "messages")
        embedding, headers = await resolve_embedding(req)
        segments = await segments_of(_format_chat, messages, "messages")
        if not req.stream:
            result = await generate(segments, embedding, req, max_tokens, request)
            body = ChatCompletion(model=config.model_name, usage=usage_of(result), choices=[
                ChatChoice(message=ChatChoiceMessage(content=result.text), finish_reason=result.finish_reason)])
            return JSONResponse(dump(body), headers=headers)
        text = await TextStream(segments, embedding, req, max_tokens).start()
        cid, now = new_id("chatcmpl"), int(time.time())

        def chunk(delta: ChatDelta, finish=None, choices=True, usage=None) -> dict:
            return dump(ChatCompletionChunk(id=cid, created=now, model=config.model_name, usage=usage,
                                            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)] if choices else []))

        def tail(result: GenResult) -> list[dict]:
            chunks = [chunk(ChatDelta(), finish=result.finish_reason)]
            if req.stream_options is not None and req.stream_options.include_usage:
                chunks.append(chunk(ChatDelta(), choices=False, usage=usage_of(result)))
            return chunks

        return stream(text, [chunk(ChatDelta(role="assistant", content=""))],
                      lambda delta: chunk(ChatDelta(content=delta)), tail, headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        authorize(request)
        check_common(req)
        max_tokens = max_tokens_of(req.max_tokens)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (batching happens on the server)", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        check_size([prompt], "prompt")
        embedding, headers = await resolve_embedding(req)
        segments = await segments_of(_format_raw, prompt, "prompt")
        prefix = prompt if req.echo else ""
        if not req.stream:
            result = await generate(segments, embedding, req, max_tokens, request)
            body = Completion(model=config.model_name, usage=usage_of(result),
                              choices=[CompletionChoice(text=prefix + result.text, finish_reason=result.finish_reason)])
            return JSONResponse(dump(body), headers=headers)
        text = await TextStream(segments, embedding, req, max_tokens).start()
        cid, now = new_id("cmpl"), int(time.time())

        def chunk(text: str, finish=None, usage=None, choices=True) -> dict:
            return dump(Completion(id=cid, created=now, model=config.model_name, usage=usage,
                                   choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else []))

        def tail(result: GenResult) -> list[dict]:
            chunks = [chunk("", finish=result.finish_reason)]
            if req.stream_options is not None and req.stream_options.include_usage:
                chunks.append(chunk("", usage=usage_of(result), choices=False))
            return chunks

        return stream(text, [chunk(prefix)] if prefix else [], chunk, tail, headers)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return dump(ModelList(data=[ModelCard(id=config.model_name, created=created)]))

    @app.get("/v1/models/{name}")
    async def model_card(name: str, request: Request):
        authorize(request)
        check_model(name)
        return dump(ModelCard(id=config.model_name, created=created))

    # --- embedding store -------------------------------------------------------------------------------
    def user_param(user_id: str) -> str:
        try:
            return check_user_id(user_id)
        except EmbeddingError as exc:
            raise APIError(400, str(exc), param="user", code="invalid_value") from None

    async def embed_texts(texts: list[str], param: str):
        """-> ([N, embedding_dim] vectors, input tokens), with the projector's own encoder."""
        if embedder is None:
            raise APIError(400, "this server's projector reads no user embedding (none, or a shared prefix): there is "
                                "nothing to embed", param=param, code="no_user_embedding")
        try:
            return await run_in_threadpool(embedder.embed, texts)
        except TextEmbeddingError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_value") from None
        except ConfigError as exc:
            raise APIError(503, f"the text encoder is unavailable: {exc}", type="server_error",
                           code="encoder_unavailable") from None

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest, request: Request):
        """OpenAI's embeddings endpoint: the vectors to store for users (or send inline as `e2p.embedding`)."""
        authorize(request)
        if embedder is None or req.model != embedder.name:  # the encoder's own name is accepted too
            check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if req.dimensions is not None and req.dimensions != embedding_dim:
            raise APIError(400, f"dimensions must be {embedding_dim} (what the projector reads) or omitted",
                           param="dimensions", code="invalid_value")
        vectors, tokens = await embed_texts(texts, "input")
        encode = ((lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if req.encoding_format == "base64"
                  else (lambda v: [float(x) for x in v]))
        return {"object": "list", "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}

    @app.put("/v1/users/{user_id}/embedding")
    async def put_embedding(user_id: str, body: EmbeddingPut, request: Request):
        """Store a user's vector, or embed their profile text with the projector's encoder and store that."""
        authorize(request, admin=True)
        user_param(user_id)
        vector = body.embedding if body.text is None else (await embed_texts([body.text], "text"))[0][0].tolist()
        try:
            if embedding_dim is not None:
                as_vector(vector, embedding_dim)
            record = await run_in_threadpool(store.put, user_id, vector)
        except StoreBusyError as exc:
            raise APIError(503, str(exc), type="server_error", code="store_busy", headers={"retry-after": "1"}) from None
        except (EmbeddingError, StoreError) as exc:
            raise APIError(400, str(exc), param="embedding", code="invalid_embedding") from None
        metrics.store_writes.labels("put").inc()
        log.info("embedding stored", extra={"user": user_id, "version": record.version})
        return {"object": "user.embedding", **record.metadata()}

    @app.get("/v1/users/{user_id}/embedding")
    async def get_embedding(user_id: str, request: Request):
        is_admin = authorize(request)
        user_param(user_id)
        record = await stored(user_id)
        if record is None:
            raise APIError(404, f"user {user_id!r} has no stored embedding", param="user", code="user_not_found")
        out: dict[str, Any] = {"object": "user.embedding", **record.metadata()}
        if is_admin:
            out["embedding"] = [float(x) for x in record.vector]
        return out

    @app.delete("/v1/users/{user_id}/embedding")
    async def delete_embedding(user_id: str, request: Request):
        authorize(request, admin=True)
        user_param(user_id)
        deleted = await run_in_threadpool(store.delete, user_id)
        if not deleted:
            raise APIError(404, f"user {user_id!r} has no stored embedding", param="user", code="user_not_found")
        metrics.store_writes.labels("delete").inc()
        log.info("embedding deleted", extra={"user": user_id})
        return {"object": "user.embedding.deleted", "user": user_id, "deleted": True}

    # --- operations ---------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        """Liveness of the decoding worker: 503 when it died or has made no step for `stall_seconds` while busy."""
        age = batcher.step_age()
        status = ("unavailable" if not batcher.alive else "stalled" if age > config.stall_seconds else "ok")
        body = {"status": status, "model": config.model_name, "queue_depth": batcher.depth(),
                "max_queue": config.max_queue, "busy": batcher.busy, "seconds_since_step": round(age, 3),
                "rss_bytes": rss_bytes()}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        if config.metrics_key is not None:
            key = _key(request)
            if key is None or not (hmac.compare_digest(key.encode(), config.metrics_key.encode()) or _is_admin(key)):
                raise APIError(401, "metrics need the metrics key: send `Authorization: Bearer METRICS_KEY`",
                               code="invalid_api_key")
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app


def load_model(projector_dir: str | None, backbone_name: str | None = None, max_prompt_tokens: int = 1024) -> E2PModel:
    """Backbone + projector from disk, ready to serve."""
    from ..backbone import load_backbone
    from ..projector import Projector

    backbone = load_backbone(backbone_name)
    projector = None
    if projector_dir is not None:
        projector = Projector.from_pretrained(projector_dir, backbone)
        projector.eval()
    return E2PModel(backbone, projector, max_prompt_tokens=max_prompt_tokens)
