"""Cold start on PENS: how many of a new user's actions before the prefix pays off, and how fresh a profile must be.

    python research/pens/cold_start.py --data runs/i44/data --projector runs/i44/style --out runs/i44/cold-start \
        --limit 840

Each test user's profile is rebuilt by the live-profile rule the data was made with (`users_text_style.profile.json`,
e2p.data.live_profile: the unit mean of MiniLM vectors plus the headline style) from their first n history headlines,
n = 1, 2, 5, 10, 20, 50 and all of them (n = 0 is the shared prefix: no user information), and every profile is
scored on the same targets through the one evaluation loop: perplexity, and the paired change against
`shared_prefix` with a 95% interval over users. Freshness: the profile from the first half of the history against
the one from the second half (a refreshed profile), on the same targets. Writes cold_start.json and
cold_start.png to --out (and the loop's results.json / REPORT.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

STEPS = (1, 2, 5, 10, 20, 50)


def profiles(data: Path, encoder, seed: int) -> tuple[dict, list[str]]:
    """{condition: UserTable} of the test users' profiles from the first n history headlines, both halves and all."""
    from e2p.data.contract import UserTable, load_users
    from e2p.data.live_profile import ProfileRule, rule_path
    from e2p.data.pens import load_pens, split_headlines

    card = json.loads((data / "data_card.json").read_text())
    shipped = load_users(data / "test" / "users_text_style.npz")
    rule = ProfileRule.load(rule_path(data / "test" / "users_text_style.npz"))
    by_id = {u.user_id: u for u in load_pens(card["source"])}
    users = [by_id[i] for i in shipped.ids]
    tables: dict[str, list] = {}
    for u in users:
        history = [h for _, h in split_headlines(u, seed=seed)[0]]
        vectors = np.asarray(encoder.encode(history), dtype=np.float32)
        for n in STEPS:
            tables.setdefault(f"e2p_n{n}", []).append(rule.batch(vectors[:n], history[:n]))
        tables.setdefault("e2p_all", []).append(rule.batch(vectors, history))
        vector_of = dict(zip(history, vectors))  # each half is part of the history: encoded once above
        for half in (0, 1):
            part = [h for _, h in split_headlines(u, seed=seed, half=half)[0]]
            tables.setdefault(f"e2p_half{half}", []).append(rule.batch(np.stack([vector_of[h] for h in part]), part))
    out = {name: UserTable(list(shipped.ids), np.stack(rows)) for name, rows in tables.items()}
    gap = float(np.abs(out["e2p_all"].vectors - shipped.vectors).max())
    if gap > 1e-4:  # the rule rebuilt from the raw history must give the very table `e2p data pens` wrote
        raise SystemExit(f"the rule's all-history profiles differ from {data}/test/users_text_style.npz by {gap}")
    lengths = [len(split_headlines(u, seed=seed)[0]) for u in users]
    return out, [f"history headlines per user: min {min(lengths)}, median {int(np.median(lengths))}, max {max(lengths)}; "
                 f"all-history profiles equal the data table (max gap {gap:.2e})"]


def summarize(results: dict) -> dict:
    """The curve against shared_prefix and the two product answers: the first n whose interval is below zero, and
    the first n at half of the full gain or better."""
    comps, conds = results["comparisons"], results["conditions"]
    curve = [{"n": 0, "label": "0 (shared prefix)", "perplexity": conds["shared_prefix"]["perplexity"],
              "vs_shared_prefix": 0.0, "ci95": [0.0, 0.0]}]
    for name in [f"e2p_n{n}" for n in STEPS] + ["e2p_all"]:
        c = comps[f"{name}_vs_shared_prefix"]
        n = name.removeprefix("e2p_n") if name != "e2p_all" else "all"
        curve.append({"n": n, "label": str(n), "perplexity": conds[name]["perplexity"],
                      "vs_shared_prefix": c["relative_change"], "ci95": c["ci95"]})
    full = curve[-1]["vs_shared_prefix"]
    beats = next((p["label"] for p in curve[1:] if p["ci95"][1] < 0), None)
    half = next((p["label"] for p in curve[1:] if full < 0 and p["vs_shared_prefix"] <= full / 2), None)
    fresh = {k: comps[k] for k in ("e2p_half1_vs_e2p_half0", "e2p_half0_vs_shared_prefix", "e2p_half1_vs_shared_prefix",
                                   "e2p_all_vs_shuffled") if k in comps}
    return {"curve": curve, "full_gain": full, "first_n_beating_shared_prefix": beats,
            "first_n_at_half_the_full_gain": half, "freshness": fresh,
            "perplexity": {k: v["perplexity"] for k, v in conds.items()}}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["curve"]
    x = np.arange(len(curve))
    y = np.array([100 * p["vs_shared_prefix"] for p in curve])
    lo = np.array([100 * p["ci95"][0] for p in curve])
    hi = np.array([100 * p["ci95"][1] for p in curve])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x, lo, hi, alpha=0.25, label="95% interval over test users")
    ax.plot(x, y, "o-", label="e2p vs shared prefix")
    ax.axhline(0, color="grey", lw=1, label="no person (shared prefix)")
    ax.axhline(100 * summary["full_gain"] / 2, color="tab:green", ls="--", lw=1, label="half of the full gain")
    ax.set_xticks(x, [p["label"] for p in curve])
    ax.set_xlabel("the user's history headlines in their profile (n)")
    ax.set_ylabel("perplexity change vs shared prefix (%)")
    ax.set_title("PENS cold start: how many actions before E2P pays off")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the folder `e2p data pens ... --test-fraction 0.2` wrote")
    ap.add_argument("--projector", required=True, help="the text + style projector `e2p train` wrote")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="score this many test targets (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from e2p import load_backbone
    from e2p.data.contract import load_examples
    from e2p.data.encoders import TextEncoder
    from e2p.evaluate import Condition, evaluate_examples

    data, proj, out = Path(args.data), Path(args.projector), Path(args.out)
    tables, notes = profiles(data, TextEncoder(), args.seed)
    examples = load_examples(data / "test" / "examples.jsonl", tables["e2p_all"])
    conds = [Condition("shared_prefix", proj / "shared_prefix"),
             Condition("shuffled", proj, embeddings="shuffled", users=tables["e2p_all"])]
    conds += [Condition(name, proj, embeddings="own", users=table) for name, table in tables.items()]
    pairs = [(name, "shared_prefix") for name in tables] + [("e2p_all", "shuffled"), ("e2p_half1", "e2p_half0")]
    results = evaluate_examples(load_backbone(), tables["e2p_all"], examples, proj, out, conditions=conds,
                                limit=args.limit, generate=0, seed=args.seed, encoder=False, pairs=pairs)
    summary = {**summarize(results), "notes": notes, "examples": results["examples"], "users": results["users"],
               "command": "python research/pens/cold_start.py " + " ".join(
                   f"--{k} {v}" for k, v in vars(args).items() if v is not None)}
    (out / "cold_start.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "cold_start.png")
    for p in summary["curve"]:
        print(f"n={p['label']:>18}: ppl {p['perplexity']:.2f}  {100 * p['vs_shared_prefix']:+.2f}% "
              f"[{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}]")
    print(f"beats the shared prefix (interval below 0) from n = {summary['first_n_beating_shared_prefix']}; "
          f"half of the full gain from n = {summary['first_n_at_half_the_full_gain']}")
    for k, v in summary["freshness"].items():
        print(f"{k}: {100 * v['relative_change']:+.2f}% [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}]")


if __name__ == "__main__":
    main()
