"""Chat and completion requests checked and formatted into a `Prompt` for the batcher: the limits (tokens, stops,
messages, characters), message text with the backbone's control tokens broken, the chat template or a raw prompt,
and the user's embedding (`OpenAIServing.resolve_embedding`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from starlette.concurrency import run_in_threadpool

from ..formatting import PromptTooLongError, Segments
from ..store import DEFAULT_TENANT
from .protocol import ChatCompletionRequest, CompletionRequest, ContentPartError
from .serving import APIError, OpenAIServing


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex of the tokenizer's special tokens (the chat template's control tokens among them), longest first;
    None if it has none."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {t.content for t in added.values() if getattr(t, "special", False)}
    specials |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)  # one character: nothing to break
    return re.compile("|".join(map(re.escape, specials))) if specials else None


@dataclass
class Prompt:
    """A checked generation request, ready for the batcher."""

    segments: Segments
    embedding: torch.Tensor | None
    headers: dict[str, str]  # where the embedding came from: x-e2p-embedding (and x-e2p-embedding-version)
    max_tokens: int
    echo: str = ""  # text the answer starts with (`echo` on /v1/completions)
    tenant: str = DEFAULT_TENANT  # whose request: the per-tenant metrics' label


class Prompts:
    """The steps from a request body to a `Prompt`, each raising `APIError` (400 with the parameter to fix)."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.config, self.model, self.metrics = serving.config, serving.model, serving.metrics
        self.tokenizer_lock = serving.tokenizer_lock
        self.special_tokens = special_token_pattern(serving.model.tokenizer)

    def max_tokens_of(self, value: int | None) -> int:
        config = self.config
        n = value if value is not None else config.default_max_tokens
        if n > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {n}, the limit is {config.max_tokens_limit}: ask for fewer tokens",
                           param="max_tokens", code="invalid_value")
        return n

    def check_common(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        self.serving.check_model(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported: send several requests instead", param="n", code="invalid_value")
        if req.end_user is not None:
            self.serving.check_user(req.end_user)
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
        """A raw prompt (no template) with the prefix where training put it (e2p.formatting.PromptFormat.format_raw)."""
        with self.tokenizer_lock:
            return self.model.format_raw(prompt)

    async def segments_of(self, fn: Callable[[Any], Segments], arg, param: str) -> Segments:
        try:
            segments = await run_in_threadpool(fn, arg)
        except PromptTooLongError as exc:
            self.metrics.rejected.labels("prompt_too_long").inc()
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        if not segments.pre and not segments.post:
            raise APIError(400, "the prompt is empty: send some text", param=param, code="invalid_value")
        return segments

    async def chat_prompt(self, req: ChatCompletionRequest, tenant: str = DEFAULT_TENANT, remember=None) -> Prompt:
        """A chat request checked, its user's embedding resolved and its messages formatted with the chat template.
        `remember(req, messages, tenant) -> headers`: folds the message into the user's profile when the request
        asks (`e2p.remember`), after every check and before the embedding is read, so the answer uses it."""
        self.check_common(req)
        max_tokens = self.max_tokens_of(req.max_completion_tokens or req.max_tokens)
        messages = self.chat_messages(req)
        self.check_size([m["content"] for m in messages], "messages")
        remembered = {}
        if req.e2p is not None and req.e2p.remember:
            if remember is None:
                raise APIError(400, "`remember` is not available on this endpoint", param="e2p.remember")
            remembered = await remember(req, messages, tenant)
        embedding, headers = await self.serving.resolve_embedding(req, tenant)
        headers = {**headers, **remembered}
        segments = await self.segments_of(self._format_chat, messages, "messages")
        return Prompt(segments, embedding, headers, max_tokens, tenant=tenant)

    async def completion_prompt(self, req: CompletionRequest, tenant: str = DEFAULT_TENANT) -> Prompt:
        """A completion request checked, its user's embedding resolved and its raw prompt tokenized (no template)."""
        self.check_common(req)
        if req.e2p is not None and req.e2p.remember:
            raise APIError(400, "`remember` folds a chat's user message into the profile: use /v1/chat/completions",
                           param="e2p.remember", code="invalid_value")
        max_tokens = self.max_tokens_of(req.max_tokens)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (batching happens on the server)", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        self.check_size([prompt], "prompt")
        embedding, headers = await self.serving.resolve_embedding(req, tenant)
        segments = await self.segments_of(self._format_raw, prompt, "prompt")
        return Prompt(segments, embedding, headers, max_tokens, echo=prompt if req.echo else "", tenant=tenant)
