"""EmbeddingStore: user id -> embedding, in SQLite (WAL mode), safe to share between threads and processes.

Every row holds the vector as float32 bytes, its dimension, a version that grows by one on each update,
and the update time. A store remembers its embedding dimension (set by the first write, or by whoever
opens it with `dim=`), so a server and `e2p users import` cannot mix vectors of different encoders.

`read_embeddings(path)` reads the import formats (no pickle anywhere):

* Parquet (`.parquet`): a `user` column plus either an `embedding` list column or numeric columns
  (taken in file order, e.g. `e0, e1, ...`).
* CSV (`.csv`): a header with `user` plus either an `embedding` column holding a JSON list
  (`"[0.1, 0.2]"`) or numeric columns in header order.
* JSON lines (`.jsonl`, `.ndjson`, `.json`): one object per line, `{"user": "...", "embedding": [...]}`
  (or numeric keys in order instead of `embedding`).
* NumPy `.npz`: arrays `user` (strings) and `embedding` ([N, E]); also `users` / `embeddings`.
* NumPy `.npy`: a structured array with fields `user` and `embedding`, or a plain [N, E] array whose
  user ids are the row numbers "0".."N-1" (or the lines of an ids file).
"""
from __future__ import annotations

import csv
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import DataError, EmbeddingError, E2PError

log = logging.getLogger(__name__)

MAX_USER_ID_LENGTH = 256
IMPORT_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json", ".npz", ".npy")


class StoreError(E2PError, ValueError):
    """A store that cannot be used as asked (wrong dimension for this projector, unreadable file)."""


@dataclass
class UserEmbedding:
    user: str
    vector: np.ndarray  # float32 [dim]
    dim: int
    version: int
    updated_at: float  # unix seconds

    def metadata(self) -> dict:
        return {"user": self.user, "dim": self.dim, "version": self.version, "updated_at": self.updated_at}


def check_user_id(user: str) -> str:
    if not isinstance(user, str) or not user.strip():
        raise EmbeddingError("user id must be a non-empty string")
    if len(user) > MAX_USER_ID_LENGTH:
        raise EmbeddingError(f"user id is {len(user)} characters, the limit is {MAX_USER_ID_LENGTH}: use a shorter id")
    if any(ord(c) < 32 for c in user):
        raise EmbeddingError("user id contains control characters: use printable ids")
    return user


def as_vector(values, dim: int | None = None) -> np.ndarray:
    """A 1-D finite float32 vector of size `dim` (if given), else EmbeddingError saying what to fix."""
    try:
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


class EmbeddingStore:
    """Thread-safe SQLite store of user embeddings. Use one instance per process (or several: WAL allows it)."""

    def __init__(self, path: str | Path, dim: int | None = None, timeout: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (user TEXT PRIMARY KEY, vector BLOB NOT NULL, "
                "dim INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable SQLite store ({exc}): pass a new path or restore the file") from exc
        if dim is not None:
            self._claim_dim(dim)

    # --- dimension ----------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        return int(row[0]) if row else None

    def _claim_dim(self, dim: int) -> None:
        with self._lock:
            current = self.dim
            if current is None:
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dim', ?)", (str(int(dim)),))
            elif current != dim:
                raise StoreError(f"store {self.path} holds {current}-dim embeddings but {dim} are needed: "
                                 "use a separate store per encoder, or re-import with the projector's encoder")

    # --- single rows ----------------------------------------------------------------------------
    def put(self, user: str, vector) -> UserEmbedding:
        """Insert or replace; the version goes up by one on every update."""
        check_user_id(user)
        with self._lock:
            v = as_vector(vector, self.dim)
            self._claim_dim(v.size)
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO embeddings (user, vector, dim, version, updated_at) VALUES (?, ?, ?, 1, ?) "
                    "ON CONFLICT(user) DO UPDATE SET vector=excluded.vector, dim=excluded.dim, "
                    "version=embeddings.version + 1, updated_at=excluded.updated_at",
                    (user, v.tobytes(), v.size, now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            record = self.get(user)
        assert record is not None
        return record

    def get(self, user: str) -> UserEmbedding | None:
        with self._lock:
            row = self._db.execute("SELECT user, vector, dim, version, updated_at FROM embeddings WHERE user=?",
                                   (user,)).fetchone()
        if row is None:
            return None
        vector = np.frombuffer(row[1], dtype=np.float32).copy()
        return UserEmbedding(user=row[0], vector=vector, dim=row[2], version=row[3], updated_at=row[4])

    def delete(self, user: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM embeddings WHERE user=?", (user,))
        return cur.rowcount > 0

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])

    def users(self, limit: int = 100, after: str = "") -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT user FROM embeddings WHERE user > ? ORDER BY user LIMIT ?",
                                    (after, int(limit))).fetchall()
        return [r[0] for r in rows]

    # --- bulk -------------------------------------------------------------------------------------
    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> int:
        """All-or-nothing import in one transaction; returns the number of rows written."""
        items = list(items)
        with self._lock:
            dim = self.dim
            checked = []
            for n, (user, vector) in enumerate(items):
                try:
                    check_user_id(user)
                    v = as_vector(vector, dim)
                except EmbeddingError as exc:
                    raise DataError(f"row {n} (user {user!r}): {exc}") from exc
                dim = v.size if dim is None else dim
                checked.append((user, v))
            if not checked:
                return 0
            self._claim_dim(dim)
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO embeddings (user, vector, dim, version, updated_at) VALUES (?, ?, ?, 1, ?) "
                    "ON CONFLICT(user) DO UPDATE SET vector=excluded.vector, dim=excluded.dim, "
                    "version=embeddings.version + 1, updated_at=excluded.updated_at",
                    [(u, v.tobytes(), v.size, now) for u, v in checked],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.info("imported %d embeddings into %s", len(checked), self.path)
        return len(checked)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- import formats -------------------------------------------------------------------------------
def _rows_from_columns(names: list[str], columns: dict, source: str) -> Iterator[tuple[str, np.ndarray]]:
    """`columns`: name -> sequence. Either `embedding` or every other column numeric."""
    if "user" not in columns:
        raise DataError(f"{source} has no `user` column (columns: {names[:10]}): name the user id column `user`")
    users = [str(u) for u in columns["user"]]
    if "embedding" in columns:
        vectors = columns["embedding"]
    else:
        numeric = [n for n in names if n != "user"]
        if not numeric:
            raise DataError(f"{source} has a `user` column but no `embedding` column or numeric columns")
        try:
            matrix = np.stack([np.asarray(columns[n], dtype=np.float32) for n in numeric], axis=1)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: columns other than `user` must all be numbers ({exc})") from exc
        vectors = list(matrix)
    for user, vector in zip(users, vectors):
        if isinstance(vector, str):
            try:
                vector = json.loads(vector)
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: embedding of user {user!r} is not a JSON list ({exc})") from exc
        yield user, vector


def _read_parquet(path: Path) -> list[tuple[str, np.ndarray]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types
        raise DataError(f"cannot read {path} as Parquet ({exc})") from exc
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return list(_rows_from_columns(table.column_names, columns, str(path)))


def _read_csv(path: Path) -> list[tuple[str, np.ndarray]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        rows = list(reader)
    columns = {n: [r[n] for r in rows] for n in names}
    return list(_rows_from_columns(names, columns, str(path)))


def _read_jsonl(path: Path) -> list[tuple[str, np.ndarray]]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not JSON ({exc}): write one object per line") from exc
            if not isinstance(obj, dict) or "user" not in obj:
                raise DataError(f'{path}:{n} needs an object with "user" and "embedding"')
            if "embedding" in obj:
                vector = obj["embedding"]
            else:
                vector = [v for k, v in obj.items() if k != "user"]
            out.append((str(obj["user"]), vector))
    return out


def _read_npz(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            ukey = next((k for k in ("user", "users") if k in keys), None)
            ekey = next((k for k in ("embedding", "embeddings") if k in keys), None)
            if ukey is None or ekey is None:
                raise DataError(f"{path} needs arrays `user` and `embedding` (found {sorted(keys)})")
            users, matrix = z[ukey], z[ekey]
    except ValueError as exc:
        raise DataError(f"cannot read {path} without pickle ({exc}): store user ids as a string array, not objects") from exc
    if matrix.ndim != 2 or len(users) != len(matrix):
        raise DataError(f"{path}: `embedding` must be [N, E] with one row per user (got {matrix.shape} for {len(users)} users)")
    return [(str(u), row) for u, row in zip(users, matrix)]


def _read_npy(path: Path, ids: list[str] | None) -> list[tuple[str, np.ndarray]]:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"cannot read {path} without pickle ({exc}): save a numeric or structured array") from exc
    if arr.dtype.names:
        if not {"user", "embedding"} <= set(arr.dtype.names):
            raise DataError(f"{path}: a structured array needs fields `user` and `embedding` (has {arr.dtype.names})")
        return [(str(r["user"]), np.asarray(r["embedding"]).reshape(-1)) for r in arr]
    if arr.ndim != 2:
        raise DataError(f"{path}: expected an [N, E] array, got shape {arr.shape}")
    users = ids if ids is not None else [str(i) for i in range(len(arr))]
    if len(users) != len(arr):
        raise DataError(f"{path} has {len(arr)} rows but {len(users)} user ids were given")
    return list(zip(users, arr))


def read_embeddings(path: str | Path, ids_file: str | Path | None = None) -> list[tuple[str, np.ndarray]]:
    """(user, vector) pairs from a Parquet / CSV / JSON lines / .npz / .npy file (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    suffix = path.suffix.lower()
    ids = None
    if ids_file is not None:
        ids = [line.strip() for line in Path(ids_file).read_text().splitlines() if line.strip()]
    if suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".npz":
        rows = _read_npz(path)
    elif suffix == ".npy":
        rows = _read_npy(path, ids)
    else:
        raise DataError(f"unknown file type {suffix!r}: use one of {', '.join(IMPORT_SUFFIXES)}")
    seen: dict[str, int] = {}
    for user, _ in rows:
        seen[user] = seen.get(user, 0) + 1
    dupes = [u for u, c in seen.items() if c > 1]
    if dupes:
        raise DataError(f"{path}: user ids appear more than once ({dupes[:5]}): keep one row per user")
    return rows


def import_embeddings(path: str | Path, store: EmbeddingStore, ids_file: str | Path | None = None) -> int:
    """Read `path` and write every row to `store` in one transaction (nothing is written if a row is bad)."""
    rows = read_embeddings(path, ids_file)
    if not rows:
        raise DataError(f"{path} holds no embeddings")
    return store.put_many(rows)

