"""The server survives its users, round two (issue 27, and issue 26's completions): bounded stop matching, text
decoded once per token with its leading space, and the other fixes, each tested through HTTP where a client meets it."""
from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from e2p.serve import ServeConfig, create_app
from e2p.serve.batching import Detokenizer, RowText
from e2p.store import EmbeddingStore
from test_serve import ADMIN, API, MODEL, PROMPT, Server, assert_error, tiny_model, vec

AUTH = {"authorization": f"Bearer {API}"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A keyed server on the tiny model, at the machine's default precision."""
    model = tiny_model()
    store = EmbeddingStore(tmp_path_factory.mktemp("round2") / "users.db")
    config = ServeConfig(model_name=MODEL, api_keys=[API], admin_key=ADMIN, max_tokens_limit=32)
    app = create_app(model, store, config)
    server = Server(app)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        yield server, app, model, http
    server.stop()


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer (as SmolLM2's, GPT-2's): spaces belong to the token after them, and a
    character it never saw is several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["I like hiking with my dogs", "I like music", "we go hiking"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


# --- 1. stop strings: bounded, and matched in the new text only ---------------------------------------------
def test_stop_strings_are_bounded(served):
    server, app, model, http = served
    too_many = http.post("/v1/chat/completions", json=chat_body(stop=[f"s{i}" for i in range(17)]))
    assert_error(too_many, 400, "invalid_value", "stop")
    assert "16" in too_many.json()["error"]["message"]
    too_long = http.post("/v1/completions", json={"model": MODEL, "prompt": "i like", "stop": "x" * 257})
    assert_error(too_long, 400, "invalid_value", "stop")
    assert "256" in too_long.json()["error"]["message"]
    at_the_limit = [chr(0x4e00 + i) * 256 for i in range(16)]
    assert http.post("/v1/chat/completions", json=chat_body(stop=at_the_limit)).status_code == 200


def test_stop_matching_costs_time_in_the_new_text_only():
    """Each token is decoded once, and a step's stop search looks at the tail its piece can complete, so a reply
    8x as long costs about 8x, not 64x (the old RowText re-decoded and searched the whole reply every step)."""
    stops = ["a" * 255 + chr(0x41 + i) for i in range(16)]  # 16 x 256 characters, their start always pending

    def cost(n: int) -> tuple[float, int]:
        calls = []
        step = lambda token: calls.append(token) or "a"
        row = RowText(step, stops)
        started = time.process_time()
        tokens = []
        for i in range(n):
            tokens.append(i)
            row.add(tokens)
        text, _ = row.finish(tokens)
        assert text == "a" * n and not row.stopped
        return time.process_time() - started, len(calls)

    cost(200)  # warm up
    (small, n_small), (big, n_big) = min(cost(400) for _ in range(3)), min(cost(3200) for _ in range(3))
    assert (n_small, n_big) == (400, 3200)  # every token decoded exactly once
    assert big < 24 * small, (small, big)  # linear: ~8x; quadratic: ~64x


# --- 2. incremental detokenization: the leading space stays (issue 26) ---------------------------------------
def test_detokenizer_keeps_the_leading_space_and_holds_back_half_characters():
    tok = byte_level_tokenizer()
    prompt = tok("I like", add_special_tokens=False)["input_ids"]
    reply = tok(" hiking 🎉 dogs", add_special_tokens=False)["input_ids"]  # 🎉 was never seen: 4 byte tokens
    detok = Detokenizer(tok, prompt)
    pieces = [detok.step(t) for t in reply]
    assert pieces[0] == " hiking"  # the old whole-reply decode, stripped, gave "hiking": "I likehiking"
    assert "" in pieces and "\ufffd" not in "".join(pieces)  # the emoji waits until its last byte
    assert "".join(pieces) + detok.flush() == " hiking 🎉 dogs"
    row = RowText(Detokenizer(tok, prompt).step, [])
    assert row.finish(reply) == (" hiking 🎉 dogs", " hiking 🎉 dogs")  # completions: never stripped
    chat = RowText(Detokenizer(tok, prompt).step, [], trim=True)
    assert chat.finish(reply)[0] == "hiking 🎉 dogs"  # chat replies: leading whitespace dropped
    half = Detokenizer(tok, prompt)  # a reply that ends inside a character: what a whole decode gives, at the end
    cut = RowText(half.step, [], flush=half.flush).finish(reply[:4])
    assert cut[0] == tok.decode(reply[:4]) == " hiking \ufffd"


def test_completions_keep_the_leading_space_streamed_and_echoed(served):
    server, app, model, http = served
    body = {"model": MODEL, "prompt": "i like", "max_tokens": 6, "temperature": 0}
    ids = model.tokenizer("i like", add_special_tokens=False)["input_ids"]
    from e2p.model import Segments

    tokens = model.generate_tokens([Segments([], ids)], [None], max_new_tokens=6)[0]
    whole = model.tokenizer.decode(ids + tokens, skip_special_tokens=True)  # "i like dogs ..."
    text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text == whole[len("i like"):] and text.startswith(" ")
    echoed = http.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == whole
    for echo in (False, True):
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "echo": echo, "stream": True},
                          headers=AUTH, timeout=30) as r:
            parts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                     if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        assert "".join(parts) == (echoed if echo else text)
