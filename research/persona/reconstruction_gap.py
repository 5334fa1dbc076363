"""How much of the person a projector's prefix carries, on people whose persona sentences it has or has not seen.

    python research/persona/reconstruction_gap.py PROJECTOR_DIR [--data ../shared/data] [--n 48]

For 48 personas of each group, the frozen backbone is asked "Tell me about yourself." with only the prefix and
scored on restating the whole persona, once with the person's own embedding and once with another person's.
The gap (shuffled - own, nats/token) is what the prefix carries about that person. Groups: `train` (people
trained on), `val` (held-out training people; they share persona sentences with training), `test`
(Synthetic-Persona-Chat test: new people with new sentences). A gap much smaller on `test` than on `val`
means the projector learned the training sentences rather than a mapping that generalizes.
"""
import argparse
import json
import time
from pathlib import Path

from e2p.backbone import load_backbone
from e2p.data.persona import persona_split
from e2p.data.encoders import TextEncoder
from e2p.model import E2PModel
from e2p.projector import Projector
from e2p.training.stage_runner import sample_examples
from recipe import PersonaRecipeConfig as RecipeConfig, reconstruction_items, split_people
from e2p.evaluate.scoring import evaluate_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("projector")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--n", type=int, default=48)
    args = ap.parse_args()
    recipe = Path(args.projector).parent / "recipe.json"
    cfg = RecipeConfig(**json.loads(recipe.read_text())) if recipe.is_file() else RecipeConfig()
    cfg.reconstruct_sentences = 0  # score restating the whole persona, whatever the training target was
    backbone, encoder = load_backbone(), TextEncoder()
    projector = Projector.from_pretrained(args.projector, backbone).eval()
    train, test = persona_split(args.data)  # without MSC: the same people with and without it
    rest, val = split_people(train, cfg.val_people, cfg.seed)
    model = E2PModel(backbone, projector)
    for name, examples in [("train", sample_examples(rest, 3000, 2)), ("val", val), ("test", sample_examples(test, 3000, 1))]:
        items, table = reconstruction_items(backbone, projector, examples, encoder, cfg, augment=False)
        items = sample_examples(items, args.n, 0)
        t = time.time()
        own = evaluate_loss(model, items, table)
        shuffled = evaluate_loss(model, items, table, shuffle_people=True)
        print(f"{name:5s} {len(items)} personas: own {own:.4f} shuffled {shuffled:.4f} gap {shuffled - own:.4f} nats/token"
              f" ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
