"""Choose the behavioural user encoder for PENS on validation users (never on test users).

    python research/pens/select_behaviour_encoder.py --data data/pens --src ../shared/data/pens \
        --shared runs/pens-behaviour/shared_prefix --out runs/pens-select

For each candidate click encoder (kind, dimension, weighting) the users of `--data` get new vectors, E2P's person
part is trained with `e2p.training.recipe.train_on_examples` on top of one shared prefix (trained once for this split: it
holds no user information), and every validation user's examples are scored: e2p vs shared_prefix and vs
shuffled, 95% intervals over users. The winner is the candidate with the largest gain over the *worse* of the
two controls (a person signal must beat both). Writes selection.json and
prints a table. The validation users are those `e2p train` holds out with the same seed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from e2p import load_backbone
from e2p.data.behaviour import click_encoder
from e2p.data.contract import load_examples, load_users, split_validation_users, write_users
from e2p.data.pens import load_pens
from e2p.evaluate import Condition, compare, run_conditions
from e2p.training.recipe_config import RecipeConfig
from e2p.training.recipe import train_on_examples

CANDIDATES = {  # name: (kind, encoder settings, projector hidden layers)
    # a linear person map from a low-dimensional embedding cannot memorize 53 training users; the default
    # MLP (1024 hidden) can, and its validation loss rose from the first evaluation on (first try, killed)
    "als-16-linear": ("als", {"dim": 16}, []),
    "item2vec-16-linear": ("item2vec", {"dim": 16}, []),
    "coclick-16-linear": ("coclick", {"dim": 16}, []),
    "als-32-linear": ("als", {"dim": 32}, []),
    "als-16-mlp": ("als", {"dim": 16}, [1024]),
    "coclick-64-mlp": ("coclick", {"dim": 64}, [1024]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder written by `e2p data pens` (its training pool)")
    ap.add_argument("--src", required=True, help="the PENS file or folder it was made from (for the clicks)")
    ap.add_argument("--shared", required=True, help="shared_prefix/ of an `e2p train` run on the same examples")
    ap.add_argument("--out", required=True)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--limit", type=int, default=650, help="validation examples scored per candidate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone()
    pens = load_pens(args.src)  # every user's clicks (clicks are behaviour, never targets)
    base = load_users(Path(args.data) / "users.npz")
    examples = load_examples(Path(args.data) / "examples.jsonl", base)
    ids = sorted({ex.user for ex in examples})
    cfg = RecipeConfig(injection="deep", num_prefix_tokens=1, seed=args.seed)  # split settings; hidden per candidate
    n_val = max(4, min(200, round(0.2 * len(ids))))  # as train_on_examples
    _, val_ids = split_validation_users(ids, n_val, cfg.seed)
    val = set(val_ids)
    rng = np.random.default_rng(args.seed)
    val_ex = [ex for ex in examples if ex.user in val]
    val_ex = [val_ex[i] for i in sorted(rng.choice(len(val_ex), min(args.limit, len(val_ex)), replace=False))]
    users_of = {u.user_id: u for u in pens}
    results_file = out / "selection.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    shared_nll = None
    for name in args.candidates.split(","):
        if name in results:
            continue
        kind, settings, hidden = CANDIDATES[name]
        t0 = time.time()
        enc = click_encoder(kind, **settings).fit([u.clicked for u in pens])
        vectors = enc.encode([users_of[u].clicked for u in base.ids])
        folder = out / name
        write_users(folder / "users.npz", base.ids, vectors)
        users = load_users(folder / "users.npz")
        run_cfg = RecipeConfig(injection="deep", num_prefix_tokens=1, seed=args.seed, hidden_dims=hidden)
        report = train_on_examples(backbone, users, examples, folder, run_cfg, shared_dir=args.shared)
        conds = [Condition("e2p", folder, embeddings="own"), Condition("shuffled", folder, embeddings="shuffled")]
        if shared_nll is None:
            conds.insert(0, Condition("shared_prefix", Path(args.shared)))
        scored = run_conditions(backbone, conds, val_ex, users, max_target_tokens=cfg.max_target_tokens, seed=args.seed)
        shared_nll = scored["nll"].get("shared_prefix", shared_nll)
        nll = {"shared_prefix": shared_nll, **scored["nll"]}
        comps = compare(nll, scored["counts"], [ex.user for ex in val_ex],
                        [("e2p", "shared_prefix"), ("e2p", "shuffled")])
        ppl = {k: float(np.exp(v.sum() / scored["counts"].sum())) for k, v in nll.items()}
        results[name] = {"kind": kind, **settings, "hidden_dims": hidden, "dim_used": enc.dim, "perplexity": ppl, "comparisons": comps,
                         "person_scale": report.get("person_scale", {}).get("chosen"),
                         "seconds": time.time() - t0, "validation_users": len(val), "validation_examples": len(val_ex)}
        results_file.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(results[name]["comparisons"]), flush=True)
    worst = lambda r: max(c["relative_change"] for c in r["comparisons"].values())
    best = min(results, key=lambda n: worst(results[n]))
    print("\n| candidate | e2p ppl | vs shared_prefix | vs shuffled |\n|---|---|---|---|")
    for n, r in results.items():
        c = r["comparisons"]
        cell = lambda k: f"{100 * c[k]['relative_change']:+.2f}% [{100 * c[k]['ci95'][0]:+.2f}, {100 * c[k]['ci95'][1]:+.2f}]"
        print(f"| {n} | {r['perplexity']['e2p']:.2f} | {cell('e2p_vs_shared_prefix')} | {cell('e2p_vs_shuffled')} |")
    print(f"\nchosen on validation users: {best}")
    (out / "chosen.json").write_text(json.dumps({"chosen": best, **results[best]}, indent=2))


if __name__ == "__main__":
    main()
