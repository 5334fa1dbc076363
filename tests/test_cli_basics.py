"""The command line as users meet it: --version, python -m e2p, -v anywhere, and a seed that seeds training."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from e2p import __version__
from e2p.cli import build_parser, main


def test_version_and_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "e2p", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"e2p {__version__}"


def test_verbose_works_before_or_after_the_command(monkeypatch):
    seen = []
    monkeypatch.setattr("e2p.cli.cmd_data", lambda args: seen.append(args.verbose))
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices["data"]._actions:
        if action.dest == "func":
            action.default = lambda args: seen.append(args.verbose)
    assert main(["data", "pens", "x", "--out", "y", "-v"]) == 0
    assert main(["-v", "data", "pens", "x", "--out", "y"]) == 0
    assert main(["data", "pens", "x", "--out", "y"]) == 0
    assert seen == [True, True, False]


def test_one_seed_gives_one_trained_projector(tmp_path):
    """Two `e2p train` runs with the same seed give bit-identical weights (the initial weights are seeded too)."""
    from conftest import make_backbone

    bb = make_backbone()
    bb.model.save_pretrained(tmp_path / "bb")
    bb.tokenizer.save_pretrained(tmp_path / "bb")
    users = [f"u{i}" for i in range(10)]
    np.savez(tmp_path / "users.npz", user=np.array(users), embedding=np.random.default_rng(0).normal(size=(10, 8)).astype("float32"))
    with open(tmp_path / "ex.jsonl", "w") as f:
        for i, u in enumerate(users):
            for reply in ["i like dogs .", "i play guitar ."][: 1 + i % 2]:
                f.write(json.dumps({"user": u, "prompt": "tell me about yourself", "completion": reply}) + "\n")
    common = ["train", "--backbone", str(tmp_path / "bb"), "--users", str(tmp_path / "users.npz"), "--examples",
              str(tmp_path / "ex.jsonl"), "--steps", "4", "--batch-size", "4", "--val-examples", "2", "--seed", "7",
              "--dtype", "float32"]
    import torch

    assert main(common + ["--out", str(tmp_path / "base")]) == 0
    # reusing a shared prefix skips its stage, so nothing but the seed may fix the person part's initial weights,
    # whatever the random state before (another process, other work)
    common += ["--shared-from", str(tmp_path / "base" / "shared_prefix")]
    for run, state in (("a", 123), ("b", 456)):
        torch.manual_seed(state)
        assert main(common + ["--out", str(tmp_path / run)]) == 0
    for part in ("model.safetensors", "shared_prefix/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / part)), load_file(str(tmp_path / "b" / part))
        assert all((a[k] == b[k]).all() for k in a), part
    assert main([a if a != "7" else "8" for a in common] + ["--out", str(tmp_path / "c")]) == 0
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert any(not (a[k] == c[k]).all() for k in a)


def test_every_argument_has_help_text():
    import argparse

    from e2p.cli import build_parser

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    walk(p, f"{name} {sub}")
            elif not action.help and "-h" not in action.option_strings:
                missing.append(f"{name} {action.option_strings or action.dest}")

    walk(build_parser(), "e2p")
    assert not missing, f"arguments without help: {missing}"


def test_train_lists_product_flags_only_and_takes_research_knobs_from_a_recipe_file(tmp_path, capsys):
    from e2p.training.recipe_config import recipe_from_args

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    listed = [a for a in train._actions if a.help != "==SUPPRESS=="]
    assert len(listed) <= 24
    shown = train.format_help()
    for knob in ("--hidden-dims", "--text-steps", "--person-map", "--prefix-position", "--embedding-slots"):
        assert knob not in shown
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"hidden_dims": [], "prefix_position": "after_sink", "seed": 7}))
    args = parser.parse_args(["train", "--users", "u", "--examples", "e", "--out", "o", "--recipe", str(recipe),
                              "--batch-size", "8"])
    cfg = recipe_from_args(args)
    assert (cfg.hidden_dims, cfg.prefix_position, cfg.seed, cfg.batch_size) == ([], "after_sink", 7, 8)
    old = parser.parse_args(["train", "--users", "u", "--examples", "e", "--out", "o", "--hidden-dims", "linear"])
    assert recipe_from_args(old).hidden_dims == [] and "moves into the recipe file" in capsys.readouterr().err
    assert recipe_from_args(parser.parse_args(["train", "--data", "d", "--out", "o"])).hidden_dims == [1024]
    (tmp_path / "bad.json").write_text(json.dumps({"hiden_dims": []}))
    assert main(["train", "--users", "u", "--examples", "e", "--out", "o", "--recipe", str(tmp_path / "bad.json")]) == 2
    assert "unknown field(s) hiden_dims" in capsys.readouterr().err
