"""Streamed, all-or-nothing imports of vector files into a store: `import_embeddings` reads any file
`e2p.store.files` reads in chunks and hands them to the store's `import_chunks`; `stage_chunk` adds one checked chunk to
the import's temporary table, refusing a user id seen before in the file."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from ..errors import DataError
from .files import DEFAULT_CHUNK_ROWS, iter_embedding_chunks
from .vectors import DEFAULT_TENANT, duplicate_in_chunk


def stage_chunk(db: sqlite3.Connection, users: list[str], matrix: np.ndarray, start: int) -> None:
    """Add a checked chunk to the staging table; DataError on a user id seen before in the file."""
    duplicate_in_chunk(users, start)
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


def import_embeddings(path: str | Path, store, ids_file: str | Path | None = None,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS, user_column: str = "user",
                      embedding_column: str = "embedding", tenant: str = DEFAULT_TENANT) -> int:
    """Stream `path` into `store` (as `tenant`'s users) in one transaction (nothing is written if any row is bad);
    memory ~ one chunk."""
    chunks = iter_embedding_chunks(path, ids_file, chunk_rows, user_column, embedding_column)
    try:
        n = store.import_chunks(chunks, tenant)
    except DataError as exc:
        msg = str(exc)
        raise DataError(msg if str(path) in msg else f"{path}: {msg}") from exc
    if not n:
        raise DataError(f"{path} holds no embeddings")
    return n
