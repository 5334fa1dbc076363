"""The default training recipe: learn the style first, then only what differs between people.

Stages (each its own projector folder, each resumable):
  1. shared_prefix        k soft prefix vectors, no user input: the data set's style (prompt tuning).
  2. reconstruct (opt.)   the person part learns to make the frozen backbone restate the persona
                          sentences from the prefix alone (xRAG-style), style part frozen.
  3. e2p                  replies; the person part starts at zero on top of the style, so it can only
                          add what the embedding knows about the person; optional margin term.
  4. *_text (opt.)        shared_prefix_text and e2p_text: the same, trained with the persona text in
                          the prompt (the hybrid must be trained as a hybrid).
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.persona import PersonaExample, without_people_of
from .encoders import encoder_for
from .errors import DataError
from .model import E2PModel, new_config, token_keys_values
from .projector import Projector, embedding_center
from .train import Item, TrainConfig, evaluate_loss, train_projector

log = logging.getLogger(__name__)

RECONSTRUCT_PROMPT = "Tell me about yourself."


@dataclass
class RecipeConfig:
    injection: str = "deep"
    num_prefix_tokens: int = 1
    prefix_position: str = "start"
    hidden_dims: list[int] = field(default_factory=lambda: [1024])
    dropout: float = 0.1
    center_embeddings: bool = True
    history_turns: int = 2
    max_target_tokens: int = 32
    batch_size: int = 16
    shared_steps: int = 80
    shared_lr: float = 3e-3
    reconstruct_steps: int = 60
    reconstruct_lr: float = 1e-3
    reconstruct_mix: float = 0.0  # share of reconstruction items mixed into the e2p stage
    reconstruct_sentences: int = 0  # 0: restate the whole persona; N: restate N random sentences of it (cheaper, one item per persona)
    include_msc: bool = False  # train on MSC's grown personas too (e2p train / scripts/run_recipe.py load them)
    e2p_steps: int = 100
    e2p_lr: float = 1e-3
    contrastive_weight: float = 0.0
    margin: float = 0.1
    freeze_shared: bool = True
    text_steps: int = 0  # steps for each of shared_prefix_text and e2p_text (0: skip them)
    distill_weight: float = 0.0  # e2p stage: share of KL(shared_prefix_text with the persona text || e2p)
    persona_subsets: bool = False  # e2p stage with distillation: random subsets of each persona as augmentation
    teacher_dir: str | None = None  # distill from this trained text-reading projector instead of this run's own
    val_people: int = 40
    val_examples: int = 48
    embedding_slots: int = 1  # > 1: one embedding per persona sentence in this many slots, one prefix token each
    novel_val_sentences: bool = True  # strip the validation people's persona sentences from training personas
    person_scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # calibrated on validation
    eval_every: int = 20
    seed: int = 0


def persona_key(ex: PersonaExample) -> str:
    """One row per persona *version*: MSC gives one person (one id) a persona that grows between sessions."""
    return f"{ex.person_id}:{ex.persona_text}"


def person_table(examples: list[PersonaExample], encoder, key=None) -> tuple[dict[str, int], torch.Tensor]:
    """One embedding per person (or per `key(example)`): the encoder applied to the persona sentences joined."""
    key = key or (lambda ex: ex.person_id)
    texts: dict[str, str] = {}
    for ex in examples:
        texts.setdefault(key(ex), ex.persona_text)
    ids = list(texts)
    vectors = encoder.encode([texts[i] for i in ids], show_progress_bar=False)
    return {pid: i for i, pid in enumerate(ids)}, torch.tensor(vectors, dtype=torch.float32)


def _reply_row(model: E2PModel, ex: PersonaExample, cfg: RecipeConfig, persona_text: str | None = None):
    """One reply as the recipe formats it: the last `history_turns` turns, at most `max_target_tokens` targets."""
    return model.format(ex.messages(cfg.history_turns), reply=ex.reply, persona_text=persona_text,
                        max_target_tokens=cfg.max_target_tokens)


def make_items(model: E2PModel, examples, index: dict[str, int], cfg: RecipeConfig, with_text: bool) -> list[Item]:
    return [Item(_reply_row(model, ex, cfg, ex.persona_text if with_text else None), index.get(persona_key(ex), -1))
            for ex in examples]


def split_people(examples: list[PersonaExample], n_val: int, seed: int, novel_sentences: bool = False):
    """(train, validation) by person. `novel_sentences`: training personas also lose every sentence of a
    validation persona, so validation people are new people with new sentences, like the test people; without
    it, validation rewards memorising the training split's sentences, which new people do not share."""
    people = sorted({e.person_id for e in examples})
    random.Random(seed).shuffle(people)
    val = set(people[:n_val])
    held_out = [e for e in examples if e.person_id in val]
    train = without_people_of(examples, held_out) if novel_sentences else [e for e in examples if e.person_id not in val]
    return train, held_out


def _sample(examples: list, n: int, seed: int) -> list:
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(examples, n)


def run_recipe(backbone, encoder, examples: list[PersonaExample], out_dir: str | Path, cfg: RecipeConfig,
               resume: bool = False, progress: bool = True, minutes: float | None = None) -> dict:
    """Train every stage into out_dir (e2p projector at the top level, others in sub-folders)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    total_steps = cfg.shared_steps + cfg.reconstruct_steps + cfg.e2p_steps + 2 * cfg.text_steps

    def budget(steps: int) -> float | None:  # split a wall-clock budget across stages by their steps
        return None if minutes is None else minutes * steps / max(total_steps, 1)

    slots = cfg.embedding_slots
    encoder = encoder_for(cfg, encoder)  # slots > 1: one vector per persona sentence
    train_ex, val_ex = split_people(examples, cfg.val_people, cfg.seed, cfg.novel_val_sentences)
    index, table = person_table(train_ex + val_ex, encoder, key=persona_key)
    train_rows = table[[index[p] for p in {persona_key(e) for e in train_ex}]]
    mean = embedding_center(train_rows, slots) if cfg.center_embeddings else None
    report = {"train_examples": len(train_ex), "train_people": len({e.person_id for e in train_ex}),
              "val_people": len({e.person_id for e in val_ex}), "stages": {}}
    val_sample = _sample(val_ex, cfg.val_examples, cfg.seed)

    def stage(name, projector, steps, lr, with_text, freeze_shared=False, contrastive=0.0, items=None, val_items=None, tbl=table,
              teacher=None):
        if steps <= 0:
            return None
        model = E2PModel(backbone, projector)
        if items is None:
            items = make_items(model, _sample(train_ex, steps * cfg.batch_size, cfg.seed + len(name)), index, cfg, with_text)
        if val_items is None:
            val_items = make_items(model, val_sample, index, cfg, with_text)
        tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, eval_every=cfg.eval_every, seed=cfg.seed,
                         contrastive_weight=contrastive, margin=cfg.margin, freeze_shared=freeze_shared,
                         minutes=budget(steps), distill_weight=cfg.distill_weight if teacher is not None else 0.0)
        folder = out_dir if name == "e2p" else out_dir / name
        s = time.time()
        state = train_projector(model, items, None if projector.config.is_shared else tbl, folder, tc,
                                val_items=val_items, resume=resume, progress=progress, name=name, teacher=teacher)
        report["stages"][name] = {"steps": state["step"], "best_val": state["best_val"], "seconds": time.time() - s,
                                  "parameters": projector.num_parameters()}
        return Projector.from_pretrained(folder)

    base = dict(injection=cfg.injection, num_prefix_tokens=slots if slots > 1 else cfg.num_prefix_tokens,
                prefix_position=cfg.prefix_position, hidden_dims=cfg.hidden_dims, dropout=cfg.dropout,
                encoder_name=getattr(encoder, "name", ""), history_turns=cfg.history_turns,
                max_target_tokens=cfg.max_target_tokens)
    shared = Projector(new_config(backbone, embedding_dim=0, **base))
    _init_shared(backbone, shared)
    shared = stage("shared_prefix", shared, cfg.shared_steps, cfg.shared_lr, False) or shared

    teacher = None
    if cfg.distill_weight > 0 and cfg.teacher_dir:
        teacher = E2PModel(backbone, Projector.from_pretrained(cfg.teacher_dir, backbone).eval())
    if cfg.text_steps > 0 or (cfg.distill_weight > 0 and teacher is None):
        if cfg.text_steps <= 0:
            raise ValueError("distill_weight > 0 needs text_steps > 0 or teacher_dir: the teacher reads the persona text")
        spt = stage("shared_prefix_text", Projector.from_pretrained(out_dir / "shared_prefix"), cfg.text_steps,
                    cfg.shared_lr / 3, True)
        if cfg.distill_weight > 0 and teacher is None:
            teacher = E2PModel(backbone, spt.eval())

    e2p = Projector(new_config(backbone, embedding_dim=table.shape[1], embedding_mean=mean.tolist() if mean is not None else None,
                               embedding_slots=slots, **base))
    e2p.shared.data.copy_(shared.shared.data)
    if cfg.reconstruct_steps > 0:
        rec_items, rec_table = _reconstruction_items(backbone, e2p, train_ex, encoder, cfg)
        val_rec, val_table = _reconstruction_items(backbone, e2p, val_ex, encoder, cfg, augment=False)
        offset = len(rec_table)
        val_rec = _sample([Item(it.row, it.person + offset) for it in val_rec], cfg.val_examples, cfg.seed)
        e2p = stage("reconstruct", e2p, cfg.reconstruct_steps, cfg.reconstruct_lr, False, freeze_shared=True,
                    items=rec_items, val_items=val_rec, tbl=torch.cat([rec_table, val_table])) or e2p
    mixed, mixed_table = None, table
    if teacher is not None and cfg.e2p_steps > 0:
        replies, reply_table = _distill_items(E2PModel(backbone, e2p), teacher,
                                              _sample(train_ex, cfg.e2p_steps * cfg.batch_size, cfg.seed + 3), encoder, cfg)
        # validation items index `table`; the reply items index their own rows behind it
        mixed = [Item(it.row, it.person + len(table), it.teacher_row) for it in replies]
        mixed_table = torch.cat([table, reply_table])
    elif cfg.reconstruct_steps > 0 and cfg.reconstruct_mix > 0 and cfg.e2p_steps > 0:
        # keep restating the persona as a share of the reply batches, so replies don't erode the person part
        n_replies = cfg.e2p_steps * cfg.batch_size
        replies = make_items(E2PModel(backbone, e2p), _sample(train_ex, n_replies, cfg.seed + 3), index, cfg, False)
        n_rec = int(n_replies * cfg.reconstruct_mix / (1 - cfg.reconstruct_mix))
        rec = [Item(it.row, it.person + len(table)) for it in _sample(rec_items, n_rec, cfg.seed)]
        mixed, mixed_table = replies + rec, torch.cat([table, rec_table])
    e2p = stage("e2p", e2p, cfg.e2p_steps, cfg.e2p_lr, False, freeze_shared=cfg.freeze_shared,
                contrastive=cfg.contrastive_weight, items=mixed, tbl=mixed_table, teacher=teacher) or e2p
    if cfg.e2p_steps > 0 and len(cfg.person_scales) > 1:
        # fresh validation replies (not those the checkpoint was picked on), so the choice is not the same noise twice
        rest = [e for e in val_ex if e not in val_sample] or val_ex
        calib = make_items(E2PModel(backbone, e2p), _sample(rest, 2 * cfg.val_examples, cfg.seed + 11), index, cfg, False)
        report["person_scale"] = calibrate_person_scale(backbone, e2p, calib, table, cfg.person_scales)
        e2p.save_pretrained(out_dir)
    if cfg.text_steps > 0:
        # the hybrid: the text-trained style (shared_prefix_text) plus E2P's person part, trained with the text
        hybrid = Projector.from_pretrained(out_dir)
        hybrid.shared.data.copy_(spt.shared.data)
        stage("e2p_text", hybrid, cfg.text_steps, cfg.e2p_lr, True, freeze_shared=True,
              contrastive=cfg.contrastive_weight)
    report["seconds"] = time.time() - t0
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    return report


def calibrate_person_scale(backbone, projector: Projector, items: list[Item], table: torch.Tensor,
                           scales: list[float]) -> dict:
    """Set projector.config.person_scale to the scale with the lowest loss on `items` (validation people).

    The shared prefix (scale 0) is always a candidate, so calibration can only move E2P toward its control."""
    model = E2PModel(backbone, projector)
    losses = {}
    for scale in sorted({0.0, *scales}):
        projector.config.person_scale = scale
        losses[scale] = evaluate_loss(model, items, table)
    best = min(losses, key=losses.get)
    projector.config.person_scale = best
    log.info("person_scale %s (validation loss by scale: %s)", best, {k: round(v, 4) for k, v in losses.items()})
    return {"chosen": best, "validation_loss": {str(k): v for k, v in losses.items()}, "items": len(items)}


def _init_shared(backbone, projector: Projector, text: str = "Persona:") -> None:
    """Start the shared prefix from a real token (its embedding, or its keys/values for deep injection)."""
    tok = backbone.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : projector.config.num_prefix_tokens]
    k = projector.config.num_prefix_tokens
    with torch.no_grad():
        if projector.config.injection == "input":
            vec = backbone.model.get_input_embeddings()(ids)[0]
        else:
            # after_sink: the prefix sits behind the prompt's first token, so take its keys/values from there
            sink = E2PModel(backbone, projector).format("hi").post[:1] if projector.config.prefix_position == "after_sink" else []
            vec = token_keys_values(backbone.model, sink + ids[0].tolist())[len(sink):]  # [t, L*2*kv]
        projector.shared.data[: vec.shape[0]] = vec
        if vec.shape[0] < k:
            projector.shared.data[vec.shape[0]:] = vec[-1]


def _distill_items(model: E2PModel, teacher: E2PModel, examples, encoder, cfg: RecipeConfig):
    """Reply items whose teacher row carries the persona text the item's embedding was made from.

    With `persona_subsets`, each example keeps a random subset (at least 2) of its persona sentences,
    so the projector sees many more distinct embeddings and the teacher shows what each subset implies."""
    rng = random.Random(cfg.seed + 7)
    texts = []
    for ex in examples:
        sentences = list(ex.persona)
        if cfg.persona_subsets and len(sentences) > 2 and rng.random() < 0.5:
            sentences = rng.sample(sentences, rng.randint(2, len(sentences) - 1))
        texts.append(" ".join(sentences))
    table = torch.tensor(encoder.encode(texts), dtype=torch.float32)
    items = [Item(_reply_row(model, ex, cfg), i, teacher_row=_reply_row(teacher, ex, cfg, text))
             for i, (ex, text) in enumerate(zip(examples, texts))]
    return items, table


def _reconstruction_items(backbone, projector, examples, encoder, cfg: RecipeConfig, augment: bool = True):
    """(prefix, 'Tell me about yourself.') -> persona sentences from the prefix alone.

    reconstruct_sentences 0: the whole persona, plus random subsets of it as augmentation.
    N > 0: one item per distinct persona; the embedding is of the persona (a random 4-6 sentence view of a
    longer one, as MSC's grown personas are) and the target is N random sentences of it, so every fact
    must be in the prefix while each item stays short and many more distinct personas fit in the steps."""
    rng = random.Random(cfg.seed)
    personas = {}
    for ex in examples:
        personas.setdefault(persona_key(ex), list(ex.persona))
    texts, targets = [], []
    for sentences in personas.values():
        if cfg.reconstruct_sentences > 0:
            view = sentences if len(sentences) <= 6 else (rng.sample(sentences, rng.randint(4, 6)) if augment else sentences[:5])
            picked = rng.sample(view, min(cfg.reconstruct_sentences, len(view))) if augment else view[:cfg.reconstruct_sentences]
            texts.append(" ".join(view))
            targets.append(" ".join(picked))
            continue
        texts.append(" ".join(sentences))
        if augment and len(sentences) > 2:
            for _ in range(2):
                sub = rng.sample(sentences, rng.randint(2, len(sentences) - 1))
                texts.append(" ".join(sub))
    targets = targets or texts
    table = torch.tensor(encoder.encode(texts), dtype=torch.float32)
    model = E2PModel(backbone, projector)
    items = [Item(model.format(RECONSTRUCT_PROMPT, reply=t, max_target_tokens=96), i) for i, t in enumerate(targets)]
    return items, table


def train_prefix_stages(backbone, items, table: torch.Tensor | None, out_dir: str | Path, cfg: RecipeConfig,
                        val_items=(), encoder_name: str = "", system_prompt: str | None = None,
                        shared_dir: str | Path | None = None, progress: bool = True,
                        minutes: float | None = None) -> dict:
    """The shared_prefix -> e2p stages of :func:`run_recipe` for any task given as items.

    `items` / `val_items`: ``(prompt, reply, person_index)`` tuples (prompt a string or chat messages;
    person_index a row of `table`, -1 for none). `table`: ``[people, E]`` user embeddings (None: train the
    shared prefix only). The shared prefix goes to ``out_dir/shared_prefix`` (or is loaded from `shared_dir`,
    skipping that stage), the e2p projector to `out_dir`. Embeddings are centred on the mean of the people in
    `items`. Returns a report with each stage's steps, best validation loss, seconds and parameters.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2))
    train_shared = shared_dir is None or not (Path(shared_dir) / "config.json").is_file()
    total_steps = (cfg.shared_steps if train_shared else 0) + (cfg.e2p_steps if table is not None else 0)
    report: dict = {"train_items": len(items), "train_people": len({p for _, _, p in items if p >= 0}), "stages": {},
                    "shared_dir": None, "e2p_dir": None}
    t0 = time.time()

    def stage(name: str, projector: Projector, folder: Path, steps: int, lr: float, tbl, freeze_shared=False,
              contrastive=0.0) -> Projector:
        budget = None if minutes is None else minutes * steps / max(total_steps, 1)
        return _stage(backbone, name, projector, folder, items, val_items, tbl, steps, lr, cfg, report, budget,
                      progress, freeze_shared=freeze_shared, contrastive=contrastive)

    overrides = {} if system_prompt is None else {"system_prompt": system_prompt}
    base = dict(injection=cfg.injection, num_prefix_tokens=cfg.num_prefix_tokens, prefix_position=cfg.prefix_position,
                hidden_dims=cfg.hidden_dims, dropout=cfg.dropout, encoder_name=encoder_name,
                history_turns=cfg.history_turns, max_target_tokens=cfg.max_target_tokens, **overrides)
    if train_shared:
        shared = Projector(new_config(backbone, embedding_dim=0, **base))
        _init_shared(backbone, shared)
        folder = out_dir / "shared_prefix"
        if cfg.shared_steps > 0:
            shared = stage("shared_prefix", shared, folder, cfg.shared_steps, cfg.shared_lr, None)
        else:
            shared.save_pretrained(folder)
        report["shared_dir"] = str(folder)
    else:
        shared = Projector.from_pretrained(shared_dir, backbone)
        report["shared_dir"] = str(shared_dir)
    if table is not None and cfg.e2p_steps > 0:
        people = sorted({p for _, _, p in items if p >= 0})
        mean = table[people].mean(0) if cfg.center_embeddings and people else None
        e2p = Projector(new_config(backbone, embedding_dim=table.shape[1],
                                   embedding_mean=mean.tolist() if mean is not None else None, **base))
        e2p.shared.data.copy_(shared.shared.data)
        stage("e2p", e2p, out_dir, cfg.e2p_steps, cfg.e2p_lr, table, freeze_shared=cfg.freeze_shared,
              contrastive=cfg.contrastive_weight)
        report["e2p_dir"] = str(out_dir)
    report["seconds"] = time.time() - t0
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    return report


def _stage(backbone, name: str, projector: Projector, folder: Path, items, val_items, table, steps: int, lr: float,
           cfg: RecipeConfig, report: dict, minutes: float | None, progress: bool, freeze_shared: bool = False,
           contrastive: float = 0.0) -> Projector:
    """Train one stage on ``(prompt, reply, person[, profile_text])`` tuples; record it in `report`; reload the
    best checkpoint from `folder`."""
    model = E2PModel(backbone, projector)
    rows = lambda tuples: [Item(model.format(t[0], reply=t[1], persona_text=t[3] if len(t) > 3 else None,
                                             max_target_tokens=cfg.max_target_tokens), t[2]) for t in tuples]
    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, eval_every=cfg.eval_every, seed=cfg.seed,
                     contrastive_weight=contrastive, margin=cfg.margin, freeze_shared=freeze_shared, minutes=minutes)
    s = time.time()
    state = train_projector(model, rows(items), table, folder, tc, val_items=rows(val_items), progress=progress, name=name)
    report["stages"][name] = {"steps": state["step"], "best_val": state["best_val"], "seconds": time.time() - s,
                              "parameters": projector.num_parameters()}
    return Projector.from_pretrained(folder)


def train_text_stages(backbone, items, val_items, table: torch.Tensor, out_dir: Path, cfg: RecipeConfig, report: dict,
                      progress: bool = True) -> None:
    """The text conditions trained alike, on ``(prompt, reply, person, profile_text)`` tuples: `shared_prefix_text`
    (the style prefix trained with the profile text in the prompt: "text, trained alike") and `e2p_text`, the
    hybrid (that style plus E2P's person part, trained together with the text)."""
    spt = _stage(backbone, "shared_prefix_text", Projector.from_pretrained(report.get("shared_dir") or out_dir / "shared_prefix"),
                 out_dir / "shared_prefix_text", items, val_items, None, cfg.text_steps, cfg.shared_lr, cfg, report,
                 None, progress)
    hybrid = Projector.from_pretrained(out_dir)
    hybrid.shared.data.copy_(spt.shared.data)
    _stage(backbone, "e2p_text", hybrid, out_dir / "e2p_text", items, val_items, table, cfg.text_steps, cfg.e2p_lr,
           cfg, report, None, progress, freeze_shared=True, contrastive=cfg.contrastive_weight)


def train_on_examples(backbone, users, examples, out_dir: str | Path, cfg: RecipeConfig | None = None, *,
                      val_users: int | None = None, minutes: float | None = None, progress: bool = True,
                      shared_dir: str | Path | None = None) -> dict:
    """The default recipe on the data contract (`e2p.data.contract`): any user table, any examples.

    Users with examples are split by user: training users, and validation users never trained on. Half of the
    validation users pick checkpoints and calibrate the person part (`person_scale`); the other half answer the
    verdict (e2p vs shared_prefix and vs shuffled, 95% intervals over users), so the verdict is not measured on
    the users it was tuned on. Writes the projector (and `shared_prefix/`) to `out_dir` and
    `training_report.json` with the verdict. No text encoder is involved: the embeddings are the table's.
    `shared_dir`: a shared prefix trained before on the same examples and split (it holds no user information,
    so a new embedding table can reuse it instead of training it again).
    """
    from .data.contract import split_users
    from .evaluate.loop import conditions_for, evaluate_examples

    cfg = cfg or RecipeConfig(injection="deep", num_prefix_tokens=1)
    out_dir = Path(out_dir)
    ids = sorted({ex.user for ex in examples})
    n_val = val_users if val_users is not None else max(4, min(200, round(0.2 * len(ids))))
    train_ids, val_ids = split_users(ids, n_val, cfg.seed)
    select_ids, verdict_ids = set(val_ids[0::2]), set(val_ids[1::2])
    train_set = set(train_ids)
    to_tuple = lambda ex: (ex.prompt, ex.target, users.index[ex.user])
    train_ex = [ex for ex in examples if ex.user in train_set]
    select_ex = [ex for ex in examples if ex.user in select_ids]
    verdict_ex = [ex for ex in examples if ex.user in verdict_ids]
    picked = _sample(select_ex, cfg.val_examples, cfg.seed)
    chosen = {id(ex) for ex in picked}
    calib = [ex for ex in select_ex if id(ex) not in chosen] or select_ex
    table = users.tensor()
    report = train_prefix_stages(backbone, [to_tuple(ex) for ex in train_ex], table, out_dir, cfg,
                                 val_items=[to_tuple(ex) for ex in picked], encoder_name="",
                                 progress=progress, minutes=minutes, shared_dir=shared_dir)
    e2p = Projector.from_pretrained(out_dir, backbone)
    if len(cfg.person_scales) > 1:
        model = E2PModel(backbone, e2p)
        items = [Item(model.format(ex.prompt, reply=ex.target, max_target_tokens=cfg.max_target_tokens), users.index[ex.user])
                 for ex in _sample(calib, 2 * cfg.val_examples, cfg.seed + 11)]
        report["person_scale"] = calibrate_person_scale(backbone, e2p, items, table, cfg.person_scales)
        e2p.save_pretrained(out_dir)
    if cfg.text_steps > 0:
        if not all(ex.profile_text for ex in examples):
            raise DataError("--text-steps trains the text conditions, which need a profile_text on every example")
        with_text = lambda ex: (ex.prompt, ex.target, users.index[ex.user], ex.profile_text)
        train_text_stages(backbone, [with_text(ex) for ex in train_ex], [with_text(ex) for ex in picked], table,
                          out_dir, cfg, report, progress)
    controls = [c for c in conditions_for(out_dir, with_text=False) if c.name != "none"]
    checked = evaluate_examples(backbone, users, verdict_ex, out_dir, out_dir / "validation", conditions=controls,
                                limit=4 * cfg.val_examples, generate=0, max_target_tokens=cfg.max_target_tokens,
                                batch_size=cfg.batch_size, seed=cfg.seed, encoder=False, progress=progress)
    report.update({"users": len(ids), "train_users": len(train_ids), "validation_users": len(val_ids),
                   "selection_users": len(select_ids), "verdict_users": len(verdict_ids),
                   "train_examples": len(train_ex), "embedding_dim": users.dim, "users_file": users.source,
                   "verdict": checked["verdict"], "validation": {"comparisons": checked["comparisons"],
                                                                 "perplexity": {k: v["perplexity"] for k, v in checked["conditions"].items()}}})
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    return report
