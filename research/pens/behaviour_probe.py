"""Do click embeddings carry how a user writes? A probe of every candidate encoder without the language model.

    python research/pens/behaviour_probe.py --src ../shared/data/pens --data data/pens --out runs/pens-probe

On the training-pool users only (never the test users' headlines), for each click encoder (kind x dimension x
weighting; clicks of every user, as `e2p data pens` fits them):
- Mantel test: the correlation, over pairs of users, between how alike two users' clicks are (cosine of
  their click embeddings) and how alike their headlines are (cosine of their MiniLM text profiles, from their
  history headlines), with a permutation p-value;
- identification: ridge regression from click embedding to text profile fitted on half the users; how often a
  held-out user's predicted profile is nearest their own among the other held-out users (20 random halves).
References on the same users: the text profile of one half of each user's history as the "embedding" of the
other half (what a signal that does carry the person gives), and random vectors (chance).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from e2p import TextEncoder
from e2p.data.behaviour import click_encoder
from e2p.data.contract import load_users
from e2p.data.pens import load_pens, split_headlines

CANDIDATES = [(k, d, w) for k in ("coclick", "als", "item2vec") for d in (8, 16, 32, 64) for w in ("bm25",)] + \
             [("coclick", 16, "binary"), ("als", 16, "binary"), ("coclick", 16, "tfidf")]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mantel(a: np.ndarray, b: np.ndarray, perms: int = 1000, seed: int = 0) -> tuple[float, float]:
    iu = np.triu_indices(len(a), 1)
    sa, sb = (unit(a) @ unit(a).T)[iu], (unit(b) @ unit(b).T)[iu]
    r = float(np.corrcoef(sa, sb)[0, 1])
    rng, full_b = np.random.default_rng(seed), unit(b) @ unit(b).T
    null = []
    for _ in range(perms):
        p = rng.permutation(len(a))
        null.append(np.corrcoef(sa, full_b[p][:, p][iu])[0, 1])
    return r, float((1 + np.sum(np.abs(null) >= abs(r))) / (1 + perms))


def identification(x: np.ndarray, y: np.ndarray, lam: float = 1.0, reps: int = 20) -> float:
    n, acc = len(x), []
    for r in range(reps):
        p = np.random.default_rng(r).permutation(n)
        a, b = p[: n // 2], p[n // 2:]
        xm, ym = x[a].mean(0), y[a].mean(0)
        w = np.linalg.solve((x[a] - xm).T @ (x[a] - xm) + lam * np.eye(x.shape[1]), (x[a] - xm).T @ (y[a] - ym))
        sim = ((x[b] - xm) @ w) @ (y[b] - ym).T
        acc.append(float(np.mean(sim.argmax(1) == np.arange(len(b)))))
    return float(np.mean(acc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="the PENS file or folder")
    ap.add_argument("--data", required=True, help="a folder `e2p data pens` wrote (its training pool is probed)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pens = load_pens(args.src)
    of = {u.user_id: u for u in pens}
    ids = load_users(Path(args.data) / "users_text.npz").ids  # the training pool
    encoder = TextEncoder()
    halves = [np.stack([unit(np.asarray(encoder.encode([h for _, h in split_headlines(of[u], seed=args.seed, half=k)[0]])))
                        .mean(0) for u in ids]) for k in (0, 1)]
    profile = unit(halves[0] + halves[1])  # the text profile: all history headlines
    chance = 1 / (len(ids) - len(ids) // 2)
    rows = {"reference: text profile of one history half": (halves[0], halves[1]),
            "reference: random vectors": (np.random.default_rng(args.seed).standard_normal((len(ids), 16)), profile)}
    everyone = sorted(pens, key=lambda u: u.user_id)
    for kind, dim, weighting in CANDIDATES:
        enc = click_encoder(kind, dim=dim, weighting=weighting).fit([u.clicked for u in everyone])
        rows[f"{kind}-{dim}-{weighting}"] = (enc.encode([of[u].clicked for u in ids]), profile)
    results = {}
    print(f"{len(ids)} training-pool users; identification chance {chance:.3f}\n")
    print("| embedding | Mantel r | p | identification |\n|---|---|---|---|")
    for name, (x, y) in rows.items():
        r, p = mantel(x, y, seed=args.seed)
        acc = identification(x, y)
        results[name] = {"mantel_r": r, "p": p, "identification": acc}
        print(f"| {name} | {r:+.3f} | {p:.3f} | {acc:.3f} |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"users": len(ids), "chance": chance, "results": results}, indent=2))


if __name__ == "__main__":
    main()
