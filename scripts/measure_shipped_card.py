"""Give a shipped projector its card: the verdict and intervals an `e2p eval` measured on people never trained on,
written as the projector's `training_report.json` (the shipped projectors were trained before reports existed), so
the playground's card and `GET /v1/projector` show what was measured, even where the answer is "no".

    e2p eval --data ../shared/data --projector persona-deep-k1 --out runs/card-deep --limit 600 --generate 0 \\
        --conditions shared_prefix,shuffled,e2p
    python scripts/measure_shipped_card.py --results runs/card-deep/results.json --projector persona-deep-k1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="results.json of `e2p eval` on the projector")
    ap.add_argument("--projector", required=True, help="a shipped name (persona-deep-k1) or its folder")
    ap.add_argument("--measured-on", default="the Synthetic-Persona-Chat test people (never trained on)")
    args = ap.parse_args()
    from e2p.config import resolve_projector

    results = json.loads(Path(args.results).read_text())
    folder = resolve_projector(args.projector)
    report = {"verdict": results["verdict"], "measured_on": args.measured_on, "verdict_users": results["users"],
              "examples": results["examples"], "person_scale": results.get("person_scale"),
              "validation": {"comparisons": results["comparisons"],
                             "perplexity": {k: v["perplexity"] for k, v in results["conditions"].items()}},
              "source": "e2p eval (the shipped projector was trained before training reports existed)"}
    (folder / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{folder / 'training_report.json'}: {report['verdict']['text']}")


if __name__ == "__main__":
    main()
