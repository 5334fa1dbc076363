"""The HTTP layer: `create_app` puts an `OpenAIServing` and its endpoint families in the app's state and includes
their routers (each family's module holds its routes: `chat` chat and completions, `users` embeddings, the user
store and events, `playground` the page and its read-only endpoints, `health` models, liveness and metrics), with
the lifespan, the error handlers, the body limit and the access log. Routes read their family from `app.state`."""
from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engines.base import Engine
from ..store import EmbeddingStore
from .auth import rate_limit_of
from .chat import ChatServing, router as chat_routes
from .health import router as health_routes
from .playground import router as playground_routes
from .prompts import Prompts
from .limits import RateLimiter, RateLimitMiddleware
from .serving import APIError, OpenAIServing, ServeConfig
from .users import UserServing, router as user_routes

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


def create_app(model: Engine, store: EmbeddingStore, config: ServeConfig | None = None, encoder=None,
               tracer_provider=None) -> FastAPI:
    """The app around a loaded engine (torch or llama.cpp, with its projector) and an embedding store. The batcher starts with the app.

    `encoder`: the text encoder for `/v1/embeddings` and `{"text": ...}` puts (default: the projector's own,
    loaded on first use)."""
    from .tracing import Tracing, otlp_provider

    config = config or ServeConfig()
    if tracer_provider is None and config.otlp_endpoint:
        tracer_provider = otlp_provider(config.otlp_endpoint)
    tracing = Tracing(tracer_provider)
    serving = OpenAIServing(model, store, config, tracing)
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

    # --- access log + metrics (outermost), rate limits, body limit (inside them) ---------------------------------
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    app.state.limiter = RateLimiter()
    app.add_middleware(RateLimitMiddleware, limiter=app.state.limiter, resolve=lambda h: rate_limit_of(config, h))

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        request_id = request_id_of(request.headers.get("x-request-id"))
        request.state.request_id = request_id
        started = time.perf_counter()
        status = 500
        span_cm = tracing.span("HTTP " + request.method)
        span = span_cm.__enter__()
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["x-request-id"] = request_id
            return response
        finally:
            if span is not None:
                template = getattr(request.scope.get("route"), "path", "unmatched")
                span.update_name(f"{request.method} {template}")
                span.set_attributes({"http.route": template, "http.request.method": request.method,
                                     "http.response.status_code": status, "e2p.request_id": request_id})
            span_cm.__exit__(None, None, None)
            elapsed = time.perf_counter() - started
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.latency.labels(route).observe(elapsed)
            access_log.info("request", extra={"request_id": request_id, "method": request.method, "route": route,
                                              "status": status, "seconds": round(elapsed, 4)})

    # --- the endpoint families' routes (each family's module holds its router) ------------------------------------
    for routes in (chat_routes, user_routes, playground_routes, health_routes):
        app.include_router(routes)

    return app
