"""A trained projector on test people at fixed person scales, against its shared prefix and its shuffled control.

    python research/persona/person_scale_test.py runs/exp9 [--scales 1 0.5] [--limit 160] [--data ../shared/data]

For reference only: `e2p train` chooses the scale on validation people and `e2p eval` scores that choice. This
shows what the person part does on the test people at other scales (e.g. when validation chose 0, the shared
prefix itself). Same replies as `e2p eval --limit N --people-half H` for H = 0 and 1; users are embedded the way
the projector reads them (one vector, or one per sentence in slots).
"""
import argparse
import math
import random
from pathlib import Path

from e2p.backbone import load_backbone
from e2p.data.persona import load_persona, people_half
from e2p.data.encoders import encoder_for
from e2p.evaluate import derangement, paired_bootstrap
from e2p.model import E2PModel
from e2p.projector import Projector
from recipe import PersonaRecipeConfig as RecipeConfig, person_table, reply_row
from e2p.evaluate.scoring import Item, row_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("projector")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--limit", type=int, default=160)
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    backbone = load_backbone()
    projector = Projector.from_pretrained(args.projector, backbone).eval()
    shared = Projector.from_pretrained(Path(args.projector) / "shared_prefix", backbone).eval()
    encoder = encoder_for(projector.config)
    test = load_persona(args.data, "test")
    model, shared_model = E2PModel(backbone, projector), E2PModel(backbone, shared)
    print("| half | scale | e2p | shuffled | shared_prefix | e2p vs shared_prefix | e2p vs shuffled |\n|---|---|---|---|---|---|---|")
    for half in (0, 1):
        pool = people_half(test, half)
        examples = random.Random(0).sample(pool, min(args.limit, len(pool)))
        index, table = person_table(examples, encoder)
        people = [e.person_id for e in examples]
        own = [index[p] for p in people]
        other = [own[j] for j in derangement(people, 0)]
        rows = [reply_row(model, e, RecipeConfig()) for e in examples]
        base = row_losses(shared_model, [Item(r, -1) for r in rows], None, 16)
        counts = base[1]
        ppl = lambda s: math.exp(s[0].sum() / counts.sum())

        def change(a, b) -> str:
            lo, hi = paired_bootstrap(a[0], b[0], counts, people)
            return f"{100 * (ppl(a) / ppl(b) - 1):+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]"

        for scale in args.scales:
            projector.config.person_scale = scale
            e2p = row_losses(model, [Item(r, own[i]) for i, r in enumerate(rows)], table, 16)
            shuffled = row_losses(model, [Item(r, other[i]) for i, r in enumerate(rows)], table, 16)
            print(f"| {half} | {scale} | {ppl(e2p):.3f} | {ppl(shuffled):.3f} | {ppl(base):.3f} | {change(e2p, base)} | "
                  f"{change(e2p, shuffled)} |", flush=True)


if __name__ == "__main__":
    main()
