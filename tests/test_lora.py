"""E2P with a shared LoRA adapter (`e2p train --lora-rank`, issue 30 candidate b): the adapter is the projector's, made
active by E2PModel around every backbone call; its controls are trained alike; engines that cannot apply it refuse."""
import json

import pytest
import torch

from conftest import make_backbone
from e2p import Projector
from e2p.errors import BackboneMismatchError, ConfigError
from e2p.lora import find_targets
from e2p.model import E2PModel, new_config
from test_model import CONVS
from test_recipe import _contract


def _projector(tiny, rank=2, injection="input", position="start", dim=8, seed=0, targets=("q_proj", "v_proj"), grow=True):
    torch.manual_seed(seed)
    extra = {} if not rank else dict(lora_rank=rank, lora_alpha=2.0 * rank, lora_targets=list(targets),
                                     lora_modules=find_targets(tiny.model, targets))
    p = Projector(new_config(tiny, embedding_dim=dim, num_prefix_tokens=2, injection=injection, prefix_position=position,
                             dropout=0.0, **extra))
    if grow:  # a trained-looking projector: a person part and (with rank) an adapter that changes something
        with torch.no_grad():
            if p.mlp is not None:
                p.mlp[-1].weight.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
            for _, _, B in (p.lora.pairs() if p.lora is not None else []):
                B.normal_(std=0.5, generator=torch.Generator().manual_seed(seed + 1))
    return p.eval()


def _rows(m, replies=True):
    return [m.format(msgs, reply=r if replies else None) for msgs, r in CONVS]


def test_a_new_adapter_changes_nothing_and_leaves_other_weights_as_without_one(tiny):
    for injection in ("input", "deep"):
        plain, adapted = _projector(tiny, 0, injection, grow=False), _projector(tiny, 2, injection, grow=False)
        assert all(torch.equal(v, adapted.state_dict()[k]) for k, v in plain.state_dict().items())  # same seed, same init
        assert adapted.lora.num_parameters() == sum(r * (o + i) for o, i in adapted.config.lora_modules.values() for r in [2])
        emb = torch.randn(3, 8)
        a, b = E2PModel(tiny, plain, autocast=False), E2PModel(tiny, adapted, autocast=False)
        assert torch.equal(a.loss(_rows(a), emb, reduction="none")[0], b.loss(_rows(b), emb, reduction="none")[0])


def test_the_adapter_applies_only_inside_its_models_calls_and_only_to_rows_with_a_user(tiny):
    m = E2PModel(tiny, _projector(tiny), autocast=False)
    plain = E2PModel(tiny, None, autocast=False)
    rows = _rows(m)
    emb = torch.randn(3, 8)
    with_user = m.loss(rows, emb, reduction="none")[0]
    prefix_only = E2PModel(tiny, _projector(tiny), autocast=False)
    prefix_only.projector.lora = None  # the same prefix without the adapter
    assert not torch.allclose(with_user, prefix_only.loss(rows, emb, reduction="none")[0])  # the adapter counts
    none_row = m.loss(rows[1:2], [None], reduction="none")[0]
    assert torch.equal(none_row, plain.loss([plain.format(CONVS[1][0], reply=CONVS[1][1])], reduction="none")[0])
    mixed = m.loss(rows, [emb[0], None, emb[2]], reduction="none")[0]
    assert torch.allclose(mixed[1], none_row, atol=1e-5) and torch.allclose(mixed[0], with_user[0], atol=1e-5)
    assert torch.equal(plain.loss(rows[1:2], reduction="none")[0], plain.loss(rows[1:2], reduction="none")[0])


@pytest.mark.parametrize("injection,position", [("input", "start"), ("deep", "start"), ("deep", "after_sink")])
def test_greedy_generation_with_the_adapter_is_the_loss_paths_argmax_alone_or_in_any_batch(tiny, injection, position):
    m = E2PModel(tiny, _projector(tiny, injection=injection, position=position), autocast=False)
    prompts = _rows(m, replies=False)
    emb = torch.randn(3, 8)
    users = [emb[0], None, emb[2]]
    together = m.generate_tokens(prompts, users, max_new_tokens=6)
    joined = m.generate_tokens(prompts, users, max_new_tokens=6, batch_size=2)  # rows join and leave a running batch
    for i in range(3):
        alone = m.generate_tokens(prompts[i:i + 1], [users[i]], max_new_tokens=6)[0]
        assert together[i] == alone == joined[i], i
        if not alone:
            continue
        row = prompts[i]
        row.target = alone  # the loss path's logits at each generated position pick the same token
        logits, labels, _ = m.target_logits([row], None if users[i] is None else users[i].unsqueeze(0))
        assert logits.argmax(-1).tolist() == alone[:len(labels)]
    assert together[1] == E2PModel(tiny, None, autocast=False).generate_tokens(prompts[1:2], max_new_tokens=6)[0]


def test_training_moves_only_the_projector_and_its_adapter(tiny, tmp_path):
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.stage_runner import example_items
    from e2p.training.loop import TrainConfig, train_projector

    users, examples = _contract()
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    p = _projector(tiny, grow=False).train()
    start = {k: v.clone() for k, v in p.state_dict().items()}
    items = example_items(tiny, p, examples, users.index, RecipeConfig())
    train_projector(E2PModel(tiny, p, training=True), items, users.tensor(), tmp_path,
                    TrainConfig(steps=3, batch_size=4, eval_every=3, warmup_steps=1, lora_lr=1e-2), progress=False)
    after = tiny.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)  # the backbone: bit-identical
    moved = {k for k, v in p.state_dict().items() if not torch.equal(v, start[k])}
    assert any(k.startswith("lora.B.") for k in moved) and any(k.startswith("mlp.") for k in moved)
    back = Projector.from_pretrained(tmp_path / "checkpoint", tiny)  # the adapter is in the checkpoint
    assert all(torch.equal(v, p.state_dict()[k]) for k, v in back.state_dict().items())
    groups = json.loads((tmp_path / "checkpoint" / "optimizer.json").read_text())
    assert sorted(g["base_lr"] for g in groups) == [1e-3, 1e-2]  # the adapter has its own learning rate


def test_gradient_checkpointing_recomputes_layers_with_the_adapter(tiny):
    from e2p.backbone import enable_gradient_checkpointing

    def grads(backbone):
        p = _projector(backbone)
        m = E2PModel(backbone, p, training=True, autocast=False)
        loss = m.loss(_rows(m), torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
        with m.adapter():  # as the training step does
            loss.backward()
        return {k: v.grad.clone() for k, v in p.named_parameters() if v.grad is not None}

    plain = grads(tiny)
    checkpointed = make_backbone()
    enable_gradient_checkpointing(checkpointed)
    again = grads(checkpointed)
    assert set(plain) == set(again) and any(k.startswith("lora.A.") for k in plain)
    assert all(torch.allclose(plain[k], again[k], atol=1e-5) for k in plain)


def test_save_and_load_give_identical_logits_and_refuse_another_backbone(tiny, tmp_path):
    p = _projector(tiny, injection="deep")
    p.save_pretrained(tmp_path / "p")
    back = Projector.from_pretrained(tmp_path / "p", tiny).eval()
    assert back.config.lora_rank == 2 and back.config.lora_targets == ["q_proj", "v_proj"]
    emb = torch.randn(3, 8)
    a, b = E2PModel(tiny, p, autocast=False), E2PModel(tiny, back, autocast=False)
    assert torch.equal(a.loss(_rows(a), emb, reduction="none")[0], b.loss(_rows(b), emb, reduction="none")[0])
    # the adapter is a PEFT folder beside the projector's own weights, which hold none of it
    from safetensors.torch import load_file, save_file

    from e2p import lora

    assert lora.load_peft(tmp_path / "p" / "adapter", tiny.model).rank == 2
    own = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert not any(k.startswith("lora.") for k in own)
    # a projector saved before (the adapter inside model.safetensors) loads the same
    import shutil

    shutil.rmtree(tmp_path / "p" / "adapter")
    save_file({**own, **{f"lora.{k}": v for k, v in p.lora.state_dict().items()}}, str(tmp_path / "p" / "model.safetensors"))
    old = Projector.from_pretrained(tmp_path / "p", tiny).eval()
    assert torch.equal(E2PModel(tiny, old, autocast=False).loss(_rows(a), emb, reduction="none")[0],
                       a.loss(_rows(a), emb, reduction="none")[0])
    plain = _projector(tiny, 0)
    plain.save_pretrained(tmp_path / "plain")
    lora.save_peft(p.lora, tmp_path / "plain" / "adapter")
    with pytest.raises(ConfigError, match="has none"):  # a stray adapter is not silently ignored
        Projector.from_pretrained(tmp_path / "plain")
    p.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "adapter" / "adapter_model.safetensors").write_bytes(b"half a file")
    with pytest.raises(ConfigError, match="corrupt"):  # a damaged adapter: one clear line
        Projector.from_pretrained(tmp_path / "p")
    other = make_backbone(layers=1)  # same hidden size, fewer layers: the adapter's layer 1 is missing
    with pytest.raises(BackboneMismatchError, match="LoRA layer model.layers.1"):
        Projector.from_pretrained(tmp_path / "p", other)
    with pytest.raises(ConfigError, match="no linear layer named k_projj"):
        find_targets(tiny.model, ["q_proj", "k_projj"])
    with pytest.raises(ConfigError, match="lora_modules"):
        new_config(tiny, embedding_dim=8, lora_rank=2, lora_alpha=4.0)


def test_engines_that_cannot_apply_the_adapter_refuse_it_by_name(tiny, tmp_path):
    from e2p.engines.numpy_projector import NumpyProjector
    from e2p.engines import check_engine
    from e2p.engines.llamacpp import LlamaCppModel

    p = _projector(tiny)
    with pytest.raises(ConfigError, match="llama-cpp engine cannot run this projector.*LoRA.*--engine torch"):
        check_engine("llama-cpp", p.config)
    with pytest.raises(ConfigError, match="llama-cpp engine cannot run"):  # before any GGUF or llama.cpp is loaded
        LlamaCppModel(tiny, p, backend=object())
    check_engine("torch", p.config)
    check_engine("llama-cpp", _projector(tiny, 0).config)
    p.save_pretrained(tmp_path / "p")
    with pytest.raises(ConfigError, match="LoRA"):
        NumpyProjector.from_pretrained(tmp_path / "p")
    with pytest.raises(ConfigError, match="vllm engine cannot run this projector.*LoRA.*--engine torch"):
        check_engine("vllm", p.config)
    from e2p.cli import main

    assert main(["generate", "--engine", "llama-cpp", "--projector", str(tmp_path / "p"), "--message", "hi",
                 "--persona", "x"]) == 2  # refused before the backbone loads


def test_the_peft_format_round_trips_through_peft_itself(tiny, tmp_path):
    from e2p import lora

    adapter = _projector(tiny).lora
    lora.save_peft(adapter, tmp_path / "a", base_model=tiny.name)
    back = lora.load_peft(tmp_path / "a", tiny.model)
    assert all(torch.equal(x, y) for x, y in zip(adapter.parameters(), back.parameters()))
    m = E2PModel(tiny, None, autocast=False)
    rows = _rows(m)
    with lora.active(tiny.model, back):
        ours = m.loss(rows, reduction="none")[0]
    peft = pytest.importorskip("peft")
    wrapped = peft.PeftModel.from_pretrained(make_backbone().model, str(tmp_path / "a")).eval()
    other = make_backbone()
    other.model = wrapped.base_model.model
    theirs = E2PModel(other, None, autocast=False).loss(rows, reduction="none")[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def _lora_recipe(**kw):
    from e2p.training.recipe_config import RecipeConfig

    return RecipeConfig(**{**dict(injection="deep", hidden_dims=[8], shared_steps=2, e2p_steps=3, batch_size=2,
                                  val_examples=2, eval_every=2, person_scales=[0.5, 1.0], lora_rank=2, lora_lr=1e-2), **kw})


def test_the_recipe_trains_the_adapter_and_its_controls_alike(tiny, tmp_path):
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10)
    report = train_on_examples(tiny, users, examples, tmp_path, _lora_recipe(text_steps=1), val_users=4, progress=False)
    stages = report["stages"]
    assert list(stages) == ["shared_prefix", "e2p", "shared_prefix_continued", "shuffled_trained", "shared_prefix_text",
                            "e2p_text"]  # the text stages start from the adapted controls and keep training the adapter
    assert Projector.from_pretrained(tmp_path / "e2p_text", tiny).lora is not None
    assert stages["e2p"]["steps"] == stages["shared_prefix_continued"]["steps"] == stages["shuffled_trained"]["steps"] == 3
    for folder in ("", "shared_prefix", "shared_prefix/start", "shuffled_trained"):
        p = Projector.from_pretrained(tmp_path / folder, tiny)
        assert p.lora is not None and p.config.lora_rank == 2, folder
    e2p, shuffled = Projector.from_pretrained(tmp_path), Projector.from_pretrained(tmp_path / "shuffled_trained")
    start, shared = Projector.from_pretrained(tmp_path / "shared_prefix" / "start"), Projector.from_pretrained(tmp_path / "shared_prefix")
    assert not torch.equal(start.lora.B[next(iter(start.lora.B))], torch.zeros(1))  # stage 1 trained the adapter
    assert any(not torch.equal(a, b) for a, b in zip(start.lora.parameters(), shared.lora.parameters()))  # continued
    assert torch.equal(e2p.shared, start.shared) and torch.equal(shuffled.shared, start.shared)  # frozen, from stage 1
    assert any(not torch.equal(a, b) for a, b in zip(e2p.parameters(), shuffled.parameters()))  # other embeddings
    a = report["adapter"]
    assert a["parameters"] == e2p.lora.num_parameters() and a["bytes_float32"] == 4 * a["parameters"]
    assert a["controls"]["shared_prefix"]["adapter_updates"] == a["e2p_adapter_updates"] == 2 + 3
    assert "person_scale" in a["controls"]["shuffled_trained"]
    assert "32 bytes" in a["per_user_storage"]  # one 8-float embedding per user, as without the adapter
    assert "e2p_vs_shuffled_trained" in report["validation"]["comparisons"]
    assert "e2p_vs_shuffled" not in report["validation"]["comparisons"] and "shuffled_trained" in report["verdict"]["text"]
    md = (tmp_path / "validation" / "REPORT.md").read_text()
    assert "Shared LoRA adapter in shared_prefix, shuffled_trained, e2p" in md and "one embedding" in md
    results = json.loads((tmp_path / "validation" / "results.json").read_text())
    assert results["conditions"]["e2p"]["adapter_parameters"] == a["parameters"]
    assert results["conditions"]["e2p"]["bytes_per_user"] == 32


def test_shared_from_reuses_only_a_shared_prefix_with_the_same_adapter(tiny, tmp_path):
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10)
    cfg = _lora_recipe(e2p_steps=1, person_scales=[1.0])
    train_on_examples(tiny, users, examples, tmp_path / "a", cfg, val_users=4, progress=False)
    report = train_on_examples(tiny, users, examples, tmp_path / "b", cfg, val_users=4, progress=False,
                               shared_dir=tmp_path / "a" / "shared_prefix")
    assert "shared_prefix" not in report["stages"] and report["adapter"]["e2p_adapter_updates"] is None
    same = lambda x, y: all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))
    assert same(Projector.from_pretrained(tmp_path / "a" / "shared_prefix" / "start"),
                Projector.from_pretrained(tmp_path / "b" / "shared_prefix" / "start"))
    with pytest.raises(ConfigError, match="rank-2 LoRA adapter.*rank-4"):
        train_on_examples(tiny, users, examples, tmp_path / "c", _lora_recipe(lora_rank=4), val_users=4,
                          progress=False, shared_dir=tmp_path / "a" / "shared_prefix")
    plain = RecipeConfig(injection="deep", hidden_dims=[8], shared_steps=1, e2p_steps=1, batch_size=2, val_examples=2)
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        train_on_examples(tiny, users, examples, tmp_path / "d", plain, val_users=4, progress=False,
                          shared_dir=tmp_path / "a" / "shared_prefix")


def test_the_adapter_is_refused_with_dp(tiny, tmp_path):
    from e2p.training.privacy import PrivacyError
    from e2p.training.recipe import train_on_examples

    users, examples = _contract(n_users=10)
    with pytest.raises(PrivacyError, match="--lora-rank"):
        train_on_examples(tiny, users, examples, tmp_path / "dp", _lora_recipe(dp_epsilon=4.0), val_users=4, progress=False)


def test_the_cli_maps_lora_flags_and_counts_the_controls_in_steps():
    from e2p.cli import build_parser
    from e2p.training.recipe_config import recipe_from_args

    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--lora-rank", "8", "--lora-targets",
                                      "q_proj,k_proj", "--steps", "38"])
    cfg = recipe_from_args(args)
    assert (cfg.lora_rank, cfg.lora_targets, cfg.lora_lr) == (8, ["q_proj", "k_proj"], 3e-4)
    assert cfg.shared_steps + 3 * cfg.e2p_steps == 38  # e2p and its two controls trained alike
    assert recipe_from_args(build_parser().parse_args(["train", "--data", "x", "--out", "y"])).lora_rank == 0


def test_an_interrupted_lora_stage_resumes_to_the_same_projector(tiny, tmp_path):
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.stage_runner import example_items
    from e2p.training.loop import TrainConfig, train_projector

    users, examples = _contract()
    cfg = TrainConfig(steps=4, batch_size=4, eval_every=2, warmup_steps=1, lora_lr=1e-2)

    def run(folder, stop_at=None, resume=False):
        p = _projector(tiny, grow=False).train()
        items = example_items(tiny, p, examples, users.index, RecipeConfig())

        def on_step(step, loss):
            if step == stop_at:
                raise KeyboardInterrupt

        try:
            train_projector(E2PModel(tiny, p, training=True), items, users.tensor(), folder, cfg, val_items=items[:4],
                            progress=False, on_step=on_step, resume=resume)
        except KeyboardInterrupt:
            pass
        return Projector.from_pretrained(folder / "checkpoint")

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_at=3)  # the checkpoint of step 2 is on disk
    resumed = run(tmp_path / "cut", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_the_server_serves_a_projector_with_an_adapter(tmp_path):
    import httpx

    from e2p.serve import ServeConfig, create_app
    from e2p.store import EmbeddingStore
    from conftest import Server

    backbone = make_backbone()
    model = E2PModel(backbone, _projector(backbone), max_prompt_tokens=48)
    app = create_app(model, EmbeddingStore(tmp_path / "s.db"), ServeConfig(model_name="m", api_keys=["k"],
                                                                           admin_key="a", max_tokens_limit=8))
    server = Server(app)
    vector = torch.randn(8, generator=torch.Generator().manual_seed(3))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.put("/v1/users/u1/embedding", json={"embedding": vector.tolist()}, headers={"authorization": "Bearer a"})
            assert r.status_code == 200, r.text
            for user, emb in (("u1", vector), (None, None)):
                body = {"model": "m", "messages": [{"role": "user", "content": "hi how are you ?"}], "max_tokens": 6,
                        "temperature": 0, **({"user": user} if user else {})}
                r = http.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer k"})
                assert r.status_code == 200, r.text
                want = model.generate(["hi how are you ?"], [emb], max_new_tokens=6)[0]
                assert r.json()["choices"][0]["message"]["content"] == want, user
    finally:
        server.stop()


def test_train_eval_and_generate_from_the_command_line_with_an_adapter(tmp_path, capsys):
    import numpy as np

    from e2p.cli import main

    bb = make_backbone()
    bb.model.save_pretrained(tmp_path / "bb")
    bb.tokenizer.save_pretrained(tmp_path / "bb")
    users = [f"u{i}" for i in range(10)]
    np.savez(tmp_path / "users.npz", user=np.array(users),
             embedding=np.random.default_rng(0).normal(size=(10, 8)).astype("float32"))
    np.save(tmp_path / "one.npy", np.random.default_rng(1).normal(size=8).astype("float32"))
    with open(tmp_path / "ex.jsonl", "w") as f:
        for i, u in enumerate(users):
            for reply in ["i like dogs .", "i play guitar ."][: 1 + i % 2]:
                f.write(json.dumps({"user": u, "prompt": "tell me about yourself", "completion": reply}) + "\n")
    common = ["--backbone", str(tmp_path / "bb"), "--users", str(tmp_path / "users.npz"), "--examples",
              str(tmp_path / "ex.jsonl"), "--dtype", "float32"]
    assert main(["train", *common, "--out", str(tmp_path / "run"), "--steps", "5", "--batch-size", "4",
                 "--val-examples", "2", "--lora-rank", "2", "--injection", "input"]) == 0
    out = capsys.readouterr().out
    assert "shared LoRA adapter (rank 2 on q_proj, v_proj)" in out and "one embedding of 8 floats" in out
    report = json.loads((tmp_path / "run" / "training_report.json").read_text())
    assert report["adapter"]["rank"] == 2 and (tmp_path / "run" / "shuffled_trained" / "config.json").is_file()
    assert main(["eval", *common, "--projector", str(tmp_path / "run"), "--out", str(tmp_path / "eval"),
                 "--generate", "0"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["conditions"]) == {"none", "shared_prefix", "shuffled_trained", "e2p"}
    assert "Shared LoRA adapter" in (tmp_path / "eval" / "REPORT.md").read_text()
    capsys.readouterr()
    assert main(["generate", "--backbone", str(tmp_path / "bb"), "--dtype", "float32", "--projector",
                 str(tmp_path / "run"), "--embedding", str(tmp_path / "one.npy"), "--message", "hi", "--compare",
                 "--max-new-tokens", "4"]) == 0
    assert "[embedding:" in capsys.readouterr().out
    assert main(["eval", *common, "--projector", str(tmp_path / "run"), "--out", str(tmp_path / "e2"),
                 "--engine", "llama-cpp"]) == 2  # refused before the data or the backbone load
    assert "llama-cpp engine cannot run this projector" in capsys.readouterr().err
