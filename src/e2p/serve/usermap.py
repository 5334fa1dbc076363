"""The playground's map of a tenant's users: their embeddings projected to two dimensions (PCA, numpy), on the
server, so that only two coordinates per user ever leave it and never a vector."""
from __future__ import annotations

import numpy as np


def as_the_projector_reads(vectors: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Rows centred by the projector's embedding mean (when it has one of the right size) and scaled to unit
    length: the projector reads a vector's direction from its mean, so the map shows what the projector tells
    apart. All-zero rows stay zero."""
    x = np.asarray(vectors, dtype=np.float64)
    if mean is not None and mean.size and x.shape[1] % mean.size == 0:
        x = x - np.tile(mean.astype(np.float64), x.shape[1] // mean.size)  # one mean per slot for slot projectors
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """-> ([N, 2] coordinates on the first two principal components, the share of the variance each explains).
    Signs are fixed (each component's largest loading is positive) so the same users give the same picture; with
    fewer than two users or one dimension the missing coordinates are 0."""
    n = x.shape[0]
    coords = np.zeros((n, 2))
    if n < 2:
        return coords, [0.0, 0.0]
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    for j in range(k):
        if vt[j, np.argmax(np.abs(vt[j]))] < 0:
            vt[j] = -vt[j]
    coords[:, :k] = centred @ vt[:k].T
    total = float((s ** 2).sum())
    shares = [float(s[j] ** 2 / total) if total > 0 and j < k else 0.0 for j in range(2)]
    return coords, shares
