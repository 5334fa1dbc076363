"""Your embeddings, your data: the data contract, `train_on_examples` and the evaluation loop, on a tiny backbone
whose users' embeddings really decide their targets (so a working recipe must say "yes"), and their CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_backbone
from e2p.data.contract import Example, load_examples, load_users, write_examples, write_users
from e2p.errors import DataError
from e2p.evaluate import evaluate_examples
from e2p.training.recipe_config import RecipeConfig
from e2p.training.recipe import train_on_examples

LIKES = ["dogs", "cats", "music", "guitar"]


def synthetic(tmp_path, n_users: int = 40, per_user: int = 6, dim: int = 12, seed: int = 0):
    """Each user likes one thing; their embedding says which (a one-hot block plus noise); every target is
    "i love to play <thing>" in one of two phrasings, so the style is shared and the thing is the person's."""
    rng = np.random.default_rng(seed)
    ids = [f"user-{i:03d}" for i in range(n_users)]
    likes = rng.integers(0, len(LIKES), n_users)
    vectors = rng.normal(0, 0.3, (n_users, dim)).astype(np.float32)
    vectors[np.arange(n_users), likes] += 3.0
    examples = []
    for i, u in enumerate(ids):
        for j in range(per_user):
            if j % 2:
                examples.append(Example(u, [{"role": "user", "content": "what do you like ?"}], f"i like {LIKES[likes[i]]} ."))
            else:
                examples.append(Example(u, "tell me about yourself", f"i love to play {LIKES[likes[i]]} !"))
    return write_users(tmp_path / "users.npz", ids, vectors), write_examples(tmp_path / "examples.jsonl", examples)


FAST = dict(injection="input", num_prefix_tokens=1, hidden_dims=[64], shared_steps=15, e2p_steps=60, batch_size=8,
            val_examples=16, eval_every=20, e2p_lr=5e-3, max_target_tokens=16)


# --- the contract --------------------------------------------------------------------------------------------
def test_contract_reads_both_example_shapes_and_any_user_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    users_path, examples_path = synthetic(tmp_path, n_users=4, per_user=2)
    users = load_users(users_path)
    assert len(users) == 4 and users.dim == 12
    examples = load_examples(examples_path, users)
    assert len(examples) == 8 and isinstance(examples[0].prompt, str) and examples[1].prompt[-1]["role"] == "user"
    # the same users as Parquet (the store's reader) and the examples as Parquet with a profile
    pq.write_table(pa.table({"user": users.ids, "embedding": users.vectors.tolist()}), tmp_path / "u.parquet")
    assert load_users(tmp_path / "u.parquet").ids == users.ids
    pq.write_table(pa.table({"user": ["user-000"], "prompt": ["hi"], "completion": ["i like cats ."],
                             "profile_text": ["likes cats"]}), tmp_path / "e.parquet")
    assert load_examples(tmp_path / "e.parquet", users)[0].profile_text == "likes cats"


@pytest.mark.parametrize("line, message", [
    ('{"user": "ghost", "prompt": "hi", "completion": "yo"}', "user 'ghost' has no embedding"),
    ('{"prompt": "hi", "completion": "yo"}', "missing `user`"),
    ('{"user": "a", "prompt": "hi", "completion": "  "}', "target is empty"),
    ('{"user": "a", "prompt": "hi"}', "`completion` must be text"),
    ('{"user": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}', "role `assistant`"),
    ('{"user": "a", "prompt": "hi", "completion": "yo", "messages": []}', "not both"),
    ('{"user": "a", "messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "message 0"),
    ('not json', "is not JSON"),
])
def test_every_bad_example_names_file_row_and_fix(tmp_path, line, message):
    users = load_users(write_users(tmp_path / "u.npz", ["a", "b"], np.ones((2, 3))))
    path = tmp_path / "e.jsonl"
    path.write_text('{"user": "a", "prompt": "hi", "completion": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as exc:
        load_examples(path, users)
    assert f"{path}:2" in str(exc.value)


def test_bad_user_tables_are_refused_with_the_row(tmp_path):
    path = tmp_path / "u.jsonl"
    for rows, message in [
        (['{"user": "a", "embedding": [1, 2]}', '{"user": "b", "embedding": [1, 2, 3]}'], "row 1.*expects 2"),
        (['{"user": "a", "embedding": [1, 2]}', '{"user": "b", "embedding": [NaN, 2]}'], "row 1.*NaN"),
        (['{"user": "a", "embedding": [1, 2]}', '{"user": "a", "embedding": [3, 4]}'], "row 1.*more than once"),
        (['{"user": "a", "embedding": ["1", 2]}'], "not a number"),
    ]:
        path.write_text("\n".join(rows) + "\n")
        with pytest.raises(DataError, match=message):
            load_users(path)


# --- train and evaluate ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("yourdata")
    users_path, examples_path = synthetic(tmp)
    users = load_users(users_path)
    examples = load_examples(examples_path, users)
    backbone = make_backbone()
    report = train_on_examples(backbone, users, examples, tmp / "run", RecipeConfig(**FAST), val_users=16, progress=False)
    return tmp, backbone, users, examples, report


def test_training_on_a_table_says_whether_the_embedding_carries_the_person(trained):
    tmp, backbone, users, examples, report = trained
    saved = json.loads((tmp / "run" / "training_report.json").read_text())
    assert saved["verdict"] == report["verdict"]
    assert report["train_users"] == 24 and report["validation_users"] == 16 and report["embedding_dim"] == 12
    assert (tmp / "run" / "config.json").is_file() and (tmp / "run" / "shared_prefix" / "config.json").is_file()
    comps = report["validation"]["comparisons"]
    # here the embedding decides the target, so the recipe must find it, on users it never trained on
    assert report["verdict"]["carries_person"] is True, report["verdict"]["text"]
    assert comps["e2p_vs_shared_prefix"]["ci95"][1] < 0 and comps["e2p_vs_shuffled"]["ci95"][1] < 0
    assert report["verdict"]["text"].startswith("YES")


def test_a_reused_shared_prefix_lands_in_the_run_and_the_verdict_is_measured(trained, tmp_path):
    """--shared-from: the shared prefix is not trained again, the new run folder still holds its own control."""
    tmp, backbone, users, examples, report = trained
    cfg = RecipeConfig(**{**FAST, "e2p_steps": 4, "eval_every": 2})
    again = train_on_examples(backbone, users, examples, tmp_path / "again", cfg, val_users=16, progress=False,
                              shared_dir=tmp / "run" / "shared_prefix")
    assert "shared_prefix" not in again["stages"] and (tmp_path / "again" / "shared_prefix" / "config.json").is_file()
    assert again["verdict"]["carries_person"] is not None, again["verdict"]["text"]


def test_the_evaluation_loop_scores_conditions_generations_and_identification(trained):
    from e2p.data.contract import split_validation_users

    tmp, backbone, users, examples, report = trained
    _, val = split_validation_users(sorted({e.user for e in examples}), 16, 0)
    held_out = [e for e in examples if e.user in set(val)]

    results = evaluate_examples(backbone, users, held_out, tmp / "run", tmp / "eval", generate=16, encoder=WordEncoder(),
                                progress=False)
    assert set(results["conditions"]) == {"none", "shared_prefix", "shuffled", "e2p"}
    e2p, shuffled = results["conditions"]["e2p"], results["conditions"]["shuffled"]
    assert e2p["perplexity"] < shuffled["perplexity"]  # the same users and targets as the training verdict
    assert all(0 <= c["identification"] <= 1 and 0 <= c["rougeL"] <= 1 for c in results["conditions"].values())
    assert results["identification"]["users"] == 16 and len(results["samples"]) == 6
    for name in ("results.json", "REPORT.md", "evaluation.png"):
        assert (tmp / "eval" / name).is_file()
    assert "Verdict" in (tmp / "eval" / "REPORT.md").read_text()


def test_hybrid_lora_other_tables_and_fixed_baselines_run_through_the_one_loop(tmp_path):
    """The study conditions: the text stages trained alike (shared_prefix_text, the e2p_text hybrid), a LoRA
    adapter on the backbone (removed again after), a second embedding table, and a fixed-text baseline."""
    import dataclasses

    import torch

    from e2p.data.contract import split_validation_users
    from e2p.evaluate import Condition
    from research.pens.train_lora import train_lora
    from e2p.model import E2PModel

    users_path, examples_path = synthetic(tmp_path, n_users=16, per_user=4)
    users = load_users(users_path)
    examples = [dataclasses.replace(e, profile_text=f"i like {e.target.split()[-2]}")
                for e in load_examples(examples_path, users)]
    backbone = make_backbone()
    cfg = RecipeConfig(**{**FAST, "e2p_steps": 10, "shared_steps": 5, "text_steps": 6, "eval_every": 5})
    report = train_on_examples(backbone, users, examples, tmp_path / "run", cfg, val_users=6, progress=False)
    assert {"shared_prefix_text", "e2p_text"} <= set(report["stages"])
    run = tmp_path / "run"
    assert (run / "shared_prefix_text" / "config.json").is_file() and (run / "e2p_text" / "config.json").is_file()
    with pytest.raises(DataError, match="profile_text"):
        train_on_examples(backbone, users, load_examples(examples_path, users), tmp_path / "r2", cfg, val_users=6,
                          progress=False)

    rows = [E2PModel(backbone, None).format(e.prompt, reply=e.target, persona_text=e.profile_text) for e in examples]
    before = [p.detach().clone() for p in backbone.model.parameters()]
    peft_model, info = train_lora(backbone, rows, steps=3, lr=1e-2, rank=2, batch_size=4, out_dir=tmp_path / "lora")
    peft_model.unload()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file() and info["parameters"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.model.parameters()))

    _, val = split_validation_users(sorted(users.ids), 6, 0)
    held = [e for e in examples if e.user in set(val)]
    other = write_users(tmp_path / "other.npz", users.ids, -users.vectors)
    conds = [Condition("none", None), Condition("lora_text", None, with_text=True, adapter=tmp_path / "lora"),
             Condition("none_again", None), Condition("e2p", run, embeddings="own"),
             Condition("e2p_negated", run, embeddings="own", users=load_users(other)),
             Condition("e2p_text", run / "e2p_text", with_text=True, embeddings="own")]
    results = evaluate_examples(backbone, users, held, run, tmp_path / "eval", conditions=conds, generate=8,
                                encoder=WordEncoder(), progress=False, baselines={"copy": lambda e: e.target},
                                pairs=[("lora_text", "none"), ("e2p", "e2p_negated")])
    c = results["conditions"]
    assert c["none"]["perplexity"] == pytest.approx(c["none_again"]["perplexity"])  # the adapter is gone again
    assert c["lora_text"]["perplexity"] != pytest.approx(c["none"]["perplexity"])
    assert c["e2p"]["perplexity"] != pytest.approx(c["e2p_negated"]["perplexity"])  # the other table was used
    assert c["copy"]["perplexity"] is None and c["copy"]["rouge1"] == pytest.approx(1.0)  # copying the target
    assert {"rouge1", "rouge2", "rougeL", "identification"} <= set(c["e2p_text"])
    assert set(results["comparisons"]) == {"lora_text_vs_none", "e2p_vs_e2p_negated"}
    assert "| copy | - |" in (tmp_path / "eval" / "REPORT.md").read_text()


class WordEncoder:
    """Embeds a text by which liked thing it names: identification is then exact (MiniLM is the default)."""

    def encode(self, texts):
        return np.array([[float(w in t.split()) for w in LIKES] + [1e-3] for t in texts])


def test_identification_uses_other_targets_or_profiles():
    from e2p.evaluate.loop import generation_metrics

    examples = [Example(u, "hi", f"i like {w} .") for u, w in [("a", "dogs"), ("a", "dogs"), ("b", "cats"), ("b", "cats"),
                                                               ("c", "music"), ("c", "music"), ("d", "guitar")]]
    gens = {"right": ["dogs", "dogs", "cats", "music", "music", "cats", "guitar"],  # 2 and 5 of 6 wrong
            "wrong": ["cats", "music", "dogs", "dogs", "cats", "cats", "dogs"]}
    m = generation_metrics(gens, examples, WordEncoder())
    # d has one example: nothing else of d's to compare with, so its generation is left out (6 of 7 scored)
    info = {k: m["_identification"][k] for k in ("users", "chance", "generations", "reference")}
    assert info == {"users": 4, "chance": 0.25, "generations": 6, "reference": "the user's other targets"}
    assert m["right"]["identification"] == pytest.approx(4 / 6) and m["wrong"]["identification"] == 0
    with_profiles = [Example(e.user, e.prompt, e.target, profile_text=f"likes {e.target.split()[2]}") for e in examples]
    m = generation_metrics(gens, with_profiles, WordEncoder())
    assert m["_identification"]["generations"] == 7 and m["right"]["identification"] == pytest.approx(5 / 7)


def test_cli_train_and_eval_on_files(tmp_path):
    from e2p.cli import main

    backbone_dir = tmp_path / "backbone"
    b = make_backbone()
    b.model.save_pretrained(backbone_dir)
    b.tokenizer.save_pretrained(backbone_dir)
    users_path, examples_path = synthetic(tmp_path, n_users=12, per_user=3)
    assert main(["train", "--users", str(users_path), "--examples", str(examples_path), "--out", str(tmp_path / "run"),
                 "--backbone", str(backbone_dir), "--steps", "8", "--val-users", "4", "--injection", "input"]) == 0
    report = json.loads((tmp_path / "run" / "training_report.json").read_text())
    assert report["verdict"]["text"] and report["embedding_dim"] == 12
    assert main(["eval", "--users", str(users_path), "--examples", str(examples_path), "--projector", str(tmp_path / "run"),
                 "--out", str(tmp_path / "eval"), "--backbone", str(backbone_dir), "--generate", "0"]) == 0
    assert "e2p" in json.loads((tmp_path / "eval" / "results.json").read_text())["conditions"]
    # a bad file is one clear line, exit code 2
    (tmp_path / "bad.jsonl").write_text('{"user": "nobody", "prompt": "hi", "completion": "x"}\n')
    assert main(["train", "--users", str(users_path), "--examples", str(tmp_path / "bad.jsonl"), "--out",
                 str(tmp_path / "run2"), "--backbone", str(backbone_dir)]) == 2


# --- the shipped studies as data adapters ----------------------------------------------------------------------
def write_pens(path, users: dict[str, list[tuple[str, str]]], clicks: dict[str, list[str]]):
    lines = ["userid\tclicknewsID\tposnewID\trewrite_titles"]
    for u, pairs in users.items():
        lines.append(f"{u}\t{','.join(clicks[u])}\t{','.join(n for n, _ in pairs)}\t{';;'.join(h for _, h in pairs)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pens_adapter_writes_the_headline_task_without_leaks(tmp_path):
    from e2p.data.pens_contract import write_pens_contract

    news = [f"N{i}" for i in range(12)]
    pool = {f"U{u}": [(n, f"u{u} take on {n} number {k}") for k, n in enumerate(news) if (k + u) % 3] for u in range(6)}
    pool["U6"] = [(f"X{k}", f"only mine {k}") for k in range(6)]  # nobody else rewrote these: no examples
    clicks = {u: [f"C{(i * 7 + j) % 20}" for j in range(8)] for i, u in enumerate(list(pool) + ["T0", "T1"])}
    test = {f"T{t}": [(n, f"t{t} view of {n}") for n in news[:8]] for t in range(2)}
    card = write_pens_contract(write_pens(tmp_path / "pool.tsv", pool, clicks), tmp_path / "out",
                               test_users=write_pens(tmp_path / "test.tsv", test, clicks), behaviour_dim=4,
                               text_encoder=WordEncoder())
    users = load_users(tmp_path / "out" / "users.npz")
    train = load_examples(tmp_path / "out" / "examples.jsonl", users)
    assert users.dim == 4 and "U6" not in {e.user for e in train}
    for ex in train:
        prompt = ex.prompt[-1]["content"]
        assert ex.target not in prompt and not prompt.split(": ", 1)[1].startswith(ex.user.lower())  # never their own
        assert " view of " not in prompt  # test users' headlines never reach the training pool
        assert ex.profile_text.startswith("Headlines I wrote before:") and ex.target not in ex.profile_text
    test_users = load_users(tmp_path / "out" / "test" / "users.npz")
    test_ex = load_examples(tmp_path / "out" / "test" / "examples.jsonl", test_users)
    assert {e.user for e in test_ex} == {"T0", "T1"} and card["parts"]["test"]["users"] == 2
    assert load_users(tmp_path / "out" / "test" / "users_text.npz").dim == 5
    from e2p.data.headline_style import STYLE_FEATURES

    styled = load_users(tmp_path / "out" / "test" / "users_text_style.npz")  # the text profile + headline style
    assert styled.dim == 5 + len(STYLE_FEATURES)
    assert np.allclose(styled.vectors[:, :5], load_users(tmp_path / "out" / "test" / "users_text.npz").vectors)
    assert card["text_profile_style"]["features"] == list(STYLE_FEATURES)
    from e2p.data.pens_contract import quoted_headline

    quoted = quoted_headline(train[0])  # the copy baseline's answer: another reader's rewrite of the same news
    assert quoted != train[0].target and any(quoted == h for pairs in pool.values() for _, h in pairs)


def test_persona_adapter_and_a_refused_overlap(tmp_path):
    from e2p.data.persona_contract import write_persona_contract
    from e2p.data.pens_contract import write_pens_contract

    convai = tmp_path / "valid_self_original_no_cands.txt"
    convai.write_text("1 your persona: i love dogs.\n2 your persona: i play guitar.\n3 hi how are you ?\ti am fine .\n"
                      "4 what do you like ?\ti like dogs .\n1 your persona: i am a nurse.\n2 hello !\thi , i work as a nurse .\n")
    card = write_persona_contract(convai, tmp_path / "persona", text_encoder=WordEncoder())
    users = load_users(tmp_path / "persona" / "users.npz")
    examples = load_examples(tmp_path / "persona" / "examples.jsonl", users)
    assert card["parts"]["train"]["users"] == 2 and len(examples) == 3
    assert examples[1].prompt[-1] == {"role": "user", "content": "what do you like ?"} and examples[1].target == "i like dogs ."
    assert examples[1].profile_text == "i love dogs. i play guitar."
    same = write_pens(tmp_path / "p.tsv", {"U0": [("N0", "a"), ("N1", "b")]}, {"U0": ["C0"]})
    with pytest.raises(DataError, match="test users are also in"):
        write_pens_contract(same, tmp_path / "x", test_users=same, text_encoder=WordEncoder())


def test_generate_refuses_unreadable_embedding_files_in_one_line(tmp_path, capsys):
    from e2p.cli import main

    (tmp_path / "text.csv").write_text("a,b,c\n")
    (tmp_path / "short.json").write_text("[1, 2, 3]")
    for path, message in [(tmp_path / "missing.npy", "does not exist"), (tmp_path / "text.csv", "cannot read"),
                          (tmp_path / "short.json", "expects 384")]:
        assert main(["generate", "--projector", "persona-deep-k1", "--embedding", str(path), "--message", "hi"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
