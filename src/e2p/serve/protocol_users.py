"""The wire protocol of the user endpoints (`serve/users.py`: embeddings, the user store, events) and of the
playground's read-only endpoints (`serve/playground.py`): pydantic models a client can rely on, beside the OpenAI
chat and completions schemas of `protocol.py`."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .protocol import Number, RequestBody, Whole


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
