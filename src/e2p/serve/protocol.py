"""The wire protocol: pydantic request / response models mirroring the OpenAI API (the fields e2p uses), plus the
`e2p` extension, and the one error shape (`ErrorResponse`) used for JSON error responses and for the error event of
a stream."""
from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Number = Annotated[float, Field(strict=True)]  # a JSON number: "1.5" and true are refused, not converted
# sampling settings are strict too ("0.5" and "yes" are refused, not converted) and finite (NaN is no temperature)
Real = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Whole = Annotated[int, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: Any, where: str = "body") -> None:
    """Refuse lone UTF-16 surrogates ("\\ud800" in JSON) anywhere: they are not text, and the tokenizer, SQLite
    and the logs cannot encode them."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            raise ValueError(f"{where} contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text: "
                             "send valid Unicode")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}.{i}")


class RequestBody(BaseModel):
    """Every request body: valid Unicode only."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_text(data)
        return data


class E2PExtra(BaseModel):
    """The `e2p` object in a request body (openai client: `extra_body={"e2p": {...}}`)."""

    model_config = ConfigDict(extra="forbid")
    embedding: list[Number] | None = Field(default=None, description="an inline user embedding, used instead of `user`")
    remember: Flag = Field(default=False, description="fold the last user message into `user`'s live profile before "
                                                      "answering (only where the tenant allows it)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ContentPartError(ValueError):
    """A content part the server cannot read: `where` names its field inside the message ("content.1.text") and
    `code` says whether it is missing or unsupported, so the client's 400 points at the part to fix."""

    def __init__(self, message: str, where: str, code: str):
        super().__init__(message)
        self.where, self.code = where, code


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text":
                raise ContentPartError(f"content part {j} has type {part.type!r}, which is not supported: send text "
                                       "parts only", f"content.{j}.type", "invalid_value")
            if part.text is None:
                raise ContentPartError(f"content part {j} is a text part without `text`: add its text",
                                       f"content.{j}.text", "missing_required_parameter")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Flag = False


UNSUPPORTED = {"logprobs": "logprobs", "top_logprobs": "top_logprobs", "tools": "tool calling (tools)",
               "functions": "function calling (functions)", "response_format": "a response_format other than text",
               "logit_bias": "logit_bias", "presence_penalty": "a presence penalty",
               "frequency_penalty": "a frequency penalty"}
NEUTRAL = {"logprobs": "false", "top_logprobs": "0", "tools": "[]", "functions": "[]",
           "response_format": '{"type": "text"}', "logit_bias": "{}", "presence_penalty": "0",
           "frequency_penalty": "0"}


class _SamplingRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Whole | None = Field(default=None, ge=1)
    temperature: Real = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Real = Field(default=1.0, gt=0.0, le=1.0)
    n: Whole = Field(default=1, ge=1)
    stream: Flag = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: Whole | None = Field(default=None, ge=-(2 ** 63), le=2 ** 64 - 1, description="a 64-bit integer")
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's newer name for the end user; `user` wins when both are given
    prompt_cache_key: str | None = None  # accepted; the server keeps no prompt cache across requests
    e2p: E2PExtra | None = None
    # Fields the server does not do: their neutral values (what common clients send by default) pass, any other
    # value is a 400 that names the field, so that no client believes it got what it asked for.
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias",
                     "presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral_only(cls, value, info):
        if not (value in (None, False, 0, [], {}) or value == {"type": "text"}):
            raise ValueError(f"{UNSUPPORTED[info.field_name]} is not supported by this server: leave it out "
                             f"(or send {NEUTRAL[info.field_name]})")
        return value

    @property
    def end_user(self) -> str | None:
        """The stored user this request speaks for: `user`, else `safety_identifier`."""
        return self.user if self.user is not None else self.safety_identifier

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Whole | None = Field(default=None, ge=1)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str]]
    echo: Flag = False


# --- responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "e2p"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """`GET /healthz`: the decoding worker's liveness (`status` "ok" answers 200, the others 503)."""

    status: Literal["ok", "stalled", "unavailable"]
    model: str
    queue_depth: int
    max_queue: int
    busy: bool
    seconds_since_step: float
    rss_bytes: int | None


class Readiness(BaseModel):
    """`GET /readyz`: whether a load balancer should send this replica requests (200) or not (503), and why not."""

    ready: bool
    model_loaded: bool
    store: Literal["ok", "unavailable"]
    draining: bool  # SIGTERM received: finishing in-flight work, taking no new traffic after the drain period


# --- errors: `{"error": {"message", "type", "param", "code"}}`, as a JSON response or as a stream's error event ---
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
