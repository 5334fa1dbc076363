"""`e2p demo`: the default backbone, a projector, three people never seen in training, and the numbers."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

SHIPPED = Path(__file__).parents[1] / "pretrained" / "persona-deep-k1"
DEMO_MESSAGE = "Hi! Tell me a bit about yourself. What do you do for fun?"


def find_data(explicit: str | None) -> Path:
    from ..errors import DataError

    for candidate in [explicit, os.environ.get("E2P_DATA"), "../shared/data", "shared/data"]:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise DataError("no persona data found: pass --data PATH (a folder with Synthetic-Persona-Chat / ConvAI2 files) or set E2P_DATA")


SAMPLE = Path(__file__).parents[1] / "demo_data" / "spc-test-sample"


def demo_data(args, config) -> tuple:
    """The demo's people as the data contract: (users, examples, text encoder or None, what they are).
    Without --data the sample shipped with the package; with --data that folder's test people (never seen in
    training), `--limit` of their replies drawn with `--seed`, embedded by the projector's own encoder."""
    from ..data.contract import load_examples, load_users
    from ..data.contract import limit_examples

    if not args.data:
        users = load_users(SAMPLE / "users.npz")
        examples = limit_examples(load_examples(SAMPLE / "examples.jsonl", users), args.limit, args.seed)
        return users, examples, None, (f"{len(users)} people it never saw (Synthetic-Persona-Chat test, CC-BY-4.0: "
                                       f"{SAMPLE / 'NOTICE.md'}); about 2-3 minutes on 2 CPU cores. `e2p demo --data "
                                       "DIR` runs the full table (about 10 minutes).")
    from ..data.persona import load_persona
    from ..data.persona_contract import persona_contract
    from ..data.encoders import TextEncoder, encoder_for

    data = find_data(args.data)
    test = limit_examples(load_persona(data, "test"), args.limit, args.seed)  # test people: never in a training split
    encoder = TextEncoder()
    users, examples = persona_contract(test, encoder_for(config, encoder), config.history_turns)
    return users, examples, encoder, f"{len(users)} people never seen in training (the test split of {data})"


def run_demo(args) -> None:
    """The projector on people it never saw: three of them answer one message with and without E2P, then every
    condition is scored on their replies. One path for the shipped sample (no data folder needed) and for --data."""
    from ..backbone import load_backbone
    from ..config import E2PConfig, resolve_projector
    from ..evaluate import evaluate_examples
    from ..model import E2PModel
    from ..projector import Projector, parameter_summary

    projector_dir = resolve_projector(args.projector or SHIPPED)
    users, examples, encoder, source = demo_data(args, E2PConfig.load(projector_dir))
    print(f"e2p demo: the projector {projector_dir.name} on {source}")
    backbone = load_backbone(args.backbone, device=args.device, dtype=args.dtype)
    projector = Projector.from_pretrained(projector_dir, backbone).eval()
    print(f"projector: {projector.config.injection} injection, k={projector.config.num_prefix_tokens}, "
          f"{parameter_summary(projector)}, person_scale {projector.config.person_scale}")
    model = E2PModel(backbone, projector)
    profile = {ex.user: ex.profile_text for ex in examples}
    people = [u for u in users.ids if u in profile]
    chosen = people[:3]
    plain = model.generate([DEMO_MESSAGE], embeddings=[None], max_new_tokens=40)[0]
    replies = model.generate([DEMO_MESSAGE] * len(chosen), embeddings=users.subset(chosen).tensor(), max_new_tokens=40)
    print(f"\nmessage: {DEMO_MESSAGE}\n\nwithout E2P: {plain}\n")
    for user, reply in zip(chosen, replies):
        print(f"unseen person: {profile[user]}\n  with E2P: {reply}\n")
    out = Path(tempfile.mkdtemp(prefix="e2p-demo-eval-"))
    print(f"scoring {len(examples)} replies of these {len(people)} people under every condition "
          "(perplexity; identification of greedy replies) ...")
    results = evaluate_examples(backbone, users, examples, projector_dir, out, generate=min(len(people), 48),
                                seed=args.seed, encoder=encoder)
    chance = results["identification"]["chance"]
    print("\n| condition | reply perplexity | identification (chance %.3f) |\n|---|---|---|" % chance)
    for name, c in results["conditions"].items():
        print(f"| {name} | {c['perplexity']:.3f} | {c.get('identification', float('nan')):.3f} |")
    print(f"\nWhat it means: {results['verdict']['text']}")
    print("shared_prefix and shuffled learn the style without the person; only e2p beating both says the embedding "
          "carries the person. Identification: how often a greedy reply is closer (all-MiniLM-L6-v2) to its own "
          f"person's profile than to each of the other {len(people) - 1}.\n(full report and plot in {out})")
