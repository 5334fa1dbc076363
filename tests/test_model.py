import pytest
import torch

from e2p import Projector
from e2p.model import E2PModel, new_config
from e2p.formatting import PromptTooLongError

CONVS = [
    ([{"role": "user", "content": "hi how are you ?"}], "i am fine ! i like dogs ."),
    ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
      {"role": "user", "content": "what do you do for fun ?"}], "i play guitar ."),
    ([{"role": "user", "content": "tell me about yourself"}], "i work as a nurse and i love cats ."),
]


def _model(tiny, injection="input", position="start", k=2, seed=0):
    torch.manual_seed(seed)
    p = Projector(new_config(tiny, embedding_dim=8, num_prefix_tokens=k, injection=injection, prefix_position=position))
    torch.nn.init.normal_(p.mlp[-1].weight, std=0.5)
    p.eval()
    return E2PModel(tiny, p, autocast=False)


@pytest.mark.parametrize("injection,position", [("input", "start"), ("input", "after_system"), ("deep", "start"),
                                                ("input", "after_sink"), ("deep", "after_sink")])
def test_padded_mixed_batch_matches_rows_alone(tiny, injection, position):
    m = _model(tiny, injection, position)
    rows = [m.format(msgs, reply=r) for msgs, r in CONVS]
    emb = torch.randn(3, 8)
    users = [emb[0], None, emb[2]]  # a mixed batch: the middle row has no user
    sums, counts = m.loss(rows, users, reduction="none")
    for i in range(3):
        s, c = m.loss(rows[i:i + 1], [users[i]], reduction="none")
        assert c[0] == counts[i]
        assert torch.allclose(s[0], sums[i], atol=1e-4), (i, s[0], sums[i])
    prompts = [msgs for msgs, _ in CONVS]
    together = m.generate_tokens([m.format(p) for p in prompts], users, max_new_tokens=6)
    for i in range(3):
        alone = m.generate_tokens([m.format(prompts[i])], [users[i]], max_new_tokens=6)
        assert alone[0] == together[i]


@pytest.mark.parametrize("injection,position", [("input", "start"), ("deep", "start"), ("deep", "after_sink")])
def test_rows_joining_and_leaving_a_running_batch_match_rows_alone(tiny, injection, position):
    """Continuous batching: a row prefilled apart and joined mid-way, or left alone by rows that finish, decodes
    exactly as it does alone (greedy tokens equal, hidden states within float noise)."""
    m = _model(tiny, injection, position)
    prompts = [m.format(msgs) for msgs, _ in CONVS]
    emb = torch.randn(3, 8)
    users = [emb[0], None, emb[2]]

    def alone(i, steps):
        dec, tokens = m.start_decoding([prompts[i]], [users[i]]), []
        for _ in range(steps):
            nxt = m.pick(m.next_logits(dec), False, 1.0, 1.0)
            tokens.append(int(nxt[0]))
            m.advance(dec, nxt)
        return tokens, dec.last[0]

    dec, got = m.start_decoding([prompts[0]], [users[0]]), {0: [], 1: [], 2: []}
    rows = [0]
    for step in range(9):
        if step == 3:  # rows 1 and 2 arrive while row 0 is 3 tokens in
            dec, rows = dec.join(m.start_decoding(prompts[1:], users[1:])), [0, 1, 2]
        if step == 6:  # row 0 leaves; the others go on
            dec, rows = dec.select([1, 2]), [1, 2]
        nxt = m.pick(m.next_logits(dec), False, 1.0, 1.0)
        for j, i in enumerate(rows):
            got[i].append(int(nxt[j]))
        m.advance(dec, nxt)
    for j, i in enumerate(rows):
        tokens, last = alone(i, len(got[i]))
        assert got[i] == tokens, i
        assert torch.allclose(dec.last[j], last, atol=1e-4), i
    assert alone(0, 6)[0] == got[0]


def test_different_users_get_different_prefixes(tiny):
    m = _model(tiny)
    rows = [m.format(CONVS[0][0], reply=CONVS[0][1])] * 2
    s, _ = m.loss(rows, torch.randn(2, 8), reduction="none")
    assert not torch.allclose(s[0], s[1])


def test_prefix_equal_to_token_embedding_matches_token_id(tiny):
    """A prefix vector equal to a real token's embedding must act exactly like that token given by id."""
    p = Projector(new_config(tiny, embedding_dim=0, num_prefix_tokens=1, output_norm=False))
    word = tiny.tokenizer.convert_tokens_to_ids("dogs")
    with torch.no_grad():
        p.shared.copy_(tiny.model.get_input_embeddings().weight[word].unsqueeze(0))
    m = E2PModel(tiny, p, autocast=False)
    row = m.format(CONVS[0][0], reply=CONVS[0][1])
    with_prefix = m.loss([row], reduction="none")[0]
    plain = E2PModel(tiny, None, config=p.config, autocast=False)
    from e2p.formatting import Segments

    as_token = plain.loss([Segments(pre=[], post=[word] + row.post, target=row.target)], reduction="none")[0]
    assert torch.allclose(with_prefix, as_token, atol=1e-5)


@pytest.mark.parametrize("injection", ["input", "deep"])
def test_after_sink_prefix_acts_like_a_token_behind_the_first_one(tiny, injection):
    """"after_sink": [first prompt token][prefix][prompt]. A prefix equal to a real token's embedding (input) or to
    that token's keys/values at position 1 (deep) must score exactly like the token given by id there."""
    from e2p.formatting import Segments

    cfg = new_config(tiny, embedding_dim=0, num_prefix_tokens=1, output_norm=False, injection=injection,
                     prefix_position="after_sink")
    p = Projector(cfg)
    plain = E2PModel(tiny, None, config=cfg, autocast=False)
    row = plain.format(CONVS[0][0], reply=CONVS[0][1])
    first, word = row.post[0], tiny.tokenizer.convert_tokens_to_ids("dogs")
    with torch.no_grad():
        if injection == "input":
            p.shared.copy_(tiny.model.get_input_embeddings().weight[word].unsqueeze(0))
        else:
            cache = tiny.model.model(input_ids=torch.tensor([[first, word]]), use_cache=True).past_key_values
            kv = [torch.stack([cache.layers[i].keys[0, :, 1].reshape(-1), cache.layers[i].values[0, :, 1].reshape(-1)])
                  for i in range(tiny.num_layers)]
            p.shared.copy_(torch.stack(kv).reshape(1, -1))
    m = E2PModel(tiny, p, autocast=False)
    with_prefix = m.loss([m.format(CONVS[0][0], reply=CONVS[0][1])], reduction="none")[0]
    as_tokens = plain.loss([Segments(pre=[], post=[first, word] + row.post, target=row.target)], reduction="none")[0]
    assert torch.allclose(with_prefix, as_tokens, atol=1e-5)
    shifted = E2PModel(tiny, Projector(new_config(tiny, embedding_dim=0, num_prefix_tokens=1, output_norm=False,
                                                  injection=injection)), autocast=False)
    shifted.projector.shared.data.copy_(p.shared.data)
    assert not torch.allclose(shifted.loss([row], reduction="none")[0], as_tokens, atol=1e-3)  # "start" differs


def test_loss_only_on_target_tokens(tiny):
    m = _model(tiny)
    row = m.format(CONVS[0][0], reply=CONVS[0][1])
    _, counts = m.loss([row], torch.randn(1, 8), reduction="none")
    assert counts[0] == len(row.target)
    batch = m.build([row], torch.randn(1, 8))
    assert int(batch["is_target"].sum()) == len(row.target)


def test_after_system_puts_prefix_after_the_system_prompt(tiny):
    m = _model(tiny, position="after_system")
    row = m.format("hello")
    system = tiny.tokenizer.apply_chat_template([{"role": "system", "content": m.config.system_prompt}], tokenize=False)
    assert row.pre == tiny.tokenizer(system, add_special_tokens=False)["input_ids"]
    assert row.post and row.pre


def test_backbone_weights_unchanged_by_training(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    assert not any(p.requires_grad for p in tiny.model.parameters()) and not tiny.model.training
    m = _model(tiny)
    m.projector.train()
    opt = torch.optim.AdamW(m.projector.parameters(), lr=1e-2)
    rows = [m.format(msgs, reply=r) for msgs, r in CONVS]
    first = None
    for _ in range(5):
        loss = m.loss(rows, torch.randn(3, 8))
        first = first if first is not None else float(loss)
        opt.zero_grad(); loss.backward(); opt.step()
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_generate_text_sampling_and_eos(tiny):
    m = _model(tiny)
    out = m.generate(["hello", "tell me about yourself"], torch.randn(2, 8), max_new_tokens=5, do_sample=True,
                     temperature=0.8, top_p=0.9, seed=1)
    again = m.generate(["hello", "tell me about yourself"], torch.randn(2, 8) * 0 + out.__len__(), max_new_tokens=5,
                       do_sample=True, seed=1)
    assert len(out) == 2 and all(isinstance(t, str) for t in out) and len(again) == 2
    tokens = m.generate_tokens([m.format("hello")], torch.randn(1, 8), max_new_tokens=8)
    assert len(tokens[0]) <= 8 and all(t not in m.eos_ids for t in tokens[0])


def test_oversize_prompt_is_refused(tiny):
    m = E2PModel(tiny, None, autocast=False, max_prompt_tokens=32)
    with pytest.raises(PromptTooLongError, match="limit is 32"):
        m.format("hello " * 50)
    long_history = [{"role": "user", "content": "hello " * 10}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]
    row = m.format(long_history)  # older turns are dropped to fit
    assert len(row.post) <= 32


def test_the_one_decode_loop_rows_join_leave_and_fail_alone(tiny):
    """`Generation`: seeded sampled and greedy rows, joined between steps, give the tokens they give alone
    through `generate_tokens`; a row the model cannot take (wrong embedding size) fails by itself."""
    from e2p.engines.generation import DecodeRow, Generation

    m = _model(tiny, "deep", "start")
    prompts = [m.format(msgs) for msgs, _ in CONVS]
    emb = torch.randn(3, 8)
    settings = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=7), dict(temperature=1.3, seed=11)]
    alone = [m.generate_tokens([prompts[i]], [emb[i]], 6, do_sample=s["temperature"] > 0,
                               temperature=s.get("temperature", 1.0), top_p=s.get("top_p", 1.0), seed=s.get("seed"))[0]
             for i, s in enumerate(settings)]
    gen = Generation(m)
    rows = [DecodeRow(max_tokens=6, **s) for s in settings]
    gen.add(rows[:1], prompts[:1], emb[:1])
    gen.step()
    gen.step()
    bad = DecodeRow(max_tokens=6)
    failed = gen.add([rows[1], bad, rows[2]], [prompts[1], prompts[0], prompts[2]], [emb[1], torch.randn(5), emb[2]])
    assert failed == [bad] and bad.finish_reason == "error" and "embeddings of size 8" in str(bad.error)
    finished = []
    while gen.rows:
        finished += gen.step()
    assert {id(r) for r in finished} == {id(r) for r in rows}
    assert [r.tokens for r in rows] == alone
    assert all(r.finish_reason in ("stop", "length") for r in rows)


def test_generate_with_a_batch_size_admits_rows_as_others_finish(tiny):
    """At most batch_size rows decode at once, a waiting row joining when one finishes: same text as all at once."""
    m = _model(tiny, "deep", "start")
    prompts = [msgs for msgs, _ in CONVS] * 2
    emb = [torch.randn(8) if i % 3 else None for i in range(len(prompts))]
    together = m.generate(prompts, emb, 9, batch_size=2)
    assert together == m.generate(prompts, emb, 9)
    assert together == [m.generate([p], [e], 9)[0] for p, e in zip(prompts, emb)]


def test_loss_with_a_batch_size_is_the_same_loss(tiny):
    m = _model(tiny, "deep", "start")
    rows = [m.format(msgs, reply=reply) for msgs, reply in CONVS] * 2
    emb = torch.randn(len(rows), 8)
    with torch.no_grad():
        whole, chunked = m.loss(rows, emb, "none"), m.loss(rows, emb, "none", batch_size=2)
        assert torch.allclose(whole[0], chunked[0], atol=1e-4) and torch.equal(whole[1], chunked[1])
        assert torch.allclose(m.loss(rows, emb), m.loss(rows, emb, batch_size=3), atol=1e-5)
