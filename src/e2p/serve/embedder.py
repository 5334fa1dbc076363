"""Text -> the user embedding the served projector reads, for `POST /v1/embeddings` and `PUT ... {"text": ...}`.

The encoder is the one the projector was trained with (`encoders.encoder_for`: its name, and one vector per
sentence when it has sentence slots), so a client never has to build slot layouts or install an encoder.
It is loaded on first use, not at start-up: servers whose clients send vectors never pay for it.
"""
from __future__ import annotations

import threading

import numpy as np

from ..data.encoders import encoder_for
from ..errors import ConfigError

MAX_INPUTS = 256
MAX_CHARS = 20_000


class TextEmbeddingError(ValueError):
    """A request's texts cannot be embedded (empty, too many, too long); the message says what to change."""


class UserEmbedder:
    """`rule` (e2p.data.live_profile.ProfileRule): the projector's live-profile rule, when its embedding is more than
    the encoder's vector (a text + style profile): a text is then embedded as a profile of that one text."""

    def __init__(self, projector_config, encoder=None, rule=None):
        self.config, self.rule = projector_config, rule
        self._encoder = encoder
        self._lock = threading.Lock()  # one load, and one encode at a time (the model is not thread-safe)

    @property
    def name(self) -> str:
        return self.config.encoder_name or "all-MiniLM-L6-v2"

    def _loaded(self):
        if self._encoder is None:
            self._encoder = encoder_for(self.config)
        return self._encoder

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """-> ([N, embedding_dim] float32, input tokens counted by the encoder's tokenizer). Blocking: run it in a
        thread. Raises TextEmbeddingError for bad input, ConfigError when the encoder cannot be loaded."""
        if self.rule is not None:
            items, tokens = self.encode_items(texts)
            return self.rule.each(items, texts), tokens
        return self._encode(texts, self.config.embedding_dim)

    def encode_items(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """-> ([N, encoder dim] float32: the encoder's own vectors, what a live profile folds in, input tokens)."""
        return self._encode(texts, self.rule.dim if self.rule is not None else self.config.embedding_dim)

    def _encode(self, texts: list[str], dim: int) -> tuple[np.ndarray, int]:
        if not texts:
            raise TextEmbeddingError("input is empty: send a text or a list of texts")
        if len(texts) > MAX_INPUTS:
            raise TextEmbeddingError(f"{len(texts)} inputs, the limit is {MAX_INPUTS}: send several requests")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise TextEmbeddingError(f"input {i} is empty: every input must be non-empty text")
            if len(t) > MAX_CHARS:
                raise TextEmbeddingError(f"input {i} has {len(t)} characters, the limit is {MAX_CHARS}: shorten it")
        with self._lock:
            encoder = self._loaded()
            vectors = np.asarray(encoder.encode(list(texts)), dtype=np.float32)
            tokens = _count_tokens(encoder, texts)
        if vectors.shape != (len(texts), dim):
            raise ConfigError(f"encoder {self.name!r} gives {vectors.shape[-1]} values, the projector reads "
                              f"{dim}: serve the projector with the encoder it was trained with")
        return vectors, tokens


def _count_tokens(encoder, texts: list[str]) -> int:
    inner = getattr(encoder, "inner", encoder)
    tokenizer = getattr(getattr(inner, "model", None), "tokenizer", None)
    if tokenizer is None:
        return sum(len(t.split()) for t in texts)
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
