"""The backbones side by side (docs/studies.md, "Does the person signal grow with the backbone?").

    python research/backbones/compare.py --runs runs/backbones

Reads what research/backbones/run.sh wrote: for each task (pens, persona) and backbone, the `e2p eval` results
and the `e2p train` report, and the wall times; prints one Markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BACKBONES = ["SmolLM2-135M-Instruct", "gemma-3-270m"]
TASKS = {"pens": "PENS headlines, text profile (17 test users)", "persona": "persona contract (unseen test people)"}


def pct(c: dict) -> str:
    return f"{c['relative_change'] * 100:+.2f}% [{c['ci95'][0] * 100:+.2f}, {c['ci95'][1] * 100:+.2f}]"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/backbones")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    walls = {}
    if (runs / "wall_times.tsv").is_file():
        for line in (runs / "wall_times.tsv").read_text().splitlines():
            name, seconds = line.split("\t")
            walls[name] = int(seconds)
    lines = ["| task | backbone | examples / users | e2p vs shared_prefix | e2p vs shuffled | perplexity none / shared / "
             "shuffled / e2p | identification e2p (chance) | train / eval wall |", "|---|---|---|---|---|---|---|---|"]
    for task, label in TASKS.items():
        for bb in BACKBONES:
            res_file = runs / f"{task}-{bb}-eval" / "results.json"
            if not res_file.is_file():
                continue
            r = json.loads(res_file.read_text())
            c, comp, ident = r["conditions"], r["comparisons"], r.get("identification") or {}
            ppl = " / ".join(f"{c[k]['perplexity']:.2f}" for k in ("none", "shared_prefix", "shuffled", "e2p"))
            idf = f"{c['e2p'].get('identification', float('nan')):.3f} ({ident.get('chance', float('nan')):.3f})"
            train = json.loads((runs / f"{task}-{bb}" / "training_report.json").read_text())
            train_s = walls.get(f"train_{task}_{bb}", train["seconds"])  # the whole command, verdict included
            wall = f"{train_s / 60:.0f} min / {walls.get(f'eval_{task}_{bb}', 0) / 60:.0f} min"
            lines.append(f"| {label} | {bb} | {r['examples']} / {r['users']} | {pct(comp['e2p_vs_shared_prefix'])} | "
                         f"{pct(comp['e2p_vs_shuffled'])} | {ppl} | {idf} | {wall} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
