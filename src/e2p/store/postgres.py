"""PostgresStore: the user store on a shared PostgreSQL database (`--store postgresql://...`), so that any number of
`e2p serve` replicas (and gateways in front of vLLM) read and write the same users.

The same interface, rows and errors as the SQLite store (e2p.store.sqlite): (tenant, user) keys, versions that grow by
one per write, live-profile sums written in the same transaction as the vector they made, all-or-nothing imports, the
dimension claimed once. It differs where a shared database must:

* No replica caches a vector: every request reads the row it uses (one primary-key lookup), so a PUT through one
  replica is what the next request on any replica gets, and a DELETE is seen at once.
* Connections come from a psycopg pool, each checked before use: when PostgreSQL goes away a request gets a
  `StoreUnavailableError` (the server answers 503 with Retry-After) within `timeout`, and when it comes back the
  pool reconnects without a restart.
* Imports stream their chunks with COPY into a temporary table, then merge in one transaction.
* The schema is created (or migrated) on first use under an advisory lock, so replicas starting together agree.
* Deletion: the rows are deleted and the tables vacuumed at once (`VACUUM` reclaims the dead tuples); `purge()` runs
  `VACUUM FULL`, which rewrites the tables so that a deleted vector's bytes are in none of their files. PostgreSQL's
  WAL and your backups keep the bytes until they are recycled or expire: see docs/privacy.md.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from typing import Iterable

import numpy as np

from ..errors import DataError
from .reads import StoreReads
from .rows import StoreError, StoreUnavailableError, UserEmbedding, record_from_row
from .vectors import DEFAULT_TENANT, as_vector, check_chunk, check_user_id, checked_rows, duplicate_in_chunk

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS e2p_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # "C" collation: ids sort by their bytes, as in SQLite, so listings page the same way on both backends
    'CREATE TABLE IF NOT EXISTS embeddings (tenant TEXT COLLATE "C" NOT NULL, "user" TEXT COLLATE "C" NOT NULL, '
    "vector BYTEA NOT NULL, dim INTEGER NOT NULL, version BIGINT NOT NULL, updated_at DOUBLE PRECISION NOT NULL, "
    'PRIMARY KEY (tenant, "user"))',
    'CREATE TABLE IF NOT EXISTS profiles (tenant TEXT COLLATE "C" NOT NULL, "user" TEXT COLLATE "C" NOT NULL, '
    'sums BYTEA NOT NULL, PRIMARY KEY (tenant, "user"))',
    # vectors stay inline and uncompressed (1.5 KB for 384-d): a row is one heap tuple, never a TOAST chunk elsewhere
    "ALTER TABLE embeddings ALTER COLUMN vector SET STORAGE PLAIN",
    "ALTER TABLE profiles ALTER COLUMN sums SET STORAGE PLAIN",
]
_UPSERT = ('INSERT INTO embeddings (tenant, "user", vector, dim, version, updated_at) VALUES (%s, %s, %s, %s, 1, %s) '
           'ON CONFLICT (tenant, "user") DO UPDATE SET vector=excluded.vector, dim=excluded.dim, '
           "version=embeddings.version + 1, updated_at=excluded.updated_at")
_SCHEMA_LOCK = 0x65327001  # pg_advisory_xact_lock key of the schema set-up


def is_postgres(spec: str) -> bool:
    return str(spec).startswith(("postgresql://", "postgres://"))


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


class PostgresStore(StoreReads):
    """Thread-safe store of user embeddings in PostgreSQL (psycopg 3 and its pool); see the module doc."""

    def __init__(self, dsn: str, dim: int | None = None, timeout: float = 5.0, pool_size: int = 8):
        try:
            import psycopg  # noqa: F401
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise StoreError(f"a postgresql:// store needs psycopg ({exc}): pip install 'e2p[postgres]'") from None
        self.dsn, self.path, self.timeout = dsn, redact(dsn), timeout
        self._dim: int | None = None
        self._lock = threading.RLock()
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, timeout=timeout, open=False,
                                   kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))},
                                   check=ConnectionPool.check_connection, name="e2p-store")
        self.pool.open(wait=False)
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM e2p_meta WHERE key='schema'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"store {self.path} has schema {row[0]}, this e2p knows {SCHEMA_VERSION}: upgrade e2p")
            conn.execute("INSERT INTO e2p_meta (key, value) VALUES ('schema', %s) ON CONFLICT (key) DO UPDATE "
                         "SET value=excluded.value", (str(SCHEMA_VERSION),))
        if dim is not None:
            self.claim_dim(dim)

    @contextlib.contextmanager
    def _conn(self):
        """A pooled connection; database errors become StoreError (StoreUnavailableError when it cannot be reached)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailableError(f"store {self.path} cannot be reached ({exc}): retry shortly") from None
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(f"store {self.path} cannot be reached ({str(exc).strip()}): retry shortly") from None
        except psycopg.Error as exc:
            raise StoreError(f"store {self.path} failed ({type(exc).__name__}: {str(exc).strip()})") from None

    def _read(self, sql: str, args: tuple = (), all_rows: bool = False):
        sql = sql.replace("?", "%s")  # StoreReads writes SQLite's placeholders
        with self._conn() as conn:
            cur = conn.execute(sql, args)
            return cur.fetchall() if all_rows else cur.fetchone()

    # --- dimension ----------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        if self._dim is None:
            row = self._read("SELECT value FROM e2p_meta WHERE key='dim'")
            self._dim = int(row[0]) if row else None
        return self._dim

    def claim_dim(self, dim: int) -> None:
        """As EmbeddingStore.claim_dim; once known the dimension never changes, so a write checks it without a query."""
        current = self.dim
        if current is None:
            with self._conn() as conn:
                conn.execute("INSERT INTO e2p_meta (key, value) VALUES ('dim', %s) ON CONFLICT (key) DO NOTHING",
                             (str(int(dim)),))
                current = self._dim = int(conn.execute("SELECT value FROM e2p_meta WHERE key='dim'").fetchone()[0])
        if current != dim:
            raise StoreError(f"store {self.path} holds {current}-dim embeddings but {dim} are needed: "
                             "use a separate store per encoder, or re-import with the projector's encoder")

    # --- single rows ------------------------------------------------------------------------------------------------
    def put(self, user: str, vector, tenant: str = DEFAULT_TENANT) -> UserEmbedding:
        check_user_id(user)
        v = as_vector(vector, self.dim)
        self.claim_dim(v.size)
        with self._conn() as conn, conn.transaction():
            conn.execute(_UPSERT, (tenant, user, v.tobytes(), v.size, time.time()))
            # a vector put from outside replaces the profile those sums made: later events start a new one
            conn.execute('DELETE FROM profiles WHERE tenant=%s AND "user"=%s', (tenant, user))
        record = self.get(user, tenant)
        assert record is not None
        return record

    def update_profile(self, user: str, update, tenant: str = DEFAULT_TENANT, create: bool = True
                       ) -> UserEmbedding | None:
        """As EmbeddingStore.update_profile; replicas folding events of one user at once take turns (an advisory
        lock on the user for the transaction), so each sees the other's sums."""
        check_user_id(user)
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{tenant}\x00{user}",))
            known = conn.execute('SELECT 1 FROM embeddings WHERE tenant=%s AND "user"=%s', (tenant, user)).fetchone()
            if known is None and not create:
                return None
            row = conn.execute('SELECT sums FROM profiles WHERE tenant=%s AND "user"=%s', (tenant, user)).fetchone()
            sums, vector = update(bytes(row[0]) if row else None)
            v = as_vector(vector, self.dim)
            self.claim_dim(v.size)
            conn.execute(_UPSERT, (tenant, user, v.tobytes(), v.size, time.time()))
            conn.execute('INSERT INTO profiles (tenant, "user", sums) VALUES (%s, %s, %s) ON CONFLICT (tenant, "user") '
                         "DO UPDATE SET sums=excluded.sums", (tenant, user, sums))
        record = self.get(user, tenant)
        assert record is not None
        return record

    def _record(self, user, blob, dim, version, updated_at) -> UserEmbedding:
        return record_from_row(user, bytes(blob) if blob is not None else blob, dim, int(version), float(updated_at),
                               self.dim)

    def delete(self, user: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Delete `tenant`'s `user` (vector and profile sums) and vacuum both tables, so the dead tuples are reclaimed
        now rather than at the next autovacuum; `purge()` goes further (VACUUM FULL)."""
        with self._conn() as conn:
            with conn.transaction():
                deleted = conn.execute('DELETE FROM embeddings WHERE tenant=%s AND "user"=%s', (tenant, user)).rowcount > 0
                conn.execute('DELETE FROM profiles WHERE tenant=%s AND "user"=%s', (tenant, user))
            conn.execute("VACUUM embeddings, profiles")
        return deleted

    def purge(self) -> None:
        """VACUUM FULL of the user tables: rewritten without the dead tuples, the old files removed, so deleted vectors
        are in none of the tables' files. It locks the tables while it runs (seconds per million users): run it in a
        quiet hour, or after a batch of deletions."""
        with self._conn() as conn:
            conn.execute("VACUUM FULL embeddings, profiles")

    def checkpoint(self) -> bool:
        """Nothing to do here (PostgreSQL checkpoints its WAL itself); for the SQLite store's interface."""
        return True

    def ping(self) -> None:
        self._read("SELECT 1")

    # --- bulk -----------------------------------------------------------------------------------------------------
    def put_many(self, items: Iterable[tuple[str, np.ndarray]], tenant: str = DEFAULT_TENANT) -> int:
        checked, dim = checked_rows(list(items), self.dim)
        if not checked:
            return 0
        self.claim_dim(dim)
        now = time.time()
        with self._conn() as conn, conn.transaction():
            with conn.cursor() as cur:
                cur.executemany(_UPSERT, [(tenant, u, v.tobytes(), v.size, now) for u, v in checked])
                cur.execute('DELETE FROM profiles WHERE tenant=%s AND "user" = ANY(%s)', (tenant, [u for u, _ in checked]))
        return len(checked)

    def import_chunks(self, chunks: Iterable[tuple[list[str], object]], tenant: str = DEFAULT_TENANT) -> int:
        """All-or-nothing streamed import: each checked chunk is COPYed into a temporary table (a savepoint per chunk
        names a user id seen twice), then merged in the same transaction; nothing is visible before the commit."""
        import psycopg

        total, dim = 0, self.dim
        with self._conn() as conn, conn.transaction():
            conn.execute('CREATE TEMP TABLE staged ("user" TEXT COLLATE "C" PRIMARY KEY, vector BYTEA NOT NULL, '
                         "dim INTEGER NOT NULL) ON COMMIT DROP")
            for users, vectors in chunks:
                if not len(users):
                    continue
                matrix, dim = check_chunk(users, vectors, total, dim)
                duplicate_in_chunk(users, total)
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        with cur.copy('COPY staged ("user", vector, dim) FROM STDIN') as copy:
                            size = matrix.shape[1]
                            for i, u in enumerate(users):
                                copy.write_row((u, matrix[i].tobytes(), size))
                except psycopg.errors.UniqueViolation:
                    seen = {r[0] for r in conn.execute('SELECT "user" FROM staged WHERE "user" = ANY(%s)', (list(users),))}
                    i = next(i for i, u in enumerate(users) if u in seen)
                    raise DataError(f"row {total + i}: user id {users[i]!r} appears more than once: keep one row per "
                                    "user") from None
                total += len(users)
            if total:
                conn.execute("INSERT INTO e2p_meta (key, value) VALUES ('dim', %s) ON CONFLICT (key) DO NOTHING",
                             (str(int(dim)),))
                current = int(conn.execute("SELECT value FROM e2p_meta WHERE key='dim'").fetchone()[0])
                if current != dim:
                    raise StoreError(f"store {self.path} holds {current}-dim embeddings but the file has {dim}: "
                                     "use a separate store per encoder")
                conn.execute('INSERT INTO embeddings (tenant, "user", vector, dim, version, updated_at) '
                             "SELECT %s, \"user\", vector, dim, 1, %s FROM staged ON CONFLICT (tenant, \"user\") DO UPDATE "
                             "SET vector=excluded.vector, dim=excluded.dim, version=embeddings.version + 1, "
                             "updated_at=excluded.updated_at", (tenant, time.time()))
                conn.execute('DELETE FROM profiles WHERE tenant=%s AND "user" IN (SELECT "user" FROM staged)', (tenant,))
        log.info("imported %d embeddings into %s", total, self.path)
        return total

    def close(self) -> None:
        self.pool.close()

