"""The serving layer, free of routing: `OpenAIServing` checks and answers OpenAI requests (auth, the user's
embedding, limits and prompt formatting, submission to the Batcher, non-streamed results and streamed events)
around one loaded model, its embedding store and its batcher. `app.py` puts HTTP routes in front of it."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import hmac
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import ConfigError, EmbeddingError
from ..model import E2PModel, PromptTooLongError, Segments
from ..store import CorruptEmbeddingError, EmbeddingStore, StoreBusyError, StoreError, as_vector, check_user_id
from .batching import (Batcher, GenerationError, GenRequest, GenResult, QueueFullError, RequestTimeoutError,
                       ShuttingDownError)
from .embedder import TextEmbeddingError, UserEmbedder
from .metrics import Metrics
from .protocol import (ChatChoice, ChatChoiceMessage, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, ChatDelta, Completion, CompletionChoice, CompletionRequest, ContentPartError,
                       EmbeddingPut, EmbeddingsRequest, ErrorBody, ErrorResponse, ModelCard, ModelList, Usage, dump, new_id)

log = logging.getLogger("e2p.serve")


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
    max_stop_strings: int = 16  # `stop` strings per request: matching runs in the one decoding thread
    max_stop_chars: int = 256  # characters per stop string (the tail searched each step is this long)
    max_embed_requests: int = 8  # text embeddings in flight (/v1/embeddings, PUT {"text"}), one encoder thread; 429 above
    max_user_requests: int = 32  # PUT / GET / DELETE /v1/users/{id}/embedding in flight, own threads; 429 above

    @property
    def open(self) -> bool:
        return not self.api_keys and not self.admin_key


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


def bearer_key(headers: Mapping[str, str]) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None. Two Authorization headers are refused (401): which
    one a proxy or the server would read differs, so neither is trusted."""
    values = headers.getlist("authorization") if hasattr(headers, "getlist") else [headers.get("authorization", "")]
    if len(values) > 1:
        raise APIError(401, f"{len(values)} Authorization headers: send exactly one, `Authorization: Bearer KEY`",
                       code="invalid_api_key")
    header = values[0] if values else ""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex of the tokenizer's special tokens (the chat template's control tokens among them), longest first;
    None if it has none."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {t.content for t in added.values() if getattr(t, "special", False)}
    specials |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)  # one character: nothing to break
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


@dataclass
class Prompt:
    """A checked generation request, ready for the batcher."""

    segments: Segments
    embedding: torch.Tensor | None
    headers: dict[str, str]  # where the embedding came from: x-e2p-embedding (and x-e2p-embedding-version)
    max_tokens: int
    echo: str = ""  # text the answer starts with (`echo` on /v1/completions)


class OpenAIServing:
    """Everything behind the routes, in small steps that raise `APIError`. Owns the config, model, store,
    batcher (started and stopped by the app's lifespan), metrics and the text embedder."""

    def __init__(self, model: E2PModel, store: EmbeddingStore, config: ServeConfig | None = None, encoder=None):
        self.config = config = config or ServeConfig()
        self.model, self.store = model, store
        self.metrics = Metrics()
        self.tokenizer_lock = threading.Lock()
        self.batcher = Batcher(model, max_batch=config.max_batch_size, wait_ms=config.batch_wait_ms,
                               max_queue=config.max_queue, tokenizer_lock=self.tokenizer_lock, metrics=self.metrics)
        projector = model.projector
        self.embedding_dim = (projector.config.embedding_dim
                              if projector is not None and not projector.config.is_shared else None)
        if self.embedding_dim is not None:
            store._claim_dim(self.embedding_dim)  # refuses a store of another encoder at start-up
        self.embedder = UserEmbedder(projector.config, encoder) if self.embedding_dim is not None else None
        # the encoder runs one text at a time anyway (UserEmbedder's lock): one thread, so waiting texts hold none
        self.text_admission = Admission(config.max_embed_requests, 1, "text-embedding requests", "embedding_queue_full")
        self.user_admission = Admission(config.max_user_requests, 4, "user-embedding requests", "user_queue_full")
        self.created = int(time.time())
        self.special_tokens = special_token_pattern(model.tokenizer)

    # --- auth -----------------------------------------------------------------------------------------
    def _is_admin(self, key: str | None) -> bool:
        admin_key = self.config.admin_key
        return bool(key and admin_key and hmac.compare_digest(key.encode(), admin_key.encode()))

    def _is_api_key(self, key: str) -> bool:
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in self.config.api_keys)

    def authorize(self, key: str | None, admin: bool = False) -> bool:
        """Raise 401 / 403 unless `key` (a bearer key, or None) is allowed; return whether it is the admin key."""
        config = self.config
        is_admin = self._is_admin(key)
        if config.open:
            return True
        if key is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
        if admin:
            if not config.admin_key:
                raise APIError(403, "embedding writes are disabled: start the server with --admin-key (or E2P_ADMIN_KEY)",
                               code="permission_denied")
            if not is_admin:
                if not self._is_api_key(key):
                    raise APIError(401, "incorrect API key", code="invalid_api_key")
                raise APIError(403, "this needs the admin key", code="permission_denied")
            return True
        if is_admin or self._is_api_key(key):
            return is_admin
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def authorize_metrics(self, key: str | None) -> None:
        """With a metrics key configured, /metrics needs it (or the admin key)."""
        metrics_key = self.config.metrics_key
        if metrics_key is not None:
            if key is None or not (hmac.compare_digest(key.encode(), metrics_key.encode()) or self._is_admin(key)):
                raise APIError(401, "metrics need the metrics key: send `Authorization: Bearer METRICS_KEY`",
                               code="invalid_api_key")

    # --- request checks -------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in (self.config.model_name, self.model.backbone.name):
            raise APIError(404, f"model {name!r} does not exist: this server serves {self.config.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def max_tokens_of(self, value: int | None) -> int:
        config = self.config
        n = value if value is not None else config.default_max_tokens
        if n > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {n}, the limit is {config.max_tokens_limit}: ask for fewer tokens",
                           param="max_tokens", code="invalid_value")
        return n

    def check_common(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        self.check_model(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported: send several requests instead", param="n", code="invalid_value")
        if req.user is not None:
            self.check_user(req.user)
        self.check_stops(req.stop)

    def check_stops(self, stop: str | list[str] | None) -> None:
        """Bounded stop matching: it runs in the decoding thread every step, so its size is every user's latency."""
        config = self.config
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > config.max_stop_strings:
            raise APIError(400, f"{len(stops)} stop strings, the limit is {config.max_stop_strings}: send fewer",
                           param="stop", code="invalid_value")
        longest = max((len(s) for s in stops), default=0)
        if longest > config.max_stop_chars:
            raise APIError(400, f"a stop string has {longest} characters, the limit is {config.max_stop_chars}: "
                                "shorten it", param="stop", code="invalid_value")

    @staticmethod
    def check_user(user_id: str) -> str:
        try:
            return check_user_id(user_id)
        except EmbeddingError as exc:
            raise APIError(400, str(exc), param="user", code="invalid_value") from None

    def check_size(self, texts: list[str], param: str) -> None:
        """Bounded work before the batcher: formatting and tokenizing stay short and linear for every request."""
        chars = sum(len(t) for t in texts)
        if chars > self.config.max_prompt_chars:
            self.metrics.rejected.labels("prompt_too_long").inc()
            raise APIError(400, f"the prompt is {chars} characters, the limit is {self.config.max_prompt_chars}: "
                                "shorten it or drop older turns", param=param, code="context_length_exceeded")

    def chat_messages(self, req: ChatCompletionRequest) -> list[dict]:
        """The request's messages as plain `{"role", "content"}` text, within the limits: developer -> system, and
        function (LangChain's FunctionMessage: a function's result) -> a user turn "NAME: CONTENT"."""
        if len(req.messages) > self.config.max_messages:
            raise APIError(400, f"{len(req.messages)} messages, the limit is {self.config.max_messages}: send the "
                                "recent turns only", param="messages", code="too_many_messages")
        messages = []
        for i, m in enumerate(req.messages):
            if m.role == "tool":
                raise APIError(400, "tool messages are not supported", param=f"messages.{i}.role", code="invalid_value")
            try:
                text = m.text()
            except ContentPartError as exc:
                raise APIError(400, f"messages.{i}: {exc}", param=f"messages.{i}.{exc.where}", code=exc.code) from None
            role = {"developer": "system", "function": "user"}.get(m.role, m.role)
            if m.role == "function" and m.name:
                text = f"{m.name}: {text}"
            messages.append({"role": role, "content": text})
        return messages

    # --- the user's embedding -------------------------------------------------------------------------
    async def resolve_embedding(self, req: ChatCompletionRequest | CompletionRequest) -> tuple[torch.Tensor | None, dict]:
        """-> (embedding or None, headers describing where it came from): inline `e2p.embedding`, else the stored
        embedding of `user`, else none."""
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
        if req.user:
            record = await self.stored(req.user)
            if record is None:
                if self.config.allow_unknown_users:
                    metrics.personalized.labels("unknown_user").inc()
                    return None, {"x-e2p-embedding": "none"}
                raise APIError(404, f"user {req.user!r} has no stored embedding: PUT /v1/users/{{id}}/embedding "
                                    "or `e2p users import` first, send one inline in `e2p.embedding`, or omit `user`",
                               param="user", code="user_not_found")
            if record.dim != dim:
                raise APIError(409, f"the stored embedding of {req.user!r} has {record.dim} values, the projector needs "
                                    f"{dim}: store it again", param="user", code="invalid_embedding")
            metrics.personalized.labels("store").inc()
            return torch.from_numpy(record.vector), {"x-e2p-embedding": "store",
                                                     "x-e2p-embedding-version": str(record.version)}
        metrics.personalized.labels("none").inc()
        return None, {"x-e2p-embedding": "none"}

    async def stored(self, user: str, admission: Admission | None = None):
        """The user's stored record (None if unknown), read on the shared threads (a chat) or on `admission`'s (the
        user endpoints); a damaged row or a busy / damaged store is an error for this request only."""
        try:
            if admission is not None:
                return await admission.run(self.store.get, user)
            return await run_in_threadpool(self.store.get, user)
        except CorruptEmbeddingError as exc:
            raise APIError(409, str(exc), param="user", code="corrupt_embedding") from None
        except StoreError as exc:
            log.error("store read failed", extra={"user": user, "error": str(exc)})
            raise APIError(503, f"the embedding store cannot be read: {exc}", type="server_error",
                           code="store_unavailable", headers={"retry-after": "1"}) from None

    # --- prompts -> Segments --------------------------------------------------------------------------
    def _format_chat(self, messages: list[dict]) -> Segments:
        messages = [{**m, "content": self.plain_text(m["content"])} for m in messages]
        with self.tokenizer_lock:
            return self.model.format(messages)

    def plain_text(self, text: str) -> str:
        """Message content with the backbone's special-token strings (`<|im_end|>`, `<|im_start|>`, ...) broken by a
        zero-width joiner after their first character: the text stays visible, but the tokenizer, which matches
        them verbatim in the rendered prompt, cannot make control tokens of them, so a client's end user cannot
        close their turn and open a system one. Repeated until none is left (a replacement cannot join two)."""
        pattern = self.special_tokens
        for _ in range(8):
            if pattern is None or not pattern.search(text):
                return text
            text = pattern.sub(lambda m: m.group(0)[0] + "\u200d" + m.group(0)[1:], text)
        raise APIError(400, "message content keeps forming the backbone's control tokens: send plain text",
                       param="messages", code="invalid_value")

    def _format_raw(self, prompt: str) -> Segments:
        """A raw prompt (no template) with the prefix where training put it, as E2PModel.format places it: after a
        copy of the first token for an `after_sink` input prefix (position 0 stays a real token, the attention
        sink), else before the prompt (a raw prompt has no system part for `after_system`; a deep `after_sink`
        prefix takes the first token's keys in the cache). The BOS token leads where the tokenizer puts one in
        front of text itself (Gemma, Llama), as in every prompt the projector was trained on."""
        model = self.model
        with self.tokenizer_lock:
            ids = list(model.tokenizer(model._bos_text + prompt, add_special_tokens=False)["input_ids"])
        if len(ids) > model.max_prompt_tokens:
            raise PromptTooLongError(f"prompt is {len(ids)} tokens, the limit is {model.max_prompt_tokens}: shorten it")
        config = model.config
        if config.prefix_position == "after_sink" and config.injection == "input" and model.projector is not None:
            return Segments(pre=ids[:1], post=ids)
        return Segments(pre=[], post=ids)

    async def segments_of(self, fn: Callable[[Any], Segments], arg, param: str) -> Segments:
        try:
            segments = await run_in_threadpool(fn, arg)
        except PromptTooLongError as exc:
            self.metrics.rejected.labels("prompt_too_long").inc()
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        if not segments.pre and not segments.post:
            raise APIError(400, "the prompt is empty: send some text", param=param, code="invalid_value")
        return segments

    async def chat_prompt(self, req: ChatCompletionRequest) -> Prompt:
        """A chat request checked, its user's embedding resolved and its messages formatted with the chat template."""
        self.check_common(req)
        max_tokens = self.max_tokens_of(req.max_completion_tokens or req.max_tokens)
        messages = self.chat_messages(req)
        self.check_size([m["content"] for m in messages], "messages")
        embedding, headers = await self.resolve_embedding(req)
        segments = await self.segments_of(self._format_chat, messages, "messages")
        return Prompt(segments, embedding, headers, max_tokens)

    async def completion_prompt(self, req: CompletionRequest) -> Prompt:
        """A completion request checked, its user's embedding resolved and its raw prompt tokenized (no template)."""
        self.check_common(req)
        max_tokens = self.max_tokens_of(req.max_tokens)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (batching happens on the server)", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        self.check_size([prompt], "prompt")
        embedding, headers = await self.resolve_embedding(req)
        segments = await self.segments_of(self._format_raw, prompt, "prompt")
        return Prompt(segments, embedding, headers, max_tokens, echo=prompt if req.echo else "")

    # --- the batcher ----------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, req: ChatCompletionRequest | CompletionRequest,
               on_delta: Callable[[str], None] | None = None) -> GenRequest:
        job = GenRequest(segments=prompt.segments, embedding=prompt.embedding, max_tokens=prompt.max_tokens,
                         temperature=req.temperature, top_p=req.top_p, seed=req.seed, stops=req.stop_list(),
                         trim=isinstance(req, ChatCompletionRequest),
                         on_delta=on_delta, deadline=time.monotonic() + self.config.request_timeout_s)
        try:
            self.batcher.submit(job)
        except QueueFullError:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is busy ({self.config.max_queue} requests queued): retry after a short "
                                "wait", type="rate_limit_error", code="queue_full", headers={"retry-after": "1"}) from None
        except ShuttingDownError:
            raise APIError(503, "the server is shutting down: retry on another instance", type="server_error",
                           code="shutting_down") from None
        return job

    async def settle(self, job: GenRequest, awaitable):
        """Await a step of `job` within its deadline, turning timeouts and shutdowns into API errors; a client
        that leaves (cancellation) or times out frees the job's place in the queue or its row in the batch."""
        try:
            return await asyncio.wait_for(awaitable, timeout=max(job.deadline - time.monotonic(), 0.001))
        except asyncio.CancelledError:  # the client went away
            self.batcher.discard(job)
            raise
        except ClientGoneError:
            self.batcher.discard(job)
            self.metrics.rejected.labels("client_gone").inc()
            raise APIError(499, "the client closed the request", code="client_closed_request") from None
        except (asyncio.TimeoutError, RequestTimeoutError):
            self.batcher.discard(job)
            self.metrics.rejected.labels("timeout").inc()
            raise APIError(504, f"generation did not finish within {self.config.request_timeout_s:g}s: ask for fewer "
                                "tokens or retry later", type="server_error", code="timeout") from None
        except ShuttingDownError:
            raise APIError(503, "the server is shutting down: retry on another instance", type="server_error",
                           code="shutting_down") from None
        except (GenerationError, RuntimeError) as exc:  # this request's row failed (the others went on)
            raise APIError(500, f"{exc}: retry, or report it with the request id", type="server_error",
                           code="generation_failed") from None

    async def generate(self, prompt: Prompt, req: ChatCompletionRequest | CompletionRequest,
                       request: Request) -> GenResult:
        """A non-streamed job's result; if the client disconnects first, its row is freed at the next step."""
        job = self.submit(prompt, req)
        return await self.settle(job, self._until_done_or_gone(job, request))

    @staticmethod
    async def _until_done_or_gone(job: GenRequest, request: Request) -> GenResult:
        done = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not done.done():
            raise ClientGoneError()
        return done.result()

    # --- OpenAI answers -------------------------------------------------------------------------------
    @staticmethod
    def usage_of(result: GenResult) -> Usage:
        return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                     total_tokens=result.prompt_tokens + result.completion_tokens)

    async def chat_completion(self, prompt: Prompt, req: ChatCompletionRequest, request: Request) -> dict:
        result = await self.generate(prompt, req, request)
        return dump(ChatCompletion(model=self.config.model_name, usage=self.usage_of(result), choices=[
            ChatChoice(message=ChatChoiceMessage(content=result.text), finish_reason=result.finish_reason)]))

    async def completion(self, prompt: Prompt, req: CompletionRequest, request: Request) -> dict:
        result = await self.generate(prompt, req, request)
        return dump(Completion(model=self.config.model_name, usage=self.usage_of(result), choices=[
            CompletionChoice(text=prompt.echo + result.text, finish_reason=result.finish_reason)]))

    async def chat_completion_stream(self, prompt: Prompt, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """The chat.completion.chunk events of a streamed chat request, once its first text (or error) is there."""
        text = await TextStream(self, prompt, req).start()
        cid, now, model_name = new_id("chatcmpl"), int(time.time()), self.config.model_name

        def chunk(delta: ChatDelta, finish=None, choices=True, usage=None) -> dict:
            return dump(ChatCompletionChunk(id=cid, created=now, model=model_name, usage=usage,
                                            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)] if choices else []))

        def tail(result: GenResult) -> list[dict]:
            chunks = [chunk(ChatDelta(), finish=result.finish_reason)]
            if req.stream_options is not None and req.stream_options.include_usage:
                chunks.append(chunk(ChatDelta(), choices=False, usage=self.usage_of(result)))
            return chunks

        return self.events(text, [chunk(ChatDelta(role="assistant", content=""))],
                           lambda delta: chunk(ChatDelta(content=delta)), tail)

    async def completion_stream(self, prompt: Prompt, req: CompletionRequest) -> AsyncIterator[str]:
        """The text_completion events of a streamed completion request, once its first text (or error) is there."""
        text = await TextStream(self, prompt, req).start()
        cid, now, model_name = new_id("cmpl"), int(time.time()), self.config.model_name

        def chunk(text: str, finish=None, usage=None, choices=True) -> dict:
            return dump(Completion(id=cid, created=now, model=model_name, usage=usage,
                                   choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else []))

        def tail(result: GenResult) -> list[dict]:
            chunks = [chunk("", finish=result.finish_reason)]
            if req.stream_options is not None and req.stream_options.include_usage:
                chunks.append(chunk("", usage=self.usage_of(result), choices=False))
            return chunks

        return self.events(text, [chunk(prompt.echo)] if prompt.echo else [], chunk, tail)

    @staticmethod
    async def events(text: TextStream, head: list[dict], delta_chunk: Callable[[str], dict],
                     tail: Callable[[GenResult], list[dict]]) -> AsyncIterator[str]:
        """Server-sent events: `head` chunks, one chunk per text delta as it is generated, then `tail(result)`.
        An error after the first byte (the status is sent) ends the stream with an OpenAI error event."""
        try:
            for chunk in head:
                yield sse(chunk)
            async for delta in text.deltas():
                yield sse(delta_chunk(delta))
            for chunk in tail(await text.result()):
                yield sse(chunk)
        except APIError as exc:
            yield sse(exc.body())
        finally:
            text.close()
        yield sse("[DONE]")

    def model_list(self) -> dict:
        return dump(ModelList(data=[ModelCard(id=self.config.model_name, created=self.created)]))

    def model_card(self, name: str) -> dict:
        self.check_model(name)
        return dump(ModelCard(id=self.config.model_name, created=self.created))

    # --- text -> embedding and the embedding store ----------------------------------------------------
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
            self.check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if req.dimensions is not None and req.dimensions != self.embedding_dim:
            raise APIError(400, f"dimensions must be {self.embedding_dim} (what the projector reads) or omitted",
                           param="dimensions", code="invalid_value")
        vectors, tokens = await self.embed_texts(texts, "input")
        encode = ((lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if req.encoding_format == "base64"
                  else (lambda v: [float(x) for x in v]))
        return {"object": "list", "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}

    async def put_embedding(self, user_id: str, body: EmbeddingPut) -> dict:
        """Store a user's vector, or embed their profile text with the projector's encoder and store that."""
        self.check_user(user_id)
        vector = body.embedding if body.text is None else (await self.embed_texts([body.text], "text"))[0][0].tolist()
        try:
            if self.embedding_dim is not None:
                as_vector(vector, self.embedding_dim)
            record = await self.user_admission.run(self.store.put, user_id, vector)
        except StoreBusyError as exc:
            raise APIError(503, str(exc), type="server_error", code="store_busy", headers={"retry-after": "1"}) from None
        except (EmbeddingError, StoreError) as exc:
            raise APIError(400, str(exc), param="embedding", code="invalid_embedding") from None
        self.metrics.store_writes.labels("put").inc()
        log.info("embedding stored", extra={"user": user_id, "version": record.version})
        return {"object": "user.embedding", **record.metadata()}

    async def get_embedding(self, user_id: str, is_admin: bool) -> dict:
        """A user's stored embedding's metadata; the vector too for the admin."""
        self.check_user(user_id)
        record = await self.stored(user_id, self.user_admission)
        if record is None:
            raise APIError(404, f"user {user_id!r} has no stored embedding", param="user", code="user_not_found")
        out: dict[str, Any] = {"object": "user.embedding", **record.metadata()}
        if is_admin:
            out["embedding"] = [float(x) for x in record.vector]
        return out

    async def delete_embedding(self, user_id: str) -> dict:
        self.check_user(user_id)
        deleted = await self.user_admission.run(self.store.delete, user_id)
        if not deleted:
            raise APIError(404, f"user {user_id!r} has no stored embedding", param="user", code="user_not_found")
        self.metrics.store_writes.labels("delete").inc()
        log.info("embedding deleted", extra={"user": user_id})
        return {"object": "user.embedding.deleted", "user": user_id, "deleted": True}

    # --- operations -----------------------------------------------------------------------------------
    def close(self) -> None:
        """At shutdown: the embedding and user-endpoint threads finish what runs and drop what waits."""
        for admission in (self.text_admission, self.user_admission):
            admission.pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> tuple[dict, int]:
        """Liveness of the decoding worker: 503 when it died or has made no step for `stall_seconds` while busy."""
        batcher, config = self.batcher, self.config
        age = batcher.step_age()
        status = ("unavailable" if not batcher.alive else "stalled" if age > config.stall_seconds else "ok")
        body = {"status": status, "model": config.model_name, "queue_depth": batcher.depth(),
                "max_queue": config.max_queue, "busy": batcher.busy, "seconds_since_step": round(age, 3),
                "rss_bytes": rss_bytes()}
        return body, 200 if status == "ok" else 503


class TextStream:
    """A streamed job: its text deltas as the batch produces them, then its GenResult. `start` waits for the
    first delta (or the end), so that a request failing before any text still gets its HTTP error status."""

    def __init__(self, serving: OpenAIServing, prompt: Prompt, req: ChatCompletionRequest | CompletionRequest):
        self.serving = serving
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)
        self.job = serving.submit(prompt, req, on_delta=put)
        self.job.future.add_done_callback(lambda _: put(None))  # after every delta: the end

    async def next(self) -> str | None:
        item = await self.serving.settle(self.job, self.queue.get())
        if item is None:
            await self.result()  # raises the job's error, if it failed
        return item

    async def result(self) -> GenResult:
        return await self.serving.settle(self.job, asyncio.shield(asyncio.wrap_future(self.job.future)))

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
            self.serving.batcher.discard(self.job)


def load_model(projector_dir: str | None, backbone_name: str | None = None, max_prompt_tokens: int = 1024,
               device: str = "auto", dtype: str = "auto", engine: str = "torch", gguf: str | None = None,
               max_batch_size: int = 16) -> E2PModel:
    """Backbone + projector from disk, ready to serve (on a CPU 'auto' is float32: batch-independent answers), on
    the torch or the llama-cpp engine (one llama.cpp sequence per row of the largest batch)."""
    from ..backbone import load_backbone
    from ..engines import make_model
    from ..projector import Projector

    backbone = load_backbone(backbone_name, device=device, dtype=dtype)
    projector = None
    if projector_dir is not None:
        projector = Projector.from_pretrained(projector_dir, backbone)
        projector.eval()
    return make_model(backbone, projector, engine=engine, gguf=gguf, n_seq_max=max_batch_size,
                      max_prompt_tokens=max_prompt_tokens)
