"""Persona dialogues -> the data contract: each reply is a target, its earlier turns the prompt, the persona
sentences the user's `profile_text`, and the user's embedding all-MiniLM-L6-v2 of the persona text.

`e2p data persona SRC --out OUT`: a folder gives its leakage-free split (training people in OUT, the unseen
test people in OUT/test, see `persona_split`); a single file goes whole into OUT.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .contract import Example, UserTable, write_examples, write_users
from .persona import LoadReport, PersonaExample, load_persona, persona_split


def write_persona_contract(src: str | Path, out: str | Path, history_turns: int = 2, include_msc: bool = False,
                           text_encoder=None) -> dict:
    from .encoders import TextEncoder

    src, out = Path(src), Path(out)
    report = LoadReport()
    train, test = persona_split(src, include_msc, report) if src.is_dir() else (load_persona(src, "all", report), [])
    encoder = text_encoder or TextEncoder()
    card = {"source": str(src), "loaded": str(report), "history_turns": history_turns,
            "embedding": "all-MiniLM-L6-v2 of the persona sentences joined", "parts": {}}
    for name, examples, folder in (("train", train, out), ("test", test, out / "test")):
        if not examples:
            continue
        personas: dict[str, str] = {}
        for ex in examples:
            personas.setdefault(ex.person_id, ex.persona_text)
        ids = sorted(personas)
        vectors = np.asarray(encoder.encode([personas[i] for i in ids]), dtype=np.float32)
        write_users(folder / "users.npz", ids, vectors)
        write_examples(folder / "examples.jsonl", [_example(ex, history_turns) for ex in examples])
        card["parts"][name] = {"folder": str(folder), "users": len(ids), "examples": len(examples)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_card.json").write_text(json.dumps(card, indent=2))
    return card


def _example(ex: PersonaExample, history_turns: int) -> Example:
    return Example(ex.person_id, ex.messages(history_turns), ex.reply, profile_text=ex.persona_text)


def persona_contract(examples: list[PersonaExample], encoder, history_turns: int = 2) -> tuple[UserTable, list[Example]]:
    """Persona examples in memory -> (users, examples) of the contract: each person's persona text embedded by
    `encoder` (the projector's own, `e2p.data.encoders.encoder_for(config)`), each reply an example."""
    personas: dict[str, str] = {}
    for ex in examples:
        personas.setdefault(ex.person_id, ex.persona_text)
    ids = sorted(personas)
    vectors = np.asarray(encoder.encode([personas[i] for i in ids]), dtype=np.float32)
    return UserTable(ids, vectors, "persona text"), [_example(ex, history_turns) for ex in examples]
