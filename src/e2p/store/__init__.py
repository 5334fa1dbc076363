"""The user store: (tenant, user) -> embedding, version and live-profile sums. `sqlite` is the embedded backend (one
file, WAL); `postgres` the shared one every replica reads and writes (`postgresql://...`); `open_store` picks by the
address. `files` reads vector files (Parquet, CSV, JSONL, NPZ, NPY) for imports and training alike; `vectors` holds
the checks every id and vector passes wherever it comes from."""
from .importing import import_embeddings
from .rows import CorruptEmbeddingError, StoreBusyError, StoreError, StoreUnavailableError, UserEmbedding
from .sqlite import EmbeddingStore
from .vectors import DEFAULT_TENANT


def open_store(spec, dim: int | None = None):
    """A `postgresql://user@host:port/db` address -> PostgresStore (shared by replicas); anything else is a SQLite file."""
    from .postgres import PostgresStore, is_postgres

    return PostgresStore(str(spec), dim=dim) if is_postgres(str(spec)) else EmbeddingStore(spec, dim=dim)


__all__ = ["DEFAULT_TENANT", "CorruptEmbeddingError", "EmbeddingStore", "StoreBusyError", "StoreError",
           "StoreUnavailableError", "UserEmbedding",
           "import_embeddings", "open_store"]
