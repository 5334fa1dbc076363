"""Behavioural user encoders learned from click histories alone (no text), as a recommender team builds them.

Three encoders share one interface (``fit(histories)``, ``encode(histories) -> [N, dim]`` L2-normalized,
``save_pretrained`` / ``from_pretrained``; a user outside the fit is folded in from their clicks alone):

- :class:`CoClickEncoder` (``"coclick"``): truncated SVD of the weighted users x news matrix (below);
- :class:`ALSEncoder` (``"als"``): implicit-feedback ALS (Hu, Koren & Volinsky 2008) fitted with the
  ``implicit`` package; a user's vector is the exact least-squares solve against the item factors;
- :class:`Item2VecEncoder` (``"item2vec"``): item vectors from the SVD of the positive PMI of news co-clicks
  (what skip-gram item2vec factorizes, Levy & Goldberg 2014); a user is the idf-weighted mean of their items.

Use :func:`click_encoder` to build one by name.

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

from ..errors import ConfigError, DataError

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
    """``CoClickEncoder(dim=64).fit(histories)``; ``encode(histories) -> float32 [N, dim]``, L2-normalized.

    The base of the click encoders: subclasses change only how item factors are learned (`_factorize`) and how
    a user's weighted clicks map onto them (`_project`)."""

    SETTINGS: tuple[str, ...] = ()  # extra constructor arguments saved in the config

    def __init__(self, dim: int = 64, weighting: str = "bm25", k1: float = 1.2, b: float = 0.75,
                 on_empty: str = "zero", **_):
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
        self.idf = self.idf.astype(np.float32)
        self._factorize(self._weight(x, lengths), x)
        density = x.nnz / float(x.shape[0] * x.shape[1])
        log.info("%s: %d users x %d news (density %.4f), dim %d, %s weighting",
                 type(self).__name__, self.n_users, len(self.item_ids), density, self.dim, self.weighting)
        return self

    def _rank(self, shape) -> int:
        k = min(self.dim, min(shape) - 1)
        if k < self.dim:
            log.warning("%s dim %d > rank limit of a %dx%d matrix: using dim %d (fit more users for more)",
                        type(self).__name__, self.dim, shape[0], shape[1], k)
        self.dim = k
        return k

    def _factorize(self, w: sp.csr_matrix, x: sp.csr_matrix) -> None:
        """Item factors V (and singular values) of the weighted users x news matrix `w`."""
        s, v = _top_svd(w, self._rank(w.shape))
        self.item_factors, self.singular_values = v.astype(np.float32), s.astype(np.float32)

    def _project(self, w: sp.csr_matrix) -> np.ndarray:
        """User vectors (before normalization) from their weighted click rows."""
        return np.asarray(w @ self.item_factors.astype(np.float64))

    def _require_fit(self):
        if self.item_factors is None:
            raise ConfigError("CoClickEncoder is not fitted: call fit(histories) or CoClickEncoder.from_pretrained(dir)")

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
        e = self._project(self._weight(x, lengths))
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        e = np.where(norms > 0, e / np.maximum(norms, 1e-12), 0.0)
        return e.astype(np.float32)

    # -- persistence -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        self._require_fit()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"item_factors": np.ascontiguousarray(self.item_factors), "idf": np.ascontiguousarray(self.idf),
                   "singular_values": np.ascontiguousarray(self.singular_values)}, str(d / WEIGHTS_FILE))
        cfg = {"type": type(self).__name__, "format_version": 1, **self._settings(), "dim": self.dim, "weighting": self.weighting,
               "k1": self.k1, "b": self.b, "on_empty": self.on_empty, "avg_len": self.avg_len,
               "n_users": self.n_users, "item_ids": self.item_ids}
        (d / CONFIG_FILE).write_text(json.dumps(cfg), encoding="utf-8")
        log.info("saved co-click encoder (%d news, dim %d) to %s", len(self.item_ids), self.dim, d)
        return d

    def _settings(self) -> dict:
        return {}

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
            kind = ENCODERS_BY_CLASS.get(cfg.get("type", "CoClickEncoder"))
            if kind is None or (cls is not CoClickEncoder and kind is not cls):
                raise ConfigError(f"{d} holds a {cfg.get('type')!r}, not a {cls.__name__}")
            enc = kind(dim=int(cfg["dim"]), weighting=cfg["weighting"], k1=cfg["k1"], b=cfg["b"],
                       on_empty=cfg.get("on_empty", "zero"), **{k: cfg[k] for k in kind.SETTINGS})
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


def _top_svd(m, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k singular values and right vectors of `m` (dense exact when small), signs fixed so the
    largest-magnitude entry of each vector is positive (the SVD's sign ambiguity)."""
    if m.shape[0] * m.shape[1] <= _DENSE_LIMIT:
        _, s, vt = np.linalg.svd(m.toarray() if sp.issparse(m) else m, full_matrices=False)
        s, v = s[:k], vt[:k].T
    else:
        from scipy.sparse.linalg import svds

        v0 = np.random.default_rng(0).standard_normal(min(m.shape))
        _, s, vt = svds(m, k=k, v0=v0)
        order = np.argsort(-s)
        s, v = s[order], vt[order].T
    signs = np.sign(v[np.abs(v).argmax(axis=0), np.arange(k)])
    return s, v * np.where(signs == 0, 1.0, signs)


class ALSEncoder(CoClickEncoder):
    """Implicit-feedback ALS: confidence ``alpha * W(x)`` on clicked news, 0 preference elsewhere, fitted with
    the ``implicit`` package (``pip install implicit``; only fitting needs it). Every user, in the fit or not,
    gets the exact least-squares solve against the item factors Y:
    ``u = (Y^T Y + lambda I + sum_j (c_j - 1) y_j y_j^T)^-1 sum_j c_j y_j`` over their clicked news j."""

    SETTINGS = ("alpha", "regularization", "iterations", "seed")

    def __init__(self, dim: int = 32, weighting: str = "bm25", alpha: float = 10.0, regularization: float = 0.1,
                 iterations: int = 15, seed: int = 0, **kw):
        super().__init__(dim=dim, weighting=weighting, **kw)
        self.alpha, self.regularization = float(alpha), float(regularization)
        self.iterations, self.seed = int(iterations), int(seed)

    def _settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SETTINGS}

    def _factorize(self, w: sp.csr_matrix, x: sp.csr_matrix) -> None:
        try:
            from implicit.cpu.als import AlternatingLeastSquares
        except ImportError as e:
            raise ConfigError("ALSEncoder.fit needs the implicit package: pip install 'e2p[research]' "
                              "(or pip install implicit)") from e
        from threadpoolctl import threadpool_limits

        k = self._rank(w.shape)
        with threadpool_limits(1, "blas"):  # implicit's own threads do the work; a BLAS pool under them thrashes
            model = AlternatingLeastSquares(factors=k, regularization=self.regularization, alpha=self.alpha,
                                            iterations=self.iterations, random_state=self.seed, use_cg=False,
                                            num_threads=1)
            model.fit(w.astype(np.float32).tocsr(), show_progress=False)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
        self.singular_values = np.linalg.norm(self.item_factors, axis=0).astype(np.float32)

    def _project(self, w: sp.csr_matrix) -> np.ndarray:
        y = self.item_factors.astype(np.float64)
        base = y.T @ y + self.regularization * np.eye(y.shape[1])
        out = np.zeros((w.shape[0], y.shape[1]))
        for i in range(w.shape[0]):
            cols, conf = w.indices[w.indptr[i]:w.indptr[i + 1]], self.alpha * w.data[w.indptr[i]:w.indptr[i + 1]]
            if len(cols):
                yc = y[cols]
                out[i] = np.linalg.solve(base + (yc * (conf - 1.0)[:, None]).T @ yc, yc.T @ conf)
        return out


class Item2VecEncoder(CoClickEncoder):
    """Item vectors from the co-click PMI matrix (news clicked by the same user), shifted-positive and factorized
    by SVD (``V sqrt(S)``): the matrix skip-gram item2vec factorizes. A user is the weighted mean of the
    vectors of the news they clicked (the weighting's idf/bm25 weights)."""

    def _factorize(self, w: sp.csr_matrix, x: sp.csr_matrix) -> None:
        co = (x.T @ x).tocoo()
        keep = co.row != co.col
        rows, cols, n = co.row[keep], co.col[keep], co.data[keep]
        counts = np.asarray(x.sum(axis=0)).ravel()
        pmi = np.log(n * float(n.sum()) / (counts[rows] * counts[cols]))
        pos = pmi > 0
        m = sp.csr_matrix((pmi[pos], (rows[pos], cols[pos])), shape=(x.shape[1], x.shape[1]))
        s, v = _top_svd(m, self._rank(m.shape))
        self.item_factors = (v * np.sqrt(s)).astype(np.float32)
        self.singular_values = s.astype(np.float32)


ENCODERS = {"coclick": CoClickEncoder, "als": ALSEncoder, "item2vec": Item2VecEncoder}
ENCODERS_BY_CLASS = {c.__name__: c for c in ENCODERS.values()}


def click_encoder(kind: str = "coclick", **settings) -> CoClickEncoder:
    """A click encoder by name: ``"coclick"``, ``"als"`` or ``"item2vec"``."""
    if kind not in ENCODERS:
        raise ConfigError(f"unknown behaviour encoder {kind!r}: choose one of {sorted(ENCODERS)}")
    return ENCODERS[kind](**settings)
