"""Persona evaluation: every condition scored by reply perplexity on the same examples.

Conditions (a baseline is a condition of the same loop, not another pipeline):
  none                the backbone alone
  text                persona sentences in the system prompt, untrained
  shared_prefix       k trained soft tokens with no user information (style only)
  shared_prefix_text  the same, trained and scored with the persona text (what text can add at all)
  shuffled            E2P fed another person's embedding (style without the person)
  e2p                 E2P
  e2p_text            E2P trained and scored together with the persona text
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.persona import PersonaExample
from ..encoders import encoder_for
from ..model import E2PModel
from ..projector import Projector
from ..recipe import person_table
from ..train import Item, row_losses
from .compare import derangement, paired_bootstrap

log = logging.getLogger(__name__)

PERSONA_CONDITIONS = ("none", "text", "shared_prefix", "shared_prefix_text", "shuffled", "e2p", "e2p_text")


@dataclass
class Condition:
    name: str
    projector_dir: Path | None  # None: the plain backbone
    with_text: bool
    embeddings: str  # "none" | "own" | "shuffled"


def persona_conditions(projector_dir: Path) -> list[Condition]:
    p = Path(projector_dir)
    return [
        Condition("none", None, False, "none"),
        Condition("text", None, True, "none"),
        Condition("shared_prefix", p / "shared_prefix", False, "none"),
        Condition("shared_prefix_text", p / "shared_prefix_text", True, "none"),
        Condition("shuffled", p, False, "shuffled"),
        Condition("e2p", p, False, "own"),
        Condition("e2p_text", p / "e2p_text", True, "own"),
    ]


def evaluate_persona(backbone, encoder, examples: list[PersonaExample], projector_dir: str | Path, out_dir: str | Path,
                     limit: int | None = None, batch_size: int = 16, seed: int = 0, history_turns: int | None = None,
                     max_target_tokens: int | None = None, progress: bool = True) -> dict:
    """Score every available condition on the same examples; write results.json, REPORT.md and a plot."""
    from tqdm.auto import tqdm

    projector_dir, out_dir = Path(projector_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = json.loads((projector_dir / "recipe.json").read_text()) if (projector_dir / "recipe.json").is_file() else {}
    history_turns = history_turns or recipe.get("history_turns", 3)
    max_target_tokens = max_target_tokens or recipe.get("max_target_tokens", 32)
    if limit and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
    # embed the people the way the projector was trained to read them (one vector, or one per sentence in slots)
    config = _plain_config(projector_dir)
    index, table = person_table(examples, encoder_for(config, encoder))
    people = [ex.person_id for ex in examples]
    own = [index[p] for p in people]
    swap = derangement(people, seed)
    conditions = [c for c in persona_conditions(projector_dir) if c.projector_dir is None or (c.projector_dir / "config.json").is_file()]
    skipped = [c.name for c in persona_conditions(projector_dir) if c not in conditions]
    results: dict = {"conditions": {}, "examples": len(examples), "people": len(set(people)), "skipped_conditions": skipped,
                     "projector": str(projector_dir), "history_turns": history_turns, "max_target_tokens": max_target_tokens}
    if (projector_dir / "config.json").is_file():  # 0: calibration found the person part only hurt validation people
        results["person_scale"] = config.person_scale
    per_example: dict[str, np.ndarray] = {}
    counts = None
    bar = tqdm(total=len(examples) * len(conditions), desc="eval", disable=not progress, dynamic_ncols=True)
    for cond in conditions:
        projector = Projector.from_pretrained(cond.projector_dir, backbone) if cond.projector_dir else None
        model = E2PModel(backbone, projector, config=None if projector else config)
        if projector is not None:
            projector.eval()
        rows = [model.format(ex.messages(history_turns), reply=ex.reply,
                             persona_text=ex.persona_text if cond.with_text else None,
                             max_target_tokens=max_target_tokens) for ex in examples]
        persons = [own[j] for j in swap] if cond.embeddings == "shuffled" else own
        items = [Item(r, persons[i]) for i, r in enumerate(rows)]
        use_table = table if (projector is not None and not projector.config.is_shared and cond.embeddings != "none") else None
        nll, cnt = row_losses(model, items, use_table, batch_size, progress=bar)
        counts = cnt if counts is None else counts
        if not np.array_equal(cnt, counts):
            raise RuntimeError("conditions scored different target tokens; this is a bug")
        per_example[cond.name] = nll
        k = model.num_prefix_tokens
        results["conditions"][cond.name] = {
            "perplexity": float(math.exp(nll.sum() / cnt.sum())),
            "nll_per_token": float(nll.sum() / cnt.sum()),
            "tokens_per_request": float(np.mean([len(r.pre) + len(r.post) for r in rows]) + k),
            "prefix_tokens": k,
            "trainable_parameters": projector.num_parameters() if projector is not None else 0,
            "bytes_per_user": int(projector.config.embedding_dim * 4) if projector is not None and not projector.config.is_shared else 0,
            "injection": projector.config.injection if projector is not None else None,
        }
    bar.close()
    results["target_tokens"] = int(counts.sum())
    results["comparisons"] = _comparisons(per_example, counts, people, results["conditions"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "REPORT.md").write_text(persona_report(results))
    plot_perplexities(results, out_dir / "perplexity.png")
    return results


def _plain_config(projector_dir: Path):
    """The plain backbone uses the same prompt format (system prompt) as the trained projectors."""
    from ..config import E2PConfig

    if (projector_dir / "config.json").is_file():
        return E2PConfig.load(projector_dir)
    return E2PConfig()


def _comparisons(per_example, counts, people, conds) -> dict:
    out = {}
    pairs = [("e2p", "shared_prefix"), ("e2p", "shuffled"), ("e2p", "none"), ("e2p_text", "shared_prefix_text"),
             ("shared_prefix_text", "shared_prefix"), ("text", "none")]
    for a, b in pairs:
        if a in per_example and b in per_example:
            lo, hi = paired_bootstrap(per_example[a], per_example[b], counts, people)
            out[f"{a}_vs_{b}"] = {"relative_change": conds[a]["perplexity"] / conds[b]["perplexity"] - 1, "ci95": [lo, hi]}
    if all(c in conds for c in ("shared_prefix", "shared_prefix_text", "e2p")):
        gain_text = conds["shared_prefix"]["perplexity"] - conds["shared_prefix_text"]["perplexity"]
        gain_e2p = conds["shared_prefix"]["perplexity"] - conds["e2p"]["perplexity"]
        out["share_of_text_gain_recovered"] = gain_e2p / gain_text if gain_text else None
    return out


def persona_report(results: dict) -> str:
    lines = [
        "# E2P persona evaluation", "",
        f"{results['examples']} replies of {results['people']} people, {results['target_tokens']} target tokens; "
        f"projector `{results['projector']}`.", "",
        "| condition | perplexity | prompt tokens / request | prefix tokens | trainable params | bytes / user |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in results["conditions"].items():
        lines.append(f"| {name} | {c['perplexity']:.3f} | {c['tokens_per_request']:.1f} | {c['prefix_tokens']} | "
                     f"{c['trainable_parameters']:,} | {c['bytes_per_user']} |")
    if results.get("skipped_conditions"):
        lines += ["", f"Not trained in this projector folder (skipped): {', '.join(results['skipped_conditions'])}."]
    if results.get("person_scale") == 0:
        lines += ["", "The projector's person_scale is 0: calibration on validation people found that the person part only "
                      "hurt, so `e2p` and `shuffled` are the shared prefix."]
    lines += ["", "## Paired comparisons (95% interval from a bootstrap over people)", "",
              "| comparison | perplexity change | 95% interval |", "|---|---|---|"]
    for key, v in results["comparisons"].items():
        if isinstance(v, dict):
            lines.append(f"| {key.replace('_vs_', ' vs ')} | {v['relative_change']*100:+.2f}% | "
                         f"[{v['ci95'][0]*100:+.2f}%, {v['ci95'][1]*100:+.2f}%] |")
    share = results["comparisons"].get("share_of_text_gain_recovered")
    if share is not None:
        lines += ["", f"Share of the text prompt's gain that E2P recovers, (shared_prefix - e2p) / "
                      f"(shared_prefix - shared_prefix_text): **{share:.2f}**"]
    return "\n".join(lines) + "\n"


def plot_perplexities(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["conditions"])
    values = [results["conditions"][n]["perplexity"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, values, color=["#999" if n in ("none", "text") else "#4a7" if n.startswith("e2p") else "#68c" for n in names])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("reply perplexity (lower is better)")
    ax.set_title(f"{results['examples']} replies of {results['people']} unseen people")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
