"""Serve E2P through vLLM: turn (projector, user embedding, chat messages) into vLLM prompt-embeds requests.

vLLM runs the frozen backbone; e2p only computes input embeddings on the client side (the backbone's token
embedding table plus the projector, no transformer layers), so only **input injection** can be sent: a deep
(per-layer key/value) prefix has no vLLM wire format. Start the server with

    vllm serve <backbone> --enable-prompt-embeds

Two request shapes:

* Completions API (`POST /v1/completions`): `prompt_embeds` is the *whole* chat-templated prompt as a
  (seq_len, hidden) tensor with the user's k prefix vectors spliced in, exactly the row `E2PModel.build`
  makes (same template, system prompt, prefix position), so replies match `e2p` itself. vLLM applies no
  chat template here. Works with every vLLM version that has `--enable-prompt-embeds`.
* Chat Completions API (`POST /v1/chat/completions`): only the k prefix vectors travel, as a content part
  `{"type": "prompt_embeds", "data": <base64>}` next to the text parts; the server renders the chat template
  around them. Needs a vLLM version whose docs list prompt embeds for Chat Completions (newer releases).
  The prefix lands inside a message (the system message for prefix_position "start", the first user
  message for "after_system"), a few template tokens away from where it was trained, so prefer the
  Completions form when replies must equal e2p's own.

Wire format: base64 of `torch.save(tensor)` bytes, exactly what vLLM's
`vllm.utils.serial_utils.tensor2base64` produces and what its server expects. This is the one place e2p
writes a torch pickle-based format; it holds one plain tensor, and `decode_tensor` reads it back with
`torch.load(..., weights_only=True)` (no arbitrary objects).
"""
from __future__ import annotations

import base64
import io
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..formatting import Messages

DEEP_ERROR = ("this projector uses deep injection (a key/value prefix in every layer), which vLLM cannot take: "
              "vLLM only accepts input embeddings. Train a projector with `e2p train --injection input` to serve it with vLLM")


def tensor2base64(x: torch.Tensor) -> str:
    """base64(torch.save(x)): the encoding of vLLM's `tensor2base64` (a contiguous CPU tensor)."""
    buf = io.BytesIO()
    torch.save(x.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("utf-8")


def decode_tensor(data: str) -> torch.Tensor:
    """The inverse of `tensor2base64`, loading tensors only (`weights_only=True`)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True)


class VLLMExporter:
    """Builds vLLM request bodies for one E2PModel (backbone + input-injection projector, or none)."""

    def __init__(self, model, dtype: torch.dtype | None = None):  # the torch engine (e2p.model.E2PModel)
        if model.projector is not None and model.config.injection != "input":
            raise ConfigError(DEEP_ERROR)
        if model.projector is not None and model.config.lora_rank:
            raise ConfigError("this projector carries a shared LoRA adapter (e2p train --lora-rank) that changes the "
                              "backbone's layers; prompt embeddings alone would run vLLM's backbone without it: serve "
                              "it with `e2p serve`, or train a projector without --lora-rank for vLLM")
        self.model = model
        self.dtype = dtype  # e.g. torch.bfloat16 to halve the payload; None: the backbone's own dtype

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if self.dtype is not None else x

    def _embedding_list(self, embedding):
        if embedding is None:
            return [None]
        return torch.as_tensor(embedding, dtype=torch.float32).reshape(1, -1)

    @torch.no_grad()
    def prompt_embeds(self, messages: Messages | str, embedding=None, persona_text: str | None = None) -> torch.Tensor:
        """(seq_len, hidden): the templated prompt's input embeddings with the prefix spliced in (E2PModel.build)."""
        was_training = self.model.projector.training if self.model.projector is not None else False
        if self.model.projector is not None:
            self.model.projector.eval()
        try:
            row = self.model.format(messages, persona_text=persona_text)
            batch = self.model.build([row], self._embedding_list(embedding))
        finally:
            if self.model.projector is not None:
                self.model.projector.train(was_training)
        assert bool(batch["attention_mask"].all()), "one row has no padding"
        return self._cast(batch["inputs_embeds"][0])

    @torch.no_grad()
    def prefix_embeds(self, embedding=None) -> torch.Tensor | None:
        """(k, hidden): the user's prefix vectors (E2PModel.prefixes), or None without a prefix."""
        if self.model.projector is None:
            return None
        was_training = self.model.projector.training
        self.model.projector.eval()
        try:
            prefix, has = self.model.prefixes(self._embedding_list(embedding), 1)
        finally:
            self.model.projector.train(was_training)
        return self._cast(prefix[0]) if prefix is not None and bool(has[0]) else None

    def completion_body(self, model_name: str, messages: Messages | str, embedding=None, persona_text: str | None = None,
                        **params: Any) -> dict:
        """Body for POST /v1/completions: {"model", "prompt_embeds": base64, **params (max_tokens, temperature...)}."""
        return {"model": model_name, "prompt_embeds": tensor2base64(self.prompt_embeds(messages, embedding, persona_text)),
                **params}

    def chat_messages(self, messages: Messages | str, embedding=None) -> list[dict]:
        """Messages with the prefix as a `prompt_embeds` content part (system message, or first user message)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = [dict(m) for m in messages]
        if not messages or messages[0].get("role") != "system":
            if self.model.config.system_prompt:
                messages.insert(0, {"role": "system", "content": self.model.config.system_prompt})
        prefix = self.prefix_embeds(embedding)
        if prefix is None:
            return messages
        if self.model.config.prefix_position == "after_sink":
            raise ConfigError("an after_sink prefix sits behind the template's first token, which a chat message cannot "
                              "express: send the whole prompt with completion_body (prompt_embeds) instead")
        part = {"type": "prompt_embeds", "data": tensor2base64(prefix)}
        want = "user" if self.model.config.prefix_position == "after_system" else "system"
        target = next((m for m in messages if m.get("role") == want), None) or next(m for m in messages if m.get("role") == "user")
        content = target.get("content")
        text_parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        target["content"] = [part] + text_parts
        return messages

    def chat_body(self, model_name: str, messages: Messages | str, embedding=None, **params: Any) -> dict:
        """Body for POST /v1/chat/completions with the prefix as a `prompt_embeds` content part."""
        return {"model": model_name, "messages": self.chat_messages(messages, embedding), **params}


class VLLMClient:
    """A small synchronous client for a `vllm serve --enable-prompt-embeds` server (httpx)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None, timeout: float = 120.0,
                 transport=None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout, transport=transport)

    def _post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"vLLM answered {r.status_code} on {path}: {r.text[:500]}")
        return r.json()

    def completions(self, body: dict) -> dict:
        return self._post("completions", body)

    def chat_completions(self, body: dict) -> dict:
        return self._post("chat/completions", body)

    def complete(self, exporter: VLLMExporter, model_name: str, messages: Messages | str, embedding=None,
                 **params: Any) -> str:
        """Reply text via the Completions API (the exact E2P prompt)."""
        out = self.completions(exporter.completion_body(model_name, messages, embedding, **params))
        return out["choices"][0]["text"]

    def chat(self, exporter: VLLMExporter, model_name: str, messages: Messages | str, embedding=None, **params: Any) -> str:
        """Reply text via the Chat Completions API (prefix as a prompt_embeds content part)."""
        out = self.chat_completions(exporter.chat_body(model_name, messages, embedding, **params))
        return out["choices"][0]["message"]["content"]

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def export_batch(exporter: VLLMExporter, model_name: str, prompts: Sequence[Messages | str], embeddings: Sequence,
                 **params: Any) -> list[dict]:
    """One Completions body per (prompt, embedding): vLLM batches concurrent requests itself."""
    return [exporter.completion_body(model_name, p, e, **params) for p, e in zip(prompts, embeddings)]
