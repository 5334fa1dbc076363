"""Run the training recipe with any RecipeConfig fields, as the experiments in docs/experiments.md did.

    python research/persona/run_recipe.py OUT_DIR '{"e2p_steps": 100, "distill_weight": 0.8, ...}' [--data PATH]

Same as `e2p train` (training split of PATH, default ../shared/data), but every recipe field can be set;
resumes stages already in OUT_DIR (a stage folder with the same config and seed is skipped).
"""
import argparse
import json
import logging

from e2p.backbone import load_backbone
from e2p.data.persona import persona_split
from e2p.data.encoders import TextEncoder
from recipe import PersonaRecipeConfig as RecipeConfig, run_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("fields", nargs="?", default="{}", help="JSON object of RecipeConfig fields")
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = RecipeConfig(**json.loads(args.fields))
    print(cfg, flush=True)
    train, _ = persona_split(args.data, include_msc=cfg.include_msc)
    report = run_recipe(load_backbone(), TextEncoder(), train, args.out, cfg,
                        progress=True, resume=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
