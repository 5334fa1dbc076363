"""Which gap-closing candidate a run trained, and why, for the verdict of its training report.

The default recipe is what won the PENS study on validation users (docs/studies.md, "Closing the gap"); a run
that sets another candidate's flags says so, so a report never reads as the default when it is not.
"""
from __future__ import annotations

DEFAULT_WHY = ("the default recipe (MLP person map, k=1): on PENS validation users what carried the person was the "
               "embedding, not another person map: the text profile joined with the history's headline style "
               "(users_text_style.npz) gave -4.45% vs shared_prefix where the text profile alone gave -0.01%; "
               "against shuffled (the control that keeps the style and swaps the person) it beat prototype mixing "
               "(-8.34% vs -7.30%; most of the mix's gain over the shared prefix is the mixture itself, and it ships "
               "the training users' own prefixes, which DP cannot cover) and the shared LoRA (-0.37% vs its shared "
               "prefix) (docs/studies.md, Closing the gap)")


def candidate(cfg) -> dict:
    """The run's candidate: its name, the settings that make it, and why it was trained."""
    settings = {"person_map": cfg.person_map, "embedding_slots": cfg.embedding_slots, "lora_rank": cfg.lora_rank,
                "num_prefix_tokens": cfg.num_prefix_tokens, "injection": cfg.injection,
                "hidden_dims": list(cfg.hidden_dims)}
    parts = []
    if cfg.person_map != "mlp":
        parts.append(f"person map {cfg.person_map}")
    if cfg.embedding_slots > 1:
        parts.append(f"{cfg.embedding_slots} embedding slots")
    if cfg.lora_rank:
        parts.append(f"shared LoRA rank {cfg.lora_rank}")
    if not parts:
        return {"name": "default (MLP person map)", "settings": settings, "why": DEFAULT_WHY}
    return {"name": ", ".join(parts), "settings": settings,
            "why": "chosen by this run's flags (not the default recipe); compare its verdict with a default run's"}
