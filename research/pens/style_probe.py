"""Is headline style a trait of the writer? Before any training: how well a user's history predicts the style of
their own held-out headlines, feature by feature, across the training pool's users.

    python research/pens/style_probe.py --examples runs/i30/data/examples.jsonl

Each example carries the user's `profile_text` (history headlines) and a target headline. Per user: the style
features (e2p.data.headline_style) of the history and of the targets; printed: the across-user spread of each
target feature and its Pearson r with the history's, with a permutation p-value. A high r on a feature the text
encoder cannot see (capitalisation: all-MiniLM-L6-v2 is uncased) is what users_text_style.npz adds.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from e2p.data.headline_style import STYLE_FEATURES, style_features

LEAD = "Headlines I wrote before: "


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", required=True)
    ap.add_argument("--permutations", type=int, default=2000)
    args = ap.parse_args()
    targets, history = defaultdict(list), {}
    with open(args.examples) as f:
        for line in f:
            row = json.loads(line)
            targets[row["user"]].append(row["messages"][-1]["content"])
            history[row["user"]] = row["profile_text"][len(LEAD):].split("; ")
    users = sorted(targets)
    t = np.stack([style_features(targets[u]) for u in users])
    h = np.stack([style_features(history[u]) for u in users])
    rng = np.random.default_rng(0)
    print(f"{len(users)} users; feature: across-user sd of the targets, r(history, targets), permutation p")
    for i, name in enumerate(STYLE_FEATURES):
        if t[:, i].std() == 0 or h[:, i].std() == 0:
            print(f"  {name:22s} constant")
            continue
        r = float(np.corrcoef(h[:, i], t[:, i])[0, 1])
        null = [abs(np.corrcoef(rng.permutation(h[:, i]), t[:, i])[0, 1]) for _ in range(args.permutations)]
        p = (1 + sum(n >= abs(r) for n in null)) / (1 + args.permutations)
        print(f"  {name:22s} sd {t[:, i].std():6.3f}  r {r:+.2f}  p {p:.4f}")


if __name__ == "__main__":
    main()
