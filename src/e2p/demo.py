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


def run_demo(args) -> None:
    from .data.persona import LoadReport, load_persona, persona_split
    from .encoders import TextEncoder, encoder_for
    from .evaluate import evaluate_persona
    from .backbone import load_backbone
    from .config import resolve_projector
    from .model import E2PModel
    from .projector import Projector, parameter_summary

    data = find_data(args.data)
    print(f"loading the frozen backbone (SmolLM2-135M-Instruct) and the encoder (all-MiniLM-L6-v2) ...")
    backbone = load_backbone(args.backbone)
    encoder = TextEncoder()
    train, test = persona_split(data)
    projector_dir = resolve_projector(args.projector) if args.projector else SHIPPED
    if not (projector_dir / "config.json").is_file():
        from .recipe import RecipeConfig, run_recipe

        projector_dir = Path(tempfile.mkdtemp(prefix="e2p-demo-"))
        print(f"no shipped projector; training a small one into {projector_dir} (a few CPU minutes) ...")
        cfg = RecipeConfig(shared_steps=20, reconstruct_steps=0, e2p_steps=30, eval_every=15, val_examples=32)
        run_recipe(backbone, encoder, train, projector_dir, cfg)
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
    evaluate_persona(backbone, encoder, test, projector_dir, out, limit=args.limit, seed=args.seed)
    print((out / "REPORT.md").read_text())
    print(f"(full report and plot in {out})")
