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


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # floats, or base64 of little-endian float32 (`encoding_format="base64"`)


class EmbeddingList(BaseModel):
    """OpenAI's answer to `POST /v1/embeddings`."""

    object: Literal["list"] = "list"
    model: str
    usage: EmbeddingUsage
    data: list[EmbeddingData]


class UserEmbeddingInfo(BaseModel):
    """A stored user embedding's metadata (`PUT` / `GET /v1/users/{id}/embedding`)."""

    object: Literal["user.embedding"] = "user.embedding"
    user: str
    dim: int
    version: int
    updated_at: float  # unix seconds


class UserEmbeddingWithVector(UserEmbeddingInfo):
    """The metadata and the vector itself: what `GET` answers the admin."""

    embedding: list[float]


class UserEmbeddingDeleted(BaseModel):
    object: Literal["user.embedding.deleted"] = "user.embedding.deleted"
    user: str
    deleted: Literal[True] = True


class Health(BaseModel):
    """`GET /healthz`: the decoding worker's liveness (`status` "ok" answers 200, the others 503)."""

    status: Literal["ok", "stalled", "unavailable"]
    model: str
    queue_depth: int
    max_queue: int
    busy: bool
    seconds_since_step: float
    rss_bytes: int | None


class EmbeddingPut(RequestBody):
    """A user's embedding, or a profile text the server embeds with the projector's own encoder."""

    model_config = ConfigDict(extra="forbid")
    embedding: list[Number] | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.embedding is None) == (self.text is None):
            raise ValueError("send exactly one of `embedding` (a vector) or `text` (a profile the server embeds)")
        return self


class UserEvents(RequestBody):
    """`POST /v1/users/{id}/events`: what the user did, folded into their live profile in order: texts they wrote
    (embedded with the projector's own encoder) and / or item vectors (the encoder's size)."""

    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = Field(default=None, max_length=256)
    vectors: list[list[Number]] | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _some(self):
        if not self.texts and not self.vectors:
            raise ValueError("send `texts` (what the user wrote) and / or `vectors` (items they acted on): at least one")
        return self


class UserProfileInfo(UserEmbeddingInfo):
    """The embedding after events: its metadata and how many events its profile holds."""

    object: Literal["user.profile"] = "user.profile"
    events: int  # items folded into the profile since it started (the last PUT or import replaces it)
    half_life_events: float | None  # the rule's decay (None: every event weighs the same)


class EmbeddingsRequest(RequestBody):
    """OpenAI's `POST /v1/embeddings`: text -> the user embedding this server's projector reads."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Whole | None = Field(default=None, ge=1)
    user: str | None = None


# --- the playground's read-only endpoints (`serve/playground.py`): what the page shows, any client gets ---------
class Interval(BaseModel):
    """A paired comparison of perplexities: the relative change (negative: e2p is better) and its 95% interval."""

    relative_change: float
    ci95: tuple[float, float]


class TrainingVerdict(BaseModel):
    """The verdict of the projector's `training_report.json`: does the embedding carry the person (e2p against
    both style-only controls on validation users never trained on)?"""

    carries_person: bool | None
    text: str
    comparisons: dict[str, Interval] = Field(default_factory=dict)
    person_scale: float | None = None
    verdict_users: int | None = None


class CallerInfo(BaseModel):
    """Who the key is: its tenant and whether it is an admin (what the page may show)."""

    tenant: str
    admin: bool


class ProjectorCard(BaseModel):
    """`GET /v1/projector`: the served model and projector, and what its training measured (or that nothing was)."""

    object: Literal["e2p.projector"] = "e2p.projector"
    model: str
    backbone: str
    engine: str
    personalized: bool  # False: no projector, or a style-only one; users make no difference
    injection: str | None
    num_prefix_tokens: int | None
    prefix_position: str | None
    embedding_dim: int | None
    text_encoder: str | None  # embeds `{"text"}` puts and /v1/embeddings
    system_prompt: str
    max_tokens_limit: int
    default_max_tokens: int
    report: TrainingVerdict | None
    report_note: str
    caller: CallerInfo


class UserListing(BaseModel):
    """One stored user's metadata: never its vector."""

    user: str
    dim: int
    version: int
    updated_at: float  # unix seconds


class UserList(BaseModel):
    """`GET /v1/users` (admin): a page of the tenant's users in id order."""

    object: Literal["list"] = "list"
    data: list[UserListing]
    total: int  # the tenant's users
    has_more: bool
    next_after: str | None  # pass as `after` for the next page


class MapPoint(BaseModel):
    user: str
    x: float
    y: float


class UserMap(BaseModel):
    """`GET /v1/users/map` (admin): a 2-D PCA of the tenant's users' embeddings, computed on the server; only the
    two coordinates of each user leave it, never a vector."""

    object: Literal["user.map"] = "user.map"
    method: Literal["pca"] = "pca"
    total: int  # the tenant's users
    shown: int  # users on the map (the first `limit` in id order)
    damaged: int  # stored rows skipped because they hold no usable vector
    explained_variance: list[float]  # share of the variance along x and y
    points: list[MapPoint]


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
