"""The research studies (research/persona, research/pens) are lists of conditions on the one evaluation loop:
end to end on the tiny backbone with tiny synthetic persona, MSC and PENS files."""
import hashlib
import json
import random
import numpy as np
import torch

from conftest import WORDS

CONTENT = [w for w in WORDS if w.isalpha() and w not in ("system", "user", "assistant")]


class FakeEncoder:
    """Hashed bag of words: deterministic, cheap, never a zero vector."""

    name = "fake-bow"
    dim = 16

    def encode(self, texts, **_):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, 0] = 0.5
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _sentence(rng, n=4):
    return " ".join(rng.choice(CONTENT) for _ in range(n))


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
    lines.append("{not json")  # malformed: skipped
    (folder / "msc_dialogue_session_2_valid.txt").write_text("\n".join(lines) + "\n")


def write_pens(path, users=10, news=14):
    """Each news item rewritten by several users (so prompts can quote another reader), clicks overlapping."""
    rng = random.Random(0)
    lines = ["userid\tclicknewsID\tposnewID\trewrite_titles"]
    for u in range(users):
        clicks = ",".join(f"N{rng.randint(1, 25)}" for _ in range(8))
        shown = [f"S{i}" for i in range(news) if (i + u) % 3]
        lines.append(f"U{u}\t{clicks}\t{','.join(shown)}\t{';;'.join(_sentence(rng) for _ in shown)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_persona_study_on_the_one_loop(tiny, tmp_path):
    from e2p.data.persona import persona_split
    from research.persona.recipe import PersonaRecipeConfig as RecipeConfig
    from research.persona.recipe import run_recipe
    from research.persona.study import add_noise, run_persona_study

    data = tmp_path / "data"
    data.mkdir()
    write_persona(data)
    train, _ = persona_split(data)
    runs = {k: tmp_path / f"k{k}" for k in (1, 2)}  # the projector and a k=2 one for the prefix-length curve
    for k, run in runs.items():
        run_recipe(tiny, FakeEncoder(), train, run, RecipeConfig(num_prefix_tokens=k, hidden_dims=[16], shared_steps=2,
                                                                  reconstruct_steps=0, e2p_steps=2, batch_size=2,
                                                                  val_people=2, val_examples=4, eval_every=2),
                   progress=False)
    # two steps on a random tiny model may not beat the start on validation (then the person part stays 0 and noise
    # could not show); give the projector a person part so that the noisy table must change its scores
    import torch

    from e2p.projector import Projector

    trained = Projector.from_pretrained(runs[1])
    with torch.no_grad():
        trained.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    trained.config.person_scale = 1.0
    trained.save_pretrained(runs[1])
    results = run_persona_study(tiny, FakeEncoder(), data, runs[1], tmp_path / "out", limit=12, noise=(0.3,),
                                k_runs=(str(runs[2]),), msc_limit=6, generate=4, progress=False)
    main = results["main"]["conditions"]
    assert {"none", "text", "shared_prefix", "shuffled", "e2p", "e2p_noise0.3", "shared_prefix_k2", "e2p_k2",
            "shuffled_k2"} <= set(main)
    assert main["e2p_noise0.3"]["perplexity"] != main["e2p"]["perplexity"]  # the noisy table was used
    assert {"rouge1", "rouge2", "rougeL", "identification"} <= set(main["e2p"])
    msc = results["msc-msc_dialogue_session_2_valid"]
    assert {"e2p_initial", "e2p_refreshed"} <= set(msc["conditions"]) and 0 < msc["cosine_initial_vs_refreshed"] < 1
    assert "e2p_refreshed_vs_e2p_initial" in msc["comparisons"]
    for name in ("REPORT.md", "results.json", "evaluation.png", "study.json"):
        assert (tmp_path / "out" / name).is_file(), name
    v = np.ones((3, 4), np.float32)
    assert np.allclose(np.linalg.norm(add_noise(v, 0.5, 0) - v, axis=1), 0.5 * np.linalg.norm(v, axis=1), atol=1e-5)


def test_pens_study_on_the_one_loop(tiny, tmp_path):
    from e2p.data.pens_contract import write_pens_contract
    from e2p.data.contract import load_examples, load_users
    from research.pens.train_lora import train_lora
    from e2p.model import E2PModel
    from e2p.training.recipe_config import RecipeConfig
    from e2p.training.recipe import train_on_examples
    from research.pens.study import run_pens_study

    src = write_pens(tmp_path / "pens.tsv")
    write_pens_contract(src, tmp_path / "data", test_fraction=0.3, behaviour="als", behaviour_dim=4,
                        text_encoder=FakeEncoder())
    users = load_users(tmp_path / "data" / "users.npz")
    examples = load_examples(tmp_path / "data" / "examples.jsonl", users)
    cfg = RecipeConfig(injection="input", hidden_dims=[], shared_steps=2, e2p_steps=2, text_steps=2, batch_size=2,
                       val_examples=4, eval_every=2, person_scales=[1.0])
    train_on_examples(tiny, users, examples, tmp_path / "run", cfg, val_users=2, progress=False)
    rows = [E2PModel(tiny, None).format(e.prompt, reply=e.target, persona_text=e.profile_text) for e in examples]
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    peft_model, _ = train_lora(tiny, rows, steps=2, rank=2, batch_size=2, out_dir=tmp_path / "lora")
    peft_model.unload()
    r = run_pens_study(tiny, tmp_path / "data", tmp_path / "run", tmp_path / "out", lora=tmp_path / "lora", generate=4,
                       encoder=FakeEncoder(), progress=False)
    assert {"none", "text", "shared_prefix", "shuffled", "e2p", "shared_prefix_text", "e2p_text", "lora_text",
            "copy"} <= set(r["conditions"])
    assert r["conditions"]["copy"]["perplexity"] is None and "rouge2" in r["conditions"]["copy"]
    assert {"e2p_vs_shared_prefix", "e2p_vs_shuffled", "e2p_text_vs_text", "lora_text_vs_text"} <= set(r["comparisons"])
    after = tiny.model.state_dict()  # LoRA was removed again: the backbone is exactly as before
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
