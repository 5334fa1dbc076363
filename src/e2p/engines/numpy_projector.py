"""A projector without torch: the same formula as `e2p.Projector`, in numpy, read from the same two files.

A llama.cpp program (here through llama-cpp-python, elsewhere in C, Go, Swift...) needs only `config.json`,
`model.safetensors` and this formula to put a user's prefix in front of the model's input (docs/edge.md):

    x      = embedding - embedding_mean;  x = x / |x|
    h(x)   = W_n (... GELU(W_1 x + b_1) ...) + b_n          (the MLP; no hidden layer: one linear map)
    prefix = shared + person_scale * (h(x) - h(0)),  reshaped to (k, hidden_size)
    prefix = prefix / |prefix| * token_embedding_norm        (each of the k rows, when output_norm)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..config import refuse_removed, resolve_projector
from ..errors import ConfigError, EmbeddingError

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU torch.nn.GELU computes."""
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))).astype(x.dtype)


class NumpyProjector:
    """An input-injection projector (or a shared prefix) as numpy arrays: embeddings [B, E] -> prefixes [B, k, D]."""

    def __init__(self, config: dict, tensors: dict[str, np.ndarray]):
        if config.get("injection", "input") != "input":
            raise ConfigError("this projector uses deep injection (a key/value prefix inside every layer), which a "
                              "llama.cpp program cannot feed in through its input: use an input-injection projector "
                              "(e2p train --injection input; shipped: persona-input-k1)")
        if config.get("embedding_slots", 1) != 1:
            raise ConfigError("sentence-slot projectors are not supported outside torch")
        if config.get("set_items", 0) and config.get("embedding_dim"):
            raise ConfigError("a set-profile projector pools a user's items with attention, which this numpy formula "
                              "does not: run it on torch, llama.cpp or vLLM (they call the torch projector)")
        if config.get("lora_rank", 0):
            raise ConfigError("this projector carries a shared LoRA adapter (e2p train --lora-rank) that changes the "
                              "backbone's layers; a llama.cpp program runs the GGUF's weights as they are: use a "
                              "projector trained without --lora-rank, or the torch engine")
        self.config = config
        self.shared = tensors["shared"].astype(np.float32)
        self.mean = tensors.get("embedding_mean", np.zeros(config["embedding_dim"], np.float32)).astype(np.float32)
        n = len(config.get("hidden_dims", []))
        # nn.Sequential indices: Linear, GELU, Dropout per hidden layer, then the last Linear
        self.layers = [(tensors[f"mlp.{3 * i}.weight"], tensors[f"mlp.{3 * i}.bias"]) for i in range(n)]
        if config["embedding_dim"]:
            self.layers.append((tensors[f"mlp.{3 * n}.weight"], tensors[f"mlp.{3 * n}.bias"]))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "NumpyProjector":
        """The folder `e2p train` writes (or a shipped name), read with safetensors' numpy loader: no torch."""
        from safetensors.numpy import load_file

        folder = resolve_projector(name_or_path)
        try:
            config = json.loads((folder / "config.json").read_text())
            tensors = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the projector in {folder} ({exc}); retrain or restore it") from exc
        refuse_removed(config, folder / "config.json")
        return cls(config, tensors)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.config["num_prefix_tokens"])

    def _mlp(self, x: np.ndarray) -> np.ndarray:
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = gelu(x)
        return x

    def __call__(self, embeddings: np.ndarray | None = None, batch_size: int = 1) -> np.ndarray:
        k, d = self.shared.shape
        if not self.config["embedding_dim"]:
            out = np.broadcast_to(self.shared, (batch_size, k, d)).copy()
        else:
            e = np.asarray(embeddings, dtype=np.float32)
            e = e[None] if e.ndim == 1 else e
            if e.ndim != 2 or e.shape[1] != self.config["embedding_dim"]:
                raise EmbeddingError(f"expected embeddings of size {self.config['embedding_dim']}, got shape {e.shape}")
            if not np.isfinite(e).all():
                raise EmbeddingError("embeddings contain NaN or inf values: recompute them before use")
            x = e - self.mean
            x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
            person = self._mlp(np.concatenate([x, np.zeros_like(x[:1])]))
            person = person[:-1] - person[-1:]
            out = self.shared[None] + float(self.config.get("person_scale", 1.0)) * person.reshape(-1, k, d)
        if self.config.get("output_norm", True):
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-6) * self.config["token_embedding_norm"]
        return out.astype(np.float32)
