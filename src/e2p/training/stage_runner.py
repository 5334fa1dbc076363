"""Runs one stage record (`e2p.training.stages.Stage`): makes its initial projector from its `Start`, formats its
examples into items, trains it with the recipe's settings and reloads its best checkpoint. Everything a run's stages
share (backbone, recipe, examples, time budget, DP plan, report) travels in one `StageRun`."""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.contract import Example
from ..evaluate.scoring import Item
from ..model import E2PModel, token_keys_values
from ..projector import Projector
from .loop import Objective, TrainConfig, train_projector
from .privacy import DPPlan
from .recipe_config import RecipeConfig
from .stages import Stage, Start


def sample_examples(examples: list, n: int, seed: int) -> list:
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(examples, n)


def init_shared(backbone, projector: Projector, text: str = "Persona:") -> None:
    """Start the shared prefix from a real token (its embedding, or its keys/values for deep injection)."""
    tok = backbone.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : projector.config.num_prefix_tokens]
    k = projector.config.num_prefix_tokens
    with torch.no_grad():
        if projector.config.injection == "input":
            vec = backbone.model.get_input_embeddings()(ids.to(backbone.device))[0]
        else:
            # after_sink: the prefix sits behind the prompt's first token, so take its keys/values from there
            sink = E2PModel(backbone, projector).format("hi").post[:1] if projector.config.prefix_position == "after_sink" else []
            vec = token_keys_values(backbone.model, sink + ids[0].tolist())[len(sink):]  # [t, L*2*kv]
        vec = vec.to(projector.shared.device, projector.shared.dtype)
        projector.shared.data[: vec.shape[0]] = vec
        if vec.shape[0] < k:
            projector.shared.data[vec.shape[0]:] = vec[-1]


def initial_projector(start: Start) -> Projector:
    """The projector a `Start` record describes (see there)."""
    if start.projector is not None:
        projector = start.projector
    elif start.folder is not None:
        projector = Projector.from_pretrained(start.folder)
    else:
        if start.seed is not None:
            torch.manual_seed(start.seed)
        projector = Projector(copy.deepcopy(start.config))  # the e2p stage and its control each their own
    if start.shared_from is not None:
        projector.shared.data.copy_(start.shared_from.shared.data)
    if start.adapter_from is not None and projector.lora is not None:
        projector.lora.load_state_dict(start.adapter_from.lora.state_dict())
    return projector


def example_items(backbone, projector: Projector, examples: Sequence[Example], index: Mapping[str, int] | None,
                  cfg: RecipeConfig, with_text: bool = False) -> list[Item]:
    """Examples as a stage trains and validates on them: formatted for `projector` (its prefix position and system
    prompt), at most `cfg.max_target_tokens` target tokens, each with its user's row of the embedding table
    (`index`, the table's user -> row; None: no table, no person). `with_text`: the profile text in the prompt."""
    model = E2PModel(backbone, projector)
    return [Item(model.format(ex.prompt, reply=ex.target, persona_text=ex.profile_text if with_text else None,
                              max_target_tokens=cfg.max_target_tokens), -1 if index is None else index[ex.user])
            for ex in examples]


def train_stage(backbone, name: str, projector: Projector, folder: str | Path, items: Sequence[Item],
                val_items: Sequence[Item], table: torch.Tensor | None, steps: int, lr: float, cfg: RecipeConfig, *,
                minutes: float | None = None, progress: bool = True, freeze_shared: bool = False,
                contrastive: float = 0.0, resume: bool = False, objective: Objective | None = None,
                dp: DPPlan | None = None, item_users: Sequence | None = None) -> tuple[Projector, dict]:
    """One stage of the recipe on formatted items (`example_items`): train `projector` into `folder` with the
    recipe's batch size, validation cadence, seed and margin; `objective`: the training loop's hook (default: the
    product's loss). Returns the best checkpoint reloaded from `folder` and the stage's report entry (steps, best
    validation loss, seconds, parameters). Research stages call this too, with their own items or objective.
    `dp`: train with DP-SGD per user (`item_users`: each item's user)."""
    model = E2PModel(backbone, projector, training=True)
    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, eval_every=cfg.eval_every, seed=cfg.seed,
                     contrastive_weight=contrastive, margin=cfg.margin, freeze_shared=freeze_shared, minutes=minutes,
                     dp=dp, lora_lr=getattr(cfg, "lora_lr", None) if projector.lora is not None else None)
    s = time.time()
    state = train_projector(model, items, table, folder, tc, val_items=val_items, progress=progress, name=name,
                            resume=resume, objective=objective, item_users=item_users)
    entry = {"steps": state["step"], "best_val": state["best_val"], "seconds": time.time() - s,
             "parameters": projector.num_parameters()}
    return Projector.from_pretrained(folder), entry


@dataclass
class StageRun:
    """What every stage of one run shares: the backbone, the recipe, the run's examples and table index, its time
    budget and planned steps, DP-SGD's plan, and the report the stages write their entries into."""

    backbone: object
    cfg: RecipeConfig
    examples: Sequence[Example]
    val_examples: Sequence[Example]
    index: Mapping[str, int] | None
    minutes: float | None
    total_steps: int
    dp: DPPlan | None
    progress: bool
    resume: bool
    report: dict


def run_stage(run: StageRun, st: Stage) -> Projector:
    """Train one stage record on the run's examples (or its own): its initial projector made now, its share of the
    run's minutes where it is timed; -> the best checkpoint, its report entry in `run.report["stages"]`."""
    budget = None if run.minutes is None or not st.timed else run.minutes * st.steps / max(run.total_steps, 1)
    train = run.examples if st.train is None else st.train
    index = st.index or run.index
    projector = initial_projector(st.start)
    items = example_items(run.backbone, projector, train, st.train_index or index, run.cfg, st.with_text)
    val_items = example_items(run.backbone, projector, run.val_examples if st.val is None else st.val, index, run.cfg,
                              st.with_text)
    trained, run.report["stages"][st.name] = train_stage(
        run.backbone, st.name, projector, st.folder, items, val_items, st.table, st.steps, st.lr, run.cfg,
        minutes=budget, progress=run.progress, freeze_shared=st.freeze_shared, contrastive=st.contrastive,
        resume=run.resume, dp=run.dp, item_users=[ex.user for ex in train])
    return trained
