"""The store's reads, the same SQL on every backend (SQLite and PostgreSQL): `?` placeholders (a backend's `_read`
adapts them) and the `"user"` column quoted (a keyword in PostgreSQL). A backend provides `_read(sql, args,
all_rows)` and `_record(user, blob, dim, version, updated_at)` (a checked UserEmbedding)."""
from __future__ import annotations

from .vectors import DEFAULT_TENANT, next_string


class StoreReads:
    """Lookups, counts, listings and the playground's records of (tenant, user) rows."""

    def profile_sums(self, user: str, tenant: str = DEFAULT_TENANT) -> bytes | None:
        """The running sums of `tenant`'s `user`'s live profile (None: no events folded since the last PUT)."""
        row = self._read('SELECT sums FROM profiles WHERE tenant=? AND "user"=?', (tenant, user))
        return None if row is None else bytes(row[0])

    def get(self, user: str, tenant: str = DEFAULT_TENANT):
        """`tenant`'s stored record of `user`, or None; CorruptEmbeddingError if the row holds no usable vector."""
        row = self._read('SELECT "user", vector, dim, version, updated_at FROM embeddings WHERE tenant=? AND "user"=?',
                         (tenant, user))
        return None if row is None else self._record(*row)

    def __len__(self) -> int:
        """Users of every tenant."""
        return int(self._read("SELECT COUNT(*) FROM embeddings")[0])

    def count(self, tenant: str = DEFAULT_TENANT) -> int:
        return int(self._read("SELECT COUNT(*) FROM embeddings WHERE tenant=?", (tenant,))[0])

    def users(self, limit: int = 100, after: str = "", tenant: str = DEFAULT_TENANT) -> list[str]:
        rows = self._read('SELECT "user" FROM embeddings WHERE tenant=? AND "user" > ? ORDER BY "user" LIMIT ?',
                          (tenant, after, int(limit)), all_rows=True)
        return [r[0] for r in rows]

    def listing(self, limit: int = 100, after: str = "", prefix: str = "", tenant: str = DEFAULT_TENANT) -> list[dict]:
        """`tenant`'s users whose id starts with `prefix`, after `after`, in id order: their metadata (id, dim,
        version, update time), never the vector. A range scan of the (tenant, user) key: cheap in a store of millions."""
        sql, args = 'SELECT "user", dim, version, updated_at FROM embeddings WHERE tenant=? AND "user" > ?', [tenant, after]
        if prefix:
            sql += ' AND "user" >= ?'
            args.append(prefix)
            upper = next_string(prefix)
            if upper is not None:
                sql += ' AND "user" < ?'
                args.append(upper)
        rows = self._read(sql + ' ORDER BY "user" LIMIT ?', (*args, int(limit)), all_rows=True)
        return [{"user": u, "dim": d, "version": int(v), "updated_at": float(t)} for u, d, v, t in rows]

    def records(self, limit: int = 1000, tenant: str = DEFAULT_TENANT) -> tuple[list, int]:
        """The first `limit` of `tenant`'s users in id order, with their vectors, and how many rows were damaged
        (skipped: a damaged row is that user's problem, not the reader's)."""
        from .rows import CorruptEmbeddingError

        rows = self._read('SELECT "user", vector, dim, version, updated_at FROM embeddings WHERE tenant=? '
                          'ORDER BY "user" LIMIT ?', (tenant, int(limit)), all_rows=True)
        out, damaged = [], 0
        for row in rows:
            try:
                out.append(self._record(*row))
            except CorruptEmbeddingError:
                damaged += 1
        return out, damaged
