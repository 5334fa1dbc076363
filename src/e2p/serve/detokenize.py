"""A streamed row's text, step by step: `Detokenizer` decodes each new token once, in a few tokens of context, and
`RowText` settles the text a client may see (stop strings, a held-back tail, trimmed chat replies), so a step costs
time in its new text, not in the reply so far."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

log = logging.getLogger(__name__)


class Detokenizer:
    """A row's tokens -> text, each token decoded once, in a few tokens of context (tokenizers' `DecodeStream` on a
    fast tokenizer). Re-decoding the whole reply every step cost time quadratic in its length and, decoded out of
    context, lost the space a tokenizer puts in front of the first token ("I like" + " hiking"); here the stream
    starts after the prompt's last tokens. Incomplete UTF-8 is held back until its character is complete."""

    CONTEXT = 6  # prompt tokens the stream starts after (vLLM's incremental detokenizer starts 5 back)

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.context = list(context)[-self.CONTEXT:]
        self.tokens: list[int] = []
        self.done = 0  # tokens whose text was returned
        self.stream = None
        if getattr(tokenizer, "_tokenizer", None) is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(ids=self.context, skip_special_tokens=True)

    def step(self, token: int) -> str:
        """One more token; -> its text, or "" while it is held back (part of a character, a special token)."""
        self.tokens.append(token)
        piece = None
        if self.stream is not None:
            try:
                piece = self.stream.step(self.tokenizer._tokenizer, token)
            except Exception:  # e.g. a decoder whose earlier text changes with later tokens: decode windows instead
                log.debug("DecodeStream failed; decoding this row in windows", exc_info=True)
                self.stream = None
        if self.stream is None:
            piece = self._window(final=False)
        if piece:
            self.done = len(self.tokens)
        return piece or ""

    def flush(self) -> str:
        """The text of the tokens still held back, at the end of the row (a character left incomplete decodes to
        U+FFFD, as a whole-reply decode gives it)."""
        piece = self._window(final=True) if self.done < len(self.tokens) else ""
        self.done = len(self.tokens)
        return piece

    def _window(self, final: bool) -> str:
        """The held-back tokens' text, decoded after the CONTEXT tokens before them ("" if still incomplete)."""
        before = (self.context + self.tokens[:self.done])[-self.CONTEXT:]
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        head, text = decode(before), decode(before + self.tokens[self.done:])
        if not final and (len(text) <= len(head) or text.endswith("\ufffd")):
            return ""
        return text[len(head):] if text.startswith(head) else text


class RowText:
    """One row's text as its tokens arrive: `add` returns only new text that no later token can change, so the
    deltas add up exactly to `finish`'s final text. The final text is cut before the first stop string; with `trim`
    (chat replies, as E2PModel.generate gives them) leading and trailing whitespace is dropped, without it
    (/v1/completions) the text is kept exactly. Each step costs time in the new text only: stop strings are
    searched only in the tail the newest piece can complete, never the whole reply. With `each_step` False
    (nothing streamed, no stop string) the caller skips `add` and the tokens are decoded at `finish`."""

    def __init__(self, step: Callable[[int], str], stops: list[str], trim: bool = False, each_step: bool = True,
                 flush: Callable[[], str] | None = None):
        self.step, self.flush = step, flush or (lambda: "")
        self.stops = [x for x in stops if x]
        self.longest = max((len(x) for x in self.stops), default=0)
        self.trim = trim
        self.each_step = each_step or bool(self.stops)
        self.parts: list[str] = []  # the text sent so far, in pieces
        self.held = ""  # text received but not sent: trailing whitespace (trim) or the start of a stop string
        self.begun = False  # trim: the first non-whitespace text has arrived
        self.seen = 0  # tokens taken so far
        self.stopped = False

    @property
    def sent(self) -> str:
        return "".join(self.parts)

    def add(self, tokens: list[int]) -> str:
        """The row's tokens (one more than last time); -> the new delta ("" if nothing is certain yet). Sets
        `stopped` at a stop string."""
        delta = []
        for token in tokens[self.seen:]:
            self.seen += 1
            if not self.stopped:
                delta.append(self._take(self.step(token)))
        return "".join(delta)

    def finish(self, tokens: list[int]) -> tuple[str, str]:
        """The row's tokens; -> (the final text, the last delta that completes what was sent)."""
        delta = self.add(tokens)
        if not self.stopped:
            delta += self._take(self.flush())
        if not self.stopped:
            rest = self.held.rstrip() if self.trim else self.held
            self.held = ""
            self.parts.append(rest)
            delta += rest
        return self.sent, delta

    def _take(self, piece: str) -> str:
        """Add one decoded piece; -> the part of the text that became certain."""
        if self.trim and not self.begun:
            piece = piece.lstrip()
            self.begun = bool(piece)
        if not piece:
            return ""
        text = self.held + piece
        if self.stops:  # only a stop ending in `piece` is new: search the last len(piece) + longest - 1 characters
            start = max(len(text) - len(piece) - self.longest + 1, 0)
            cuts = [i for i in (text.find(x, start) for x in self.stops) if i >= 0]
            if cuts:
                self.stopped, self.held = True, ""
                return self._send(text[:min(cuts)])
        keep = self._stop_start(text)
        if self.trim:
            keep = max(keep, len(text) - len(text.rstrip()))  # trailing whitespace may be trimmed at the end
        self.held = text[len(text) - keep:] if keep else ""
        return self._send(text[:len(text) - keep])

    def _stop_start(self, text: str) -> int:
        """The length of the longest end of `text` that may begin a stop string (held back until it is decided)."""
        best = 0
        for x in self.stops:
            i = text.find(x[0], max(len(text) - len(x) + 1, 0))
            while i >= 0 and len(text) - i > best:
                if x.startswith(text[i:]):
                    best = len(text) - i
                    break
                i = text.find(x[0], i + 1)
        return best

    def _send(self, text: str) -> str:
        if text:
            self.parts.append(text)
        return text
