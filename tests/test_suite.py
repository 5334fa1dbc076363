"""The paper suite end to end on the tiny backbone, a fake encoder and tiny synthetic PENS / persona files."""
import hashlib
import json
import random

import numpy as np
import pytest
import torch

from conftest import WORDS
from e2p.errors import DataError
from e2p.suite import SuiteConfig, add_noise, detect_parts, run_suite

CONTENT = [w for w in WORDS if w.isalpha() and w not in ("system", "user", "assistant")]


class FakeEncoder:
    """Hashed bag of words: deterministic, cheap, never a zero vector."""

    name = "fake-bow"
    dim = 16

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, 0] = 0.5
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _sentence(rng, n=4):
    return " ".join(rng.choice(CONTENT) for _ in range(n))


def write_pens(folder, users=10, headlines=12):
    rng = random.Random(0)
    lines = ["userid\tclicknewsID\tposnewID\trewrite_titles"]
    for u in range(users):
        clicks = ",".join(f"N{rng.randint(1, 25)}" for _ in range(8))
        shown = ",".join(f"S{u}_{i}" for i in range(headlines))
        titles = ";;".join(_sentence(rng) for _ in range(headlines))
        lines.append(f"U{u}\t{clicks}\t{shown}\t{titles}")
    lines.append("BAD\tN1\tS1,S2\tonly one")  # misaligned: skipped and counted
    (folder / "pens_users.tsv").write_text("\n".join(lines) + "\n")


def _convai2(rng, episodes):
    out = []
    for _ in range(episodes):
        n = 1
        for _ in range(2):
            out.append(f"{n} your persona: i love {rng.choice(CONTENT)} {rng.choice(CONTENT)} .")
            n += 1
        for _ in range(3):
            out.append(f"{n} {_sentence(rng, 5)} ?\t{_sentence(rng, 5)} .")
            n += 1
    return "\n".join(out) + "\n"


def write_persona(folder):
    rng = random.Random(1)
    (folder / "convai2_train.txt").write_text(_convai2(rng, 12))
    (folder / "convai2_test.txt").write_text(_convai2(rng, 8))
    lines = []
    for _ in range(4):
        init = [[f"i love {rng.choice(CONTENT)} ."], [f"i am a {rng.choice(CONTENT)} ."]]
        grown = [p + [f"i like {rng.choice(CONTENT)} ."] for p in init]
        dialog = [{"id": "Speaker 1" if j % 2 == 0 else "Speaker 2", "text": _sentence(rng, 5)} for j in range(4)]
        lines.append(json.dumps({"personas": grown, "init_personas": init, "dialog": dialog, "metadata": {}}))
    lines.append("{not json")  # malformed: skipped and counted
    (folder / "msc_dialogue_session_2_valid.txt").write_text("\n".join(lines) + "\n")


def tiny_config(**kw):
    values = dict(hidden_dims=[32], batch_size=2, eval_batch_size=8, max_target_tokens=8, train_minutes=None,
                  pens_users=None, unseen_fraction=0.3, seen_eval_users=3, unseen_eval_users=None, eval_targets_per_user=2,
                  train_targets_per_user=4, history_token_budget=16, behaviour_dim=4, shared_steps=2, e2p_steps=2,
                  lora_steps=2, prompt_tuning_users=2, prompt_tuning_steps=1, k_shared_steps=1, k_e2p_steps=1,
                  prefix_lengths=[1, 2], gen_limit=4, max_new_tokens=4, persona_train_people=None, persona_val_people=2,
                  persona_val_examples=4, persona_shared_steps=2, persona_e2p_steps=2, persona_limit=12, msc_limit=6,
                  drift_behaviour=True)
    values.update(kw)
    return SuiteConfig.preset(quick=True, **values)


PENS_CONDITIONS = {"none", "text", "shared_prefix", "shuffled", "e2p", "shuffled_behaviour", "e2p_behaviour",
                   "prompt_tuning", "lora_text"}


def _check_outputs(out):
    for name in ("results.json", "REPORT.md", "perplexity.png", "drift.png", "k_curve.png"):
        assert (out / name).is_file(), name
    return json.loads((out / "results.json").read_text())


def test_suite_end_to_end(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_pens(data)
    write_persona(data)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    res = run_suite(tiny, FakeEncoder(), data, tmp_path / "out", tiny_config(), progress=False)
    r = _check_outputs(tmp_path / "out")
    assert r["parts"] == ["pens", "persona"] and res["parts"] == r["parts"]
    assert r["data"]["pens"]["skipped"] == {"PENS rows with misaligned headlines": 1}
    p = r["pens"]
    assert set(p["conditions"]) == PENS_CONDITIONS
    for name, c in p["conditions"].items():
        assert c["perplexity"] > 1, name
        for key in ("trainable_parameters", "bytes_per_user", "prompt_tokens_per_request", "train_seconds",
                    "perplexity_seen", "perplexity_unseen"):
            assert key in c, (name, key)
    assert p["conditions"]["prompt_tuning"]["perplexity_unseen"] is None  # seen users only
    assert p["conditions"]["text"]["prompt_tokens_per_request"] > p["conditions"]["none"]["prompt_tokens_per_request"]
    assert p["conditions"]["e2p"]["bytes_per_user"] == 16 * 4
    assert p["conditions"]["lora_text"]["trainable_parameters"] > 0
    assert set(p["drift_noise"]) == {"e2p", "e2p_behaviour"}
    assert set(p["drift_noise"]["e2p"]) == {"0.0", "0.1", "0.25", "0.5", "1.0"}
    assert {"half_a", "half_b", "full_history"} <= set(p["drift_history_halves"])
    assert set(p["k_curve"]) == {"1", "2"} and p["k_curve"]["2"]["e2p"] > 1
    for g in ("none", "text", "e2p", "lora_text"):
        assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(p["generation"][g])
    assert "e2p_vs_shared_prefix" in p["comparisons"]
    q = r["persona"]
    assert {"none", "text", "shared_prefix", "shuffled", "e2p"} <= set(q["evaluation"]["conditions"])
    assert set(q["drift_noise"]["e2p"]) == {"0.0", "0.1", "0.25", "0.5", "1.0"}
    assert "e2p" in q["generation"] and "rougeL" in q["generation"]["e2p"]
    msc = q["msc_refresh"]["msc_dialogue_session_2_valid.txt"]
    assert msc["persona_changed"] == 1.0 and msc["e2p_initial"] > 1 and msc["e2p_refreshed"] > 1
    assert msc["skipped"] == {"malformed msc lines": 1}
    assert "k_curve" not in q  # the k curve is run on PENS when both parts exist
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## PENS personalized headlines" in report and "## Persona dialogue" in report and "quick mode" in report
    # LoRA was removed again: the backbone is exactly as before
    after = tiny.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_pens_only_folder(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_pens(data)
    (data / "notes.tsv").write_text("id\ttext\n1\thello\n")  # a non-PENS .tsv is ignored
    cfg = tiny_config(lora_steps=0, prompt_tuning_steps=0, prefix_lengths=[1], noise_levels=[0.0, 0.5])
    run_suite(tiny, FakeEncoder(), data, tmp_path / "out", cfg, progress=False)
    r = _check_outputs(tmp_path / "out")
    assert r["parts"] == ["pens"] and "persona" not in r
    assert "lora_text" not in r["pens"]["conditions"] and "prompt_tuning" not in r["pens"]["conditions"]
    assert "## Persona dialogue" not in (tmp_path / "out" / "REPORT.md").read_text()


def test_persona_only_folder(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_persona(data)
    cfg = tiny_config(noise_levels=[0.0, 1.0])
    run_suite(tiny, FakeEncoder(), data, tmp_path / "out", cfg, progress=False)
    r = _check_outputs(tmp_path / "out")
    assert r["parts"] == ["persona"] and "pens" not in r
    assert set(r["persona"]["k_curve"]) == {"1", "2"}  # persona-only: the k curve runs on persona
    assert (tmp_path / "out" / "persona" / "projector" / "config.json").is_file()


def test_bad_data_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        detect_parts(tmp_path / "missing")
    (tmp_path / "x.tsv").write_text("id\ttext\n")
    with pytest.raises(DataError, match="PENS"):
        detect_parts(tmp_path / "x.tsv")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("nothing")
    with pytest.raises(DataError, match="no PENS"):
        run_suite(tiny, FakeEncoder(), empty, tmp_path / "out", tiny_config(), progress=False)


def test_add_noise_relative_strength():
    t = torch.randn(5, 8)
    for level in (0.0, 0.25, 1.0):
        d = (add_noise(t, level, 0) - t).norm(dim=-1) / t.norm(dim=-1)
        assert torch.allclose(d, torch.full((5,), level), atol=1e-5)


def test_quick_preset_is_small():
    q, full = SuiteConfig.preset(quick=True), SuiteConfig.preset()
    assert q.quick and q.train_minutes is not None and q.prefix_lengths == [1, 2]
    assert full.prefix_lengths == [1, 2, 4, 8] and full.noise_levels == [0.0, 0.1, 0.25, 0.5, 1.0]
    assert q.e2p_steps < full.e2p_steps and q.gen_limit < full.gen_limit
    assert "under 10 min" in q.budget_text()


def test_cli_has_suite_flags():
    from e2p.cli import build_parser

    args = build_parser().parse_args(["eval", "--suite", "paper", "--data", "d", "--out", "o", "--quick"])
    assert args.suite == "paper" and args.quick and args.projector is None
    args = build_parser().parse_args(["eval", "--data", "d", "--out", "o", "--projector", "p"])
    assert args.suite == "persona" and not args.quick


def test_cli_paper_suite_wiring(tiny, tmp_path, monkeypatch, capsys):
    import e2p.cli as cli
    import e2p.suite as suite

    data = tmp_path / "data"
    data.mkdir()
    write_pens(data)
    monkeypatch.setattr(cli, "_load", lambda *a, **k: (tiny, FakeEncoder()))
    seen = {}
    real = tiny_config(lora_steps=0, prompt_tuning_steps=0, prefix_lengths=[1], noise_levels=[0.0])

    def preset(quick=False, **kw):
        seen["quick"] = quick
        return suite.SuiteConfig(**{**real.__dict__, "seed": kw.get("seed", 0)})

    monkeypatch.setattr(suite.SuiteConfig, "preset", staticmethod(preset))
    assert cli.main(["eval", "--suite", "paper", "--quick", "--data", str(data), "--out", str(tmp_path / "o")]) == 0
    assert seen["quick"] and "# E2P paper suite" in capsys.readouterr().out
    assert cli.main(["eval", "--data", str(data), "--out", str(tmp_path / "p")]) == 2  # persona suite needs --projector
