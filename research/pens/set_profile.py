"""Set profile against today's default on PENS: the same examples scored (and generated) under both projectors, each
with its own users table, beside the controls, with paired 95% intervals over users.

    python research/pens/set_profile.py --data runs/i46/data --default runs/i44/style --set runs/i46/set \
        --split validation --out runs/i46/compare-validation
    python research/pens/set_profile.py --data runs/i46/data --default runs/i44/style --set runs/i46/set \
        --split test --generate 340 --out runs/i46/compare-test

The backbone is the projectors' own (`backbone_name` in their config.json; both must share it).

`--split validation`: the 13 validation users of the set projector's split (split.json: selection + verdict users,
never trained on by either projector: both trainings used the same split), on which the default is chosen. `--split
test`: the 17 test users. Conditions: shared_prefix (the same control for both: one seed trains the same shared
prefix), shuffled_default and shuffled_set (each projector with another user's profile: for the set, another user's
whole set), e2p_default (users_text_style.npz) and e2p_set (users_text_set.npz). Writes results.json, REPORT.md and
set_profile.json to --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def paired_hits(results: dict, seed: int) -> dict:
    """Identification by text + style, paired on the same generations: each projector against its own controls and
    the set against the default (difference of accuracies, 95% interval over users)."""
    from e2p.evaluate.identification import user_interval
    import numpy as np

    info = (results.get("identification") or {}).get("style") or {}
    hits, users = info.get("hits") or {}, info.get("generation_users") or []
    out = {}
    for a, b in (("e2p_set", "shuffled_set"), ("e2p_set", "shared_prefix"), ("e2p_set", "e2p_default"),
                 ("e2p_default", "shuffled_default"), ("e2p_default", "shared_prefix")):
        if a in hits and b in hits:
            diff = np.asarray(hits[a], float) - np.asarray(hits[b], float)
            per_user: dict = {}
            for u, d in zip(users, diff):
                per_user.setdefault(u, []).append(d)
            means = [float(np.mean(v)) for v in per_user.values()]
            out[f"{a}_vs_{b}"] = {"difference": float(diff.mean()), "ci95": user_interval(diff, users, seed),
                                  "users_higher": sum(m > 0 for m in means), "users_lower": sum(m < 0 for m in means)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the folder `e2p data pens ... --profile-set N` wrote")
    ap.add_argument("--default", required=True, help="the text + style projector (users_text_style.npz)")
    ap.add_argument("--set", required=True, help="the set projector (users_text_set.npz)")
    ap.add_argument("--split", choices=["validation", "test"], required=True)
    ap.add_argument("--generate", type=int, default=0, help="greedy generations for ROUGE and identification")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-results", action="store_true", help="summarize the results.json already in --out")
    args = ap.parse_args()

    from e2p import load_backbone
    from e2p.config import E2PConfig
    from e2p.data.contract import load_examples, load_users
    from e2p.data.encoders import TextEncoder
    from e2p.evaluate import Condition, evaluate_examples

    data, default, as_set = Path(args.data), Path(args.default), Path(args.set)
    folder = data / "test" if args.split == "test" else data
    tables = {"default": load_users(folder / "users_text_style.npz"), "set": load_users(folder / "users_text_set.npz")}
    examples = load_examples(folder / "examples.jsonl", tables["default"])
    if args.split == "validation":
        split = json.loads((as_set / "split.json").read_text())
        keep = set(split["selection"]) | set(split["verdict"])
        if split != json.loads((default / "split.json").read_text()):
            raise SystemExit("the two projectors were trained on different splits: their validation users differ")
        examples = [ex for ex in examples if ex.user in keep]
    conds = [Condition("shared_prefix", as_set / "shared_prefix"),
             Condition("shuffled_default", default, embeddings="shuffled", users=tables["default"]),
             Condition("shuffled_set", as_set, embeddings="shuffled", users=tables["set"]),
             Condition("e2p_default", default, embeddings="own", users=tables["default"]),
             Condition("e2p_set", as_set, embeddings="own", users=tables["set"])]
    pairs = [("e2p_set", "e2p_default"), ("e2p_set", "shared_prefix"), ("e2p_default", "shared_prefix"),
             ("e2p_set", "shuffled_set"), ("e2p_default", "shuffled_default")]
    backbone = E2PConfig.load(as_set).backbone_name
    if E2PConfig.load(default).backbone_name != backbone:
        raise SystemExit(f"the two projectors were trained on different backbones: retrain --default on {backbone}")
    if args.from_results:
        results = json.loads((Path(args.out) / "results.json").read_text())
    else:
        results = evaluate_examples(load_backbone(backbone), tables["default"], examples, as_set, args.out, conditions=conds,
                                    limit=args.limit, generate=args.generate, seed=args.seed,
                                    encoder=TextEncoder() if args.generate else False, pairs=pairs)
    cfg = E2PConfig.load(as_set)
    summary = {"split": args.split, "users": results["users"], "examples": results["examples"],
               "perplexity": {k: v["perplexity"] for k, v in results["conditions"].items()},
               "comparisons": results["comparisons"],
               "bytes_per_user": {"default": tables["default"].dim * 4, "set": tables["set"].dim * 4,
                                  "set_items": cfg.set_items},
               "identification": {name: {k: v for k, v in c.items() if k.startswith("identification")}
                                  for name, c in results["conditions"].items()},
               "identification_paired": paired_hits(results, args.seed),
               "command": "python research/pens/set_profile.py " + " ".join(
                   f"--{k} {v}" for k, v in vars(args).items() if v is not None)}
    (Path(args.out) / "set_profile.json").write_text(json.dumps(summary, indent=2, default=str))
    for name, c in results["comparisons"].items():
        print(f"{name}: {100 * c['relative_change']:+.2f}% [{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]")
    for name, c in summary["identification"].items():
        print(f"identification {name}: {c}")
    for name, c in summary["identification_paired"].items():
        print(f"paired identification {name}: {c}")


if __name__ == "__main__":
    main()
