"""The persona experiments' recipe (`run_recipe`): the product's stages plus the knobs the persona sessions tried
(persona reconstruction, distillation from a text-reading teacher, sentence slots, MSC personas, validation on
novel sentences). Figures and commands: docs/experiments.md.

Stages (each its own projector folder, each resumable):
  1. shared_prefix        k soft prefix vectors, no user input: the data set's style (prompt tuning).
  2. reconstruct (opt.)   the person part learns to make the frozen backbone restate the persona
                          sentences from the prefix alone (xRAG-style), style part frozen.
  3. e2p                  replies; the person part starts at zero on top of the style.
  4. *_text (opt.)        shared_prefix_text and e2p_text, trained with the persona text in the prompt.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from e2p.data.persona import PersonaExample, without_people_of
from e2p.data.encoders import encoder_for
from e2p.training.calibration import calibrate_person_scale
from e2p.model import E2PModel, new_config, per_row_sum
from e2p.formatting import Segments
from e2p.projector import Projector, embedding_center
from e2p.training.recipe_config import RecipeConfig
from e2p.training.stage_runner import init_shared, sample_examples, train_stage
from e2p.evaluate.scoring import Item

log = logging.getLogger(__name__)

RECONSTRUCT_PROMPT = "Tell me about yourself."


@dataclass
class PersonaRecipeConfig(RecipeConfig):
    reconstruct_steps: int = 60
    reconstruct_lr: float = 1e-3
    reconstruct_mix: float = 0.0  # share of reconstruction items mixed into the e2p stage
    reconstruct_sentences: int = 0  # 0: restate the whole persona; N: restate N random sentences of it
    include_msc: bool = False  # train on MSC's grown personas too
    distill_weight: float = 0.0  # e2p stage: share of KL(shared_prefix_text with the persona text || e2p)
    persona_subsets: bool = False  # e2p stage with distillation: random subsets of each persona as augmentation
    teacher_dir: str | None = None  # distill from this trained text-reading projector instead of this run's own
    val_people: int = 40
    embedding_slots: int = 1  # > 1: one embedding per persona sentence in this many slots, one prefix token each
    novel_val_sentences: bool = True  # strip the validation people's persona sentences from training personas


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


def reply_row(model: E2PModel, ex: PersonaExample, cfg: PersonaRecipeConfig, persona_text: str | None = None):
    """One reply as the recipe formats it: the last `history_turns` turns, at most `max_target_tokens` targets."""
    return model.format(ex.messages(cfg.history_turns), reply=ex.reply, persona_text=persona_text,
                        max_target_tokens=cfg.max_target_tokens)


def make_items(model: E2PModel, examples, index: dict[str, int], cfg: PersonaRecipeConfig, with_text: bool) -> list[Item]:
    return [Item(reply_row(model, ex, cfg, ex.persona_text if with_text else None), index.get(persona_key(ex), -1))
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


def run_recipe(backbone, encoder, examples: list[PersonaExample], out_dir: str | Path, cfg: PersonaRecipeConfig,
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
    val_sample = sample_examples(val_ex, cfg.val_examples, cfg.seed)

    def stage(name, projector, steps, lr, with_text, freeze_shared=False, contrastive=0.0, items=None, val_items=None, tbl=table,
              teacher=None):
        """The product's stage (`e2p.training.stage_runner.train_stage`) on this recipe's items; a teacher: distillation."""
        if steps <= 0:
            return None
        model = E2PModel(backbone, projector)
        if items is None:
            items = make_items(model, sample_examples(train_ex, steps * cfg.batch_size, cfg.seed + len(name)), index, cfg, with_text)
        if val_items is None:
            val_items = make_items(model, val_sample, index, cfg, with_text)
        folder = out_dir if name == "e2p" else out_dir / name
        trained, report["stages"][name] = train_stage(
            backbone, name, projector, folder, items, val_items, None if projector.config.is_shared else tbl, steps, lr,
            cfg, minutes=budget(steps), progress=progress, freeze_shared=freeze_shared, contrastive=contrastive,
            resume=resume, objective=distill_objective(teacher, cfg.distill_weight) if teacher is not None else None)
        return trained

    base = dict(injection=cfg.injection, num_prefix_tokens=slots if slots > 1 else cfg.num_prefix_tokens,
                prefix_position=cfg.prefix_position, hidden_dims=cfg.hidden_dims, dropout=cfg.dropout,
                encoder_name=getattr(encoder, "name", ""), history_turns=cfg.history_turns,
                max_target_tokens=cfg.max_target_tokens)
    shared = Projector(new_config(backbone, embedding_dim=0, **base))
    init_shared(backbone, shared)
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
        rec_items, rec_table = reconstruction_items(backbone, e2p, train_ex, encoder, cfg)
        val_rec, val_table = reconstruction_items(backbone, e2p, val_ex, encoder, cfg, augment=False)
        offset = len(rec_table)
        val_rec = sample_examples([Item(it.row, it.person + offset) for it in val_rec], cfg.val_examples, cfg.seed)
        e2p = stage("reconstruct", e2p, cfg.reconstruct_steps, cfg.reconstruct_lr, False, freeze_shared=True,
                    items=rec_items, val_items=val_rec, tbl=torch.cat([rec_table, val_table])) or e2p
    mixed, mixed_table = None, table
    if teacher is not None and cfg.e2p_steps > 0:
        replies, reply_table = _distill_items(E2PModel(backbone, e2p), teacher,
                                              sample_examples(train_ex, cfg.e2p_steps * cfg.batch_size, cfg.seed + 3), encoder, cfg)
        # validation items index `table`; the reply items index their own rows behind it
        mixed = [TeacherItem(it.row, it.person + len(table), it.teacher_row) for it in replies]
        mixed_table = torch.cat([table, reply_table])
    elif cfg.reconstruct_steps > 0 and cfg.reconstruct_mix > 0 and cfg.e2p_steps > 0:
        # keep restating the persona as a share of the reply batches, so replies don't erode the person part
        n_replies = cfg.e2p_steps * cfg.batch_size
        replies = make_items(E2PModel(backbone, e2p), sample_examples(train_ex, n_replies, cfg.seed + 3), index, cfg, False)
        n_rec = int(n_replies * cfg.reconstruct_mix / (1 - cfg.reconstruct_mix))
        rec = [Item(it.row, it.person + len(table)) for it in sample_examples(rec_items, n_rec, cfg.seed)]
        mixed, mixed_table = replies + rec, torch.cat([table, rec_table])
    e2p = stage("e2p", e2p, cfg.e2p_steps, cfg.e2p_lr, False, freeze_shared=cfg.freeze_shared,
                contrastive=cfg.contrastive_weight, items=mixed, tbl=mixed_table, teacher=teacher) or e2p
    if cfg.e2p_steps > 0 and len(cfg.person_scales) > 1:
        # fresh validation replies (not those the checkpoint was picked on), so the choice is not the same noise twice
        rest = [e for e in val_ex if e not in val_sample] or val_ex
        calib = make_items(E2PModel(backbone, e2p), sample_examples(rest, 2 * cfg.val_examples, cfg.seed + 11), index, cfg, False)
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


@dataclass
class TeacherItem(Item):
    """A training item and the same example as the teacher sees it (e.g. with the persona text in the prompt)."""

    teacher_row: Segments | None = None


def distill_sums(model: E2PModel, teacher: E2PModel, rows, teacher_rows, emb):
    """Per row: summed NLL, target-token count and summed KL(teacher || model) over the target tokens."""
    if any(r is None for r in teacher_rows):
        raise ValueError("distillation needs a teacher_row on every item")
    logits, labels, row = model.target_logits(rows, emb)
    with torch.no_grad():
        t_logits, t_labels, _ = teacher.target_logits(teacher_rows, None)
    if not torch.equal(labels, t_labels):
        raise ValueError("teacher and model rows must have the same target tokens")
    logp = torch.log_softmax(logits, -1)
    t_logp = torch.log_softmax(t_logits, -1)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
    nll = -logp.gather(1, labels[:, None])[:, 0]
    n = len(rows)
    return per_row_sum(nll, row, n), per_row_sum(torch.ones_like(row), row, n), per_row_sum(kl, row, n)


def distill_objective(teacher: E2PModel, weight: float):
    """The training loop's objective (`e2p.training.loop.train_projector(objective=...)`) for distillation: per row,
    (1 - weight) * NLL + weight * KL(teacher || model) on the target tokens, each `TeacherItem`'s `teacher_row`
    scored by the frozen teacher (far more signal per reply than the one sampled token)."""
    def objective(model: E2PModel, items, embeddings):
        nll, count, kl = distill_sums(model, teacher, [it.row for it in items],
                                      [getattr(it, "teacher_row", None) for it in items], embeddings)
        return (1 - weight) * nll + weight * kl, count

    return objective


def _distill_items(model: E2PModel, teacher: E2PModel, examples, encoder, cfg: PersonaRecipeConfig):
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
    items = [TeacherItem(reply_row(model, ex, cfg), i, teacher_row=reply_row(teacher, ex, cfg, text))
             for i, (ex, text) in enumerate(zip(examples, texts))]
    return items, table


def reconstruction_items(backbone, projector, examples, encoder, cfg: PersonaRecipeConfig, augment: bool = True):
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


