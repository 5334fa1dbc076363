"""EmbeddingStore: user id -> embedding, in SQLite (WAL mode), safe to share between threads and processes.

Every row holds the vector as float32 bytes, its dimension, a version that grows by one on each update,
and the update time. A store remembers its embedding dimension (set by the first write, or by whoever
opens it with `dim=`), so a server and `e2p users import` cannot mix vectors of different encoders.

`import_embeddings(path, store)` streams the import formats (no pickle anywhere) in chunks of
`chunk_rows` rows, so memory stays flat however large the file (1M x 64 measured by
benchmarks/import_scale.py), stages them in a temporary on-disk table and merges them in ONE short SQLite
transaction: a bad row anywhere (wrong size, NaN/inf, a bad or duplicate user id) stops the import before
anything is written and names the row. While the file is read, other writers (a running `e2p serve`'s
PUTs) go on; they wait only for the final merge. Readers never wait (WAL, a reader connection of their own).

* Parquet (`.parquet`): a user id column (`user`, any type, turned into a string) plus either a list column
  `embedding` (list<float|double>, large_list or fixed_size_list, as Spark `array<float>` / BigQuery
  `ARRAY<FLOAT64>` exports write them; a one-field struct around the list or its items is unwrapped) or
  numeric columns (taken in file order, e.g. `e0, e1, ...`). Other names: `user_column=` /
  `embedding_column=` (`e2p users import --user-column --embedding-column`). Read with `iter_batches`.
* CSV (`.csv`): a header with `user` plus either an `embedding` column holding a JSON list
  (`"[0.1, 0.2]"`) or numeric columns in header order. Read row by row.
* JSON lines (`.jsonl`, `.ndjson`, `.json`): one object per line, `{"user": "...", "embedding": [...]}`
  (or numeric keys in order instead of `embedding`). Read line by line.
* NumPy `.npz`: arrays `user` (strings) and `embedding` ([N, E]); also `users` / `embeddings`. Both
  members are streamed out of the zip (compressed or not).
* NumPy `.npy`: a structured array with fields `user` and `embedding`, or a plain [N, E] array whose
  user ids are the row numbers "0".."N-1" (or the lines of an ids file). Memory-mapped (`mmap_mode="r"`).

`read_embeddings(path)` returns the whole file as a list of (user, vector) pairs, for small files.
"""
from __future__ import annotations

import contextlib
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
DEFAULT_CHUNK_ROWS = 10_000
IMPORT_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json", ".npz", ".npy")


class StoreError(E2PError, ValueError):
    """A store that cannot be used as asked (wrong dimension for this projector, unreadable file)."""


class CorruptEmbeddingError(StoreError):
    """One user's stored row does not hold a usable vector (NaN / inf, wrong length): that user only."""


class StoreBusyError(StoreError):
    """Another writer held the store past the busy timeout: retry shortly."""


@contextlib.contextmanager
def _sqlite_errors(path: Path):
    """sqlite3 errors -> StoreError saying what to do: busy (retry) or a damaged file (restore)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreBusyError(f"store {path} is busy with another writer ({exc}): retry shortly") from exc
        raise StoreError(f"store {path} cannot be used ({exc})") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"store {path} is damaged ({exc}): restore it from a backup, or rebuild it with "
                         f"`sqlite3 {path} .recover` and `e2p users import`") from exc


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


_ON_CONFLICT = ("ON CONFLICT(user) DO UPDATE SET vector=excluded.vector, dim=excluded.dim, "
                "version=embeddings.version + 1, updated_at=excluded.updated_at")
@contextlib.contextmanager
def _immediate(db: sqlite3.Connection):
    """One write transaction on `db`: committed if the block ends, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


_UPSERT = "INSERT INTO embeddings (user, vector, dim, version, updated_at) VALUES (?, ?, ?, 1, ?) " + _ON_CONFLICT


class EmbeddingStore:
    """Thread-safe SQLite store of user embeddings. Use one instance per process (or several: WAL allows it).

    Writes go through one connection (under a lock), reads through another, so a reader never waits behind a
    writer that waits for a lock (WAL: a read sees the last committed state). An import stages its rows in a
    temporary table of its own connection and merges them in one short transaction at the end, so other
    writers are only held off for the merge, not for the whole read of the file. Vectors read back are
    checked (length, NaN / inf) before anyone uses them: a damaged row is a `CorruptEmbeddingError` for that
    user only.
    """

    def __init__(self, path: str | Path, dim: int | None = None, timeout: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._dim: int | None = None
        self._lock = threading.RLock()  # the writer connection
        self._read_lock = threading.Lock()  # the reader connection
        try:
            with _sqlite_errors(self.path):
                self._db = self._connect()
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings (user TEXT PRIMARY KEY, vector BLOB NOT NULL, "
                    "dim INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL)"
                )
                self._reader = self._connect()
                self._reader.execute("SELECT COUNT(*) FROM meta").fetchone()
        except StoreError as exc:
            raise StoreError(f"{self.path} is not a usable SQLite store ({exc.__cause__}): pass a new path or restore "
                             "the file from a backup") from exc
        if dim is not None:
            self._claim_dim(dim)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=self.timeout, check_same_thread=False, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        return db

    def _read(self, sql: str, args: tuple = (), all_rows: bool = False):
        with self._read_lock, _sqlite_errors(self.path):
            cur = self._reader.execute(sql, args)
            return cur.fetchall() if all_rows else cur.fetchone()

    # --- dimension ----------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        if self._dim is None:  # once claimed it never changes; get() checks it on every read
            row = self._read("SELECT value FROM meta WHERE key='dim'")
            self._dim = int(row[0]) if row else None
        return self._dim

    def _claim_dim(self, dim: int) -> None:
        with self._lock, _sqlite_errors(self.path):
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
            with _sqlite_errors(self.path):
                self._write_transaction([(user, v.tobytes(), v.size, time.time())])
            record = self.get(user)
        assert record is not None
        return record

    def _write_transaction(self, rows: list[tuple]) -> None:
        with _immediate(self._db):
            self._db.executemany(_UPSERT, rows)

    def get(self, user: str) -> UserEmbedding | None:
        """The stored record, or None; CorruptEmbeddingError if the row does not hold a usable vector."""
        row = self._read("SELECT user, vector, dim, version, updated_at FROM embeddings WHERE user=?", (user,))
        return None if row is None else self._record(*row)

    def _record(self, user, blob, dim, version, updated_at) -> UserEmbedding:
        fix = (f"store it again (PUT /v1/users/{{id}}/embedding or `e2p users import`) or delete it "
               f"(DELETE /v1/users/{{id}}/embedding)")
        if not isinstance(blob, bytes) or not isinstance(dim, int) or dim <= 0 or len(blob) != 4 * dim:
            size = len(blob) if isinstance(blob, (bytes, str)) else type(blob).__name__
            raise CorruptEmbeddingError(f"the stored embedding of user {user!r} is damaged ({size} bytes for "
                                        f"dimension {dim!r}): {fix}")
        expected = self.dim
        if expected is not None and dim != expected:
            raise CorruptEmbeddingError(f"the stored embedding of user {user!r} has {dim} values, the store holds "
                                        f"{expected}-dim embeddings: {fix}")
        vector = np.frombuffer(blob, dtype=np.float32).copy()
        if not np.isfinite(vector).all():
            raise CorruptEmbeddingError(f"the stored embedding of user {user!r} contains NaN or inf values: {fix}")
        return UserEmbedding(user=user, vector=vector, dim=dim, version=version, updated_at=updated_at)

    def delete(self, user: str) -> bool:
        with self._lock, _sqlite_errors(self.path):
            cur = self._db.execute("DELETE FROM embeddings WHERE user=?", (user,))
        return cur.rowcount > 0

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM embeddings")[0])

    def users(self, limit: int = 100, after: str = "") -> list[str]:
        rows = self._read("SELECT user FROM embeddings WHERE user > ? ORDER BY user LIMIT ?", (after, int(limit)),
                          all_rows=True)
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
            with _sqlite_errors(self.path):
                self._write_transaction([(u, v.tobytes(), v.size, now) for u, v in checked])
        log.info("imported %d embeddings into %s", len(checked), self.path)
        return len(checked)

    def import_chunks(self, chunks: Iterable[tuple[list[str], object]]) -> int:
        """All-or-nothing streamed import: every (users, vectors) chunk is checked and staged in a temporary table
        of a connection of its own (no lock on the store meanwhile), then merged in one short transaction; any
        bad row stops it before the merge (DataError naming the row). Memory: one chunk."""
        db = self._connect()
        try:
            with _sqlite_errors(self.path):
                db.execute("PRAGMA temp_store=FILE")
                db.execute("CREATE TEMP TABLE staged (user TEXT PRIMARY KEY, vector BLOB NOT NULL, dim INTEGER NOT NULL)")
                dim, total = self.dim, 0
                db.execute("BEGIN")  # touches only the temp database until the merge
                for users, vectors in chunks:
                    if not len(users):
                        continue
                    matrix, dim = check_chunk(users, vectors, total, dim)
                    _stage(db, users, matrix, total)
                    total += len(users)
                db.execute("COMMIT")
                if total:
                    self._merge(db, dim)
        finally:
            db.close()
        log.info("imported %d embeddings into %s", total, self.path)
        return total

    def _merge(self, db: sqlite3.Connection, dim: int) -> None:
        """Staged rows -> the store, in one transaction that also claims the dimension."""
        with _immediate(db):
            current = db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
            if current is not None and int(current[0]) != dim:
                raise StoreError(f"store {self.path} holds {current[0]}-dim embeddings but the file has {dim}: "
                                 "use a separate store per encoder")
            if current is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(int(dim)),))
            db.execute("INSERT INTO embeddings (user, vector, dim, version, updated_at) "
                       "SELECT user, vector, dim, 1, ? FROM temp.staged WHERE true " + _ON_CONFLICT, (time.time(),))

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()


def _stage(db: sqlite3.Connection, users: list[str], matrix: np.ndarray, start: int) -> None:
    """Add a checked chunk to the staging table; DataError on a user id seen before in the file."""
    if len(set(users)) != len(users):
        seen: set[str] = set()
        for i, u in enumerate(users):
            if u in seen:
                raise DataError(f"row {start + i}: user id {u!r} appears more than once: keep one row per user")
            seen.add(u)
    size = matrix.shape[1]
    db.execute("SAVEPOINT chunk")
    try:
        db.executemany("INSERT INTO temp.staged (user, vector, dim) VALUES (?, ?, ?)",
                       ((u, matrix[i].tobytes(), size) for i, u in enumerate(users)))
    except sqlite3.IntegrityError:
        db.execute("ROLLBACK TO chunk")
        for i, u in enumerate(users):
            if db.execute("SELECT 1 FROM temp.staged WHERE user=?", (u,)).fetchone():
                raise DataError(f"row {start + i}: user id {u!r} appears more than once: keep one row per user") from None
        raise
    finally:
        db.execute("RELEASE chunk")


# --- import formats (streamed) -------------------------------------------------------------------
Chunk = tuple[list[str], object]  # (user ids, [n, E] float32 array or a list of n per-row values)


def _user_str(value) -> str | None:
    """A user id from a file as a string; a missing (null) id stays None so that it is refused, not stored as "None"."""
    return None if value is None else str(value)


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


def _unwrap_list(arr):
    """A list-like Arrow array (list / large_list / fixed_size_list, maybe in a one-field struct, items maybe
    one-field structs as some BigQuery / Hive exports write them) -> (flat values, offsets or None, width)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    while pa.types.is_struct(arr.type) and arr.type.num_fields == 1:
        arr = arr.field(0)
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return None
    if arr.null_count:
        i = int(np.argmax(np.asarray(arr.is_null())))
        raise DataError(f"row {i}: the embedding is null")
    values = arr.flatten()
    while pa.types.is_struct(values.type) and values.type.num_fields == 1:
        values = values.field(0)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type) or pa.types.is_decimal(values.type)):
        raise DataError(f"embedding items are {values.type}, not numbers")
    if values.null_count:
        raise DataError("an embedding contains null values: recompute it before importing")
    flat = np.asarray(values.cast(pa.float32()) if not pa.types.is_float32(values.type) else values, dtype=np.float32)
    if pa.types.is_fixed_size_list(t):
        return flat, None, t.list_size
    offsets = np.asarray(arr.offsets)
    return flat, offsets - offsets[0], None


def _parquet_matrix(batch, embedding_column: str, names: list[str], source: str, start: int):
    import pyarrow as pa

    if embedding_column in names:
        col = batch.column(names.index(embedding_column))
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):  # JSON text lists
            return [json.loads(v) if v is not None else None for v in col.to_pylist()]
        unwrapped = _unwrap_list(col)
        if unwrapped is None:
            raise DataError(f"{source}: column `{embedding_column}` is {col.type}, not a list of numbers")
        flat, offsets, width = unwrapped
        if width is not None:
            return flat.reshape(-1, width) if width else np.zeros((len(col), 0), np.float32)
        lengths = np.diff(offsets)
        if len(lengths) and (lengths != lengths[0]).any():  # ragged: per-row check names the row
            return [flat[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
        width = int(lengths[0]) if len(lengths) else 0
        return flat[offsets[0]: offsets[-1]].reshape(-1, width) if width else [[] for _ in lengths]
    raise DataError(f"{source}: no `{embedding_column}` column")


def _iter_parquet(path: Path, chunk_rows: int, user_column: str, embedding_column: str) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer=False: with pre-buffering (the default) pyarrow keeps the read-ahead of every row group it
        # has passed, and memory grows with the file (measured: +364 MB for 1M x 64 vs +50 MB without)
        pf = pq.ParquetFile(path, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several types
        raise DataError(f"cannot read {path} as Parquet ({exc})") from exc
    names = pf.schema_arrow.names
    if user_column not in names:
        raise DataError(f"{path} has no `{user_column}` column (columns: {names[:10]}): name the user id column "
                        f"`{user_column}` or pass user_column= / --user-column")
    numeric = [n for n in names if n != user_column]
    if embedding_column not in names:
        if not numeric:
            raise DataError(f"{path} has a `{user_column}` column but no `{embedding_column}` column or numeric columns")
        bad = [n for n in numeric if not (pa.types.is_integer(pf.schema_arrow.field(n).type) or pa.types.is_floating(pf.schema_arrow.field(n).type))]
        if bad:
            raise DataError(f"{path}: columns other than `{user_column}` must all be numbers, or name the list column "
                            f"`{embedding_column}` (non-numeric: {bad[:5]})")
    columns = [user_column, embedding_column] if embedding_column in names else None
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            users = [_user_str(u) for u in batch.column(batch.schema.names.index(user_column)).to_pylist()]
            if embedding_column in names:
                vectors = _parquet_matrix(batch, embedding_column, batch.schema.names, str(path), start)
            else:
                vectors = np.stack([np.asarray(batch.column(batch.schema.names.index(n)).cast(pa.float32()), dtype=np.float32)
                                    for n in numeric], axis=1)
            yield users, vectors
            start += len(users)
    except DataError as exc:
        raise DataError(f"{path}: rows from {start}: {exc}") from exc


def _iter_csv(path: Path, chunk_rows: int, user_column: str, embedding_column: str) -> Iterator[Chunk]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM as Excel writes it is not a column name
        reader = csv.reader(f)
        names = next(reader, [])
        if user_column not in names:
            raise DataError(f"{path} has no `{user_column}` column (columns: {names[:10]}): name the user id column `{user_column}`")
        ucol = names.index(user_column)
        ecol = names.index(embedding_column) if embedding_column in names else None
        numeric = [i for i, n in enumerate(names) if i != ucol]
        if ecol is None and not numeric:
            raise DataError(f"{path} has a `{user_column}` column but no `{embedding_column}` column or numeric columns")
        users: list[str] = []
        vectors: list = []
        for n, row in enumerate(reader, 1):
            if not row:
                continue
            if len(row) != len(names):
                raise DataError(f"{path}:{n + 1} has {len(row)} fields, the header has {len(names)}")
            users.append(row[ucol])
            if ecol is not None:
                try:
                    vectors.append(json.loads(row[ecol]))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: embedding of user {row[ucol]!r} is not a JSON list ({exc})") from exc
            else:
                try:
                    vectors.append([float(row[i]) for i in numeric])
                except ValueError as exc:
                    raise DataError(f"{path}:{n + 1}: columns other than `{user_column}` must all be numbers ({exc})") from exc
            if len(users) >= chunk_rows:
                yield users, vectors
                users, vectors = [], []
        if users:
            yield users, vectors


def _iter_jsonl(path: Path, chunk_rows: int, user_column: str, embedding_column: str) -> Iterator[Chunk]:
    users: list[str] = []
    vectors: list = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not JSON ({exc}): write one object per line") from exc
            if not isinstance(obj, dict) or user_column not in obj:
                raise DataError(f'{path}:{n} needs an object with "{user_column}" and "{embedding_column}"')
            if embedding_column in obj:
                vector = obj[embedding_column]
            else:
                vector = [v for k, v in obj.items() if k != user_column]
            users.append(_user_str(obj[user_column]))
            vectors.append(vector)
            if len(users) >= chunk_rows:
                yield users, vectors
                users, vectors = [], []
    if users:
        yield users, vectors


def _npy_member(f):
    """Header of an .npy stream -> (shape, dtype, fortran_order); the file is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _stream_npy(f, shape, dtype, chunk_rows: int) -> Iterator[np.ndarray]:
    """Rows of a C-order array from an open .npy stream, `chunk_rows` at a time."""
    row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    row_bytes = dtype.itemsize * row_items
    for start in range(0, shape[0] if shape else 0, chunk_rows):
        n = min(chunk_rows, shape[0] - start)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
            raise DataError("the array data ends early: the file is truncated")
        yield np.frombuffer(data, dtype=dtype).reshape((n,) + tuple(shape[1:]))


def _iter_npz(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    import zipfile

    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"cannot read {path} as .npz ({exc})") from exc
    with z:
        keys = {name[:-4] for name in z.namelist() if name.endswith(".npy")}
        ukey = next((k for k in ("user", "users") if k in keys), None)
        ekey = next((k for k in ("embedding", "embeddings") if k in keys), None)
        if ukey is None or ekey is None:
            raise DataError(f"{path} needs arrays `user` and `embedding` (found {sorted(keys)})")
        with z.open(ukey + ".npy") as fu, z.open(ekey + ".npy") as fe:
            ushape, ufortran, udtype = _npy_member(fu)
            eshape, efortran, edtype = _npy_member(fe)
            if udtype.hasobject or edtype.hasobject:
                raise DataError(f"cannot read {path} without pickle (object arrays): store user ids as a string array, not objects")
            if len(eshape) != 2 or len(ushape) != 1 or ushape[0] != eshape[0]:
                raise DataError(f"{path}: `embedding` must be [N, E] with one row per user (got {eshape} for {ushape[0] if ushape else 0} users)")
            if ufortran or efortran:
                raise DataError(f"{path}: Fortran-ordered arrays are not supported: save with np.ascontiguousarray")
            for users, matrix in zip(_stream_npy(fu, ushape, udtype, chunk_rows), _stream_npy(fe, eshape, edtype, chunk_rows)):
                yield [str(u) for u in users], matrix


def _iter_npy(path: Path, chunk_rows: int, ids_file: Path | None) -> Iterator[Chunk]:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        raise DataError(f"cannot read {path} without pickle ({exc}): save a numeric or structured array") from exc
    if arr.dtype.names:
        if not {"user", "embedding"} <= set(arr.dtype.names):
            raise DataError(f"{path}: a structured array needs fields `user` and `embedding` (has {arr.dtype.names})")
        for start in range(0, len(arr), chunk_rows):
            part = arr[start:start + chunk_rows]
            yield [str(u) for u in part["user"]], np.asarray(part["embedding"]).reshape(len(part), -1)
        return
    if arr.ndim != 2:
        raise DataError(f"{path}: expected an [N, E] array, got shape {arr.shape}")
    ids = open(ids_file) if ids_file is not None else None
    try:
        for start in range(0, len(arr), chunk_rows):
            part = np.asarray(arr[start:start + chunk_rows])
            if ids is None:
                users = [str(i) for i in range(start, start + len(part))]
            else:
                users = []
                while len(users) < len(part):
                    line = ids.readline()
                    if not line:
                        raise DataError(f"{path} has {len(arr)} rows but {ids_file} has fewer user ids")
                    if line.strip():
                        users.append(line.strip())
            yield users, part
        if ids is not None and any(line.strip() for line in ids):
            raise DataError(f"{path} has {len(arr)} rows but {ids_file} has more user ids")
    finally:
        if ids is not None:
            ids.close()


def iter_embedding_chunks(path: str | Path, ids_file: str | Path | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                          user_column: str = "user", embedding_column: str = "embedding") -> Iterator[Chunk]:
    """(user ids, vectors) chunks of at most `chunk_rows` rows from any import format (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(path, chunk_rows, user_column, embedding_column)
    if suffix == ".csv":
        return _iter_csv(path, chunk_rows, user_column, embedding_column)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _iter_jsonl(path, chunk_rows, user_column, embedding_column)
    if suffix == ".npz":
        return _iter_npz(path, chunk_rows)
    if suffix == ".npy":
        return _iter_npy(path, chunk_rows, Path(ids_file) if ids_file is not None else None)
    raise DataError(f"unknown file type {suffix!r}: use one of {', '.join(IMPORT_SUFFIXES)}")


def read_embeddings(path: str | Path, ids_file: str | Path | None = None, **columns) -> list[tuple[str, np.ndarray]]:
    """The whole file as (user, vector) pairs (for small files; `import_embeddings` streams)."""
    rows: list[tuple[str, np.ndarray]] = []
    for users, vectors in iter_embedding_chunks(path, ids_file, **columns):
        rows.extend(zip(users, list(vectors)))
    seen: dict[str, int] = {}
    for user, _ in rows:
        seen[user] = seen.get(user, 0) + 1
    dupes = [u for u, c in seen.items() if c > 1]
    if dupes:
        raise DataError(f"{path}: user ids appear more than once ({dupes[:5]}): keep one row per user")
    return rows


def import_embeddings(path: str | Path, store: EmbeddingStore, ids_file: str | Path | None = None,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS, user_column: str = "user",
                      embedding_column: str = "embedding") -> int:
    """Stream `path` into `store` in one transaction (nothing is written if any row is bad); memory ~ one chunk."""
    chunks = iter_embedding_chunks(path, ids_file, chunk_rows, user_column, embedding_column)
    try:
        n = store.import_chunks(chunks)
    except DataError as exc:
        msg = str(exc)
        raise DataError(msg if str(path) in msg else f"{path}: {msg}") from exc
    if not n:
        raise DataError(f"{path} holds no embeddings")
    return n
