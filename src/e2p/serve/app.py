"""The HTTP layer: the FastAPI app around an `OpenAIServing` and its endpoint families (chat / completions,
streamed or not, models, embeddings, the embedding store, ops), with its lifespan, error handlers, body limit,
access log and auth. Each route is a line or two: the work is in the families."""
from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engines.base import Engine
from ..store import EmbeddingStore
from . import health
from .auth import Caller, authorize, authorize_metrics, bearer_key
from .chat import ChatServing
from .playground import add_playground
from .prompts import Prompts
from .protocol import ChatCompletionRequest, CompletionRequest
from .protocol_users import EmbeddingPut, EmbeddingsRequest, UserEvents
from .serving import APIError, OpenAIServing, ServeConfig
from .users import UserServing

log = logging.getLogger("e2p.serve")
access_log = logging.getLogger("e2p.serve.access")


def error_response(exc: APIError) -> JSONResponse:
    """An APIError as its OpenAI-shaped JSON response (protocol.ErrorResponse)."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes with 413 before the app parses them (pure ASGI, works for chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_response(APIError(413, f"request body is larger than {self.limit} bytes: send a shorter prompt "
                                               "or embedding", code="request_too_large"))
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.limit:
                        return await too_big(scope, receive, send)
                except ValueError:
                    return await error_response(APIError(400, "bad Content-Length header"))(scope, receive, send)
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


MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID)  # printable ASCII, no spaces


def request_id_of(sent: str | None) -> str:
    """The client's `x-request-id` when it is a plausible id (1-128 printable ASCII characters), else a new one:
    the id is echoed and logged with every line, so it must stay short and unable to forge log lines."""
    return sent if sent and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def event_stream(events, headers: dict) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache", **headers})


def create_app(model: Engine, store: EmbeddingStore, config: ServeConfig | None = None, encoder=None) -> FastAPI:
    """The app around a loaded engine (torch or llama.cpp, with its projector) and an embedding store. The batcher starts with the app.

    `encoder`: the text encoder for `/v1/embeddings` and `{"text": ...}` puts (default: the projector's own,
    loaded on first use)."""
    serving = OpenAIServing(model, store, config)
    prompts, chat, users = Prompts(serving), ChatServing(serving), UserServing(serving, encoder)
    config, batcher, metrics = serving.config, serving.batcher, serving.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("serving", extra={"model": config.model_name, "embedding_dim": serving.embedding_dim,
                                   "store": str(store.path), "max_batch": config.max_batch_size,
                                   "max_queue": config.max_queue})
        try:
            yield
        finally:
            log.info("shutting down: finishing queued requests", extra={"queued": batcher.depth()})
            await run_in_threadpool(batcher.stop, True)
            users.close()
            log.info("stopped")

    app = FastAPI(title="e2p", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.serving, app.state.prompts, app.state.chat, app.state.users = serving, prompts, chat, users
    app.state.batcher, app.state.store, app.state.metrics, app.state.config, app.state.model = (
        batcher, store, metrics, config, model)

    # --- errors: every one OpenAI-shaped ------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"request body is not valid JSON ({first.get('msg', '')}): send a "
                                                "JSON object", code="invalid_json"))
        loc = tuple(first.get("loc", ()))
        if loc == ("body",) and first.get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
            # the body as a whole: empty, or JSON that is no object
            what = "empty" if first.get("type") == "missing" else "not a JSON object"
            return error_response(APIError(400, f"request body is {what}: send a JSON object with "
                                                "`content-type: application/json`", code="invalid_json"))
        param = _param(loc)
        if first.get("type") == "missing":
            return error_response(APIError(400, f"missing required parameter {param!r}", param=param,
                                           code="missing_required_parameter"))
        return error_response(APIError(400, f"invalid value for {param or 'the body'}: {first.get('msg', 'invalid')}",
                                       param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 400:  # FastAPI's one: a body it could not read as JSON (e.g. not UTF-8)
            message = "request body could not be read as JSON (it must be UTF-8 text): send a JSON object"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /v1/models, /v1/chat/completions, /v1/completions"
        return error_response(APIError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # the route's template, not its path: a path names the user (/v1/users/{id}/embedding)
        log.exception("unhandled error", extra={"route": getattr(request.scope.get("route"), "path", "unmatched")})
        return error_response(APIError(500, "internal error; see the server log", type="server_error",
                                       code="internal_error"))

    # --- access log + metrics (outermost), body limit (inside it) ---------------------------------------
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        request_id = request_id_of(request.headers.get("x-request-id"))
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

    # --- auth (dependencies): -> the caller (its tenant, whether an admin); 401 / 403 otherwise ---------------
    async def inference_key(request: Request) -> Caller:
        return authorize(config, bearer_key(request.headers))

    async def admin_key(request: Request) -> Caller:
        return authorize(config, bearer_key(request.headers), admin=True)

    async def metrics_key(request: Request) -> None:
        authorize_metrics(config, bearer_key(request.headers))

    inference, admin = Depends(inference_key), Depends(admin_key)

    # --- OpenAI endpoints -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request, caller: Caller = inference):
        prompt = await prompts.chat_prompt(req, caller.tenant, remember=users.remember)
        if req.stream:
            return event_stream(await chat.chat_completion_stream(prompt, req), prompt.headers)
        return JSONResponse(await chat.chat_completion(prompt, req, request), headers=prompt.headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request, caller: Caller = inference):
        prompt = await prompts.completion_prompt(req, caller.tenant)
        if req.stream:
            return event_stream(await chat.completion_stream(prompt, req), prompt.headers)
        return JSONResponse(await chat.completion(prompt, req, request), headers=prompt.headers)

    @app.get("/v1/models", dependencies=[inference])
    async def models():
        return health.model_list(serving)

    @app.get("/v1/models/{name}", dependencies=[inference])
    async def model_card(name: str):
        return health.model_card(serving, name)

    @app.post("/v1/embeddings", dependencies=[inference])
    async def embeddings(req: EmbeddingsRequest):
        """OpenAI's embeddings endpoint: the vectors to store for users (or send inline as `e2p.embedding`)."""
        return await users.embeddings(req)

    # --- embedding store: any id the store accepts (`org/alice` too), percent-encoded in the path; always the
    # caller's own tenant's user, so another tenant's users are neither reachable nor observable --------------
    @app.put("/v1/users/{user_id:path}/embedding")
    async def put_embedding(user_id: str, body: EmbeddingPut, caller: Caller = admin):
        """Store a user's vector, or embed their profile text with the projector's encoder and store that."""
        return await users.put_embedding(user_id, body, caller.tenant)

    @app.get("/v1/users/{user_id:path}/embedding")
    async def get_embedding(user_id: str, caller: Caller = inference):
        return await users.get_embedding(user_id, caller.admin, caller.tenant)

    @app.post("/v1/users/{user_id:path}/events")
    async def post_events(user_id: str, body: UserEvents, caller: Caller = inference):
        """Fold what a user did (texts, item vectors) into their live profile; admins may start a new user's."""
        return await users.post_events(user_id, body, caller.tenant, caller.admin)

    @app.delete("/v1/users/{user_id:path}/embedding")
    async def delete_embedding(user_id: str, caller: Caller = admin):
        return await users.delete_embedding(user_id, caller.tenant)

    add_playground(app, serving, users)  # GET /playground, /v1/projector; for admins /v1/users, /v1/users/map

    # --- operations ---------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        """Liveness of the decoding worker: 503 when it died or has made no step for `stall_seconds` while busy."""
        body, status = health.health(serving)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", dependencies=[Depends(metrics_key)])
    async def prometheus_metrics():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
