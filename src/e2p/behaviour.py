"""Behavioural user encoder learned from click histories alone (no text): co-click factorization.

The users x news click matrix X (binary: clicked or not; repeated clicks count once) is weighted
(``"bm25"`` by default, ``"tfidf"`` or ``"binary"``) and factorized with a truncated SVD,
``W(X) ~ U S V^T``. A user's embedding is the projection of their weighted click vector onto the item
factors, ``e = W(x) V`` (= the row of ``U S`` for a user of the fit), L2-normalized. The same formula
folds in users who were not in the fit, so a new user with the same clicks as a fit user gets the same
vector. News IDs unknown to the fit are ignored; a history with no known ID gets the zero vector
(``on_empty="zero"``, logged) or raises :class:`~e2p.errors.DataError` (``on_empty="raise"``).

Weightings (N users in the fit, df_j users who clicked item j, n_i items clicked by user i):

- ``binary``: x_ij in {0, 1};
- ``tfidf``: x_ij * (log((1 + N) / (1 + df_j)) + 1), then each user row L2-normalized;
- ``bm25``: x_ij * (k1 + 1) / (k1 * (1 - b + b * n_i / avgdl) + 1) * log(1 + N / df_j)
  (BM25 with binary term frequency, avgdl the mean n_i of the fit; the usual implicit-feedback weighting).

Saved as ``behaviour.safetensors`` (item factors, idf, singular values) + ``behaviour_config.json`` (item IDs,
settings); never pickle.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "behaviour.safetensors"
CONFIG_FILE = "behaviour_config.json"
WEIGHTINGS = ("bm25", "tfidf", "binary")
_DENSE_LIMIT = 20_000_000  # cells; below this a dense exact SVD is fast and fully deterministic


def _check_histories(histories) -> list[Sequence[str]]:
    if isinstance(histories, (str, bytes)) or (len(histories) and isinstance(histories[0], str)):
        raise DataError("expected a list of click histories (each a list of news IDs); "
                        "wrap a single history in a list: encode([history])")
    return list(histories)


class CoClickEncoder:
    """``CoClickEncoder(dim=64).fit(histories)``; ``encode(histories) -> float32 [N, dim]``, L2-normalized."""

    def __init__(self, dim: int = 64, weighting: str = "bm25", k1: float = 1.2, b: float = 0.75,
                 on_empty: str = "zero"):
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if on_empty not in ("zero", "raise"):
            raise ConfigError(f"on_empty must be 'zero' or 'raise', got {on_empty!r}")
        if dim < 1:
            raise ConfigError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.weighting = weighting
        self.k1, self.b = float(k1), float(b)
        self.on_empty = on_empty
        self.item_ids: list[str] = []
        self._index: dict[str, int] = {}
        self.idf: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None  # V: [n_items, dim]
        self.singular_values: np.ndarray | None = None
        self.avg_len = 1.0
        self.n_users = 0

    # -- matrix building -------------------------------------------------------------------------------------
    def _binary(self, histories: Sequence[Iterable[str]]) -> tuple[sp.csr_matrix, np.ndarray]:
        """Binary [N, n_items] matrix of known clicks and, per user, how many known items they clicked."""
        rows, cols = [], []
        for i, h in enumerate(histories):
            known = {self._index[n] for n in h if n in self._index}
            rows.extend([i] * len(known))
            cols.extend(sorted(known))
        x = sp.csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)),
                          shape=(len(histories), len(self.item_ids)))
        return x, np.diff(x.indptr)

    def _weight(self, x: sp.csr_matrix, lengths: np.ndarray) -> sp.csr_matrix:
        if self.weighting == "binary":
            return x
        x = x @ sp.diags(self.idf)
        if self.weighting == "tfidf":
            norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
            return sp.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0)) @ x
        denom = self.k1 * (1.0 - self.b + self.b * lengths / self.avg_len) + 1.0
        return sp.diags((self.k1 + 1.0) / denom) @ x

    # -- fit / encode ----------------------------------------------------------------------------------------
    def fit(self, histories: Sequence[Iterable[str]]) -> "CoClickEncoder":
        """Learn item factors from the click histories of the training users (their order does not matter)."""
        histories = _check_histories(histories)
        self.item_ids = sorted({n for h in histories for n in h if n})
        self._index = {n: j for j, n in enumerate(self.item_ids)}
        x, lengths = self._binary(histories)
        keep = lengths > 0
        if keep.sum() < 2 or len(self.item_ids) < 2:
            raise DataError(f"co-click factorization needs at least 2 users with clicks and 2 news IDs, got "
                            f"{int(keep.sum())} users and {len(self.item_ids)} IDs")
        x, lengths = x[keep], lengths[keep]
        self.n_users = int(x.shape[0])
        self.avg_len = float(lengths.mean())
        df = np.asarray(x.sum(axis=0)).ravel()
        if self.weighting == "tfidf":
            self.idf = np.log((1.0 + self.n_users) / (1.0 + df)) + 1.0
        else:
            self.idf = np.log1p(self.n_users / df)
        w = self._weight(x, lengths)
        k = min(self.dim, min(w.shape) - 1)
        if k < self.dim:
            log.warning("co-click dim %d > rank limit of a %dx%d matrix: using dim %d (fit more users for more)",
                        self.dim, w.shape[0], w.shape[1], k)
        self.dim = k
        if w.shape[0] * w.shape[1] <= _DENSE_LIMIT:
            _, s, vt = np.linalg.svd(w.toarray(), full_matrices=False)
            s, v = s[:k], vt[:k].T
        else:
            from scipy.sparse.linalg import svds

            v0 = np.random.default_rng(0).standard_normal(min(w.shape))
            _, s, vt = svds(w, k=k, v0=v0)
            order = np.argsort(-s)
            s, v = s[order], vt[order].T
        # fix the SVD's sign ambiguity: the largest-magnitude entry of each item factor is positive
        signs = np.sign(v[np.abs(v).argmax(axis=0), np.arange(k)])
        v = v * np.where(signs == 0, 1.0, signs)
        self.item_factors = v.astype(np.float32)
        self.singular_values = s.astype(np.float32)
        self.idf = self.idf.astype(np.float32)
        density = x.nnz / float(x.shape[0] * x.shape[1])
        log.info("co-click encoder: %d users x %d news (density %.4f), dim %d, %s weighting",
                 self.n_users, len(self.item_ids), density, k, self.weighting)
        return self

    def _require_fit(self):
        if self.item_factors is None:
            raise ConfigError("CoClickEncoder is not fitted: call fit(histories) or CoClickEncoder.from_pretrained(dir)")

    def coverage(self, histories: Sequence[Iterable[str]]) -> np.ndarray:
        """Per history, the fraction of its distinct news IDs known to the fit (0 for an empty history)."""
        self._require_fit()
        out = []
        for h in _check_histories(histories):
            ids = set(h)
            out.append(sum(n in self._index for n in ids) / len(ids) if ids else 0.0)
        return np.asarray(out, dtype=np.float32)

    def encode(self, histories: Sequence[Iterable[str]], batch_size: int | None = None,
               show_progress_bar: bool = False) -> np.ndarray:
        """[N, dim] float32, L2-normalized; unknown IDs ignored; empty known history -> zero row or DataError.
        (batch_size and show_progress_bar are accepted for sentence-transformers compatibility and unused.)"""
        self._require_fit()
        histories = _check_histories(histories)
        x, lengths = self._binary(histories)
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            msg = f"{len(empty)} of {len(histories)} histories have no news ID known to the co-click encoder"
            if self.on_empty == "raise":
                raise DataError(f"{msg} (first: index {empty[0]}): refit on histories that include them, "
                                "or use on_empty='zero'")
            log.warning("%s: they get the zero vector", msg)
        e = np.asarray(self._weight(x, lengths) @ self.item_factors.astype(np.float64))
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        e = np.where(norms > 0, e / np.maximum(norms, 1e-12), 0.0)
        return e.astype(np.float32)

    def fit_encode(self, histories: Sequence[Iterable[str]]) -> np.ndarray:
        return self.fit(histories).encode(histories)

    # -- persistence -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        self._require_fit()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"item_factors": np.ascontiguousarray(self.item_factors), "idf": np.ascontiguousarray(self.idf),
                   "singular_values": np.ascontiguousarray(self.singular_values)}, str(d / WEIGHTS_FILE))
        cfg = {"type": "CoClickEncoder", "format_version": 1, "dim": self.dim, "weighting": self.weighting,
               "k1": self.k1, "b": self.b, "on_empty": self.on_empty, "avg_len": self.avg_len,
               "n_users": self.n_users, "item_ids": self.item_ids}
        (d / CONFIG_FILE).write_text(json.dumps(cfg), encoding="utf-8")
        log.info("saved co-click encoder (%d news, dim %d) to %s", len(self.item_ids), self.dim, d)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CoClickEncoder":
        from safetensors.numpy import load_file

        d = Path(directory)
        if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise ConfigError(f"{d} is not a saved CoClickEncoder: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                              "(written by CoClickEncoder.save_pretrained)")
        try:
            cfg = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(d / WEIGHTS_FILE))
            enc = cls(dim=int(cfg["dim"]), weighting=cfg["weighting"], k1=cfg["k1"], b=cfg["b"],
                      on_empty=cfg.get("on_empty", "zero"))
            enc.item_ids = [str(n) for n in cfg["item_ids"]]
            enc.avg_len, enc.n_users = float(cfg["avg_len"]), int(cfg["n_users"])
            enc.item_factors = tensors["item_factors"].astype(np.float32)
            enc.idf = tensors["idf"].astype(np.float32)
            enc.singular_values = tensors["singular_values"].astype(np.float32)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{d}: corrupt CoClickEncoder files ({e}); re-save it with save_pretrained") from e
        n = len(enc.item_ids)
        if enc.item_factors.shape != (n, enc.dim) or enc.idf.shape != (n,) or len(set(enc.item_ids)) != n:
            raise ConfigError(f"{d}: item_factors {enc.item_factors.shape} / idf {enc.idf.shape} do not match "
                              f"{n} item ids and dim {enc.dim}; re-save it with save_pretrained")
        enc._index = {n_: j for j, n_ in enumerate(enc.item_ids)}
        return enc
