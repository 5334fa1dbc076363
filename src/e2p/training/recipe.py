"""The default training recipe on the data contract: learn the style first, then only what differs between users.

Stages (each its own projector folder, each resumable):
  1. shared_prefix   k soft prefix vectors, no user input: the data set's style (prompt tuning).
  2. e2p             the person part starts at zero on top of the style, so it can only add what the embedding
                     knows about the user; calibrated on validation users (`person_scale`).
  3. *_text (opt.)   shared_prefix_text and e2p_text: the same, trained with the profile text in the prompt
                     (the hybrid must be trained as a hybrid).
With `lora_rank` > 0 both stages also train one shared LoRA adapter of the backbone, and the controls are trained
alike (e2p.training.lora_controls: shared_prefix continued for as many steps as e2p took, shuffled_trained).
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .calibration import calibrate_person_scale, calibrate_prototypes
from ..config import SPLIT_FILE
from ..data.contract import Example, UserTable
from .distributed import barrier, is_main_process
from .recipe_config import RecipeConfig
from ..errors import DataError
from ..model import E2PModel, new_config, token_keys_values
from ..projector import Projector, embedding_center
from .privacy import DPPlan, PrivacyError, plan, resolve_delta, spent
from .loop import Objective, TrainConfig, train_projector
from .stages import Stage, planned_steps
from ..evaluate.scoring import Item

log = logging.getLogger(__name__)

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

    run = _Run(backbone, cfg, examples, val_examples, index, minutes, total_steps, dp, progress, resume, report)
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
            shared = run_stage(run, Stage("shared_prefix", lambda s=shared: s, start, cfg.shared_steps, cfg.shared_lr))
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
        torch.manual_seed(cfg.seed + 1)
        if cfg.person_map == "prototypes":
            from .prototypes import prototype_stage, save_prototypes

            own_stage, onehot = prototype_stage(backbone, examples, users, shared, out_dir, base, cfg)
            save_prototypes(backbone, run_stage(run, own_stage), onehot, users, shared, out_dir, base, mean)
            barrier()
            report["e2p_dir"] = str(out_dir)
            return _with_privacy(report, dp, delta, cfg, total_steps)

        def new_e2p() -> Projector:  # the e2p stage's initial projector (again for the shuffled control, alike)
            torch.manual_seed(cfg.seed + 1)
            e2p = Projector(new_config(backbone, embedding_dim=table.shape[1],
                                       embedding_mean=mean.tolist() if mean is not None else None, **base))
            e2p.shared.data.copy_(shared.shared.data)
            if e2p.lora is not None:  # and the shared stage's adapter
                e2p.lora.load_state_dict(shared.lora.state_dict())
            return e2p

        run_stage(run, Stage("e2p", new_e2p, out_dir, cfg.e2p_steps, cfg.e2p_lr, table, freeze_shared=cfg.freeze_shared,
                             contrastive=cfg.contrastive_weight))
        report["e2p_dir"] = str(out_dir)
        if cfg.lora_rank:
            from .lora_controls import adapter_report, control_stages

            for control in control_stages(start, out_dir, examples, index, table, cfg, report["stages"]["e2p"]["steps"],
                                          new_e2p):
                run_stage(run, control)
            report["adapter"] = adapter_report(out_dir, cfg, report)
    if start != folder and main and not (folder / "config.json").is_file():
        shared.save_pretrained(folder)  # no e2p stage to match: the control is the shared stage itself
    return _with_privacy(report, dp, delta, cfg, total_steps)


@dataclass
class _Run:
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


def run_stage(run: _Run, st: Stage) -> Projector:
    """Train one stage record on the run's examples (or its own): its initial projector made now, its share of the
    run's minutes where it is timed; -> the best checkpoint, its report entry in `run.report["stages"]`."""
    budget = None if run.minutes is None or not st.timed else run.minutes * st.steps / max(run.total_steps, 1)
    train = run.examples if st.train is None else st.train
    index = st.index or run.index
    projector = st.start()
    trained, run.report["stages"][st.name] = train_stage(
        run.backbone, st.name, projector, st.folder, example_items(run.backbone, projector, train, st.train_index or index,
                                                                  run.cfg),
        example_items(run.backbone, projector, run.val_examples if st.val is None else st.val, index, run.cfg), st.table,
        st.steps, st.lr, run.cfg, minutes=budget, progress=run.progress, freeze_shared=st.freeze_shared,
        contrastive=st.contrastive, resume=run.resume, dp=run.dp, item_users=[ex.user for ex in train])
    return trained


def _with_privacy(report: dict, dp: DPPlan | None, delta, cfg: RecipeConfig, total_steps: int) -> dict:
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
    hybrid (that style plus E2P's person part, trained together with the text). Adds their entries to `report`."""
    def stage(name: str, projector: Projector, table, lr: float, **kw) -> Projector:
        trained, report["stages"][name] = train_stage(
            backbone, name, projector, out_dir / name, example_items(backbone, projector, examples, users.index, cfg, True),
            example_items(backbone, projector, val_examples, users.index, cfg, True), table, cfg.text_steps, lr, cfg,
            progress=progress, **kw)
        return trained

    spt = stage("shared_prefix_text", Projector.from_pretrained(report.get("shared_dir") or out_dir / "shared_prefix"),
                None, cfg.shared_lr)
    hybrid = Projector.from_pretrained(out_dir)
    hybrid.shared.data.copy_(spt.shared.data)
    stage("e2p_text", hybrid, users.tensor(), cfg.e2p_lr, freeze_shared=True, contrastive=cfg.contrastive_weight)


def _set_items_of_table(users, cfg: RecipeConfig) -> RecipeConfig:
    """A users table of set profiles (its rule beside it has set_items, `e2p data pens --profile-set`) trains a set
    projector without a recipe saying so; a recipe that says otherwise is refused."""
    from ..data.live_profile import ProfileRule, rule_path

    beside = rule_path(users.source) if getattr(users, "source", None) else None
    if beside is None or not beside.is_file():
        return cfg
    items = ProfileRule.load(beside).set_items or 0
    if items and cfg.set_items not in (0, items):
        raise DataError(f"{users.source} holds sets of {items} items, the recipe says set_items {cfg.set_items}")
    return replace(cfg, set_items=items) if items and not cfg.set_items else cfg


def train_on_examples(backbone, users, examples, out_dir: str | Path, cfg: RecipeConfig | None = None, *,
                      val_users: int | None = None, minutes: float | None = None, progress: bool = True,
                      shared_dir: str | Path | None = None, resume: bool = False, encoder_name: str = "") -> dict:
    """The default recipe on the data contract (`e2p.data.contract`): any user table, any examples.

    Users with examples are split by user: training users, and validation users never trained on. Half of the
    validation users pick checkpoints and calibrate the person part (`person_scale`); the other half answer the
    verdict (e2p vs shared_prefix and vs shuffled, 95% intervals over users), so the verdict is not measured on
    the users it was tuned on. Writes the projector (and `shared_prefix/`) to `out_dir` and
    `training_report.json` with the verdict. No text encoder is involved: the embeddings are the table's.
    `shared_dir`: a shared prefix trained before on the same examples and split (it holds no user information,
    so a new embedding table can reuse it instead of training it again). `resume`: continue interrupted stages
    from their checkpoints. `encoder_name`: the text encoder the table was made with, if any (saved in config.json
    so `generate` and the server embed new users' text the same way).
    """
    from ..data.contract import split_validation_users
    from ..evaluate.loop import conditions_for, evaluate_examples

    cfg = cfg or RecipeConfig(injection="deep", num_prefix_tokens=1)
    cfg = _set_items_of_table(users, cfg)
    out_dir = Path(out_dir)
    t0 = time.time()
    ids = sorted({ex.user for ex in examples})
    n_val = val_users if val_users is not None else max(4, min(200, round(0.2 * len(ids))))
    train_ids, val_ids = split_validation_users(ids, n_val, cfg.seed)
    select_ids, verdict_ids = set(val_ids[0::2]), set(val_ids[1::2])
    if cfg.max_train_users is not None:  # a learning curve: the same validation users, fewer training users
        if cfg.max_train_users < 2:
            raise DataError(f"max_train_users must be at least 2, got {cfg.max_train_users}")
        train_ids = sorted(random.Random(cfg.seed + 7).sample(list(train_ids), min(cfg.max_train_users, len(train_ids))))
    train_set = set(train_ids)
    train_ex = [ex for ex in examples if ex.user in train_set]
    select_ex = [ex for ex in examples if ex.user in select_ids]
    verdict_ex = [ex for ex in examples if ex.user in verdict_ids]
    picked = sample_examples(select_ex, cfg.val_examples, cfg.seed)
    chosen = {id(ex) for ex in picked}
    calib = [ex for ex in select_ex if id(ex) not in chosen] or select_ex
    if is_main_process():  # who trained and who did not: what `e2p audit` reads (keep it with the run, never ship it)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SPLIT_FILE).write_text(json.dumps({"train": list(train_ids), "selection": sorted(select_ids),
                                                      "verdict": sorted(verdict_ids)}, indent=1))
        from ..data.live_profile import carry_rule

        carry_rule(users, out_dir)  # the rule that built the table, so a server folds new events in the same way
    report = train_prefix_stages(backbone, train_ex, users, out_dir, cfg, val_examples=picked, encoder_name=encoder_name,
                                 progress=progress, minutes=minutes, shared_dir=shared_dir, resume=resume)
    e2p = Projector.from_pretrained(out_dir, backbone)
    if len(cfg.person_scales) > 1 or e2p.config.prototypes:
        items = example_items(backbone, e2p, sample_examples(calib, 2 * cfg.val_examples, cfg.seed + 11), users.index, cfg)
        if e2p.config.prototypes:
            from .prototypes import TEMPERATURES

            report["person_scale"] = calibrate_prototypes(backbone, e2p, items, users.tensor(), cfg.person_scales,
                                                          TEMPERATURES)
        else:
            report["person_scale"] = calibrate_person_scale(backbone, e2p, items, users.tensor(), cfg.person_scales)
        if "adapter" in report:  # the shuffled control trained alike is calibrated alike, on the same items
            from .lora_controls import SHUFFLED

            shuffled = Projector.from_pretrained(out_dir / SHUFFLED, backbone)
            report["adapter"]["controls"][SHUFFLED]["person_scale"] = calibrate_person_scale(
                backbone, shuffled, items, users.tensor(), cfg.person_scales)
            if is_main_process():
                shuffled.save_pretrained(out_dir / SHUFFLED)
        if is_main_process():  # every rank computed the same scale; one writes it
            e2p.save_pretrained(out_dir)
        barrier()
    if cfg.text_steps > 0:
        if not all(ex.profile_text for ex in examples):
            raise DataError("--text-steps trains the text conditions, which need a profile_text on every example")
        train_text_stages(backbone, train_ex, picked, users, out_dir, cfg, report, progress)
    report["seconds"] = time.time() - t0  # the training: every stage and the calibration, not the verdict below
    if not is_main_process():  # the verdict is rank 0's alone (it writes the report)
        return report
    controls = [c for c in conditions_for(out_dir, with_text=False) if c.name != "none"]
    checked = evaluate_examples(backbone, users, verdict_ex, out_dir, out_dir / "validation", conditions=controls,
                                limit=4 * cfg.val_examples, generate=0, max_target_tokens=cfg.max_target_tokens,
                                batch_size=cfg.batch_size, seed=cfg.seed, encoder=False, progress=progress)
    report.update({"users": len(ids), "train_users": len(train_ids), "validation_users": len(val_ids),
                   "selection_users": len(select_ids), "verdict_users": len(verdict_ids),
                   "train_examples": len(train_ex), "embedding_dim": users.dim, "users_file": users.source,
                   "split_file": SPLIT_FILE,
                   "verdict": checked["verdict"], "validation": {"comparisons": checked["comparisons"],
                                                                 "perplexity": {k: v["perplexity"] for k, v in checked["conditions"].items()}}})
    report["recipe"] = asdict(cfg)  # what this run trained (its person map, slots, adapter...), beside the verdict
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    return report
