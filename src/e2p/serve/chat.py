"""Chat and completion answers: a checked `Prompt` submitted to the batcher and settled within its deadline, then
answered whole (`chat.completion`, `text_completion`) or streamed as server-sent events (`TextStream`: the text
deltas as the batch makes them; an error after the first byte becomes the stream's error event)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from ..errors import UpstreamError
from .auth import Caller, inference_caller

from .batching import (GenerationError, GenRequest, GenResult, QueueFullError, RequestTimeoutError,
                       ShuttingDownError)
from .prompts import Prompt
from .protocol import (ChatChoice, ChatChoiceMessage, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                       ChatCompletionRequest, ChatDelta, Completion, CompletionChoice, CompletionRequest, Usage, dump,
                       new_id)
from .serving import APIError, OpenAIServing


class ClientGoneError(Exception):
    """The client disconnected before its non-streamed answer was ready."""


async def disconnected(request: Request) -> None:
    """Return when the client disconnects: the body is read already, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected; never spin


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class ChatServing:
    """`/v1/chat/completions` and `/v1/completions` once their prompt is built: submission, deadlines, answers."""

    def __init__(self, serving: OpenAIServing):
        self.config, self.batcher, self.metrics = serving.config, serving.batcher, serving.metrics
        self.tracing = serving.tracing

    def submit(self, prompt: Prompt, req: ChatCompletionRequest | CompletionRequest,
               on_delta: Callable[[str], None] | None = None) -> GenRequest:
        job = GenRequest(segments=prompt.segments, embedding=prompt.embedding, max_tokens=prompt.max_tokens,
                         temperature=req.temperature, top_p=req.top_p, seed=req.seed, stops=req.stop_list(),
                         trim=isinstance(req, ChatCompletionRequest),
                         on_delta=on_delta, deadline=time.monotonic() + self.config.request_timeout_s,
                         tenant=prompt.tenant, trace=self.tracing.recorder())
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
        except UpstreamError as exc:  # the engine behind us (a vLLM server) is down, slow or wrong: this request only
            self.metrics.rejected.labels("upstream").inc()
            raise APIError(exc.status, f"{exc}: retry later", type="server_error", code=exc.code,
                           headers={"retry-after": "1"} if exc.status == 503 else None) from None
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

    @staticmethod
    def debit(request: Request, result: GenResult) -> None:
        """A rate-limited key's answer used its prompt and completion tokens (serve.limits)."""
        found = request.scope.get("state", {}).get("rate_limit")
        if found is not None:
            request.app.state.limiter.debit(*found, result.prompt_tokens + result.completion_tokens)

    async def chat_completion(self, prompt: Prompt, req: ChatCompletionRequest, request: Request) -> dict:
        result = await self.generate(prompt, req, request)
        self.debit(request, result)
        return dump(ChatCompletion(model=self.config.model_name, usage=self.usage_of(result), choices=[
            ChatChoice(message=ChatChoiceMessage(content=result.text), finish_reason=result.finish_reason)]))

    async def completion(self, prompt: Prompt, req: CompletionRequest, request: Request) -> dict:
        result = await self.generate(prompt, req, request)
        self.debit(request, result)
        return dump(Completion(model=self.config.model_name, usage=self.usage_of(result), choices=[
            CompletionChoice(text=prompt.echo + result.text, finish_reason=result.finish_reason)]))

    async def chat_completion_stream(self, prompt: Prompt, req: ChatCompletionRequest, request: Request
                                     ) -> AsyncIterator[str]:
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
                           lambda delta: chunk(ChatDelta(content=delta)), tail, lambda r: self.debit(request, r))

    async def completion_stream(self, prompt: Prompt, req: CompletionRequest, request: Request) -> AsyncIterator[str]:
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

        return self.events(text, [chunk(prompt.echo)] if prompt.echo else [], chunk, tail,
                           lambda r: self.debit(request, r))

    @staticmethod
    async def events(text: TextStream, head: list[dict], delta_chunk: Callable[[str], dict],
                     tail: Callable[[GenResult], list[dict]], done: Callable[[GenResult], None]) -> AsyncIterator[str]:
        """Server-sent events: `head` chunks, one chunk per text delta as it is generated, then `tail(result)`.
        An error after the first byte (the status is sent) ends the stream with an OpenAI error event."""
        try:
            for chunk in head:
                yield sse(chunk)
            async for delta in text.deltas():
                yield sse(delta_chunk(delta))
            result = await text.result()
            done(result)
            for chunk in tail(result):
                yield sse(chunk)
        except APIError as exc:
            yield sse(exc.body())
        finally:
            text.close()
        yield sse("[DONE]")


class TextStream:
    """A streamed job: its text deltas as the batch produces them, then its GenResult. `start` waits for the
    first delta (or the end), so that a request failing before any text still gets its HTTP error status."""

    def __init__(self, chat: ChatServing, prompt: Prompt, req: ChatCompletionRequest | CompletionRequest):
        self.chat = chat
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)
        self.job = chat.submit(prompt, req, on_delta=put)
        self.job.future.add_done_callback(lambda _: put(None))  # after every delta: the end

    async def next(self) -> str | None:
        item = await self.chat.settle(self.job, self.queue.get())
        if item is None:
            await self.result()  # raises the job's error, if it failed
        return item

    async def result(self) -> GenResult:
        return await self.chat.settle(self.job, asyncio.shield(asyncio.wrap_future(self.job.future)))

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
            self.chat.batcher.discard(self.job)


# --- the routes: chat and completions, streamed or not ------------------------------------------------------------
router = APIRouter()


def event_stream(events, headers: dict) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache", **headers})


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, caller: Caller = Depends(inference_caller)):
    state = request.app.state
    prompt = await state.prompts.chat_prompt(req, caller.tenant, remember=state.users.remember)
    if req.stream:
        return event_stream(await state.chat.chat_completion_stream(prompt, req, request), prompt.headers)
    return JSONResponse(await state.chat.chat_completion(prompt, req, request), headers=prompt.headers)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, caller: Caller = Depends(inference_caller)):
    state = request.app.state
    prompt = await state.prompts.completion_prompt(req, caller.tenant)
    if req.stream:
        return event_stream(await state.chat.completion_stream(prompt, req, request), prompt.headers)
    return JSONResponse(await state.chat.completion(prompt, req, request), headers=prompt.headers)
