"""Tiny randomly initialised Llama backbones and a word-level tokenizer with a chat template, built in code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("hi hello how are you i am fine like dogs cats music tell me about yourself what do for fun "
         "chatting with someone just met reply briefly your persona a an the love to play guitar work "
         "as teacher nurse . , ! ? system user assistant").split()

DATA = Path(os.environ.get("E2P_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_backbone(seed: int = 0, hidden: int = 64, layers: int = 2, name: str = "tiny-llama"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from e2p.backbone import Backbone, freeze

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    return freeze(Backbone(model=model, tokenizer=tok, name=name))


@pytest.fixture
def tiny():
    return make_backbone()


@pytest.fixture(scope="session")
def real_backbone():
    from e2p.backbone import load_backbone

    return load_backbone()


@pytest.fixture(scope="session")
def shared_data():
    if not (DATA / "synthetic_persona_chat").is_dir():
        pytest.skip(f"real data not found at {DATA} (set E2P_DATA)")
    return DATA
