"""The paper's study in one run: `e2p eval --suite paper --data PATH --out DIR [--quick]`.

Every baseline, reference and robustness variant is a *condition of the same loop*, scored on the same
examples (same target tokens), so every number in the report is directly comparable within its part.

PENS part (when the data holds a PENS .tsv): personalized headlines, two user-embedding kinds (text profile:
mean MiniLM embedding of the history headlines; behavioural: co-click factorization of the clicks).
  none, text, shared_prefix, shuffled, e2p               (text profile)
  shuffled_behaviour, e2p_behaviour                      (behavioural profile)
  prompt_tuning   per-user soft prompt (seen users only)  fine-tuning reference
  lora_text       LoRA r=8 on q_proj,v_proj, profile as text   fine-tuning reference
  robustness: Gaussian drift of the embedding, the profile from the other half of the history, prefix
  length k, seen vs unseen users.
Persona part (when the data holds persona files): :func:`~e2p.evaluate.evaluate_persona` with a projector
trained here (or given), plus generation metrics, embedding drift and MSC personas refreshed after later sessions.

Per-user prompt tuning is a shared :class:`~e2p.projector.Projector` (embedding_dim 0) trained per user, started
from the trained shared prefix, rather than PEFT's PromptTuningConfig: it goes through exactly the same
E2PModel formatting and injection (deep KV or input tokens, same position), so it differs from E2P only in
where the prefix comes from (a per-user trained table instead of a projected embedding).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .config import E2PConfig
from .errors import DataError
from .evaluate import derangement, evaluate_persona, paired_bootstrap
from .lora import train_lora
from .model import E2PModel
from .projector import Projector
from .train import Item, TrainConfig, row_losses, train_projector

log = logging.getLogger(__name__)



@dataclass
class SuiteConfig:
    quick: bool = False
    seed: int = 0
    injection: str = "deep"
    num_prefix_tokens: int = 1
    hidden_dims: list[int] = field(default_factory=lambda: [1024])
    batch_size: int = 16
    eval_batch_size: int = 16
    max_target_tokens: int = 32
    train_minutes: float | None = None  # wall-clock cap over all training, split by planned steps
    # PENS
    pens_users: int | None = None  # cap on the users used (None: all)
    unseen_fraction: float = 0.2
    seen_eval_users: int = 12
    unseen_eval_users: int | None = None
    eval_targets_per_user: int = 10
    train_targets_per_user: int | None = None
    history_token_budget: int = 256
    behaviour_dim: int = 64
    shared_steps: int = 150
    e2p_steps: int = 300
    lora_steps: int = 300
    lora_lr: float = 3e-4
    lora_rank: int = 8
    prompt_tuning_users: int = 12
    prompt_tuning_steps: int = 60
    k_shared_steps: int = 100
    k_e2p_steps: int = 200
    prefix_lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    noise_levels: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 1.0])
    drift_behaviour: bool = True  # also the noise curve of the behavioural embedding (quick: text profile only)
    gen_limit: int = 64  # users (PENS) / examples (persona) with greedy generations per condition
    max_new_tokens: int = 24
    # persona
    persona_train_people: int | None = None
    persona_val_people: int = 40
    persona_val_examples: int = 96
    persona_shared_steps: int = 150
    persona_e2p_steps: int = 200
    persona_limit: int = 400
    msc_limit: int = 200  # examples per MSC session file

    @classmethod
    def preset(cls, quick: bool = False, **overrides) -> "SuiteConfig":
        """The full study, or `quick`: a budget that finishes in < 10 min on 2 CPU cores with SmolLM2-135M."""
        values: dict = {}
        if quick:
            values = dict(
                quick=True, batch_size=4, eval_batch_size=12, max_target_tokens=24, train_minutes=3.5,
                pens_users=24, unseen_fraction=0.25, seen_eval_users=6, unseen_eval_users=6, eval_targets_per_user=3,
                train_targets_per_user=20, history_token_budget=96, shared_steps=12, e2p_steps=24, lora_steps=12,
                prompt_tuning_users=3, prompt_tuning_steps=6, k_shared_steps=6, k_e2p_steps=12, prefix_lengths=[1, 2],
                gen_limit=12, max_new_tokens=16, persona_train_people=120, persona_val_people=8,
                persona_val_examples=8, persona_shared_steps=10, persona_e2p_steps=20, persona_limit=16, msc_limit=8,
                drift_behaviour=False,
            )
        values.update(overrides)
        return cls(**values)

    def budget_text(self) -> str:
        return (f"PENS: up to {self.pens_users or 'all'} users ({self.unseen_fraction:.0%} unseen), "
                f"{self.seen_eval_users} seen + {self.unseen_eval_users or 'all'} unseen evaluated users x "
                f"{self.eval_targets_per_user} targets, history text budget {self.history_token_budget} tokens; "
                f"steps: shared {self.shared_steps}, e2p {self.e2p_steps} (each embedding kind), LoRA {self.lora_steps}, "
                f"prompt tuning {self.prompt_tuning_steps} x {self.prompt_tuning_users} users, "
                f"k curve {self.prefix_lengths} at {self.k_shared_steps}+{self.k_e2p_steps}; batch {self.batch_size}; "
                f"generations: {self.gen_limit} per condition, {self.max_new_tokens} new tokens. "
                f"Persona: train {self.persona_train_people or 'all'} people, steps {self.persona_shared_steps}+"
                f"{self.persona_e2p_steps}, {self.persona_limit} scored replies, MSC {self.msc_limit} per session. "
                f"Drift noise levels {self.noise_levels} (behavioural embedding too: {self.drift_behaviour}). "
                f"Training wall-clock cap: {self.train_minutes if self.train_minutes is not None else 'none'} min"
                + (" (quick mode is sized to finish in under 10 min on 2 CPU cores with SmolLM2-135M: training is "
                   "capped by this wall-clock budget, scoring and generation by the row counts above)." if self.quick else "."))


class _Encoder:
    """Accept any encoder with `.encode(list[str]) -> array` (and `.name`, `.dim`); drop extra keyword args."""

    def __init__(self, encoder):
        self.inner = encoder
        self.name = getattr(encoder, "name", "")
        self.dim = getattr(encoder, "dim", None)

    def encode(self, texts, **_) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        return np.asarray(self.inner.encode(list(texts)), dtype=np.float32)


class _Progress:
    """One suite-level progress bar over the planned units of work."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="suite", disable=not enabled, dynamic_ncols=True)

    def step(self, what: str, n: int = 1) -> None:
        self.bar.set_postfix_str(what[:40])
        self.bar.update(n)

    def close(self) -> None:
        self.bar.n = max(self.bar.n, self.bar.total or 0)
        self.bar.refresh()
        self.bar.close()


class _Clock:
    """Splits `train_minutes` across training calls in proportion to their planned steps."""

    def __init__(self, minutes: float | None, planned_steps: int):
        self.minutes, self.planned = minutes, max(planned_steps, 1)

    def __call__(self, steps: int) -> float | None:
        return None if self.minutes is None else self.minutes * steps / self.planned


def _clean(x):
    """JSON-safe: numpy scalars to Python, NaN / inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _ppl(nll: np.ndarray, cnt: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    ok = np.isfinite(nll) if mask is None else (np.isfinite(nll) & mask)
    if not ok.any() or cnt[ok].sum() == 0:
        return None
    return float(math.exp(nll[ok].sum() / cnt[ok].sum()))


def add_noise(table: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """Each row plus Gaussian noise whose norm is `level` x the row's norm (fixed by the seed)."""
    if level == 0:
        return table.clone()
    g = torch.randn(table.shape, generator=torch.Generator().manual_seed(seed))
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return table + level * table.norm(dim=-1, keepdim=True) * g


def _text_metrics(encoder, preds: list[str], refs: list[list[str]], profiles: np.ndarray | None,
                  persona_index: list[int] | None) -> dict:
    from .metrics import bleu, persona_consistency, rouge

    out: dict = {"generations": len(preds)}
    out.update(rouge(preds, refs))
    out["bleu"] = bleu(preds, refs)
    if profiles is not None and len(set(persona_index)) >= 2:
        try:
            c = persona_consistency(encoder.encode([p or " " for p in preds]), profiles, np.asarray(persona_index))
            out["consistency_margin"], out["consistency_accuracy"] = c["margin"], c["accuracy"]
            out["consistency_chance"] = c["chance_accuracy"]
        except Exception as exc:  # noqa: BLE001 - a degenerate generation must not stop the study
            log.warning("persona consistency not computed: %s", exc)
    return out


# ----------------------------------------------------------------------------------------------------------
# Scoring: one table of conditions on one fixed set of rows
# ----------------------------------------------------------------------------------------------------------
class Scorer:
    """Scores conditions on the same rows; checks they all score the same target tokens."""

    def __init__(self, groups: list[str], seen: np.ndarray, batch_size: int, progress: _Progress):
        self.groups, self.seen, self.batch_size, self.progress = groups, seen, batch_size, progress
        self.counts: np.ndarray | None = None
        self.per_example: dict[str, np.ndarray] = {}

    def score(self, name: str, model: E2PModel, rows, embeddings: torch.Tensor | None, rows_idx=None,
              keep: bool = True) -> dict:
        n = len(self.groups)
        idx = list(range(n)) if rows_idx is None else list(rows_idx)
        items = [Item(rows[i], j) for j, i in enumerate(idx)]
        if model.projector is not None:
            model.projector.eval()
        nll, cnt = row_losses(model, items, embeddings, self.batch_size)
        full, full_cnt = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
        full[idx], full_cnt[idx] = nll, cnt
        if self.counts is None:
            if len(idx) != n:
                raise RuntimeError("the first condition must score every row")
            self.counts = full_cnt
        elif not np.array_equal(full_cnt[idx], self.counts[idx]):
            raise RuntimeError(f"condition {name} scored different target tokens; this is a bug")
        self.last = full
        if keep:
            self.per_example[name] = full
        self.progress.step(name)
        return self.summary(full, model, [rows[i] for i in idx])

    def summary(self, nll: np.ndarray, model: E2PModel, rows) -> dict:
        k = model.num_prefix_tokens
        return {"perplexity": _ppl(nll, self.counts), "perplexity_seen": _ppl(nll, self.counts, self.seen),
                "perplexity_unseen": _ppl(nll, self.counts, ~self.seen), "rows": int(np.isfinite(nll).sum()),
                "prompt_tokens_per_request": float(np.mean([len(r.pre) + len(r.post) for r in rows]) + k),
                "prefix_tokens": k}

    def compare(self, a: str, b: str, mask: np.ndarray | None = None) -> dict | None:
        if a not in self.per_example or b not in self.per_example:
            return None
        x, y = self.per_example[a], self.per_example[b]
        ok = np.isfinite(x) & np.isfinite(y) & (mask if mask is not None else True)
        if not ok.any():
            return None
        groups = [g for g, o in zip(self.groups, ok) if o]
        change = math.exp((x[ok].sum() - y[ok].sum()) / self.counts[ok].sum()) - 1
        lo, hi = paired_bootstrap(x[ok], y[ok], self.counts[ok], groups)
        return {"relative_change": change, "ci95": [lo, hi], "rows": int(ok.sum()), "people": len(set(groups))}


def _generate(model: E2PModel, prompts, embeddings, cfg: SuiteConfig, persona_texts=None) -> list[str]:
    out = []
    for i in range(0, len(prompts), cfg.eval_batch_size):
        emb = None if embeddings is None else embeddings[i:i + cfg.eval_batch_size]
        pt = None if persona_texts is None else persona_texts[i:i + cfg.eval_batch_size]
        out += model.generate(prompts[i:i + cfg.eval_batch_size], embeddings=emb, max_new_tokens=cfg.max_new_tokens,
                              persona_texts=pt)
    return out


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning references
# ----------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------
# PENS
# ----------------------------------------------------------------------------------------------------------
def _pens_planned_steps(cfg: SuiteConfig) -> int:
    extra_k = [k for k in cfg.prefix_lengths if k != cfg.num_prefix_tokens]
    return (cfg.shared_steps + 2 * cfg.e2p_steps + cfg.lora_steps + cfg.prompt_tuning_steps * cfg.prompt_tuning_users
            + len(extra_k) * (cfg.k_shared_steps + cfg.k_e2p_steps))


def _pens_units(cfg: SuiteConfig) -> int:
    return 14 + 2 * len(cfg.noise_levels) + 3 * len(cfg.prefix_lengths) + cfg.prompt_tuning_users


def run_pens(backbone, encoder, users, out_dir: Path, cfg: SuiteConfig, progress: _Progress, clock: _Clock,
             show_bars: bool = True) -> dict:
    from .pens_task import PENS_PROMPT, PENS_SYSTEM_PROMPT, build_pens_task, text_prompt
    from .recipe import RecipeConfig, train_prefix_stages

    out_dir.mkdir(parents=True, exist_ok=True)
    task = build_pens_task(users, encoder, backbone.tokenizer, seed=cfg.seed, max_users=cfg.pens_users,
                           unseen_fraction=cfg.unseen_fraction, seen_eval_users=cfg.seen_eval_users,
                           unseen_eval_users=cfg.unseen_eval_users, eval_targets=cfg.eval_targets_per_user,
                           train_targets=cfg.train_targets_per_user, history_token_budget=cfg.history_token_budget,
                           behaviour_dim=cfg.behaviour_dim)
    progress.step("pens data")
    result: dict = {"data": task.info, "conditions": {}, "generation": {}}
    rc = RecipeConfig(injection=cfg.injection, num_prefix_tokens=cfg.num_prefix_tokens, hidden_dims=cfg.hidden_dims,
                      max_target_tokens=cfg.max_target_tokens, batch_size=cfg.batch_size, shared_steps=cfg.shared_steps,
                      e2p_steps=cfg.e2p_steps, eval_every=max(cfg.e2p_steps, cfg.shared_steps, 1), seed=cfg.seed)
    common = dict(encoder_name=encoder.name, system_prompt=PENS_SYSTEM_PROMPT, progress=show_bars)
    train = task.train_tuples()
    text_dir, beh_dir = out_dir / "e2p_text_profile", out_dir / "e2p_behaviour"
    rep_text = train_prefix_stages(backbone, train, task.text_table, text_dir, rc,
                                   minutes=clock(cfg.shared_steps + cfg.e2p_steps), **common)
    progress.step("trained e2p (text)")
    rep_beh = None
    if task.behaviour_table is not None:
        rep_beh = train_prefix_stages(backbone, train, task.behaviour_table, beh_dir, rc, shared_dir=rep_text["shared_dir"],
                                      minutes=clock(cfg.e2p_steps), **common)
    progress.step("trained e2p (behaviour)")

    # the fixed rows every condition is scored on
    rows_meta = task.eval_rows()
    people = [u for u, _, _ in rows_meta]
    seen = np.array([s for _, _, s in rows_meta])
    person_rows = torch.tensor([task.index[u] for u in people])
    scorer = Scorer(people, seen, cfg.eval_batch_size, progress)
    plain_cfg = E2PConfig(system_prompt=PENS_SYSTEM_PROMPT)
    plain = E2PModel(backbone, None, config=plain_cfg)
    mt = cfg.max_target_tokens
    rows_plain = [plain.format(PENS_PROMPT, reply=t, max_target_tokens=mt) for _, t, _ in rows_meta]
    rows_text = [plain.format(text_prompt(task.profile_text[u]), reply=t, max_target_tokens=mt) for u, t, _ in rows_meta]
    swap = derangement(people, cfg.seed)
    swapped_rows = person_rows[torch.tensor(swap)]
    gen_users = _interleave(task.seen_eval_ids, task.unseen_ids)[:cfg.gen_limit]
    gen_refs = [task.eval_targets[u] for u in gen_users]
    gen_rows = torch.tensor([task.index[u] for u in gen_users])
    gen_swap = torch.tensor([task.index[gen_users[j]] for j in derangement(gen_users, cfg.seed)]) if len(gen_users) > 1 else gen_rows
    profiles = task.text_table[gen_rows].numpy()
    text_bytes = float(np.mean([len(task.profile_text[u].encode()) for u in task.eval_ids]))

    def gen(name, model, prompts, emb):
        preds = _generate(model, prompts, emb, cfg)
        result["generation"][name] = _text_metrics(encoder, preds, gen_refs, profiles, list(range(len(gen_users))))
        result["generation"][name]["examples"] = [{"user": u, "generated": p, "reference": r[0]}
                                                 for u, p, r in list(zip(gen_users, preds, gen_refs))[:3]]
        progress.step(f"generate {name}")

    def record(name, summary, params=0, bytes_per_user=0, seconds=0.0, **extra):
        summary.update(trainable_parameters=params, bytes_per_user=bytes_per_user, train_seconds=seconds, **extra)
        result["conditions"][name] = summary

    plain_prompts = [PENS_PROMPT] * len(gen_users)
    text_prompts = [text_prompt(task.profile_text[u]) for u in gen_users]
    record("none", scorer.score("none", plain, rows_plain, None))
    gen("none", plain, plain_prompts, None)
    record("text", scorer.score("text", plain, rows_text, None), bytes_per_user=text_bytes)
    gen("text", plain, text_prompts, None)

    shared_p = Projector.from_pretrained(rep_text["shared_dir"], backbone)
    shared_m = E2PModel(backbone, shared_p)
    shared_s = rep_text["stages"].get("shared_prefix", {}).get("seconds", 0.0)
    record("shared_prefix", scorer.score("shared_prefix", shared_m, rows_plain, None), shared_p.num_parameters(), 0, shared_s)
    gen("shared_prefix", shared_m, plain_prompts, None)

    def e2p_block(suffix: str, folder: Path, rep: dict, table: torch.Tensor, drift_levels):
        proj = Projector.from_pretrained(folder, backbone)
        m = E2PModel(backbone, proj)
        secs = shared_s + rep["stages"].get("e2p", {}).get("seconds", 0.0)
        meta = dict(params=proj.num_parameters(), bytes_per_user=int(table.shape[1] * 4), seconds=secs)
        record(f"shuffled{suffix}", scorer.score(f"shuffled{suffix}", m, rows_plain, table[swapped_rows]), **meta)
        gen(f"shuffled{suffix}", m, plain_prompts, table[gen_swap])
        record(f"e2p{suffix}", scorer.score(f"e2p{suffix}", m, rows_plain, table[person_rows]), **meta)
        gen(f"e2p{suffix}", m, plain_prompts, table[gen_rows])
        drift = {}
        for level in drift_levels:
            s = scorer.score(f"e2p{suffix}_noise{level}", m, rows_plain, add_noise(table, level, cfg.seed)[person_rows],
                             keep=False) if level else dict(result["conditions"][f"e2p{suffix}"])
            drift[str(level)] = {"perplexity": s["perplexity"], "perplexity_seen": s["perplexity_seen"],
                                 "perplexity_unseen": s["perplexity_unseen"]}
        if drift:
            result.setdefault("drift_noise", {})[f"e2p{suffix}"] = drift
        return m

    e2p_text = e2p_block("", text_dir, rep_text, task.text_table, cfg.noise_levels)
    # the text profile recomputed from each half of the history pool (same targets)
    a, b = task.half_tables
    halves = {"full_history": result["conditions"]["e2p"]["perplexity"]}
    for name, tbl in (("half_a", a), ("half_b", b)):
        halves[name] = scorer.score(f"e2p_{name}", e2p_text, rows_plain, tbl[person_rows])["perplexity"]
    eval_rows = torch.tensor([task.index[u] for u in task.eval_ids])
    halves["cosine_half_a_vs_half_b"] = float(torch.nn.functional.cosine_similarity(a[eval_rows], b[eval_rows]).mean())
    halves["cosine_full_vs_half_a"] = float(torch.nn.functional.cosine_similarity(task.text_table[eval_rows], a[eval_rows]).mean())
    result["drift_history_halves"] = halves
    if rep_beh is not None:
        e2p_block("_behaviour", beh_dir, rep_beh, task.behaviour_table, cfg.noise_levels if cfg.drift_behaviour else [])
    else:
        progress.step("no behaviour", 4 + len(cfg.noise_levels))

    # per-user prompt tuning (users seen in training only)
    pt_users = task.seen_eval_ids[:cfg.prompt_tuning_users]
    if pt_users and cfg.prompt_tuning_steps > 0:
        secs, preds, pt_params = 0.0, {}, 0
        full = np.full(len(people), np.nan)
        for u in pt_users:
            proj = Projector.from_pretrained(rep_text["shared_dir"], backbone)
            m = E2PModel(backbone, proj)
            mine = task.history[u] + task.train_targets.get(u, [])
            items = [Item(m.format(PENS_PROMPT, reply=h, max_target_tokens=mt), -1) for h in mine]
            tc = TrainConfig(steps=cfg.prompt_tuning_steps, batch_size=cfg.batch_size, lr=rc.shared_lr,
                             eval_every=cfg.prompt_tuning_steps, seed=cfg.seed, minutes=clock(cfg.prompt_tuning_steps))
            state = train_projector(m, items, None, out_dir / "prompt_tuning" / u, tc, progress=False, name=f"prompt_tuning[{u}]")
            secs += state["elapsed_s"]
            proj = Projector.from_pretrained(out_dir / "prompt_tuning" / u, backbone)
            m = E2PModel(backbone, proj)
            pt_params = proj.num_parameters()
            idx = [i for i, p in enumerate(people) if p == u]
            scorer.score(f"prompt_tuning[{u}]", m, rows_plain, None, rows_idx=idx, keep=False)
            full[idx] = scorer.last[idx]
            if u in gen_users:
                preds[u] = _generate(m, [PENS_PROMPT], None, cfg)[0]
        scorer.per_example["prompt_tuning"] = full
        summary = scorer.summary(full, m, [rows_plain[i] for i in np.flatnonzero(np.isfinite(full))])
        record("prompt_tuning", summary, pt_params, pt_params * 4, secs / len(pt_users),
               users=len(pt_users), note="seen users only; parameters and seconds per user")
        if preds:
            us = [u for u in gen_users if u in preds]
            rows_g = torch.tensor([task.index[u] for u in us])
            result["generation"]["prompt_tuning"] = _text_metrics(
                encoder, [preds[u] for u in us], [task.eval_targets[u] for u in us], task.text_table[rows_g].numpy(),
                list(range(len(us))))
    else:
        progress.step("no prompt tuning", len(pt_users) or 1)

    # LoRA on the backbone, profile as text (the adapter is removed again afterwards)
    if cfg.lora_steps > 0:
        lora_rows = [plain.format(text_prompt(task.profile_text[u]), reply=t, max_target_tokens=mt)
                     for u in task.train_ids for t in task.train_targets[u]]
        peft_model, info = train_lora(backbone, lora_rows, steps=cfg.lora_steps, lr=cfg.lora_lr, rank=cfg.lora_rank,
                                      batch_size=cfg.batch_size, seed=cfg.seed, minutes=clock(cfg.lora_steps))
        try:
            lora_m = E2PModel(backbone, None, config=plain_cfg)
            record("lora_text", scorer.score("lora_text", lora_m, rows_text, None), info["parameters"], text_bytes,
                   info["seconds"], adapter_bytes=info["adapter_bytes"], steps=info["steps"])
            gen("lora_text", lora_m, text_prompts, None)
        finally:
            peft_model.unload()
            for p in backbone.model.parameters():
                p.requires_grad_(False)

    # prefix length k
    curve = {}
    for k in cfg.prefix_lengths:
        if k == cfg.num_prefix_tokens:
            c = result["conditions"]
            curve[str(k)] = {n: c[n]["perplexity"] for n in ("shared_prefix", "e2p", "shuffled")}
            curve[str(k)]["e2p_parameters"] = c["e2p"]["trainable_parameters"]
            progress.step(f"k={k}", 3)
            continue
        rck = replace(rc, num_prefix_tokens=k, shared_steps=cfg.k_shared_steps, e2p_steps=cfg.k_e2p_steps,
                      eval_every=max(cfg.k_shared_steps, cfg.k_e2p_steps, 1))
        rep = train_prefix_stages(backbone, train, task.text_table, out_dir / f"k{k}", rck,
                                  minutes=clock(cfg.k_shared_steps + cfg.k_e2p_steps), **common)
        sp = E2PModel(backbone, Projector.from_pretrained(rep["shared_dir"], backbone))
        ep = Projector.from_pretrained(out_dir / f"k{k}", backbone)
        em = E2PModel(backbone, ep)
        curve[str(k)] = {
            "shared_prefix": scorer.score(f"k{k}_shared", sp, rows_plain, None, keep=False)["perplexity"],
            "e2p": scorer.score(f"k{k}_e2p", em, rows_plain, task.text_table[person_rows], keep=False)["perplexity"],
            "shuffled": scorer.score(f"k{k}_shuffled", em, rows_plain, task.text_table[swapped_rows], keep=False)["perplexity"],
            "e2p_parameters": ep.num_parameters(),
        }
    result["k_curve"] = curve

    comps = {}
    for x, y in [("e2p", "shared_prefix"), ("e2p", "shuffled"), ("e2p", "none"), ("text", "none"),
                 ("e2p_behaviour", "shared_prefix"), ("e2p_behaviour", "shuffled_behaviour"), ("lora_text", "text"),
                 ("e2p", "lora_text"), ("prompt_tuning", "shared_prefix"), ("e2p", "prompt_tuning")]:
        c = scorer.compare(x, y)
        if c:
            comps[f"{x}_vs_{y}"] = c
    for subset, mask in (("seen", seen), ("unseen", ~seen)):
        c = scorer.compare("e2p", "shared_prefix", mask)
        if c:
            comps[f"e2p_vs_shared_prefix[{subset}]"] = c
    result["comparisons"] = comps
    result["rows"] = len(rows_meta)
    result["target_tokens"] = int(scorer.counts.sum())
    result["training"] = {"text_profile": rep_text, "behaviour": rep_beh}
    return result


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out += ([a[i]] if i < len(a) else []) + ([b[i]] if i < len(b) else [])
    return out


# ----------------------------------------------------------------------------------------------------------
# Persona (ConvAI2 / Synthetic-Persona-Chat / MSC)
# ----------------------------------------------------------------------------------------------------------
def _msc_session_files(data: Path) -> list[Path]:
    """MSC files of sessions 2+ (their lines carry both `personas` and `init_personas`)."""
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.is_file() and p.name.lower().startswith("msc"))
    out = []
    for p in files:
        try:
            with p.open(encoding="utf-8", errors="replace") as f:
                first = json.loads(f.readline())
        except (ValueError, OSError):
            continue
        if isinstance(first, dict) and "init_personas" in first and "personas" in first:
            out.append(p)
    return out


def _msc_initial(path: Path) -> dict[str, str]:
    """person id (from the initial persona) -> initial persona text."""
    from .data.persona import person_id

    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            init = json.loads(line).get("init_personas")
        except (ValueError, AttributeError):
            continue
        for p in init or []:
            if p:
                out.setdefault(person_id(p), " ".join(p))
    return out


def _persona_planned_steps(cfg: SuiteConfig, train: bool, k_curve: bool) -> int:
    if not train:
        return 0
    extra = [k for k in cfg.prefix_lengths if k != cfg.num_prefix_tokens] if k_curve else []
    return cfg.persona_shared_steps + cfg.persona_e2p_steps + len(extra) * (cfg.k_shared_steps + cfg.k_e2p_steps)


def run_persona_part(backbone, encoder, data: Path, out_dir: Path, cfg: SuiteConfig, progress: _Progress, clock: _Clock,
                     projector: str | Path | None = None, k_curve: bool = False, show_bars: bool = True) -> dict:
    from .data.persona import LoadReport, load_msc, load_persona
    from .recipe import RecipeConfig, person_table, run_recipe, split_people

    out_dir.mkdir(parents=True, exist_ok=True)
    test_report, train_report = LoadReport(), LoadReport()
    test = load_persona(data, "test" if data.is_dir() else "all", test_report)
    result: dict = {"data": {"test": str(test_report), "test_skipped": test_report.skipped}}
    if projector is None:
        try:
            train = load_persona(data, "train", train_report) if data.is_dir() else []
        except DataError:
            train = []
        test_ids = {e.person_id for e in test}
        train = [e for e in train if e.person_id not in test_ids]
        if not train:  # only test files (or one file): split its people
            n = len({e.person_id for e in test})
            if n < 4:
                raise DataError(f"the persona part needs training people: {data} has only {n} people and no training files")
            train, test = split_people(test, n // 2, cfg.seed)
            result["data"]["note"] = "no training files: people of the test files split in half for training"
        people = sorted({e.person_id for e in train})
        if cfg.persona_train_people and len(people) > cfg.persona_train_people:
            keep = set(random.Random(cfg.seed).sample(people, cfg.persona_train_people))
            train = [e for e in train if e.person_id in keep]
            people = sorted(keep)
        result["data"].update(train=str(train_report), train_examples=len(train), train_people=len(people))
        rc = RecipeConfig(injection=cfg.injection, num_prefix_tokens=cfg.num_prefix_tokens, hidden_dims=cfg.hidden_dims,
                          batch_size=cfg.batch_size, shared_steps=cfg.persona_shared_steps,
                          e2p_steps=cfg.persona_e2p_steps, max_target_tokens=cfg.max_target_tokens,
                          val_people=max(1, min(cfg.persona_val_people, len(people) // 4)),
                          val_examples=cfg.persona_val_examples,
                          eval_every=max(cfg.persona_shared_steps, cfg.persona_e2p_steps, 1), seed=cfg.seed)
        projector = out_dir / "projector"
        report = run_recipe(backbone, encoder, train, projector, rc, progress=show_bars,
                            minutes=clock(cfg.persona_shared_steps + cfg.persona_e2p_steps))
        result["training"] = report
    projector = Path(projector)
    result["projector"] = str(projector)
    progress.step("persona projector")
    ev = evaluate_persona(backbone, encoder, test, projector, out_dir, limit=cfg.persona_limit,
                          batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=False)
    result["evaluation"] = ev
    progress.step("persona conditions")

    # the same examples as evaluate_persona
    examples = random.Random(cfg.seed).sample(test, cfg.persona_limit) if cfg.persona_limit and cfg.persona_limit < len(test) else test
    index, table = person_table(examples, encoder)
    ht, mt = ev["history_turns"], ev["max_target_tokens"]
    e2p_p = Projector.from_pretrained(projector, backbone)
    e2p_m = E2PModel(backbone, e2p_p)
    shared_dir = projector / "shared_prefix"
    shared_m = E2PModel(backbone, Projector.from_pretrained(shared_dir, backbone)) if (shared_dir / "config.json").is_file() else None
    plain = E2PModel(backbone, None, config=E2PConfig.load(projector))
    own = torch.tensor([index[e.person_id] for e in examples])
    people = [e.person_id for e in examples]
    rows = [e2p_m.format(e.messages(ht), reply=e.reply, max_target_tokens=mt) for e in examples]
    scorer = Scorer(people, np.zeros(len(rows), dtype=bool), cfg.eval_batch_size, progress)
    base = scorer.score("e2p", e2p_m, rows, table[own])
    drift = {}
    for level in cfg.noise_levels:
        s = scorer.score(f"e2p_noise{level}", e2p_m, rows, add_noise(table, level, cfg.seed)[own], keep=False) if level else base
        drift[str(level)] = {"perplexity": s["perplexity"]}
    result["drift_noise"] = {"e2p": drift}
    if "shared_prefix" in ev["conditions"]:
        result["drift_noise_reference"] = {"shared_prefix": ev["conditions"]["shared_prefix"]["perplexity"],
                                           "shuffled": ev["conditions"].get("shuffled", {}).get("perplexity")}

    # generations: ROUGE / BLEU against the real reply, consistency with the own persona
    g = examples[:cfg.gen_limit]
    g_own = own[:len(g)]
    g_swap = g_own[torch.tensor(derangement([e.person_id for e in g], cfg.seed))] if len(g) > 1 else g_own
    prompts = [e.messages(ht) for e in g]
    refs = [[e.reply] for e in g]
    profiles = table.numpy()
    pidx = [int(i) for i in g_own]
    gens = {}
    variants = [("none", plain, None, None), ("text", plain, None, [e.persona_text for e in g])]
    if shared_m is not None:
        variants.append(("shared_prefix", shared_m, None, None))
    variants += [("shuffled", e2p_m, table[g_swap], None), ("e2p", e2p_m, table[g_own], None)]
    for name, m, emb, texts in variants:
        preds = _generate(m, prompts, emb, cfg, persona_texts=texts)
        gens[name] = _text_metrics(encoder, preds, refs, profiles, pidx)
        progress.step(f"persona generate {name}")
    result["generation"] = gens

    # MSC: the initial persona's embedding vs the persona refreshed after earlier sessions
    msc = {}
    for path in _msc_session_files(data):
        rep = LoadReport()
        exs = load_msc(path, rep)
        initial = _msc_initial(path)
        exs = [e for e in exs if e.person_id in initial]
        if len({e.person_id for e in exs}) < 2:
            continue
        exs = random.Random(cfg.seed).sample(exs, min(cfg.msc_limit, len(exs)))
        init_emb = torch.tensor(encoder.encode([initial[e.person_id] for e in exs]))
        new_emb = torch.tensor(encoder.encode([e.persona_text for e in exs]))
        mrows = [e2p_m.format(e.messages(ht), reply=e.reply, max_target_tokens=mt) for e in exs]
        ms = Scorer([e.person_id for e in exs], np.zeros(len(exs), dtype=bool), cfg.eval_batch_size, progress)
        entry = {"examples": len(exs), "skipped": rep.skipped,
                 "persona_changed": float(np.mean([initial[e.person_id] != e.persona_text for e in exs])),
                 "cosine_initial_vs_refreshed": float(torch.nn.functional.cosine_similarity(init_emb, new_emb).mean())}
        entry["none"] = ms.score("none", plain, mrows, None)["perplexity"]
        if shared_m is not None:
            entry["shared_prefix"] = ms.score("shared_prefix", shared_m, mrows, None)["perplexity"]
        entry["e2p_initial"] = ms.score("e2p_initial", e2p_m, mrows, init_emb)["perplexity"]
        entry["e2p_refreshed"] = ms.score("e2p_refreshed", e2p_m, mrows, new_emb)["perplexity"]
        swap = torch.tensor(derangement([e.person_id for e in exs], cfg.seed))
        entry["e2p_shuffled"] = ms.score("e2p_shuffled", e2p_m, mrows, new_emb[swap])["perplexity"]
        c = ms.compare("e2p_refreshed", "e2p_initial")
        entry["refreshed_vs_initial"] = c
        msc[path.name] = entry
    result["msc_refresh"] = msc

    if k_curve and "training" in result:
        curve = {}
        for k in cfg.prefix_lengths:
            if k == cfg.num_prefix_tokens:
                c = ev["conditions"]
                curve[str(k)] = {n: c[n]["perplexity"] for n in ("shared_prefix", "e2p", "shuffled") if n in c}
                continue
            rck = RecipeConfig(**{**json.loads((projector / "recipe.json").read_text()), "num_prefix_tokens": k,
                                  "shared_steps": cfg.k_shared_steps, "e2p_steps": cfg.k_e2p_steps,
                                  "eval_every": max(cfg.k_shared_steps, cfg.k_e2p_steps, 1)})
            kdir = out_dir / f"k{k}"
            run_recipe(backbone, encoder, train, kdir, rck, progress=show_bars, minutes=clock(cfg.k_shared_steps + cfg.k_e2p_steps))
            em = E2PModel(backbone, Projector.from_pretrained(kdir, backbone))
            sm = E2PModel(backbone, Projector.from_pretrained(kdir / "shared_prefix", backbone))
            swap_rows = own[torch.tensor(derangement(people, cfg.seed))]
            curve[str(k)] = {"shared_prefix": scorer.score(f"k{k}_shared", sm, rows, None, keep=False)["perplexity"],
                             "e2p": scorer.score(f"k{k}_e2p", em, rows, table[own], keep=False)["perplexity"],
                             "shuffled": scorer.score(f"k{k}_shuffled", em, rows, table[swap_rows], keep=False)["perplexity"]}
        result["k_curve"] = curve
    return result


# ----------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------
def detect_parts(data: str | Path) -> dict:
    """Which parts a data path supports: {"pens": [files], "persona": [files]}."""
    from .data.pens import is_pens_file, pens_files
    from .data.persona import persona_files

    data = Path(data)
    if not data.exists():
        raise DataError(f"{data} does not exist: pass a data folder (PENS .tsv and/or persona files) or one file")
    if data.is_file():
        if data.suffix == ".tsv":
            return {"pens": pens_files(data), "persona": []}  # raises a clear error on a non-PENS .tsv
        return {"pens": [], "persona": persona_files(data)}
    pens = pens_files(data)
    persona = [p for p in persona_files(data, "all") if not is_pens_file(p)]
    return {"pens": pens, "persona": persona}


def run_suite(backbone, encoder, data: str | Path, out_dir: str | Path, cfg: SuiteConfig | None = None,
              projector: str | Path | None = None, progress: bool = True) -> dict:
    """Run every part the data supports; write results.json, REPORT.md and PNG plots into `out_dir`.

    `backbone`: a :class:`~e2p.backbone.Backbone`; `encoder`: anything with ``encode(list[str]) -> [N, d]`` and
    ``.name`` (the MiniLM TextEncoder by default); `projector`: a trained persona projector folder (otherwise
    the persona part trains one).
    """
    from .data.pens import load_pens
    from .data.persona import LoadReport

    cfg = cfg or SuiteConfig.preset()
    data, out_dir = Path(data), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = _Encoder(encoder)
    parts = detect_parts(data)
    if not parts["pens"] and not parts["persona"]:
        raise DataError(f"{data}: no PENS .tsv (header userid clicknewsID posnewID rewrite_titles) and no persona files "
                        "(ConvAI2 .txt, Synthetic-Persona-Chat .csv, MSC JSON lines) found")
    t0 = time.time()
    results: dict = {"suite": "paper", "quick": cfg.quick, "budget": cfg.budget_text(), "config": asdict(cfg),
                     "backbone": backbone.name, "encoder": encoder.name, "data": {"path": str(data)},
                     "parts": [], "timing_s": {}}
    users, pens_report = None, LoadReport()
    if parts["pens"]:
        users = load_pens(data, pens_report)
        results["data"]["pens"] = {"files": pens_report.files, "users": len(users), "skipped": pens_report.skipped}
    do_persona = bool(parts["persona"])
    persona_k = do_persona and users is None
    planned = (_pens_planned_steps(cfg) if users else 0) + (
        _persona_planned_steps(cfg, projector is None, persona_k) if do_persona else 0)
    clock = _Clock(cfg.train_minutes, planned)
    units = (_pens_units(cfg) if users else 0) + (10 + len(cfg.noise_levels) + 3 * len(cfg.prefix_lengths) if do_persona else 0)
    bar = _Progress(units, progress)
    try:
        if users:
            s = time.time()
            results["pens"] = run_pens(backbone, encoder, users, out_dir / "pens", cfg, bar, clock, show_bars=progress)
            results["parts"].append("pens")
            results["timing_s"]["pens"] = time.time() - s
        if do_persona:
            s = time.time()
            results["persona"] = run_persona_part(backbone, encoder, data, out_dir / "persona", cfg, bar, clock,
                                                  projector=projector, k_curve=persona_k, show_bars=progress)
            results["parts"].append("persona")
            results["timing_s"]["persona"] = time.time() - s
    finally:
        bar.close()
    results["timing_s"]["total"] = time.time() - t0
    results = _clean(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "REPORT.md").write_text(suite_report(results))
    results["plots"] = plot_suite(results, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.info("suite finished in %.0f s: %s", results["timing_s"]["total"], out_dir)
    return results


# ----------------------------------------------------------------------------------------------------------
# Report and plots
# ----------------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _comparison_table(comps: dict) -> list[str]:
    lines = ["| comparison | perplexity change | 95% interval (bootstrap over people) | rows |", "|---|---|---|---|"]
    for key, v in comps.items():
        if isinstance(v, dict):
            lines.append(f"| {key.replace('_vs_', ' vs ')} | {v['relative_change'] * 100:+.2f}% | "
                         f"[{v['ci95'][0] * 100:+.2f}%, {v['ci95'][1] * 100:+.2f}%] | {v.get('rows', '')} |")
    return lines


def _generation_table(gens: dict) -> list[str]:
    lines = ["| condition | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | consistency margin | consistency acc. (chance) |",
             "|---|---|---|---|---|---|---|"]
    for name, g in gens.items():
        lines.append(f"| {name} | {_f(g.get('rouge1'))} | {_f(g.get('rouge2'))} | {_f(g.get('rougeL'))} | "
                     f"{_f(g.get('bleu'), '{:.2f}')} | {_f(g.get('consistency_margin'), '{:+.4f}')} | "
                     f"{_f(g.get('consistency_accuracy'), '{:.2f}')} ({_f(g.get('consistency_chance'), '{:.2f}')}) |")
    return lines


def _drift_table(drift: dict, title: str) -> list[str]:
    levels = sorted({lv for curve in drift.values() for lv in curve}, key=float)
    lines = [f"| {title} | " + " | ".join(f"noise {lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
    for name, curve in drift.items():
        lines.append(f"| {name} | " + " | ".join(_f(curve.get(lv, {}).get("perplexity")) for lv in levels) + " |")
    return lines


def _k_table(curve: dict) -> list[str]:
    lines = ["| k | shared_prefix | e2p | shuffled | e2p parameters |", "|---|---|---|---|---|"]
    for k, v in sorted(curve.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} | {_f(v.get('shared_prefix'))} | {_f(v.get('e2p'))} | {_f(v.get('shuffled'))} | "
                     f"{v.get('e2p_parameters', 'n/a')} |")
    return lines


def suite_report(r: dict) -> str:
    lines = ["# E2P paper suite", "",
             f"Backbone `{r['backbone']}`, encoder `{r['encoder']}`, data `{r['data']['path']}`, parts: "
             f"{', '.join(r['parts']) or 'none'}; {r['timing_s'].get('total', 0):.0f} s"
             + (" (**quick mode**)" if r["quick"] else "") + ".", "",
             f"Budget: {r['budget']}", "",
             "Every condition of a table is scored on the same examples (same target tokens); perplexity is over the "
             "reply / headline tokens only, lower is better.", ""]
    if "pens" in r:
        p = r["pens"]
        d = p["data"]
        lines += ["## PENS personalized headlines", "",
                  f"{d['users']} users: {d['train_users']} train ({d['seen_eval_users']} of them evaluated on held-out "
                  f"targets: *seen*), {d['unseen_users']} *unseen*; {p['rows']} scored headlines, {p['target_tokens']} "
                  f"target tokens; ~{d['history_headlines_per_user']:.0f} history headlines per user; "
                  f"skipped rows: {r['data'].get('pens', {}).get('skipped') or 'none'}; behaviour: {d.get('behaviour')}.", "",
                  "| condition | ppl (all) | ppl seen | ppl unseen | trainable params | bytes / user | "
                  "prompt tokens / request | train s |", "|---|---|---|---|---|---|---|---|"]
        for name, c in p["conditions"].items():
            lines.append(f"| {name} | {_f(c['perplexity'])} | {_f(c['perplexity_seen'])} | {_f(c['perplexity_unseen'])} | "
                         f"{c['trainable_parameters']:,} | {_f(c['bytes_per_user'], '{:.0f}')} | "
                         f"{c['prompt_tokens_per_request']:.1f} | {_f(c['train_seconds'], '{:.1f}')} |")
        lines += ["", "`text`: history headlines in the prompt (truncated to the token budget); `lora_text`: the same "
                  "prompt on the backbone with a LoRA adapter (its bytes / user are the profile text; the adapter is "
                  "shared); `prompt_tuning`: a soft prompt trained per user (seen users only); `*_behaviour`: co-click "
                  "profile instead of the text profile.", "", "### Paired comparisons", ""]
        lines += _comparison_table(p.get("comparisons", {}))
        lines += ["", "### Generations (greedy, one per evaluated user, all the user's targets as references)", ""]
        lines += _generation_table(p.get("generation", {}))
        lines += ["", "### Robustness: embedding drift (Gaussian noise, norm relative to the embedding's)", ""]
        lines += _drift_table(p.get("drift_noise", {}), "condition")
        h = p.get("drift_history_halves", {})
        lines += ["", "### Robustness: text profile recomputed from the other half of the history (same targets)", "",
                  "| profile from | perplexity |", "|---|---|",
                  f"| full history pool | {_f(h.get('full_history'))} |", f"| half A | {_f(h.get('half_a'))} |",
                  f"| half B (other half) | {_f(h.get('half_b'))} |", "",
                  f"Mean cosine of the half-A and half-B profiles: {_f(h.get('cosine_half_a_vs_half_b'))}; "
                  f"full vs half A: {_f(h.get('cosine_full_vs_half_a'))}.", "",
                  "### Prefix length k (text profile)", ""]
        lines += _k_table(p.get("k_curve", {}))
        lines.append("")
    if "persona" in r:
        q = r["persona"]
        ev = q["evaluation"]
        lines += ["## Persona dialogue", "", f"Projector `{q['projector']}`; data: {q['data']}.", "",
                  "| condition | perplexity | prompt tokens / request | prefix tokens | trainable params | bytes / user |",
                  "|---|---|---|---|---|---|"]
        for name, c in ev["conditions"].items():
            lines.append(f"| {name} | {_f(c['perplexity'])} | {c['tokens_per_request']:.1f} | {c['prefix_tokens']} | "
                         f"{c['trainable_parameters']:,} | {c['bytes_per_user']} |")
        lines += ["", f"{ev['examples']} replies of {ev['people']} unseen people; skipped conditions: "
                  f"{', '.join(ev.get('skipped_conditions') or []) or 'none'}. Training seconds: "
                  + json.dumps({k: round(v.get('seconds', 0), 1) for k, v in q.get('training', {}).get('stages', {}).items()}),
                  "", "### Paired comparisons", ""]
        lines += _comparison_table(ev.get("comparisons", {}))
        lines += ["", "### Generations (greedy, ROUGE / BLEU against the real reply)", ""]
        lines += _generation_table(q.get("generation", {}))
        lines += ["", "### Robustness: embedding drift", ""]
        lines += _drift_table(q.get("drift_noise", {}), "condition")
        if q.get("drift_noise_reference"):
            lines += ["", f"References: {q['drift_noise_reference']}"]
        if q.get("msc_refresh"):
            lines += ["", "### MSC: initial persona vs persona refreshed after earlier sessions", "",
                      "| file | examples | changed | cos(init, refreshed) | none | shared_prefix | e2p initial | "
                      "e2p refreshed | e2p shuffled | refreshed vs initial |", "|---|---|---|---|---|---|---|---|---|---|"]
            for name, m in q["msc_refresh"].items():
                c = m.get("refreshed_vs_initial") or {}
                ch = f"{c['relative_change'] * 100:+.2f}% [{c['ci95'][0] * 100:+.2f}, {c['ci95'][1] * 100:+.2f}]" if c else "n/a"
                lines.append(f"| {name} | {m['examples']} | {m['persona_changed']:.2f} | {m['cosine_initial_vs_refreshed']:.3f} | "
                             f"{_f(m.get('none'))} | {_f(m.get('shared_prefix'))} | {_f(m['e2p_initial'])} | "
                             f"{_f(m['e2p_refreshed'])} | {_f(m['e2p_shuffled'])} | {ch} |")
        if q.get("k_curve"):
            lines += ["", "### Prefix length k", ""] + _k_table(q["k_curve"])
        lines.append("")
    lines += ["## Plots", "", "- `perplexity.png`: perplexity by condition", "- `drift.png`: perplexity vs embedding noise",
              "- `k_curve.png`: perplexity vs prefix length k", ""]
    return "\n".join(lines)


def plot_suite(r: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # perplexity by condition
    fig, axes = plt.subplots(1, len(r["parts"]) or 1, figsize=(7 * max(len(r["parts"]), 1), 4), squeeze=False)
    for ax, part in zip(axes[0], r["parts"]):
        conds = r["pens"]["conditions"] if part == "pens" else r["persona"]["evaluation"]["conditions"]
        names = [n for n, c in conds.items() if c.get("perplexity") is not None]
        vals = [conds[n]["perplexity"] for n in names]
        bars = ax.bar(names, vals, color=["#999" if n in ("none", "text") else "#4a7" if n.startswith("e2p") else "#68c" for n in names])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_title(f"{part}: perplexity by condition")
        ax.set_ylabel("perplexity (lower is better)")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "perplexity.png", dpi=100)
    plt.close(fig)
    written.append("perplexity.png")
    # drift
    fig, ax = plt.subplots(figsize=(7, 4))
    for part in r["parts"]:
        for name, curve in (r[part].get("drift_noise") or {}).items():
            xs = sorted(curve, key=float)
            ys = [curve[x]["perplexity"] for x in xs]
            ax.plot([float(x) for x in xs], [y if y is not None else float("nan") for y in ys], "o-", label=f"{part}: {name}")
        ref = (r[part].get("conditions") or {}).get("shared_prefix", {}).get("perplexity") if part == "pens" else \
            (r[part].get("drift_noise_reference") or {}).get("shared_prefix")
        if ref:
            ax.axhline(ref, ls="--", lw=1, color="gray")
    ax.set_xlabel("noise norm / embedding norm")
    ax.set_ylabel("perplexity")
    ax.set_title("embedding drift (dashed: shared prefix)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "drift.png", dpi=100)
    plt.close(fig)
    written.append("drift.png")
    # k curve
    fig, ax = plt.subplots(figsize=(7, 4))
    for part in r["parts"]:
        curve = r[part].get("k_curve") or {}
        ks = sorted(curve, key=int)
        for name in ("e2p", "shared_prefix", "shuffled"):
            ys = [curve[k].get(name) for k in ks]
            if any(y is not None for y in ys):
                ax.plot([int(k) for k in ks], [y if y is not None else float("nan") for y in ys], "o-", label=f"{part}: {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefix tokens k")
    ax.set_ylabel("perplexity")
    ax.set_title("prefix length")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "k_curve.png", dpi=100)
    plt.close(fig)
    written.append("k_curve.png")
    return written
