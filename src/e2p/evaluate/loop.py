"""The evaluation loop on the data contract: conditions x examples -> per-example losses and greedy generations
-> comparisons with intervals over users -> results.json, REPORT.md and plots (`report.py`).

A baseline is a condition (how to build the model, which prompt, which embeddings), never a second pipeline:
  none           the backbone alone
  text           the user's `profile_text` in the system prompt (only where every example has one)
  shared_prefix  the trained style-only prefix: no user information
  shuffled       the E2P projector fed another user's embedding: the style without the person
  shuffled_trained  instead of `shuffled` where the run trained it (e2p train --lora-rank): the e2p stage trained
                 alike on other users' embeddings (`shuffled_trained/`), scored with the users' own
  e2p            the E2P projector with the user's own embedding
  e2p_text       E2P trained and scored together with the profile text (where trained)
A study adds its own: another embedding table for the same users (`Condition.users`), a LoRA adapter on the
backbone (`Condition.adapter`, a folder in PEFT's format, applied by e2p.lora), and fixed texts scored like generations (`baselines`, e.g.
copying the headline quoted in the prompt).
"""
from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import E2PConfig, resolve_projector
from ..data.contract import Example, UserTable, limit_examples
from ..errors import ConfigError
from ..engines.base import Engine
from ..model import E2PModel
from ..projector import Projector
from .scoring import Item, derangement, row_losses
from .compare import compare

log = logging.getLogger(__name__)

PAIRS = [("e2p", "shared_prefix"), ("e2p", "shuffled"), ("e2p", "shuffled_trained"), ("e2p", "none"), ("shared_prefix", "none"),
         ("text", "none"), ("e2p_text", "text"), ("e2p_text", "shared_prefix_text")]


@dataclass
class Condition:
    name: str
    projector_dir: Path | None  # None: the plain backbone
    with_text: bool = False  # the user's profile_text in the system prompt
    embeddings: str = "none"  # "none" | "own" | "shuffled"
    users: UserTable | None = None  # this condition's embedding table (default: the evaluation's)
    adapter: Path | None = None  # a LoRA adapter folder (PEFT's format) applied to the backbone for this condition


def conditions_for(projector_dir: str | Path, with_text: bool) -> list[Condition]:
    """The conditions a projector folder (as `e2p train` writes it) supports; text ones only `with_text`."""
    p = Path(projector_dir)
    trained = p / "shuffled_trained"  # the shuffled control trained alike (a run with a shared LoRA adapter)
    shuffled = (Condition("shuffled_trained", trained, embeddings="own") if (trained / "config.json").is_file()
                else Condition("shuffled", p, embeddings="shuffled"))
    conds = [Condition("none", None), Condition("shared_prefix", p / "shared_prefix"), shuffled,
             Condition("e2p", p, embeddings="own")]
    if with_text:
        conds += [Condition("text", None, with_text=True),
                  Condition("shared_prefix_text", p / "shared_prefix_text", with_text=True),
                  Condition("e2p_text", p / "e2p_text", with_text=True, embeddings="own")]
    return [c for c in conds if c.projector_dir is None or (c.projector_dir / "config.json").is_file()]


def _model(backbone, cond: Condition, plain: E2PConfig, engine=None) -> Engine:
    """The condition's model on the chosen engine (`engine(backbone, projector, config)`; default: torch)."""
    projector = Projector.from_pretrained(cond.projector_dir, backbone).eval() if cond.projector_dir else None
    return (engine or E2PModel)(backbone, projector, config=None if projector else plain)


@contextmanager
def _adapter(backbone, folder: Path | None):
    """The backbone with a LoRA adapter folder (PEFT's format) active for the duration (e2p.lora: the backbone's
    weights never change), inactive again after."""
    if folder is None:
        yield
        return
    from ..lora import active, load_peft

    adapter = load_peft(folder, backbone.model).to(backbone.device)
    with active(backbone.model, adapter):
        yield


def run_conditions(backbone, conditions: list[Condition], examples: list[Example], users: UserTable, *,
                   plain_config: E2PConfig | None = None, max_target_tokens: int = 64, batch_size: int = 16,
                   generate: int = 0, max_new_tokens: int = 32, seed: int = 0, progress: bool = True,
                   engine=None) -> dict:
    """Score every condition on the same examples (same target tokens, checked) and, for the first `generate`
    examples, greedy generations. -> {"nll": {cond: [N]}, "counts": [N], "generations": {cond: [G]}}."""
    from tqdm.auto import tqdm

    plain = plain_config or E2PConfig()
    swap = derangement([ex.user for ex in examples], seed)
    n_gen = min(generate, len(examples))
    bar = tqdm(total=len(conditions) * (len(examples) + n_gen), desc="eval", disable=not progress, dynamic_ncols=True)
    nll, counts, generations, costs = {}, None, {}, {}
    for cond in conditions:
        table_of = cond.users or users
        table = table_of.tensor()
        own = [table_of.index[ex.user] for ex in examples]
        persons = {"own": own, "shuffled": [own[j] for j in swap], "none": own}
        model = _model(backbone, cond, plain, engine)
        if cond.adapter is not None and model.projector is not None and model.projector.lora is not None:
            raise ConfigError(f"condition {cond.name}: a LoRA folder and a projector with its own shared adapter; give one")
        reads_user = model.projector is not None and not model.projector.config.is_shared and cond.embeddings != "none"
        text = lambda ex: ex.profile_text if cond.with_text else None
        rows = [model.format(ex.prompt, reply=ex.target, persona_text=text(ex), max_target_tokens=max_target_tokens)
                for ex in examples]
        items = [Item(r, persons[cond.embeddings][i]) for i, r in enumerate(rows)]
        costs[cond.name] = _costs(model, rows, reads_user)
        with _adapter(backbone, cond.adapter):
            loss, cnt = row_losses(model, items, table if reads_user else None, batch_size, progress=bar)
            if counts is not None and not np.array_equal(cnt, counts):
                raise RuntimeError(f"condition {cond.name} scored other target tokens than the first; this is a bug")
            nll[cond.name], counts = loss, cnt
            if n_gen:
                shown = examples[:n_gen]
                embeddings = table[persons[cond.embeddings][:n_gen]] if reads_user else None
                generations[cond.name] = model.generate([ex.prompt for ex in shown], embeddings, max_new_tokens,
                                                        persona_texts=[text(ex) for ex in shown], batch_size=batch_size)
                bar.update(n_gen)
    bar.close()
    return {"nll": nll, "counts": counts, "generations": generations, "costs": costs}


def _costs(model: Engine, rows, reads_user: bool) -> dict:
    """What a condition costs per request and per user: context tokens (prompt + soft prefix), trained parameters,
    bytes stored per user."""
    from ..projector import adapter_cost

    p = model.projector
    return {"tokens_per_request": float(np.mean([len(r.pre) + len(r.post) for r in rows])) + model.num_prefix_tokens,
            "prefix_tokens": model.num_prefix_tokens,
            "trainable_parameters": p.num_parameters() if p is not None else 0,
            "bytes_per_user": int(p.config.embedding_dim * 4) if reads_user else 0,
            **adapter_cost(p)}  # a shared adapter's parameters are counted once, for every user: not per user


def generation_metrics(generations: dict[str, list[str]], examples: list[Example], encoder=None) -> dict:
    """ROUGE-1/2/L against each example's own target and identification (e2p.evaluate.identification): how often
    a generation is closer to its own user's reference than to every other evaluated user's, read by text alone
    (`identification`, all-MiniLM-L6-v2 cosine to the profile text or the user's other targets) and by text and
    writing style (`identification_style`, against the user's other targets), each with a 95% interval over users."""
    from .text_metrics import rouge
    from .identification import identify

    if not generations:
        return {}
    n = len(next(iter(generations.values())))
    shown = examples[:n]
    out: dict = {name: rouge(texts, [ex.target for ex in shown]) for name, texts in generations.items()}
    if encoder is None:
        return out
    by_text, info = identify(generations, examples, encoder, "text")
    by_style, style_info = identify(generations, examples, encoder, "text+style")
    for name in generations:
        out[name].update(by_text[name])
        out[name]["identification_style"] = by_style[name]["identification"]
        out[name]["identification_style_ci95"] = by_style[name]["identification_ci95"]
    out["_identification"] = {**info, "style": style_info}
    return out


def evaluate_examples(backbone, users: UserTable, examples: list[Example], projector_dir: str | Path,
                      out_dir: str | Path | None = None, *, conditions: list[Condition] | None = None,
                      limit: int | None = None, generate: int = 64, max_target_tokens: int | None = None,
                      batch_size: int = 16, seed: int = 0, encoder=None, progress: bool = True,
                      baselines: dict | None = None, pairs: list[tuple[str, str]] | None = None, engine=None,
                      only: list[str] | None = None) -> dict:
    """Every condition the projector folder supports, on the same examples of unseen users: perplexity on
    target tokens, paired 95% intervals over users, ROUGE-1/2/L and identification of greedy generations.
    Writes results.json, REPORT.md and plots to `out_dir` when given. `encoder`: for identification
    (default: all-MiniLM-L6-v2 when generating; pass False to skip). `max_target_tokens`: default the
    projector config's (what it was trained with). `baselines`: {name: fn(example) -> text},
    texts scored like generations (no perplexity), e.g. copying a headline the prompt quotes. `pairs`: the
    comparisons (default: the standard ones present). `engine`: how each condition's model is made, e.g.
    `e2p.engines.llamacpp.LlamaCppModel.factory(backend)` (default: the torch E2PModel). `only`: score just these
    condition names (e.g. skip the slow text conditions)."""
    from .report import write_report

    projector_dir = resolve_projector(projector_dir)
    examples = limit_examples(examples, limit, seed)
    examples = _interleave_users(examples, seed)  # generations spread over users, not the first few
    with_text = all(ex.profile_text for ex in examples)
    conditions = conditions or conditions_for(projector_dir, with_text)
    if only:
        unknown = sorted(set(only) - {c.name for c in conditions})
        if unknown:
            raise ConfigError(f"condition(s) {', '.join(unknown)} not available here; this projector and these examples "
                              f"support: {', '.join(c.name for c in conditions)}")
        conditions = [c for c in conditions if c.name in only]
    plain = E2PConfig.load(projector_dir)
    max_target_tokens = max_target_tokens or plain.max_target_tokens  # as the projector was trained
    scores = run_conditions(backbone, conditions, examples, users, plain_config=plain, max_target_tokens=max_target_tokens,
                            batch_size=batch_size, generate=generate, seed=seed, progress=progress, engine=engine)
    if encoder is None and generate:
        from ..data.encoders import TextEncoder

        encoder = TextEncoder()
    n_gen = len(next(iter(scores["generations"].values()), []))
    fixed = {name: [fn(ex) for ex in examples[:n_gen]] for name, fn in (baselines or {}).items()} if n_gen else {}
    gen = generation_metrics({**scores["generations"], **fixed}, examples, encoder or None)
    counts, people = scores["counts"], [ex.user for ex in examples]
    results = {
        "projector": str(projector_dir), "examples": len(examples), "users": len(set(people)),
        "target_tokens": int(counts.sum()), "person_scale": plain.person_scale,
        "conditions": {name: {"perplexity": math.exp(nll.sum() / counts.sum()), "nll_per_token": float(nll.sum() / counts.sum()),
                              **scores["costs"][name], **gen.get(name, {})} for name, nll in scores["nll"].items()},
        "comparisons": compare(scores["nll"], counts, people, pairs or PAIRS, seed=seed),
        "identification": gen.get("_identification"),
        "samples": _samples(examples, {**scores["generations"], **fixed}),
    }
    for name in fixed:
        results["conditions"][name] = {"perplexity": None, **gen.get(name, {})}
    results["verdict"] = verdict(results)
    if out_dir is not None:
        write_report(results, Path(out_dir))
    return results


def _interleave_users(examples: list[Example], seed: int) -> list[Example]:
    """Round-robin over users (each user's examples in a seeded order), so any prefix covers many users."""
    rng = random.Random(seed)
    by_user: dict[str, list[Example]] = {}
    for ex in examples:
        by_user.setdefault(ex.user, []).append(ex)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_user.items())]
    rng.shuffle(queues)
    out = []
    while queues:
        out += [q.pop() for q in queues]
        queues = [q for q in queues if q]
    return out


def _samples(examples: list[Example], generations: dict[str, list[str]], n: int = 6) -> list[dict]:
    if not generations:
        return []
    count = min(n, len(next(iter(generations.values()))))
    return [{"user": ex.user, "prompt": ex.prompt if isinstance(ex.prompt, str) else ex.prompt[-1]["content"],
             "target": ex.target, **{name: texts[i] for name, texts in generations.items()}}
            for i, ex in enumerate(examples[:count])]


def verdict(results: dict) -> dict:
    """One plain answer: does the embedding carry the person? Yes only if e2p beats both style-only controls
    (shared_prefix and shuffled) with both 95% intervals below zero."""
    comps = results["comparisons"]
    shuffled = "shuffled_trained" if "e2p_vs_shuffled_trained" in comps else "shuffled"  # trained alike, where it is
    vs_shared, vs_shuffled = comps.get("e2p_vs_shared_prefix"), comps.get(f"e2p_vs_{shuffled}")
    if vs_shared is None or vs_shuffled is None:
        return {"carries_person": None, "text": "not measured: the projector folder lacks shared_prefix/ or e2p"}
    fmt = lambda c: f"{c['relative_change'] * 100:+.2f}% [{c['ci95'][0] * 100:+.2f}, {c['ci95'][1] * 100:+.2f}]"
    numbers = (f"perplexity e2p vs shared_prefix {fmt(vs_shared)}, vs {shuffled} {fmt(vs_shuffled)} (95% intervals "
               "over users)")
    yes = vs_shared["ci95"][1] < 0 and vs_shuffled["ci95"][1] < 0
    if yes:
        text = f"YES: the embedding carries the person on users never trained on: {numbers}."
    elif results.get("person_scale") == 0:
        text = (f"NO: calibration on validation users set the person part to 0 (every share of it hurt), so e2p is the "
                f"style-only prefix: {numbers}. These embeddings do not carry what the targets need about new users.")
    else:
        text = (f"NO (not shown): e2p does not beat both style-only controls with intervals excluding zero: {numbers}. "
                "The gain, if any, is style, not the person.")
    return {"carries_person": yes, "text": text}
