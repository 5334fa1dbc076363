"""Utility against epsilon from research/privacy/dp_sweep.sh's runs: e2p vs shared_prefix perplexity change on
unseen users (95% interval over users) and the membership AUCs, per epsilon (and without DP). The unseen users are
the test users where the sweep evaluated them (pens-eps-*-eval), else each run's training-report verdict users."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="runs/privacy", help="the sweep's folder (pens-eps-*-eval, pens-eps-*-audit)")
    ap.add_argument("--out", default="runs/privacy/utility_vs_epsilon.png", help="the plot")
    args = ap.parse_args()
    rows = []
    for run in sorted(p for p in Path(args.runs).glob("pens-eps-*") if (p / "training_report.json").is_file()):
        eps = run.name[len("pens-eps-"):]
        report = json.loads((run / "training_report.json").read_text())
        ev = run.parent / f"{run.name}-eval" / "results.json"
        if ev.is_file():  # the test users, where the sweep evaluated them (EVAL=1)
            res = json.loads(ev.read_text())
            comparisons, ppl = res["comparisons"], {k: v["perplexity"] for k, v in res["conditions"].items()}
            where = f"{res['users']} test users"
        else:  # the training report's verdict: validation users never trained on nor tuned on
            comparisons, ppl = report["validation"]["comparisons"], report["validation"]["perplexity"]
            where = f"{report['verdict_users']} verdict users"
        c = comparisons["e2p_vs_shared_prefix"]
        audit = run.parent / f"{run.name}-audit" / "results.json"
        mia = json.loads(audit.read_text())["membership"]["attacks"] if audit.is_file() else {}
        spent = (report.get("privacy") or {}).get("epsilon")
        rows.append({"epsilon": eps, "spent": spent, "e2p_ppl": ppl["e2p"], "shared_ppl": ppl["shared_prefix"],
                     "change": c["relative_change"], "ci95": c["ci95"], "where": where,
                     "person_scale": report.get("person_scale", {}).get("chosen") if isinstance(report.get("person_scale"), dict) else None,
                     "auc": {k: (a["auc"], a["ci95"]) for k, a in mia.items()}})
    order = lambda r: float("inf") if r["epsilon"] == "none" else float(r["epsilon"])
    rows.sort(key=order)
    print("| epsilon (target / spent) | scored on | person_scale | e2p ppl | shared_prefix ppl | e2p vs shared_prefix [95%] "
          "| MIA AUC loss | MIA AUC calibrated |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda a: "-" if a is None else f"{a[0]:.3f} [{a[1][0]:.3f}, {a[1][1]:.3f}]"
    for r in rows:
        print(f"| {r['epsilon']} / {'-' if r['spent'] is None else format(r['spent'], '.2f')} | {r['where']} | "
              f"{r['person_scale']} | {r['e2p_ppl']:.2f} | "
              f"{r['shared_ppl']:.2f} | {r['change'] * 100:+.2f}% [{r['ci95'][0] * 100:+.2f}, {r['ci95'][1] * 100:+.2f}] | "
              f"{fmt(r['auc'].get('loss'))} | {fmt(r['auc'].get('calibrated'))} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(range(len(rows)))
    ys = [r["change"] * 100 for r in rows]
    err = [[y - r["ci95"][0] * 100 for y, r in zip(ys, rows)], [r["ci95"][1] * 100 - y for y, r in zip(ys, rows)]]
    ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=4)
    ax.axhline(0, color="k", lw=1, ls="--")
    ax.set_xticks(xs, [f"eps {r['epsilon']}" if r["epsilon"] != "none" else "no DP" for r in rows])
    ax.set_ylabel("e2p vs shared_prefix perplexity, % (lower: better)")
    ax.set_title(f"PENS, users never trained on ({rows[0]['where']}): utility against epsilon")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
