"""Differential privacy per user in training (DP-SGD through Opacus) and `e2p audit`, on tiny backbones."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import WORDS, make_backbone
from e2p.data.contract import Example, load_examples, load_users, write_examples, write_users
from e2p.evaluate.compare import auc, auc_interval
from e2p.training.privacy import PrivacyError, check_epsilon_delta, plan, resolve_delta, spent
from e2p.training.recipe_config import RecipeConfig
from e2p.training.recipe import train_on_examples
from test_your_data import FAST, WordEncoder, synthetic


def test_budget_checks_say_what_to_do():
    for eps in (0, -1, float("nan"), float("inf")):
        with pytest.raises(PrivacyError, match="positive"):
            check_epsilon_delta(eps, None)
    with pytest.raises(PrivacyError, match="needs --dp-epsilon"):
        check_epsilon_delta(None, 1e-5)
    assert resolve_delta(1.0, None, 50) == pytest.approx(1 / 500)
    for delta in (0.02, 0.5):
        with pytest.raises(PrivacyError, match="at or above 1 / 50"):
            resolve_delta(1.0, delta, 50)
    with pytest.raises(PrivacyError, match=r"in \(0, 1 / number"):
        resolve_delta(1.0, 0.0, 50)
    with pytest.raises(PrivacyError, match="give 1 or more"):  # the Python API refuses it as the CLI does
        RecipeConfig(dp_epsilon=1.0, dp_examples_per_user=0)


def test_sigma_is_calibrated_and_the_accountant_spends_it():
    p = plan(4.0, 1e-4, n_users=1000, users_per_step=50, steps=200)
    assert p.sample_rate == pytest.approx(0.05) and p.noise_multiplier > 0.5
    assert spent(p, 200, 1e-4) == pytest.approx(4.0, abs=0.05)
    assert spent(p, 100, 1e-4) < spent(p, 200, 1e-4)  # a run stopped early spent less
    assert plan(1.0, 1e-4, 1000, 50, 200).noise_multiplier > p.noise_multiplier > plan(16.0, 1e-4, 1000, 50, 200).noise_multiplier


def test_auc_and_its_interval():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0 and auc([0, 1], [2, 3]) == 0.0 and auc([1, 1], [1, 1]) == 0.5
    lo, hi = auc_interval(np.arange(10) + 0.5, np.arange(10), seed=0)
    assert 0 <= lo <= auc(np.arange(10) + 0.5, np.arange(10)) <= hi <= 1


def test_each_users_gradient_is_clipped_before_it_is_averaged():
    """With sigma 0 the DP step's gradient is the mean of per-user gradients clipped to C: its norm is at most C."""
    from opacus.optimizers import DPOptimizer

    from e2p.model import E2PModel, new_config
    from e2p.training.privacy import DPPlan
    from e2p.projector import Projector
    from e2p.evaluate.scoring import Item
    from e2p.training.loop import _dp_step, nll_objective

    backbone = make_backbone()
    projector = Projector(new_config(backbone, embedding_dim=4, injection="input", hidden_dims=[8]))
    torch.nn.init.normal_(projector.mlp[-1].weight)
    model = E2PModel(backbone, projector, training=True)
    items = [Item(model.format("hi", reply="i like dogs ."), i % 3) for i in range(6)]
    table = torch.randn(3, 4)
    params = [p for p in projector.parameters() if p.requires_grad]
    dp = DPPlan(noise_multiplier=0.0, max_grad_norm=1e-3, sample_rate=1.0, expected_users=3, examples_per_user=2)
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=1e-3, expected_batch_size=3)
    seen = []
    opt.attach_step_hook(lambda o: seen.append(torch.cat([p.grad.flatten() for p in params]).norm().item()))
    _dp_step(model, items, table, [[0, 3], [1, 4], [2, 5]], params, opt, dp, 0, nll_objective)
    assert 0 < seen[0] <= 1e-3 * (1 + 1e-4)


def test_dp_training_writes_the_budget_spent(tmp_path):
    users_path, examples_path = synthetic(tmp_path, n_users=14, per_user=3)
    users = load_users(users_path)
    examples = load_examples(examples_path, users)
    cfg = RecipeConfig(**{**FAST, "shared_steps": 2, "e2p_steps": 3, "eval_every": 5, "dp_epsilon": 2.0,
                          "dp_examples_per_user": 2})
    report = train_on_examples(make_backbone(), users, examples, tmp_path / "run", cfg, val_users=6, progress=False)
    saved = json.loads((tmp_path / "run" / "training_report.json").read_text())
    p = saved["privacy"]
    assert p["unit"] == "user" and p["stages"] == ["shared_prefix", "e2p"] and p["steps"] == 5
    assert p["examples_per_user"] == 2  # `e2p train --dp-examples-per-user 2`
    assert 0 < p["epsilon"] <= 2.0 + 0.02 and p["delta"] == pytest.approx(1 / 80) and p["training_users"] == 8
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) == 8 and report["split_file"] == "split.json"
    curves = json.loads((tmp_path / "run" / "curves.json").read_text())
    assert curves["train_loss"] == []  # a training-users statistic outside the guarantee is not written
    with pytest.raises(PrivacyError, match="shared-from"):
        train_on_examples(make_backbone(), users, examples, tmp_path / "r2", cfg, val_users=6, progress=False,
                          shared_dir=tmp_path / "run" / "shared_prefix")


def test_cli_refuses_bad_budgets_in_one_line(tmp_path, capsys):
    from e2p.cli import main

    backbone_dir = tmp_path / "backbone"
    b = make_backbone()
    b.model.save_pretrained(backbone_dir)
    b.tokenizer.save_pretrained(backbone_dir)
    users_path, examples_path = synthetic(tmp_path, n_users=12, per_user=2)
    capsys.readouterr()  # saving the backbone's own progress bar
    base = ["train", "--users", str(users_path), "--examples", str(examples_path), "--out", str(tmp_path / "run"),
            "--backbone", str(backbone_dir), "--val-users", "4", "--steps", "2", "--injection", "input"]
    for extra, message in [(["--dp-epsilon", "0"], "epsilon must be a positive number"),
                           (["--dp-epsilon", "-3"], "epsilon must be a positive number"),
                           (["--dp-epsilon", "1", "--dp-delta", "0.2"], "at or above 1 / 8 training users"),
                           (["--dp-epsilon", "1", "--dp-delta", "-1"], "delta must lie in"),
                           (["--dp-delta", "0.001"], "needs --dp-epsilon"),
                           (["--dp-epsilon", "1", "--dp-examples-per-user", "0"], "give 1 or more")]:
        assert main(base + extra) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors


def memorable(tmp_path, n_users: int = 16, per_user: int = 3, dim: int = 12, seed: int = 1):
    """Each user has a random phrase of their own that their embedding cannot predict: only memorising helps."""
    rng = np.random.default_rng(seed)
    ids = [f"u{i:02d}" for i in range(n_users)]
    vocab = [w for w in WORDS if w.isalpha()]
    phrases = [" ".join(rng.choice(vocab, 5)) for _ in ids]
    examples = [Example(u, "tell me about yourself", phrases[i]) for i, u in enumerate(ids) for _ in range(per_user)]
    return (write_users(tmp_path / "users.npz", ids, rng.normal(0, 1, (n_users, dim)).astype(np.float32)),
            write_examples(tmp_path / "examples.jsonl", examples))


def test_audit_finds_the_members_of_an_overfit_projector(tmp_path, capsys):
    from e2p.cli import main
    from e2p.evaluate.audit import audit_projector

    users_path, examples_path = memorable(tmp_path)
    users = load_users(users_path)
    examples = load_examples(examples_path, users)
    backbone = make_backbone()
    cfg = RecipeConfig(**{**FAST, "shared_steps": 5, "e2p_steps": 60, "e2p_lr": 1e-2, "eval_every": 60,
                          "person_scales": [1.0], "dropout": 0.0, "hidden_dims": [128]})
    train_on_examples(backbone, users, examples, tmp_path / "run", cfg, val_users=8, progress=False)
    res = audit_projector(backbone, users, examples, tmp_path / "run", tmp_path / "audit", candidates=4,
                          encoder=WordEncoder(), progress=False)
    attacks = res["membership"]["attacks"]
    assert res["membership"]["users"] == {"members": 8, "nonmembers": 8}
    for a in attacks.values():
        assert 0 <= a["ci95"][0] <= a["auc"] <= a["ci95"][1] <= 1
    assert attacks["calibrated"]["auc"] > 0.75 and attacks["loss"]["auc"] > 0.5, attacks
    ident = res["identification"]
    assert ident["unseen"]["chance"] == 0.25 and 0 <= ident["training"]["accuracy"]["e2p"] <= 1
    for name in ("REPORT.md", "results.json", "audit.png"):
        assert (tmp_path / "audit" / name).is_file()
    # the same training under DP at epsilon 1: the calibrated attack falls back to chance
    import dataclasses

    train_on_examples(backbone, users, examples, tmp_path / "dp", dataclasses.replace(cfg, dp_epsilon=1.0), val_users=8,
                      progress=False)
    dp = audit_projector(backbone, users, examples, tmp_path / "dp", None, candidates=0, progress=False)
    assert dp["privacy"]["epsilon"] <= 1.01
    assert dp["membership"]["attacks"]["calibrated"]["auc"] < min(0.6, attacks["calibrated"]["auc"])

    backbone_dir = tmp_path / "backbone"
    backbone.model.save_pretrained(backbone_dir)
    backbone.tokenizer.save_pretrained(backbone_dir)
    (tmp_path / "train.txt").write_text("\n".join(json.loads((tmp_path / "run" / "split.json").read_text())["train"]))
    assert main(["audit", "--users", str(users_path), "--examples", str(examples_path), "--projector", str(tmp_path / "run"),
                 "--train-users", str(tmp_path / "train.txt"), "--out", str(tmp_path / "cli"), "--backbone",
                 str(backbone_dir), "--candidates", "0"]) == 0
    assert "Membership inference" in capsys.readouterr().out
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert cli["membership"]["attacks"]["calibrated"]["auc"] == pytest.approx(attacks["calibrated"]["auc"])
    assert main(["audit", "--users", str(users_path), "--examples", str(examples_path), "--projector", str(tmp_path / "run"),
                 "--train-users", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "x"), "--backbone",
                 str(backbone_dir)]) == 2
