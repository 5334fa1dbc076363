"""Fair shares of decoding across tenants: a light tenant's rows step alone, the others wait with their cache, and
no row's text changes for it."""
from __future__ import annotations

import time

import torch

from conftest import PROMPT, slowed, tiny_model
from e2p.engines.generation import DecodeRow, Generation
from e2p.serve.batching import Batcher, GenRequest
from e2p.serve.fair_share import FairShare


def test_a_tenant_that_starts_behind_steps_alone_until_it_has_its_share():
    share = FairShare(window=2, credit=10)
    share.starting("a", [])
    for _ in range(50):
        share.stepped(["a", "a"])  # a: two rows, 50 steps
    share.starting("b", ["a"])
    assert share.clock["b"] == 100 - 10  # at most `credit` behind, not 100
    assert share.stepping(["a", "a", "b"]) == {"b"}
    for _ in range(8):
        share.stepped(["b"])
    assert share.stepping(["a", "b"]) == {"a", "b"}  # within the window again: one batch
    share.starting("a", ["a", "b"])  # a tenant already running gains nothing by sending more
    assert share.clock["a"] == 100


def test_tenants_with_their_share_step_together():
    share = FairShare(window=4, credit=16)
    for t in ("a", "b", "c"):
        share.starting(t, [])
    share.stepped(["a", "b", "c"])
    assert share.stepping(["a", "b", "c"]) == {"a", "b", "c"}
    assert share.stepping(["a"]) == {"a"}


def _rows(n: int, max_tokens: int) -> list[DecodeRow]:
    return [DecodeRow(temperature=0.0, top_p=1.0, seed=None, max_tokens=max_tokens) for _ in range(n)]


def test_rows_set_aside_and_brought_back_give_the_same_tokens():
    """Generation.focus: rows that wait keep their cache; every row's greedy tokens equal those of a plain run."""
    model = tiny_model()
    model.eos_ids = []
    segs = [model.format(PROMPT), model.format("what is your name ?"), model.format("tell me more")]
    emb = torch.randn(3, 8)

    def run(focus: bool) -> list[list[int]]:
        gen = Generation(model)
        rows = _rows(3, 12)
        gen.add(rows, segs, list(emb))
        step = 0
        while gen.rows or gen.waiting:
            if focus:  # row 1 waits on steps 2-6, rows 0 and 2 on steps 7-8
                wanted = {1} if step in (7, 8) else {0, 2} if 2 <= step <= 6 else {0, 1, 2}
                gen.focus(lambda r: rows.index(r) in wanted)
            gen.step()
            step += 1
        return [r.tokens for r in rows]

    plain, focused = run(False), run(True)
    assert focused == plain and all(len(t) == 12 for t in plain)


def test_a_light_tenants_rows_step_alone_beside_a_flood():
    """Under the batcher: while tenant B's short request runs, tenant A's rows wait (steps of one row), and every
    text equals the one without fair shares."""
    def run(fair: bool) -> tuple[list[list[str]], dict]:
        model = slowed(tiny_model(), 0.01)
        model.eos_ids = []
        batcher = Batcher(model, max_batch=2, wait_ms=50)
        if not fair:
            batcher.share = FairShare(window=10 ** 9, credit=10 ** 9)
        steps: list[list[str]] = []  # the tenants of the rows each step decodes
        counted = batcher.share.stepped

        def stepped(tenants):
            steps.append(sorted(tenants))
            counted(steps[-1])

        batcher.share.stepped = stepped
        segments = model.format(PROMPT)
        flood = [GenRequest(segments, None, max_tokens=20, tenant="a") for _ in range(3)]
        short = GenRequest(segments, None, max_tokens=5, tenant="b")
        for r in flood:
            batcher.submit(r)
        batcher.start()
        while len(steps) < 10:  # A's two rows decoded 10 tokens each: more than the credit (16) behind them
            time.sleep(0.005)
        batcher.submit(short)
        try:
            texts = {f"a{i}": r.future.result(timeout=120).text for i, r in enumerate(flood)}
            texts["b"] = short.future.result(timeout=120).text
        finally:
            batcher.stop()
        return steps, texts

    fair_steps, fair_texts = run(True)
    plain_steps, plain_texts = run(False)
    assert fair_texts == plain_texts
    assert [s for s in fair_steps if "b" in s] == [["b"]] * 5  # B's five tokens, each in a step of its own row
    assert [s for s in plain_steps if "b" in s] == [["a", "a", "b"]] * 5  # without: beside A's two rows


def test_fair_shares_can_be_turned_off_for_a_gpu(capsys):
    """`e2p serve --no-fair-shares` (ServeConfig.fair_shares): every row steps every time."""
    from e2p.cli import build_parser

    share = FairShare.off()
    share.starting("a", [])
    for _ in range(100):
        share.stepped(["a"] * 8)
    share.starting("b", ["a"])
    assert share.stepping(["a", "b"]) == {"a", "b"}
    assert Batcher(tiny_model(), max_batch=2, fair_shares=False).share.window > 10 ** 12
    args = build_parser().parse_args(["serve", "--store", "users.db", "--no-fair-shares"])
    assert args.no_fair_shares is True
