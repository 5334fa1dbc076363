"""One version of each command: persona files (--data) become the data contract before the command goes on, so
`e2p train`, `e2p eval` and `e2p demo` run one code path for them and for --users / --examples (tiny backbone,
a hashed bag-of-words encoder in place of MiniLM)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import make_backbone
from e2p.cli import main
from e2p.data.contract import Example
from test_studies import FakeEncoder, write_persona


@pytest.fixture(autouse=True)
def fake_encoder(monkeypatch):
    monkeypatch.setattr("e2p.data.encoders.TextEncoder", lambda *a, **k: FakeEncoder())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from e2p.data.persona_contract import write_persona_contract

    tmp = tmp_path_factory.mktemp("paths")
    bb = make_backbone()
    bb.model.save_pretrained(tmp / "bb")
    bb.tokenizer.save_pretrained(tmp / "bb")
    (tmp / "data").mkdir()
    write_persona(tmp / "data")
    write_persona_contract(tmp / "data", tmp / "contract", text_encoder=FakeEncoder())  # the same people, as files
    return tmp


def _common(tmp):
    return ["--backbone", str(tmp / "bb"), "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(files):
    """`e2p train` on persona files and on the same data as contract files, recording what the one path received."""
    import e2p.training.distributed
    import e2p.training.recipe

    calls, seen = [], []
    real_init, real_train = e2p.training.distributed.init_distributed, e2p.training.recipe.train_on_examples

    def init():
        calls.append("init")
        return real_init()

    def train(backbone, users, examples, *a, **k):
        seen.append((users, examples, k.get("encoder_name")))
        return real_train(backbone, users, examples, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr("e2p.data.encoders.TextEncoder", lambda *a, **k: FakeEncoder())
    mp.setattr(e2p.training.distributed, "init_distributed", init)
    mp.setattr(e2p.training.recipe, "train_on_examples", train)
    args = ["train", *_common(files), "--steps", "4", "--batch-size", "2", "--val-examples", "2", "--val-users", "4",
            "--hidden-dims", "16"]
    try:
        assert main(args + ["--data", str(files / "data"), "--out", str(files / "persona")]) == 0
        assert main(args + ["--users", str(files / "contract" / "users.npz"), "--examples",
                            str(files / "contract" / "examples.jsonl"), "--out", str(files / "files")]) == 0
    finally:
        mp.undo()
    return calls, seen


def test_train_runs_one_path_with_distributed_set_up_for_persona_and_contract_files(files, trained):
    calls, seen = trained
    assert calls == ["init", "init"]  # the process group is set up on every training path
    (users_p, examples_p, name_p), (users_f, examples_f, name_f) = seen
    assert all(isinstance(e, Example) for e in examples_p + examples_f)
    assert users_p.ids == users_f.ids and np.array_equal(users_p.vectors, users_f.vectors)
    fields = lambda exs: [(e.user, e.prompt, e.target, e.profile_text) for e in exs]
    assert fields(examples_p) == fields(examples_f)
    assert name_p == FakeEncoder.name and name_f == ""  # persona data says which encoder embedded it
    # the same data through the one path: the same projector
    for part in ("model.safetensors", "shared_prefix/model.safetensors"):
        a, b = load_file(str(files / "persona" / part)), load_file(str(files / "files" / part))
        assert set(a) == set(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), part
    reports = [json.loads((files / run / "training_report.json").read_text()) for run in ("persona", "files")]
    assert reports[0]["train_examples"] == reports[1]["train_examples"] > 0
    assert reports[0]["validation"] == reports[1]["validation"]


def test_eval_on_persona_files_equals_eval_on_the_same_contract_files(files, trained, capsys):
    out = {}
    for name, data in (("persona", ["--data", str(files / "data")]),
                       ("files", ["--users", str(files / "contract" / "test" / "users.npz"), "--examples",
                                  str(files / "contract" / "test" / "examples.jsonl")])):
        assert main(["eval", *_common(files), *data, "--projector", str(files / "persona"), "--out",
                     str(files / f"eval-{name}"), "--limit", "6", "--generate", "0"]) == 0
        out[name] = json.loads((files / f"eval-{name}" / "results.json").read_text())
    assert out["persona"]["examples"] == out["files"]["examples"] == 6
    assert {"text", "shuffled", "e2p"} <= set(out["persona"]["conditions"])
    for cond, c in out["persona"]["conditions"].items():
        assert c["perplexity"] == pytest.approx(out["files"]["conditions"][cond]["perplexity"], rel=1e-6), cond
    assert out["persona"]["comparisons"] == out["files"]["comparisons"]


def test_people_half_belongs_to_persona_files(files, trained, capsys):
    code = main(["eval", *_common(files), "--users", str(files / "contract" / "test" / "users.npz"), "--examples",
                 str(files / "contract" / "test" / "examples.jsonl"), "--projector", str(files / "persona"),
                 "--out", str(files / "half"), "--people-half", "0"])
    assert code == 2 and "--people-half" in capsys.readouterr().err
    assert main(["eval", *_common(files), "--data", str(files / "data"), "--projector", str(files / "persona"),
                 "--out", str(files / "half"), "--people-half", "0", "--generate", "0"]) == 0
    assert "people half 0" in capsys.readouterr().out


def test_demo_runs_one_path_on_the_shipped_sample_and_on_a_data_folder(files, trained, capsys):
    from e2p.backbone import load_backbone
    from e2p.model import new_config
    from e2p.projector import Projector

    # the shipped sample's users are 384-dim MiniLM vectors: a projector of that size on the tiny backbone
    bb = load_backbone(str(files / "bb"), device="cpu", dtype="float32")
    Projector(new_config(bb, embedding_dim=384, hidden_dims=[8])).save_pretrained(files / "p384")
    for args, source in ((["--projector", str(files / "p384"), "--limit", "10"], "people it never saw"),
                         (["--projector", str(files / "persona"), "--data", str(files / "data"), "--limit", "8"],
                          "people never seen in training")):
        assert main(["demo", *_common(files), *args]) == 0
        text = capsys.readouterr().out
        assert source in text and text.count("unseen person:") == 3 and "without E2P:" in text
        assert "| e2p |" in text and "| shuffled |" in text and "What it means:" in text
        assert f"scoring {args[args.index('--limit') + 1]} replies" in text
