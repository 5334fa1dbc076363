"""E2P on any causal LM transformers builds: tiny random models of five families, built in code.

For each family: the loss trains the projector only, a mixed-user batch gives exactly what each row gives alone,
and a prefix equal to a real token (its embedding for input injection, its keys/values for deep injection)
generates exactly what that token generates given by id. A backbone without a chat template gets the plain format.
"""
from __future__ import annotations

import pytest
import torch

from e2p.backbone import Backbone, freeze
from e2p.model import DeepInjectionError, E2PModel, new_config, token_keys_values
from e2p.formatting import Segments, plain_prompt
from e2p.projector import Projector

from conftest import make_tokenizer

MESSAGES = ["hi how are you ?", "tell me about yourself", "what do you do for fun ?", "i like dogs"]
REPLIES = ["i am fine", "i am a teacher", "i play guitar", "i love cats"]


def _config(family: str, vocab: int, tok):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(num_key_value_heads=2, **common)
    if family == "gemma3":  # scaled embeddings, sliding-window layers, explicit head_dim, soft-capping
        return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=64,
                                                         final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"],
                                                         **common)
    if family == "gpt_neox":  # no num_key_value_heads, the decoder stack is .gpt_neox, not .model
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**common)
    if family == "phi":
        return tf.PhiForCausalLM, tf.PhiConfig(num_key_value_heads=2, **common)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "gemma3", "gpt_neox", "phi"]


def make_family(family: str, chat_template: bool = True) -> Backbone:
    torch.manual_seed(0)
    tok = make_tokenizer()
    if not chat_template:
        tok.chat_template = None
    cls, cfg = _config(family, len(tok), tok)
    model = cls(cfg).float()
    return freeze(Backbone(model=model, tokenizer=tok, name=f"tiny-{family}"))


@pytest.fixture(params=FAMILIES, scope="module")
def family(request):
    return make_family(request.param)


def _rows(model: E2PModel, with_target: bool = True) -> list[Segments]:
    return [model.format(m, reply=r if with_target else None) for m, r in zip(MESSAGES, REPLIES)]


@pytest.mark.parametrize("injection", ["input", "deep"])
def test_loss_trains_the_projector_only(family, injection):
    p = Projector(new_config(family, embedding_dim=8, injection=injection, hidden_dims=[16]))
    with torch.no_grad():
        p.mlp[-1].weight.normal_(0, 0.1)
    m = E2PModel(family, p, autocast=False)
    before = {k: v.clone() for k, v in family.model.state_dict().items()}
    opt = torch.optim.AdamW(p.parameters(), lr=1e-2)
    m.loss(_rows(m), torch.randn(4, 8)).backward()
    assert all(q.grad is None for q in family.model.parameters())
    assert p.shared.grad is not None and p.shared.grad.abs().sum() > 0
    assert p.mlp[0].weight.grad.abs().sum() > 0
    opt.step()
    after = family.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("injection", ["input", "deep"])
def test_a_mixed_user_batch_gives_what_each_row_gives_alone(family, injection):
    p = Projector(new_config(family, embedding_dim=8, injection=injection, hidden_dims=[16]))
    with torch.no_grad():
        p.mlp[-1].weight.normal_(0, 0.5)
    m = E2PModel(family, p.eval(), autocast=False)
    users = [torch.randn(8), None, torch.randn(8), torch.randn(8)]  # one row without a user, in the same batch
    rows = _rows(m)
    nll, _ = m.loss(rows, users, reduction="none")
    alone = torch.cat([m.loss([r], [u], reduction="none")[0] for r, u in zip(rows, users)])
    assert torch.allclose(nll, alone, atol=1e-4)
    prompts = _rows(m, with_target=False)
    together = m.generate_tokens(prompts, users, max_new_tokens=6)
    assert together == [m.generate_tokens([r], [u], max_new_tokens=6)[0] for r, u in zip(prompts, users)]
    other_user = m.loss([rows[0]], [users[2]], reduction="none")[0]
    assert not torch.allclose(nll[:1], other_user, atol=1e-4)  # the user matters


@pytest.mark.parametrize("injection", ["input", "deep"])
def test_a_prefix_equal_to_a_real_token_generates_what_the_token_generates(family, injection):
    word = family.tokenizer.convert_tokens_to_ids("dogs")
    p = Projector(new_config(family, embedding_dim=0, output_norm=False, injection=injection))
    with torch.no_grad():
        if injection == "input":  # what the embedding layer outputs (Gemma scales rows by sqrt(hidden) there)
            p.shared.copy_(family.model.get_input_embeddings()(torch.tensor([word])))
        else:
            p.shared.copy_(token_keys_values(family.model, [word]))
    m = E2PModel(family, p, autocast=False)
    plain = E2PModel(family, None, config=p.config, autocast=False)
    prompts = _rows(m, with_target=False)
    with_prefix = m.generate_tokens(prompts, max_new_tokens=8)
    as_token = plain.generate_tokens([Segments(pre=[], post=[word] + r.post) for r in prompts], max_new_tokens=8)
    assert with_prefix == as_token
    rows = _rows(m)
    scored = m.loss(rows, reduction="none")[0]
    as_id = plain.loss([Segments(pre=[], post=[word] + r.post, target=r.target) for r in rows], reduction="none")[0]
    assert torch.allclose(scored, as_id, atol=1e-4)


def test_a_backbone_without_a_chat_template_gets_the_plain_format():
    bb = make_family("llama", chat_template=False)
    m = E2PModel(bb, None, autocast=False)
    messages = [{"role": "user", "content": "hi"}]
    assert m.formatter.render([{"role": "system", "content": "be kind"}] + messages, True) == "System: be kind\n\nUser: hi\n\nAssistant:"
    seg = m.format(messages, reply="hello")
    assert seg.target[-1] == bb.tokenizer.eos_token_id  # the reply ends with EOS, so generation learns to stop
    assert plain_prompt(messages, True, bos="<s>") == "<s>User: hi\n\nAssistant:"
    assert plain_prompt(messages + [{"role": "assistant", "content": "b"}], False, eos="</s>") == "User: hi\n\nAssistant: b</s>"


def test_deep_injection_names_an_architecture_without_a_key_value_cache():
    import transformers as tf

    tok = make_tokenizer()
    cfg = tf.MambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, state_size=4,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    bb = freeze(Backbone(model=tf.MambaForCausalLM(cfg), tokenizer=tok, name="tiny-mamba"))
    with pytest.raises(DeepInjectionError, match="MambaForCausalLM"):
        E2PModel(bb, Projector(new_config(bb, embedding_dim=8, injection="deep", backbone_kv_dim=32)))
    m = E2PModel(bb, Projector(new_config(bb, embedding_dim=8, injection="input")), autocast=False)  # input works
    assert len(m.generate_tokens(_rows(m, with_target=False)[:2], [torch.randn(8)] * 2, max_new_tokens=3)[0]) == 3


def test_rows_that_wait_or_leave_keep_their_logits_past_a_sliding_window(family):
    """Rows set aside (fair shares), brought back, and rows leaving mid-batch get at every step the logits they get
    alone, also when a prompt is longer than a sliding-window layer's window (gemma3 here: 64): the rebuilt cache keeps
    each layer's keys aligned with the mask's last columns."""
    from conftest import WORDS
    from e2p.engines.generation import DecodeRow, Generation

    model = E2PModel(family, None, autocast=False)
    words = [WORDS[i % len(WORDS)] for i in torch.randperm(len(WORDS) * 3, generator=torch.Generator().manual_seed(1))]
    segs = [model.format(" ".join(words[:90])), model.format("i play guitar"), model.format(" ".join(words[30:110]))]
    lengths = [10, 12, 6]
    seen: dict[int, list[torch.Tensor]] = {}
    stepping: list = []
    real = model.next_logits

    def spy(dec):
        out = real(dec)
        for j, row in enumerate(stepping):
            seen.setdefault(id(row), []).append(out[j].float().clone())
        return out

    model.next_logits = spy

    alone, kept = [], []  # rows kept alive: their ids key `seen`
    for seg, n in zip(segs, lengths):
        row = DecodeRow(temperature=0.0, top_p=1.0, seed=None, max_tokens=n)
        kept.append(row)
        gen = Generation(model)
        gen.add([row], [seg])
        while gen.rows:
            stepping[:] = gen.rows
            gen.step()
        alone.append(seen[id(row)])
    batch = [DecodeRow(temperature=0.0, top_p=1.0, seed=None, max_tokens=n) for n in lengths]
    gen = Generation(model)
    gen.add(batch, segs)
    step = 0
    while gen.rows or gen.waiting:  # row 1 alone on steps 2-4, rows 0 and 2 on step 5; row 2 leaves first
        wanted = {1} if step in (2, 3, 4) else {0, 2} if step == 5 else {0, 1, 2}
        gen.focus(lambda r: batch.index(r) in wanted)
        stepping[:] = gen.rows
        gen.step()
        step += 1
    for row, mine in zip(batch, alone):
        got = seen[id(row)]
        assert len(got) == len(mine) and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, mine))
    assert len(segs[0].pre) + len(segs[0].post) > 64  # past gemma3's window
