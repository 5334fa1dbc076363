"""How a prompt becomes token ids around the prefix: the one module every engine (torch, llama.cpp) and the server use.

A row is `Segments`: `pre` + [the k prefix vectors] + `post` + `target` (the loss reads only the target). Where the
prefix goes is the projector's (`prefix_position`, `injection`): in front of the prompt, after the system part, or
after a copy of the first token (an `after_sink` input prefix keeps position 0 a real token, the attention sink).
A backbone without a chat template (a base model) gets the plain "Role: content" format.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .config import E2PConfig
from .errors import E2PError

Messages = list[dict]
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class PromptTooLongError(E2PError, ValueError):
    """The prompt does not fit even after dropping older turns."""


@dataclass
class Segments:
    """One tokenized row: `pre` + [prefix] + `post` + `target` (loss only on target)."""

    pre: list[int]
    post: list[int]
    target: list[int] = field(default_factory=list)


def plain_prompt(messages: Messages, add_generation_prompt: bool, bos: str = "", eos: str = "") -> str:
    """The prompt format of a backbone without a chat template (a base model): the tokenizer's BOS, then each turn
    as "Role: content" separated by blank lines, an assistant turn ending with EOS, and "Assistant:" to reply."""
    parts = []
    for m in messages:
        role = PLAIN_ROLES.get(m["role"], str(m["role"]).capitalize())
        parts.append(f"{role}: {m['content']}" + (eos if m["role"] == "assistant" else ""))
    text = bos + "\n\n".join(parts)
    if add_generation_prompt:
        text += ("\n\n" if parts else "") + "Assistant:"
    return text


def eos_ids(tokenizer, generation_eos=None) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS and the generation config's (one id or a list)."""
    eos = {tokenizer.eos_token_id}
    eos |= set(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    return sorted(i for i in eos if i is not None)


class PromptFormat:
    """Chat messages or a raw prompt -> `Segments`, for one tokenizer and one projector's placement."""

    def __init__(self, tokenizer, config: E2PConfig, has_projector: bool, max_prompt_tokens: int = 1024):
        self.tokenizer, self.config, self.has_projector = tokenizer, config, has_projector
        self.max_prompt_tokens = max_prompt_tokens
        self.plain = getattr(tokenizer, "chat_template", None) is None

    @functools.cached_property
    def bos_text(self) -> str:
        """The BOS token when the tokenizer puts one in front of text itself (Gemma, Llama): the plain format keeps it."""
        tok = self.tokenizer
        with_special = tok("a")["input_ids"]
        plain = tok("a", add_special_tokens=False)["input_ids"]
        if tok.bos_token and tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id] != plain[:1]:
            return tok.bos_token
        return ""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, messages: Messages, add_generation_prompt: bool) -> str:
        if self.plain:
            return plain_prompt(messages, add_generation_prompt, self.bos_text, self.tokenizer.eos_token or "")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _inline_after_sink(self) -> bool:
        return self.config.prefix_position == "after_sink" and self.config.injection == "input" and self.has_projector

    def format(self, messages: Messages | str, reply: str | None = None, persona_text: str | None = None,
               system_prompt: str | None = None, max_target_tokens: int | None = None) -> Segments:
        """Chat messages (or one user message) -> Segments; `persona_text` goes into the system prompt.

        Older turns are dropped until the prompt fits `max_prompt_tokens`.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        system = system_prompt if system_prompt is not None else self.config.system_prompt
        if messages and messages[0].get("role") == "system":
            system = messages[0]["content"]
            messages = messages[1:]
        if persona_text:
            system = f"{system}\nYour persona: {persona_text}" if system else f"Your persona: {persona_text}"
        head = [{"role": "system", "content": system}] if system else []

        def render(drop: int) -> tuple[str, list[int]]:
            prompt = self.render(head + messages[drop:], add_generation_prompt=True)
            return prompt, self.encode(prompt)

        prompt, ids = render(0)
        if len(ids) > self.max_prompt_tokens:
            # the fewest oldest turns to drop, by bisection: O(n log n) in the chat's length, not O(n^2)
            lo, hi = 1, max(len(messages) - 1, 0)
            last, last_ids = render(hi)
            if len(last_ids) > self.max_prompt_tokens:
                raise PromptTooLongError(
                    f"prompt is {len(last_ids)} tokens, the limit is {self.max_prompt_tokens}: shorten the message or the persona"
                )
            while lo < hi:
                mid = (lo + hi) // 2
                if len(render(mid)[1]) <= self.max_prompt_tokens:
                    hi = mid
                else:
                    lo = mid + 1
            messages = messages[hi:]
            prompt, ids = render(0)
        pre: list[int] = []
        post = ids
        if self.config.prefix_position == "after_system" and self.config.injection == "input" and head:
            system_part = self.render(head, add_generation_prompt=False)
            if prompt.startswith(system_part):
                pre, post = self.encode(system_part), self.encode(prompt[len(system_part):])
        elif self._inline_after_sink():
            pre = post[:1]  # a copy of the first token takes position 0 (deep injection puts its keys in the cache)
        target: list[int] = []
        if reply is not None:
            full = self.render(head + messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
            target_text = full[len(prompt):] if full.startswith(prompt) else reply + (self.tokenizer.eos_token or "")
            eos = self.tokenizer.eos_token
            if eos and eos in target_text:
                target_text = target_text[: target_text.index(eos) + len(eos)]
            target = self.encode(target_text)
            if max_target_tokens is not None:
                target = target[:max_target_tokens]
        return Segments(pre=pre, post=post, target=target)

    def format_raw(self, prompt: str) -> Segments:
        """A raw prompt (no template, `/v1/completions`) with the prefix where training put it, as `format` places
        it: after a copy of the first token for an `after_sink` input prefix, else before the prompt (a raw prompt
        has no system part for `after_system`; a deep `after_sink` prefix takes the first token's keys in the
        cache). The BOS token leads where the tokenizer puts one in front of text itself (Gemma, Llama), as in
        every prompt the projector was trained on."""
        ids = list(self.encode(self.bos_text + prompt))
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(f"prompt is {len(ids)} tokens, the limit is {self.max_prompt_tokens}: shorten it")
        if self._inline_after_sink():
            return Segments(pre=ids[:1], post=ids)
        return Segments(pre=[], post=ids)
