"""The recipe's stages, built as a list of `Stage` records and run one after another by the stage runner:

  1. shared_prefix   k soft prefix vectors, no user input: the data set's style (prompt tuning).
  2. e2p             the person part starts at zero on top of the style, so it can only add what the embedding
                     knows about the user.
  3. controls        with a shared LoRA adapter, the controls trained alike (e2p.training.lora_controls).
  4. *_text (opt.)   shared_prefix_text and e2p_text: the same, trained with the profile text in the prompt
                     (the hybrid must be trained as a hybrid).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from ..data.contract import Example, UserTable
from ..model import new_config
from ..projector import Projector, embedding_center
from .distributed import is_main_process
from .privacy import DPPlan, PrivacyError, plan, resolve_delta, spent
from .recipe_config import RecipeConfig
from .stage_runner import StageRun, init_shared, run_stage
from .stages import Stage, Start, planned_steps

log = logging.getLogger(__name__)


def train_prefix_stages(backbone, examples: Sequence[Example], users: UserTable | None, out_dir: str | Path,
                        cfg: RecipeConfig, val_examples: Sequence[Example] = (), encoder_name: str = "",
                        system_prompt: str | None = None, shared_dir: str | Path | None = None, progress: bool = True,
                        minutes: float | None = None, resume: bool = False) -> dict:
    """The shared_prefix -> e2p stages of the recipe on any examples of the data contract.

    `examples` / `val_examples`: training and validation examples; `users`: the table their users' embeddings
    come from (None: train the shared prefix only). The shared prefix goes to ``out_dir/shared_prefix`` (or is
    loaded from `shared_dir`, skipping that stage), the e2p projector to `out_dir`. Embeddings are centred on the
    mean of the training users. Returns the report's stage part: each stage's steps, best validation loss,
    seconds and parameters (the caller writes the report, once).
    """
    out_dir = Path(out_dir)
    main = is_main_process()  # under torchrun every rank trains its share of each batch; rank 0 alone writes
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2))
    table = users.tensor() if users is not None else None
    index = users.index if users is not None else None
    train_shared = shared_dir is None or not (Path(shared_dir) / "config.json").is_file()
    # the stages before the text ones, counted once (e2p.training.stages.planned_steps): --minutes and DP share them
    total_steps = sum(planned_steps(cfg, train_shared, table is not None, text=False).values())
    report: dict = {"train_items": len(examples), "train_people": len({ex.user for ex in examples}), "stages": {},
                    "shared_dir": None, "e2p_dir": None}
    cfg.check()  # again: a config changed after it was made
    dp, delta = None, None
    if cfg.dp_epsilon is not None:
        if not train_shared:
            raise PrivacyError("--shared-from reuses a shared prefix trained outside this run's privacy budget: "
                               "leave it out under --dp-epsilon, so the shared prefix is trained with DP-SGD too")
        n_users = report["train_people"]
        delta = resolve_delta(cfg.dp_epsilon, cfg.dp_delta, n_users)
        dp = plan(cfg.dp_epsilon, delta, n_users, cfg.batch_size, total_steps, cfg.dp_max_grad_norm,
                  cfg.dp_examples_per_user, cfg.seed)
        log.info("DP-SGD per user: sigma %.3f, q %.4f, C %s over %d steps", dp.noise_multiplier, dp.sample_rate,
                 dp.max_grad_norm, total_steps)

    run = StageRun(backbone, cfg, examples, val_examples, index, minutes, total_steps, dp, progress, resume, report)
    overrides = {} if system_prompt is None else {"system_prompt": system_prompt}
    base = dict(injection=cfg.injection, num_prefix_tokens=cfg.num_prefix_tokens, prefix_position=cfg.prefix_position,
                embedding_slots=cfg.embedding_slots, set_items=cfg.set_items,
                hidden_dims=cfg.hidden_dims, dropout=cfg.dropout, encoder_name=encoder_name,
                history_turns=cfg.history_turns, max_target_tokens=cfg.max_target_tokens, **overrides)
    if cfg.lora_rank:
        from .lora_controls import START, adapter_fields

        base.update(adapter_fields(backbone, cfg))
    folder = out_dir / "shared_prefix"
    start = folder / START if cfg.lora_rank else folder  # with an adapter, shared_prefix/ holds the continued control
    if train_shared:
        torch.manual_seed(cfg.seed)  # the seed fixes every initial weight, so one seed gives one projector
        shared = Projector(new_config(backbone, embedding_dim=0, **base))
        init_shared(backbone, shared)
        if cfg.shared_steps > 0:
            shared = run_stage(run, Stage("shared_prefix", Start(projector=shared), start, cfg.shared_steps,
                                          cfg.shared_lr))
        elif main:
            shared.save_pretrained(start)
        report["shared_dir"] = str(folder)
    else:
        from .lora_controls import check_same_adapter, shared_source

        shared = Projector.from_pretrained(shared_source(shared_dir), backbone)
        check_same_adapter(shared.config, base, shared_dir)
        if main and shared_source(shared_dir).resolve() != start.resolve():
            shared.save_pretrained(start)  # the run folder holds its own control, as always
        report["shared_dir"] = str(out_dir / "shared_prefix")
        report["shared_from"] = str(shared_dir)
    if table is not None and cfg.e2p_steps > 0:
        # under DP the centre is the validation users' mean: the training users' mean would be released unnoised
        people = sorted({index[ex.user] for ex in (val_examples if dp is not None else examples)})
        mean = embedding_center(table[people], cfg.set_items or cfg.embedding_slots) if cfg.center_embeddings and people else None
        # the e2p stage's initial projector (again for the shuffled control, alike): seeded, the shared stage's
        # prefix and adapter
        e2p_start = Start(config=new_config(backbone, embedding_dim=table.shape[1],
                                            embedding_mean=mean.tolist() if mean is not None else None, **base),
                          seed=cfg.seed + 1, shared_from=shared, adapter_from=shared)
        run_stage(run, Stage("e2p", e2p_start, out_dir, cfg.e2p_steps, cfg.e2p_lr, table, freeze_shared=cfg.freeze_shared,
                             contrastive=cfg.contrastive_weight))
        report["e2p_dir"] = str(out_dir)
        if cfg.lora_rank:
            from .lora_controls import adapter_report, control_stages

            for control in control_stages(start, out_dir, examples, index, table, cfg, report["stages"]["e2p"]["steps"],
                                          e2p_start):
                run_stage(run, control)
            report["adapter"] = adapter_report(out_dir, cfg, report)
    if start != folder and main and not (folder / "config.json").is_file():
        shared.save_pretrained(folder)  # no e2p stage to match: the control is the shared stage itself
    return with_privacy(report, dp, delta, cfg, total_steps)


def with_privacy(report: dict, dp: DPPlan | None, delta, cfg: RecipeConfig, total_steps: int) -> dict:
    """The report with what DP-SGD spent, when the run trained under it."""
    if dp is not None:
        steps = sum(st["steps"] for st in report["stages"].values())
        report["privacy"] = {
            "epsilon": spent(dp, steps, delta), "delta": delta, "target_epsilon": cfg.dp_epsilon, "unit": "user",
            "accountant": "rdp (opacus)", "sampling": "poisson over training users", "noise_multiplier": dp.noise_multiplier,
            "sample_rate": dp.sample_rate, "expected_users_per_step": dp.expected_users, "steps": steps,
            "planned_steps": total_steps, "max_grad_norm": dp.max_grad_norm, "examples_per_user": dp.examples_per_user,
            "training_users": report["train_people"], "stages": list(report["stages"]),
            "embedding_center": "validation users' mean"}
    return report


def train_text_stages(backbone, examples: Sequence[Example], val_examples: Sequence[Example], users: UserTable,
                      out_dir: Path, cfg: RecipeConfig, report: dict, progress: bool = True) -> None:
    """The text conditions trained alike, with each example's profile text in the prompt: `shared_prefix_text`
    (the style prefix trained with the profile text in the prompt: "text, trained alike") and `e2p_text`, the
    hybrid (that style plus E2P's person part, trained together with the text). Adds their entries to `report`;
    untimed, outside DP and never resumed, as they always were."""
    run = StageRun(backbone, cfg, examples, val_examples, users.index, None, 0, None, progress, False, report)
    spt = run_stage(run, Stage("shared_prefix_text", Start(folder=Path(report.get("shared_dir") or out_dir / "shared_prefix")),
                               out_dir / "shared_prefix_text", cfg.text_steps, cfg.shared_lr, with_text=True))
    run_stage(run, Stage("e2p_text", Start(folder=out_dir, shared_from=spt), out_dir / "e2p_text", cfg.text_steps,
                         cfg.e2p_lr, users.tensor(), freeze_shared=True, contrastive=cfg.contrastive_weight,
                         with_text=True))
