"""The user store: (tenant, user) -> embedding, version and live-profile sums. `sqlite` is the embedded backend (one
file, WAL); `files` reads vector files (Parquet, CSV, JSONL, NPZ, NPY) for imports and training alike; `vectors`
holds the checks every id and vector passes wherever it comes from."""
from .importing import import_embeddings
from .sqlite import CorruptEmbeddingError, EmbeddingStore, StoreBusyError, StoreError, UserEmbedding
from .vectors import DEFAULT_TENANT

__all__ = ["DEFAULT_TENANT", "CorruptEmbeddingError", "EmbeddingStore", "StoreBusyError", "StoreError", "UserEmbedding",
           "import_embeddings"]
