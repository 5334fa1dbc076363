"""The default training recipe on the data contract: split users, run the stages (e2p.training.prefix_stages), calibrate
the person part on validation users, and answer the verdict on users it was never tuned on.

The stages (each its own projector folder, each resumable) are listed in e2p.training.prefix_stages; after them
the person part's share is calibrated on validation users (`person_scale`).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

from ..config import SPLIT_FILE
from ..errors import DataError
from ..projector import Projector
from .calibration import calibrate_person_scale
from .distributed import barrier, is_main_process
from .prefix_stages import train_prefix_stages, train_text_stages
from .recipe_config import RecipeConfig, with_set_items_of
from .stage_runner import example_items, sample_examples


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
    cfg = with_set_items_of(users, cfg)
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
    if len(cfg.person_scales) > 1:
        items = example_items(backbone, e2p, sample_examples(calib, 2 * cfg.val_examples, cfg.seed + 11), users.index, cfg)
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
