"""Ceiling of a one-token user prefix on a data-contract folder: what would a *perfect* user signal give?

    python research/pens/oracle_prefix_ceiling.py --users data/pens/test/users.npz --examples data/pens/test/examples.jsonl \
        --shared runs/pens-behaviour/shared_prefix --out runs/pens-oracle

Each evaluated user gets a free prefix of their own (a one-hot user id through the projector, i.e. per-user prompt
tuning on top of the trained style prefix), learned from half of that user's own targets; it is scored on the
other half against the same shared prefix and against another user's learned prefix (shuffled). No embedding can
tell a projector more about a user than their own targets do, so E2P on unseen users cannot be expected to beat
the shared prefix by more than this. An oracle for analysis only: it trains on the evaluated users.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from e2p import load_backbone
from e2p.data.contract import UserTable, load_examples, load_users
from e2p.evaluate import Condition, compare, run_conditions
from e2p.config import E2PConfig
from e2p.training.recipe_config import RecipeConfig
from e2p.training.prefix_stages import train_prefix_stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--shared", required=True, help="the trained shared_prefix folder the oracle builds on")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    users = load_users(args.users)
    examples = load_examples(args.examples, users)
    ids = sorted({e.user for e in examples})
    onehot = UserTable(ids, np.eye(len(ids), dtype=np.float32), "one-hot user ids")
    rng = random.Random(args.seed)
    fit, held = [], []
    for u in ids:
        mine = [e for e in examples if e.user == u]
        rng.shuffle(mine)
        fit += mine[: len(mine) // 2]
        held += mine[len(mine) // 2:]
    rng.shuffle(fit)
    n_val = max(16, len(fit) // 10)
    cfg = RecipeConfig(injection=E2PConfig.load(args.shared).injection, e2p_steps=args.steps, e2p_lr=args.lr,
                       center_embeddings=False, freeze_shared=True, seed=args.seed)
    backbone = load_backbone()
    out = Path(args.out)
    train_prefix_stages(backbone, fit[n_val:], onehot, out, cfg, val_examples=fit[:n_val], shared_dir=args.shared)
    conditions = [Condition("shared_prefix", Path(args.shared)), Condition("oracle_shuffled", out, embeddings="shuffled"),
                  Condition("oracle_own", out, embeddings="own")]
    scores = run_conditions(backbone, conditions, held, onehot, plain_config=E2PConfig.load(args.shared),
                            max_target_tokens=cfg.max_target_tokens, seed=args.seed)
    counts = scores["counts"]
    result = {"users": len(ids), "fit_examples": len(fit), "held_examples": len(held),
              "perplexity": {k: float(np.exp(v.sum() / counts.sum())) for k, v in scores["nll"].items()},
              "comparisons": compare(scores["nll"], counts, [e.user for e in held],
                                     [("oracle_own", "shared_prefix"), ("oracle_own", "oracle_shuffled")], seed=args.seed)}
    (out / "ceiling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
