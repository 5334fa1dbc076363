"""EmbeddingStore: user id -> embedding, in SQLite (WAL mode), safe to share between threads and processes.

Every row holds the vector as float32 bytes, its dimension, a version that grows by one on each update,
and the update time. A store remembers its embedding dimension (set by the first write, or by whoever
opens it with `dim=`), so a server and `e2p users import` cannot mix vectors of different encoders.

`import_embeddings(path, store)` streams a file (any format `embedding_files` reads, no pickle) in chunks of
`chunk_rows` rows, so memory stays flat however large the file (1M x 64 measured by
benchmarks/import_scale.py), stages them in a temporary on-disk table and merges them in ONE short SQLite
transaction: a bad row anywhere (wrong size, NaN/inf, a bad or duplicate user id) stops the import before
anything is written and names the row. While the file is read, other writers (a running `e2p serve`'s
PUTs) go on; they wait only for the final merge. Readers never wait (WAL, a reader connection of their own).

Every row belongs to a tenant: the key is (tenant, user), so the same user id in two tenants names two people
(a server takes the tenant from the request's API key, never from its body). Stores written before tenants
existed are migrated when opened: their rows become the `default` tenant's.

Deletion deletes: every connection runs with `PRAGMA secure_delete=ON` (freed cells and pages are overwritten
with zeros) and `delete` ends with a `wal_checkpoint(TRUNCATE)`, so a deleted vector's bytes are in none of the
store's files (database, -wal, -shm) afterwards (tested on the raw files). The same holds for a user's live-profile
running sums (table `profiles`, `update_profile`), which are written and deleted with the vector.

Files are read by `e2p.store.files` (the one reader the store, the data contract and the CLI share) and
ids and vectors checked by `e2p.store.vectors`.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from .importing import stage_chunk
from .reads import StoreReads
from .rows import StoreBusyError, StoreError, UserEmbedding, record_from_row
from .vectors import DEFAULT_TENANT, as_vector, check_chunk, check_user_id, checked_rows

log = logging.getLogger(__name__)



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


_ON_CONFLICT = ("ON CONFLICT(tenant, user) DO UPDATE SET vector=excluded.vector, dim=excluded.dim, "
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


_UPSERT = ("INSERT INTO embeddings (tenant, user, vector, dim, version, updated_at) VALUES (?, ?, ?, ?, 1, ?) "
           + _ON_CONFLICT)
# a user's live-profile running sums (e2p.data.live_profile.ProfileSums, float64 bytes, never texts), kept beside
# the embedding they made; written in the same transaction as it, dropped when a PUT or an import replaces it
_CREATE_PROFILES = ("CREATE TABLE IF NOT EXISTS profiles (tenant TEXT NOT NULL, user TEXT NOT NULL, sums BLOB NOT NULL, "
                    "PRIMARY KEY (tenant, user))")
_CREATE = ("CREATE TABLE IF NOT EXISTS embeddings (tenant TEXT NOT NULL, user TEXT NOT NULL, vector BLOB NOT NULL, "
           "dim INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (tenant, user))")


def _migrate(db: sqlite3.Connection) -> None:
    """A store from before tenants (key: user) -> the (tenant, user) table, its rows the default tenant's; one
    transaction, so a crash leaves the old table as it was. secure_delete wipes the old table's pages."""
    with _immediate(db):
        columns = [row[1] for row in db.execute("PRAGMA table_info(embeddings)")]
        if not columns or "tenant" in columns:
            return
        db.execute("ALTER TABLE embeddings RENAME TO embeddings_before_tenants")
        db.execute(_CREATE)
        db.execute("INSERT INTO embeddings (tenant, user, vector, dim, version, updated_at) "
                   "SELECT ?, user, vector, dim, version, updated_at FROM embeddings_before_tenants", (DEFAULT_TENANT,))
        db.execute("DROP TABLE embeddings_before_tenants")
    log.info("store migrated: its users are now the %r tenant's", DEFAULT_TENANT)


class EmbeddingStore(StoreReads):
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
                _migrate(self._db)
                self._db.execute(_CREATE)
                self._db.execute(_CREATE_PROFILES)
                self._reader = self._connect()
                self._reader.execute("SELECT COUNT(*) FROM meta").fetchone()
        except StoreError as exc:
            raise StoreError(f"{self.path} is not a usable SQLite store ({exc.__cause__}): pass a new path or restore "
                             "the file from a backup") from exc
        if dim is not None:
            self.claim_dim(dim)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=self.timeout, check_same_thread=False, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        db.execute("PRAGMA secure_delete=ON")  # freed cells and pages are zeroed: a deleted vector leaves no bytes
        return db

    def _read(self, sql: str, args: tuple = (), all_rows: bool = False):
        with self._read_lock, _sqlite_errors(self.path):
            cur = self._reader.execute(sql, args)
            return cur.fetchall() if all_rows else cur.fetchone()

    # --- dimension ----------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """The dimension of every vector in this store; None while it is empty and nobody has claimed one."""
        if self._dim is None:  # once claimed it never changes; get() checks it on every read
            row = self._read("SELECT value FROM meta WHERE key='dim'")
            self._dim = int(row[0]) if row else None
        return self._dim

    def claim_dim(self, dim: int) -> None:
        """Fix the store's dimension to `dim` (a server claims its projector's at start-up); StoreError if it
        already holds vectors of another size, so that a store of another encoder fails before the first request."""
        with self._lock, _sqlite_errors(self.path):
            current = self.dim
            if current is None:
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dim', ?)", (str(int(dim)),))
            elif current != dim:
                raise StoreError(f"store {self.path} holds {current}-dim embeddings but {dim} are needed: "
                                 "use a separate store per encoder, or re-import with the projector's encoder")

    # --- single rows ----------------------------------------------------------------------------
    def put(self, user: str, vector, tenant: str = DEFAULT_TENANT) -> UserEmbedding:
        """Insert or replace `tenant`'s `user`; the version goes up by one on every update."""
        check_user_id(user)
        with self._lock:
            v = as_vector(vector, self.dim)
            self.claim_dim(v.size)
            with _sqlite_errors(self.path):
                self._write_transaction([(tenant, user, v.tobytes(), v.size, time.time())])
            record = self.get(user, tenant)
        assert record is not None
        return record

    def _write_transaction(self, rows: list[tuple]) -> None:
        with _immediate(self._db):
            self._db.executemany(_UPSERT, rows)
            # a vector put from outside replaces the profile those sums made: later events start a new one
            self._db.executemany("DELETE FROM profiles WHERE tenant=? AND user=?", [r[:2] for r in rows])

    def update_profile(self, user: str, update, tenant: str = DEFAULT_TENANT, create: bool = True
                       ) -> UserEmbedding | None:
        """Fold into `tenant`'s `user`'s live profile in one write transaction: `update(sums bytes or None)` ->
        (new sums bytes, new vector); the vector is stored (version + 1) with its sums, so two replicas folding at
        once each see the other's sums. None, and nothing written, for an unknown user when `create` is False."""
        check_user_id(user)
        with self._lock:
            with _sqlite_errors(self.path), _immediate(self._db):
                known = self._db.execute("SELECT 1 FROM embeddings WHERE tenant=? AND user=?", (tenant, user)).fetchone()
                if known is None and not create:
                    return None
                row = self._db.execute("SELECT sums FROM profiles WHERE tenant=? AND user=?", (tenant, user)).fetchone()
                sums, vector = update(row[0] if row else None)
                v = as_vector(vector, self.dim)
                self.claim_dim(v.size)
                self._db.execute(_UPSERT, (tenant, user, v.tobytes(), v.size, time.time()))
                self._db.execute("INSERT INTO profiles (tenant, user, sums) VALUES (?, ?, ?) ON CONFLICT(tenant, user) "
                                 "DO UPDATE SET sums=excluded.sums", (tenant, user, sums))
            record = self.get(user, tenant)
        assert record is not None
        return record

    def _record(self, user, blob, dim, version, updated_at) -> UserEmbedding:
        return record_from_row(user, blob, dim, version, updated_at, self.dim)

    def delete(self, user: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Delete `tenant`'s `user`; True if there was one. The row's bytes are zeroed (secure_delete) and the WAL,
        which still holds the pages written before, is checkpointed into the database and truncated (also when there
        was no such user, so that a retry wipes what a reader kept in the WAL before)."""
        with self._lock, _sqlite_errors(self.path):
            with _immediate(self._db):
                cur = self._db.execute("DELETE FROM embeddings WHERE tenant=? AND user=?", (tenant, user))
                deleted = cur.rowcount > 0
                self._db.execute("DELETE FROM profiles WHERE tenant=? AND user=?", (tenant, user))
            self.checkpoint()  # also when nobody was deleted: the same work (and time) either way, and a retry wipes
        return deleted

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes; False (and a warning) when a reader of
        another connection holds an old snapshot past the busy timeout: the WAL is truncated at the next one."""
        with self._lock, _sqlite_errors(self.path):
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning("store %s: a reader held the WAL; it is truncated at the next delete or checkpoint", self.path)
        return not busy

    def ping(self) -> None:
        """A read the store must answer (readiness); StoreError when it cannot."""
        self._read("SELECT COUNT(*) FROM meta")

    # --- bulk -------------------------------------------------------------------------------------
    def put_many(self, items: Iterable[tuple[str, np.ndarray]], tenant: str = DEFAULT_TENANT) -> int:
        """All-or-nothing import in one transaction; returns the number of rows written."""
        items = list(items)
        with self._lock:
            checked, dim = checked_rows(items, self.dim)
            if not checked:
                return 0
            self.claim_dim(dim)
            now = time.time()
            with _sqlite_errors(self.path):
                self._write_transaction([(tenant, u, v.tobytes(), v.size, now) for u, v in checked])
        log.info("imported %d embeddings into %s", len(checked), self.path)
        return len(checked)

    def import_chunks(self, chunks: Iterable[tuple[list[str], object]], tenant: str = DEFAULT_TENANT) -> int:
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
                    stage_chunk(db, users, matrix, total)
                    total += len(users)
                db.execute("COMMIT")
                if total:
                    self._merge(db, dim, tenant)
        finally:
            db.close()
        log.info("imported %d embeddings into %s", total, self.path)
        return total

    def _merge(self, db: sqlite3.Connection, dim: int, tenant: str) -> None:
        """Staged rows -> the store, in one transaction that also claims the dimension."""
        with _immediate(db):
            current = db.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
            if current is not None and int(current[0]) != dim:
                raise StoreError(f"store {self.path} holds {current[0]}-dim embeddings but the file has {dim}: "
                                 "use a separate store per encoder")
            if current is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(int(dim)),))
            db.execute("INSERT INTO embeddings (tenant, user, vector, dim, version, updated_at) "
                       "SELECT ?, user, vector, dim, 1, ? FROM temp.staged WHERE true " + _ON_CONFLICT,
                       (tenant, time.time()))
            db.execute("DELETE FROM profiles WHERE tenant=? AND user IN (SELECT user FROM temp.staged)", (tenant,))

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()
