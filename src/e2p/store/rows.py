"""What a stored row is and what can go wrong with one, on every backend: `UserEmbedding`, the store errors, and
`record_from_row`, the check every row read back passes (length, the store's dimension, NaN / inf)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import E2PError


class StoreError(E2PError, ValueError):
    """A store that cannot be used as asked (wrong dimension for this projector, unreadable file)."""


class CorruptEmbeddingError(StoreError):
    """One user's stored row does not hold a usable vector (NaN / inf, wrong length): that user only."""


class StoreBusyError(StoreError):
    """Another writer held the store past the busy timeout: retry shortly."""

    code = "store_busy"


class StoreUnavailableError(StoreBusyError):
    """The store cannot be reached (a database that is down or restarting): retry shortly."""

    code = "store_unavailable"


@dataclass
class UserEmbedding:
    user: str
    vector: np.ndarray  # float32 [dim]
    dim: int
    version: int
    updated_at: float  # unix seconds

    def metadata(self) -> dict:
        return {"user": self.user, "dim": self.dim, "version": self.version, "updated_at": self.updated_at}


def record_from_row(user, blob, dim, version, updated_at, expected: int | None) -> UserEmbedding:
    """A stored row -> UserEmbedding, checked (length, the store's dimension `expected`, NaN / inf): a damaged row is a
    CorruptEmbeddingError for that user only. Both backends read rows through here."""
    fix = ("store it again (PUT /v1/users/{id}/embedding or `e2p users import`) or delete it "
           "(DELETE /v1/users/{id}/embedding)")
    if not isinstance(blob, bytes) or not isinstance(dim, int) or dim <= 0 or len(blob) != 4 * dim:
        size = len(blob) if isinstance(blob, (bytes, str)) else type(blob).__name__
        raise CorruptEmbeddingError(f"the stored embedding of user {user!r} is damaged ({size} bytes for "
                                    f"dimension {dim!r}): {fix}")
    if expected is not None and dim != expected:
        raise CorruptEmbeddingError(f"the stored embedding of user {user!r} has {dim} values, the store holds "
                                    f"{expected}-dim embeddings: {fix}")
    vector = np.frombuffer(blob, dtype=np.float32).copy()
    if not np.isfinite(vector).all():
        raise CorruptEmbeddingError(f"the stored embedding of user {user!r} contains NaN or inf values: {fix}")
    return UserEmbedding(user=user, vector=vector, dim=dim, version=version, updated_at=updated_at)
