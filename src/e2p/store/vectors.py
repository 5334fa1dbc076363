"""The checks every user id and vector passes, wherever it comes from (a file, a PUT, a request's inline
`e2p.embedding`): one set of rules, so the store, the data contract, the server and the CLI refuse the same
things with the same message."""
from __future__ import annotations

import numpy as np

from ..errors import DataError, EmbeddingError

MAX_USER_ID_LENGTH = 256
DEFAULT_TENANT = "default"  # the tenant of the single-key flags, of `e2p users` without --tenant, of old stores


def check_user_id(user: str) -> str:
    """`user` if it is a usable id (a short printable string: it is a SQLite key, a URL path and a log field)."""
    if user is None:
        raise EmbeddingError("user id is missing (null): every row needs a user id")
    if not isinstance(user, str) or not user.strip():
        raise EmbeddingError("user id must be a non-empty string")
    if len(user) > MAX_USER_ID_LENGTH:
        raise EmbeddingError(f"user id is {len(user)} characters, the limit is {MAX_USER_ID_LENGTH}: use a shorter id")
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in user):
        raise EmbeddingError("user id contains control characters or a lone UTF-16 surrogate: use printable ids")
    return user


def _numbers_only(values) -> None:
    """Refuse what NumPy would quietly turn into numbers: strings ("1.5"), booleans, None."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "fiu":
            raise EmbeddingError(f"embedding must hold numbers, got an array of {values.dtype}")
        return
    if isinstance(values, (str, bytes)):
        raise EmbeddingError("embedding must be a list of numbers, got a string")
    if isinstance(values, (list, tuple)):
        for i, x in enumerate(values):
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
                raise EmbeddingError(f"embedding value {i} is {x!r} ({type(x).__name__}), not a number: "
                                     "send plain JSON numbers")


def as_vector(values, dim: int | None = None) -> np.ndarray:
    """A 1-D finite float32 vector of size `dim` (if given), else EmbeddingError saying what to fix."""
    _numbers_only(values)
    try:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
            v = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise EmbeddingError(f"embedding must be a list of numbers ({exc})") from exc
    if v.ndim != 1 or v.size == 0:
        raise EmbeddingError(f"embedding must be a non-empty flat list of numbers, got shape {tuple(v.shape)}")
    if dim is not None and v.size != dim:
        raise EmbeddingError(f"embedding has {v.size} values but this store / projector expects {dim}: "
                             "embed users with the encoder the projector was trained with")
    if not np.isfinite(v).all():
        raise EmbeddingError("embedding contains NaN or inf values: recompute it before storing")
    return v


def check_chunk(users: list[str], vectors, start: int, dim: int | None) -> tuple[np.ndarray, int]:
    """Validate a chunk -> ([n, E] float32, E); DataError naming the first bad row (numbered in the file)."""
    for i, user in enumerate(users):
        try:
            check_user_id(user)
        except EmbeddingError as exc:
            raise DataError(f"row {start + i} (user {user!r}): {exc}") from exc

    def bad(i: int, value, d):
        try:
            as_vector(value, d)
        except EmbeddingError as exc:
            raise DataError(f"row {start + i} (user {users[i]!r}): {exc}") from exc

    if isinstance(vectors, np.ndarray) and vectors.ndim == 2 and np.issubdtype(vectors.dtype, np.number):
        if len(vectors) != len(users):
            raise DataError(f"rows {start}..: {len(users)} user ids for {len(vectors)} embeddings")
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        if matrix.shape[1] == 0 or (dim is not None and matrix.shape[1] != dim):
            bad(0, matrix[0], dim)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            i = int(np.argmin(finite))
            bad(i, matrix[i], dim)
        return matrix, matrix.shape[1]
    rows = []
    for i, value in enumerate(vectors):
        try:
            v = as_vector(value, dim)
        except EmbeddingError as exc:
            raise DataError(f"row {start + i} (user {users[i]!r}): {exc}") from exc
        dim = v.size if dim is None else dim
        rows.append(v)
    return np.stack(rows), int(dim)


def next_string(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix` (SQLite's BINARY order of UTF-8 is code
    point order): `prefix` with its last character raised by one; None when there is no such bound."""
    for i in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[i]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:i] + chr(code)
    return None


def duplicate_in_chunk(users: list[str], start: int) -> None:
    """DataError naming the first row whose user id appeared earlier in the same chunk."""
    if len(set(users)) == len(users):
        return
    seen: set[str] = set()
    for i, u in enumerate(users):
        if u in seen:
            raise DataError(f"row {start + i}: user id {u!r} appears more than once: keep one row per user")
        seen.add(u)


def checked_rows(items, dim: int | None) -> tuple[list, int | None]:
    """(user, vector) pairs checked for an all-or-nothing write -> ([(user, float32 vector)], the dimension); DataError
    naming the first bad row."""
    checked = []
    for n, (user, vector) in enumerate(items):
        try:
            check_user_id(user)
            v = as_vector(vector, dim)
        except EmbeddingError as exc:
            raise DataError(f"row {n} (user {user!r}): {exc}") from exc
        dim = v.size if dim is None else dim
        checked.append((user, v))
    return checked, dim
