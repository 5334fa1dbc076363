"""`e2p demo`: the default backbone, a projector, three people never seen in training, and the numbers."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

SHIPPED = Path(__file__).parent / "pretrained" / "persona-deep-k1"
DEMO_MESSAGE = "Hi! Tell me a bit about yourself. What do you do for fun?"


def find_data(explicit: str | None) -> Path:
    from .errors import DataError

    for candidate in [explicit, os.environ.get("E2P_DATA"), "../shared/data", "shared/data"]:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise DataError("no persona data found: pass --data PATH (a folder with Synthetic-Persona-Chat / ConvAI2 files) or set E2P_DATA")


SAMPLE = Path(__file__).parent / "demo_data" / "spc-test-sample"


def run_demo(args) -> None:
    """With --data: the full persona table on that folder's test people; without: the sample shipped with the
    package (no data folder needed)."""
    if args.data:
        return run_demo_on_data(args)
    from .backbone import load_backbone
    from .config import resolve_projector
    from .data.contract import load_examples, load_users
    from .evaluate import evaluate_examples
    from .model import E2PModel
    from .projector import Projector, parameter_summary

    users = load_users(SAMPLE / "users.npz")
    examples = load_examples(SAMPLE / "examples.jsonl", users)
    projector_dir = resolve_projector(args.projector or "persona-deep-k1")
    print(f"e2p demo: the projector {projector_dir.name} on {len(users)} people it never saw (Synthetic-Persona-Chat "
          f"test, CC-BY-4.0: {SAMPLE / 'NOTICE.md'}); about 2-3 minutes on 2 CPU cores. `e2p demo --data DIR` runs "
          "the full table (about 10 minutes).")
    backbone = load_backbone(args.backbone, device=args.device, dtype=args.dtype)
    projector = Projector.from_pretrained(projector_dir, backbone).eval()
    print(f"projector: {projector.config.injection} injection, k={projector.config.num_prefix_tokens}, "
          f"{parameter_summary(projector)}, person_scale {projector.config.person_scale}")
    model = E2PModel(backbone, projector)
    chosen = users.ids[:3]
    profile = {ex.user: ex.profile_text for ex in examples}
    plain = model.generate([DEMO_MESSAGE], embeddings=[None], max_new_tokens=40)[0]
    replies = model.generate([DEMO_MESSAGE] * 3, embeddings=users.subset(chosen).tensor(), max_new_tokens=40)
    print(f"\nmessage: {DEMO_MESSAGE}\n\nwithout E2P: {plain}\n")
    for user, reply in zip(chosen, replies):
        print(f"unseen person: {profile[user]}\n  with E2P: {reply}\n")
    out = Path(tempfile.mkdtemp(prefix="e2p-demo-eval-"))
    print(f"scoring {len(examples)} replies of these {len(users)} people under every condition "
          "(perplexity; identification of greedy replies) ...")
    results = evaluate_examples(backbone, users, examples, projector_dir, out, generate=len(users), seed=args.seed)
    chance = results["identification"]["chance"]
    print("\n| condition | reply perplexity | identification (chance %.3f) |\n|---|---|---|" % chance)
    for name, c in results["conditions"].items():
        print(f"| {name} | {c['perplexity']:.3f} | {c.get('identification', float('nan')):.3f} |")
    print(f"\nWhat it means: {results['verdict']['text']}")
    print("shared_prefix and shuffled learn the style without the person; only e2p beating both says the embedding "
          "carries the person. Identification: how often a greedy reply is closer (all-MiniLM-L6-v2) to its own "
          f"person's profile than to each of the other {len(users) - 1}.\n(full report and plot in {out})")


def run_demo_on_data(args) -> None:
    from .data.persona import persona_split
    from .encoders import TextEncoder, encoder_for
    from .data.persona_contract import persona_contract
    from .evaluate import evaluate_examples
    from .backbone import load_backbone
    from .config import resolve_projector
    from .model import E2PModel
    from .projector import Projector, parameter_summary

    data = find_data(args.data)
    print("loading the frozen backbone (SmolLM2-135M-Instruct) and the encoder (all-MiniLM-L6-v2) ...")
    backbone = load_backbone(args.backbone, device=args.device, dtype=args.dtype)
    encoder = TextEncoder()
    train, test = persona_split(data)
    projector_dir = resolve_projector(args.projector or SHIPPED)
    projector = Projector.from_pretrained(projector_dir, backbone)
    projector.eval()
    print(f"projector {projector_dir}: {projector.config.injection} injection, k={projector.config.num_prefix_tokens}, "
          f"{parameter_summary(projector)}")
    trained_people = {e.person_id for e in train}
    people = {}
    for ex in test:
        if ex.person_id not in trained_people:
            people.setdefault(ex.person_id, ex)
    chosen = random.Random(args.seed).sample(sorted(people.values(), key=lambda e: e.person_id), 3)
    model = E2PModel(backbone, projector)
    vectors = list(encoder_for(projector.config, encoder).encode([ex.persona_text for ex in chosen]))
    import torch

    plain = model.generate([DEMO_MESSAGE], embeddings=[None], max_new_tokens=40)[0]
    replies = model.generate([DEMO_MESSAGE] * 3, embeddings=[torch.tensor(v) for v in vectors], max_new_tokens=40)
    print(f"\nmessage: {DEMO_MESSAGE}\n\nwithout E2P: {plain}\n")
    for ex, reply in zip(chosen, replies):
        print(f"unseen person: {ex.persona_text}\n  with E2P: {reply}\n")
    out = Path(tempfile.mkdtemp(prefix="e2p-demo-eval-"))
    print(f"perplexity of {args.limit} replies of unseen people (Synthetic-Persona-Chat test) under every condition:")
    shown = random.Random(args.seed).sample(test, min(args.limit, len(test)))
    users, examples = persona_contract(shown, encoder_for(projector.config, encoder), projector.config.history_turns)
    evaluate_examples(backbone, users, examples, projector_dir, out, generate=min(args.limit, 48), seed=args.seed,
                      encoder=encoder)
    print((out / "REPORT.md").read_text())
    print(f"(full report and plot in {out})")
